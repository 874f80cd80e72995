#!/usr/bin/env bash
# Call 1 on the H200: the cuDNN fusion's GPU tests, then ResNet18/50 configs compiled side
# by side and timed one at a time (bench/cudnn_fusion.py --lock).
set -uo pipefail
out=${OUT:?}
export PYTHONPATH=$PWD/src:$PWD/bench PYTHONUNBUFFERED=1 TORCHINDUCTOR_CACHE_DIR=/tmp/ind-cache
lock=/tmp/timing.lock
run() {  # name, args...
  local name=$1; shift
  timeout 540 python3 bench/cudnn_fusion.py --lock $lock --json "$out/json/$name.json" "$@" \
    > "$out/logs/$name.log" 2>&1 || echo "$name: rc $?" >> "$out/logs/$name.log"
}
mkdir -p "$out/json" "$out/logs"
V5="compile,freezing,freezing+plugin (no fusion),freezing+plugin,jit.freeze"
V6="$V5,freezing+plugin (always fuse)"
run r18-f32-32 --model resnet18 --dtype float32 --batch-size 32 --variants "$V6" &
run r18-bf16cl-32 --model resnet18 --dtype bfloat16 --channels-last --batch-size 32 --variants "$V6" &
run r18-fp16cl-32 --model resnet18 --dtype float16 --channels-last --batch-size 32 --variants "$V6" &
run r18-tf32-32 --model resnet18 --dtype float32 --tf32 --batch-size 32 --variants "$V6" &
run r18-bf16cl-1 --model resnet18 --dtype bfloat16 --channels-last --batch-size 1 --variants "$V6" --calls 30 &
run r18-f32-256 --model resnet18 --dtype float32 --batch-size 256 --variants "$V5" --calls 4 &
run r50-bf16cl-32 --model resnet50 --dtype bfloat16 --channels-last --batch-size 32 --variants "$V5" &
run r50-f32-32 --model resnet50 --dtype float32 --batch-size 32 --variants "$V5" &
timeout 400 python3 -m pytest tests/test_cudnn.py -q -p no:cacheprovider -x > "$out/logs/pytest.log" 2>&1
echo "pytest rc $?" >> "$out/logs/pytest.log"
wait
tail -3 "$out/logs/pytest.log"
for f in "$out"/logs/r*.log; do grep -h "^resnet\|rc \|Error" "$f" | tail -2; done
cat "$out"/logs/*.log > "$out/all.log"; rm -rf "$out/logs"
