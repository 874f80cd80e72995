#!/usr/bin/env bash
# The benchmark suite on a CUDA machine, from the repository root:
#   bash bench/run_gpu_bench.sh OUT_DIR [PYTEST -k EXPRESSION]
# Writes OUT_DIR/gpu-<name>.json (pytest-benchmark) and its log; then, on any machine:
#   python bench/report.py OUT_DIR/*.json
set -uo pipefail
out=${1:?usage: run_gpu_bench.sh OUT_DIR [-k expression]}
select=${2:-}
name=$(echo "${select:-all}" | tr -c 'A-Za-z0-9' '-' | sed 's/-*$//')
mkdir -p "$out"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
python3 -m pytest bench -p no:cacheprovider -p no:logging -q --device cuda \
  ${select:+-k "$select"} --benchmark-json "$out/gpu-$name.json" 2>&1 \
  | grep -v Warning > "$out/gpu-$name.log"
status=${PIPESTATUS[0]}
tail -5 "$out/gpu-$name.log"
exit "$status"
