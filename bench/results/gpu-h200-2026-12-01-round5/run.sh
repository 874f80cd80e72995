#!/usr/bin/env bash
# Round 5 on the H200: GPU tests, the coverage cases, the failed zoo cases and timm in half
# precision (in parallel), then the AOTInductor package timing (alone).
set -uo pipefail
export PYTHONPATH="$PWD/src" PYTHONUNBUFFERED=1
R=bench/results/gpu-h200-2026-12-01-round5
python3 -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__, torch.cuda.get_device_name())" > "$OUT/env.txt"
timeout 330 python3 -m pytest -q -p no:cacheprovider -p no:logging -m gpu -rfs tests > "$OUT/gpu-tests.txt" 2>&1 &
timeout 330 python3 bench/gpu_cases.py cuda > "$OUT/gpu-cases.txt" 2>&1 &
timeout 330 python3 "$R/rerun.py" --out "$OUT" > "$OUT/rerun.jsonl" 2> "$OUT/rerun.err" &
wait
tail -3 "$OUT/gpu-tests.txt"; cat "$OUT/gpu-cases.txt" | cut -c1-160
grep -v Warning "$OUT/rerun.jsonl" | cut -c1-400
timeout 170 python3 bench/package_timing.py --device cuda --dtype bfloat16 --channels-last \
  --batch-size 32 --rounds 20 --calls 10 --json "$OUT/package-timing.json" > "$OUT/package-timing.txt" 2>&1
grep -v Warning "$OUT/package-timing.txt" | tail -8
