#!/usr/bin/env bash
# Session 2026-12-03 on the H200, call 1: ResNet50 fp32 eager budgets (alone), then the
# compiled fp32 caches warmed in parallel with the large zoo models and the package split
# check, then the compiled fp32 timed run (alone).
set -uo pipefail
export PYTHONPATH="$PWD/src" PYTHONUNBUFFERED=1
R=bench/results/gpu-h200-2026-12-03
python3 -c "import torch; print('torch', torch.__version__, torch.version.cuda, torch.cuda.get_device_name())" > "$OUT/env.txt"
nvidia-smi --query-gpu=driver_version --format=csv >> "$OUT/env.txt" 2>&1
B=bench/training_budget.py
for b in 256 64; do
  timeout 110 python3 $B --model resnet50 --batch-size $b --dtype float32 --mode eager \
    --json "$OUT/resnet50-$b-float32-eager.json" > "$OUT/log-resnet50-$b-float32-eager.txt" 2>&1 \
    || echo "resnet50 $b float32 eager failed: $(tail -2 "$OUT/log-resnet50-$b-float32-eager.txt")"
done
# Not timed from here until the timed run below.
timeout 250 python3 bench/zoo_gpu.py --out "$OUT/zoo" --workers 8 --deadline 240 --modes freezing \
  --models efficientnet_b6 efficientnet_b7 efficientnet_v2_l convnext_large regnet_y_128gf vit_h_14 \
  > "$OUT/zoo.txt" 2>&1 &
ZOO=$!
( for k in cuda cpu cuda-embed; do
    P=/tmp/split-$k.pt2
    timeout 100 python3 $R/package_split.py build $P $k 2>&1 | grep -v Warn | tail -3; echo "build rc=$?"
    timeout 60 python3 $R/package_split.py load $P $k 2>&1 | grep -v Warn | tail -6; echo "load $k rc=${PIPESTATUS[0]}"
  done ) > "$OUT/package-split.txt" 2>&1 &
for v in plain fused "budget=0.1" "budget=0.2" "torch budget=0.5"; do
  timeout 240 python3 $B --model resnet50 --batch-size 256 --dtype float32 --mode compiled \
    --budgets 0.1 0.2 --only "$v" > "$OUT/warm-${v// /_}.txt" 2>&1 &
done
wait
pkill -f multiprocessing || true
grep -h "Error" "$OUT"/warm-*.txt | tail -3
timeout 200 python3 $B --model resnet50 --batch-size 256 --dtype float32 --mode compiled \
  --budgets 0.1 0.2 --json "$OUT/resnet50-256-float32-compiled.json" > "$OUT/log-resnet50-256-float32-compiled.txt" 2>&1 \
  || echo "compiled float32 failed: $(grep -v Warn "$OUT/log-resnet50-256-float32-compiled.txt" | tail -3)"
cat "$OUT/package-split.txt"; grep -v Warn "$OUT/zoo.txt" | grep "^\[\|cases ok\|deadline"
cat "$OUT"/log-*.txt | grep -v "Warning\|warn" | grep "^|\|^\*\*"
cat "$OUT"/log-*.txt "$OUT"/warm-*.txt > "$OUT/logs.txt"; rm -f "$OUT"/log-*.txt "$OUT"/warm-*.txt
