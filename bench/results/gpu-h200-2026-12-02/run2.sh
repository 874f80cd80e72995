#!/usr/bin/env bash
# Package segfault steps (in parallel, each its own process), then the recompute profiles (alone).
set -uo pipefail
export PYTHONPATH="$PWD/src" PYTHONUNBUFFERED=1
R=bench/results/gpu-h200-2026-12-02
for s in plain-fp32 plugin-fp32 plain-bf16cl plugin-bf16cl two-packages; do
  (timeout 200 python3 -X faulthandler $R/package_debug.py $s > "$OUT/pkg-$s.txt" 2>&1; echo "rc=$?" >> "$OUT/pkg-$s.txt") &
done
wait
for s in plain-fp32 plugin-fp32 plain-bf16cl plugin-bf16cl two-packages; do echo "== $s"; grep -v "Warning\|warn\|return cls" "$OUT/pkg-$s.txt" | tail -12; done > "$OUT/pkg.txt"
cat "$OUT/pkg.txt" | cut -c1-200
for cfg in "resnet50 64 bfloat16" "resnet50 64 float32" "resnet18 64 bfloat16"; do
  set -- $cfg
  timeout 100 python3 $R/recompute_profile.py --model $1 --batch-size $2 --dtype $3 > "$OUT/prof-$1-$2-$3.txt" 2>&1
done
cat "$OUT"/prof-*.txt | grep -v "^{" | cut -c1-180 | head -150
