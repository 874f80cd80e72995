#!/usr/bin/env bash
# Call A: issue 18's open question (does the fused path gain once the aten ops sit in the
# graph themselves, no Python kernel?) with caches on and no recompile while timing: four
# configs compiled side by side, timed one at a time; then zoo cases (issue 15) and the
# swin_v2 bfloat16 check until the call's time is up.
set -uo pipefail
out=${OUT:?}
export PYTHONPATH=$PWD/src:$PWD/bench PYTHONUNBUFFERED=1 TORCHINDUCTOR_CACHE_DIR=/tmp/ind-cache
late=bench/results/gpu-h200-2026-12-02-late
here=bench/results/gpu-h200-2026-12-03-stop28
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > "$out/env.txt" 2>&1
python3 -c "import torch; print(torch.__version__, torch.backends.cudnn.version())" >> "$out/env.txt"
mkdir -p "$out/json" /tmp/logs /tmp/barrier
run() {  # name, args...
  local name=$1; shift
  timeout 250 python3 $late/aten_direct.py model --lock /tmp/timing.lock --barrier /tmp/barrier:4 \
    --json "$out/json/$name.json" "$@" > "/tmp/logs/$name.log" 2>&1 \
    || { echo "$name: rc $?" >> "/tmp/logs/$name.log"; touch /tmp/barrier/$name; }
}
run r18-bf16cl-32 --dtype bfloat16 --channels-last --batch-size 32 &
run r18-f32-32 --dtype float32 --batch-size 32 &
run r18-bf16cl-256 --dtype bfloat16 --channels-last --batch-size 256 --calls 3 &
run r50-bf16cl-32 --model resnet50 --dtype bfloat16 --channels-last --batch-size 32 &
wait
cat /tmp/logs/*.log > "$out/models.log"
left=$((565 - SECONDS))
echo "zoo gets $left s"
(timeout $((left - 20)) python3 $here/swin_check.py plain; timeout $((left - 20)) python3 $here/swin_check.py plugin) > "$out/swin.log" 2>&1 &
setsid timeout $((left + 5)) python3 bench/results/gpu-h200-2026-12-03/zoo_rest.py --out "$out" \
  --workers 13 --deadline $((left - 25)) > "$out/zoo-rest.txt" 2>&1 & P=$!
wait $P; kill -- -$P 2>/dev/null
grep -h "^resnet\|rc \|Error\|aten variant\|Meta" "$out/models.log"
grep "bf16" "$out/swin.log"
grep "cases\|deadline" "$out/zoo-rest.txt"; grep "^\[" "$out/zoo-rest.txt" | grep -v ": ok"
echo "ok lines: $(grep -c ': ok' "$out/zoo-rest.txt")"
