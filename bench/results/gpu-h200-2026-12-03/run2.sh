#!/usr/bin/env bash
# Call 2: the compiled bf16 caches warmed in parallel with the zoo cases not run yet
# (zoo_rest.py), then the compiled bf16 timed run (alone).
set -uo pipefail
export PYTHONPATH="$PWD/src" PYTHONUNBUFFERED=1
R=bench/results/gpu-h200-2026-12-03
B=bench/training_budget.py
BUDGETS="0.05 0.1 0.2"
timeout 290 python3 $R/zoo_rest.py --out "$OUT/zoo" --workers 9 --deadline 280 > "$OUT/zoo-rest.txt" 2>&1 &
for v in plain fused "budget=0.05" "budget=0.1" "budget=0.2" "torch budget=0.5"; do
  timeout 260 python3 $B --model resnet50 --batch-size 256 --dtype bfloat16 --mode compiled \
    --budgets $BUDGETS --only "$v" > "$OUT/warm-${v// /_}.txt" 2>&1 &
done
wait
pkill -f multiprocessing || true
sleep 2
grep -h "Error" "$OUT"/warm-*.txt | tail -3
timeout 220 python3 $B --model resnet50 --batch-size 256 --dtype bfloat16 --mode compiled \
  --budgets $BUDGETS --json "$OUT/resnet50-256-bfloat16-compiled.json" > "$OUT/log-resnet50-256-bfloat16-compiled.txt" 2>&1 \
  || echo "compiled bfloat16 failed: $(grep -v Warn "$OUT/log-resnet50-256-bfloat16-compiled.txt" | tail -3)"
grep -v Warn "$OUT/zoo-rest.txt" | grep "^\[\|cases\|deadline" | grep -v ": ok" ; grep -c ": ok" "$OUT/zoo-rest.txt"
cat "$OUT"/log-*.txt | grep -v "Warning\|warn" | grep "^|\|^\*\*"
cat "$OUT"/log-*.txt "$OUT"/warm-*.txt > "$OUT/logs.txt"; rm -f "$OUT"/log-*.txt "$OUT"/warm-*.txt
