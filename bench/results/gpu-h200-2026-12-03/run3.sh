#!/usr/bin/env bash
# Call 3: compiled ResNet50 bf16 batch 256, four variants: the caches filled by one process
# per variant (--warm: no float64 reference, which ran the GPU out of memory in call 2 with
# six processes and the zoo beside them), then the timed run alone.
set -uo pipefail
export PYTHONPATH="$PWD/src" PYTHONUNBUFFERED=1
B=bench/training_budget.py
A="--model resnet50 --batch-size 256 --dtype bfloat16 --mode compiled --budgets 0.1"
for v in plain fused "budget=0.1" "torch budget=0.5"; do
  timeout 260 python3 $B $A --warm --only "$v" > "$OUT/warm-${v// /_}.txt" 2>&1 &
done
wait
grep -h "Error" "$OUT"/warm-*.txt | tail -3
timeout 230 python3 $B $A --json "$OUT/resnet50-256-bfloat16-compiled.json" > "$OUT/log-compiled.txt" 2>&1 \
  || echo "compiled bfloat16 failed: $(grep -v Warn "$OUT/log-compiled.txt" | tail -3)"
grep -v "Warning\|warn" "$OUT/log-compiled.txt" | grep "^|\|^\*\*"
cat "$OUT"/log-*.txt "$OUT"/warm-*.txt > "$OUT/logs.txt"; rm -f "$OUT"/log-*.txt "$OUT"/warm-*.txt
