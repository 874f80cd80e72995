#!/usr/bin/env bash
# Call 1: is the fused path's host cost this package's Python kernel (aten_direct.py micro,
# then three ResNet18 configs compiled side by side and timed one at a time); then zoo
# cases until the call's time is up.
set -uo pipefail
out=${OUT:?}
export PYTHONPATH=$PWD/src:$PWD/bench PYTHONUNBUFFERED=1 TORCHINDUCTOR_CACHE_DIR=/tmp/ind-cache
d=bench/results/gpu-h200-2026-12-02-late
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > "$out/env.txt" 2>&1
timeout 90 python3 $d/aten_direct.py micro > "$out/micro.log" 2>&1
mkdir -p "$out/json" /tmp/logs /tmp/barrier
run() {  # name, args...
  local name=$1; shift
  timeout 240 python3 $d/aten_direct.py model --lock /tmp/timing.lock --barrier /tmp/barrier:3 \
    --json "$out/json/$name.json" "$@" > "/tmp/logs/$name.log" 2>&1 \
    || { echo "$name: rc $?" >> "/tmp/logs/$name.log"; touch /tmp/barrier/$name; }
}
run r18-bf16cl-32 --dtype bfloat16 --channels-last --batch-size 32 &
run r18-f32-32 --dtype float32 --batch-size 32 &
run r18-bf16cl-256 --dtype bfloat16 --channels-last --batch-size 256 --calls 3 &
wait
cat /tmp/logs/*.log > "$out/models.log"
left=$((560 - SECONDS))
echo "zoo gets $left s"
setsid timeout $((left + 5)) python3 bench/results/gpu-h200-2026-12-03/zoo_rest.py --out "$out" \
  --workers 12 --deadline $((left - 25)) > "$out/zoo-rest.txt" 2>&1 & P=$!
wait $P; kill -- -$P 2>/dev/null
grep -v Warn "$out/micro.log" | grep -v "^ "
grep -h "^resnet\|rc \|Error\|aten variant\|Meta" "$out/models.log"
grep "cases\|deadline" "$out/zoo-rest.txt"; grep "^\[" "$out/zoo-rest.txt" | grep -v ": ok"
echo "ok lines: $(grep -c ': ok' "$out/zoo-rest.txt")"
