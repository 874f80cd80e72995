#!/usr/bin/env bash
# CUDA checks for the core plugin, run on a GPU machine from the repository root:
#   bash bench/run_gpu_checks.sh [OUT_DIR]
# Runs the whole test suite (the `gpu` tests included) and the main command on ResNet18 in
# fp32 and in bf16 channels_last; logs land in OUT_DIR (default bench/results/gpu-logs).
set -uo pipefail
out=${1:-${OUT:-bench/results/gpu-logs}}
mkdir -p "$out"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
python3 - <<'PY' | tee "$out/environment.txt"
import torch
print("torch", torch.__version__, "| cuda", torch.version.cuda, "|", torch.cuda.get_device_name())
PY
python3 -m pytest -q -p no:cacheprovider -p no:logging -rfs tests > "$out/pytest-full.txt" 2>&1
status=$?
grep -E "^(FAILED|ERROR)|passed|failed" "$out/pytest-full.txt" | tail -20
python3 -m inductor_convbn resnet18 --device cuda 2>&1 | grep -v Warning | tee "$out/resnet18-fp32-b1.txt"
python3 -m inductor_convbn resnet18 --device cuda --dtype bfloat16 --channels-last --batch-size 32 2>&1 \
  | grep -v Warning | tee "$out/resnet18-bf16-cl-b32.txt"
exit "$status"
