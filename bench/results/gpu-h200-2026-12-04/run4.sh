#!/usr/bin/env bash
# Call 4: four ResNet18 configs compiled side by side, then timed one at a time after all
# have compiled (bench/cudnn_fusion.py --barrier --lock).
set -uo pipefail
out=${OUT:?}
export PYTHONPATH=$PWD/src:$PWD/bench PYTHONUNBUFFERED=1 TORCHINDUCTOR_CACHE_DIR=/tmp/ind-cache
mkdir -p "$out/json" /tmp/logs /tmp/barrier
n=4
run() {  # name, args...
  local name=$1; shift
  timeout 430 python3 bench/cudnn_fusion.py --lock /tmp/timing.lock --barrier /tmp/barrier:$n \
    --json "$out/json/$name.json" "$@" > "/tmp/logs/$name.log" 2>&1 \
    || { echo "$name: rc $?" >> "/tmp/logs/$name.log"; touch /tmp/barrier/$name; }
}
V="compile,freezing,freezing+plugin (no fusion),freezing+plugin,freezing+plugin (always fuse)"
RO="compile,freezing,freezing+plugin,freezing (reduce-overhead),freezing+plugin (no fusion; reduce-overhead),freezing+plugin (reduce-overhead)"
run r18-bf16cl-32 --model resnet18 --dtype bfloat16 --channels-last --batch-size 32 --variants "$V,jit.freeze" --rounds 30 &
run r18-f32-32 --model resnet18 --dtype float32 --batch-size 32 --variants "compile,freezing,freezing+plugin (no fusion),freezing+plugin" --rounds 30 &
run r18-bf16cl-256 --model resnet18 --dtype bfloat16 --channels-last --batch-size 256 --variants "compile,freezing,freezing+plugin (no fusion),freezing+plugin" --calls 3 &
run r18-bf16cl-1 --model resnet18 --dtype bfloat16 --channels-last --batch-size 1 --variants "$RO" --calls 30 &
wait
for f in /tmp/logs/*.log; do grep -h "^resnet\|rc \|Error:" "$f" | tail -2; done
cat /tmp/logs/*.log > "$out/all.log"
