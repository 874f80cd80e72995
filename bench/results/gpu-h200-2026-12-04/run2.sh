#!/usr/bin/env bash
# Call 2: the GPU tests; where the time goes (diag.py); then two configs timed alone.
set -uo pipefail
out=${OUT:?}
export PYTHONPATH=$PWD/src:$PWD/bench PYTHONUNBUFFERED=1 TORCHINDUCTOR_CACHE_DIR=/tmp/ind-cache
d=bench/results/gpu-h200-2026-12-04
timeout 300 python3 -m pytest tests/test_cudnn.py -q -p no:cacheprovider > "$out/pytest.log" 2>&1 &
python3 $d/diag.py "$out" bfloat16 32 > "$out/diag.log" 2>&1
python3 $d/diag.py "$out" float32 32 >> "$out/diag.log" 2>&1
wait
V="compile,freezing,freezing+plugin (no fusion),freezing+plugin,freezing+plugin (always fuse)"
for cfg in "--dtype bfloat16 --channels-last" "--dtype float32"; do
  timeout 200 python3 bench/cudnn_fusion.py --model resnet18 $cfg --batch-size 32 --variants "$V" --rounds 30 2>&1 | grep -v Warn | tail -2 >> "$out/timing.log"
done
tail -4 "$out/pytest.log"; grep "^==" "$out/diag.log"; cat "$out/timing.log"
