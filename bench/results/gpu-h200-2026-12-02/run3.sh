#!/usr/bin/env bash
# memory_efficient's time budgets on the H200: every eager config (one process each, alone),
# then compiled ResNet50 batch 256 in DTYPES (argument 1, e.g. "float32 bfloat16"): the compile
# caches filled by one process per variant in parallel, then the timed run.
set -uo pipefail
export PYTHONPATH="$PWD/src" PYTHONUNBUFFERED=1
B=bench/training_budget.py
EXTRA=${EXTRA:-}
DTYPES=${1:-float32}
EAGER_MODELS=${2:-resnet50 resnet18}
EAGER_DTYPES=${3:-float32 bfloat16}
if [ "$EAGER_MODELS" != none ]; then
  for m in $EAGER_MODELS; do for b in 256 64; do for d in $EAGER_DTYPES; do
    timeout 100 python3 $B $EXTRA --model $m --batch-size $b --dtype $d --mode eager \
      --json "$OUT/$m-$b-$d-eager.json" > "$OUT/log-$m-$b-$d-eager.txt" 2>&1 \
      || echo "$m $b $d eager failed: $(tail -2 "$OUT/log-$m-$b-$d-eager.txt")"
  done; done; done
fi
for d in $DTYPES; do
  for v in plain fused "budget=0.1" "budget=0.2" "torch budget=0.5"; do
    timeout 240 python3 $B --model resnet50 --batch-size 256 --dtype $d --mode compiled \
      --budgets 0.1 0.2 --only "$v" > "$OUT/warm-$d-${v// /_}.txt" 2>&1 &
  done
  wait
  timeout 200 python3 $B --model resnet50 --batch-size 256 --dtype $d --mode compiled \
    --budgets 0.1 0.2 --json "$OUT/resnet50-256-$d-compiled.json" > "$OUT/log-resnet50-256-$d-compiled.txt" 2>&1 \
    || echo "compiled $d failed: $(grep -v Warn "$OUT/log-resnet50-256-$d-compiled.txt" | tail -3)"
  grep -h "Error" "$OUT"/warm-$d-*.txt | tail -3
done
cat "$OUT"/log-*.txt | grep -v "Warning\|warn" | grep "^|\|^\*\*"
cat "$OUT"/log-*.txt > "$OUT/logs.txt"; rm -f "$OUT"/log-*.txt "$OUT"/warm-*.txt
