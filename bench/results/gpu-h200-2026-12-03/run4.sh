#!/usr/bin/env bash
# Call 4: compiled ResNet50 batch 256 at max_overhead=0.05 against plain, fp32 and bf16:
# caches filled in parallel (--warm), then each dtype's timed run alone.
set -uo pipefail
export PYTHONPATH="$PWD/src" PYTHONUNBUFFERED=1
B=bench/training_budget.py
for d in float32 bfloat16; do for v in plain "budget=0.05"; do
  timeout 150 python3 $B --model resnet50 --batch-size 256 --dtype $d --mode compiled --budgets 0.05 \
    --torch-budgets --warm --only "$v" > "$OUT/warm-$d-${v// /_}.txt" 2>&1 &
done; done
wait
grep -h "Error" "$OUT"/warm-*.txt | tail -3
for d in float32 bfloat16; do
  timeout 80 python3 $B --model resnet50 --batch-size 256 --dtype $d --mode compiled --budgets 0.05 \
    --torch-budgets --rounds 5 --json "$OUT/resnet50-256-$d-compiled-0.05.json" > "$OUT/log-$d.txt" 2>&1 \
    || echo "$d failed: $(grep -v Warn "$OUT/log-$d.txt" | tail -3)"
  grep -v "Warning\|warn" "$OUT/log-$d.txt" | grep "^|\|^\*\*"
done
cat "$OUT"/log-*.txt "$OUT"/warm-*.txt > "$OUT/logs.txt"; rm -f "$OUT"/log-*.txt "$OUT"/warm-*.txt
