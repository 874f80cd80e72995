#!/usr/bin/env bash
# The GPU zoo table of docs/zoo.md: every round's results in the order they ran (a later
# result of a case replaces an earlier one), then bench/zoo_gpu.py's table of them.
#   bash bench/results/gpu-h200-2026-12-03-stop28/merge.sh [up-to-round7]
set -euo pipefail
r=bench/results
files=(
  $r/gpu-h200-2026-12-01/zoo-gpu.jsonl
  $r/gpu-h200-2026-12-01-round3/zoo-gpu.jsonl
  $r/gpu-h200-2026-12-01-round3/zoo-gpu-rest-half-freezing.jsonl
  $r/gpu-h200-2026-12-01-round4/zoo-gpu-combined.jsonl
  $r/gpu-h200-2026-12-01-round5/zoo.jsonl
  $r/gpu-h200-2026-12-01-round5/rerun.jsonl
  $r/gpu-h200-2026-12-03/zoo-gpu.jsonl
  $r/gpu-h200-2026-12-04/zoo-round7/zoo-gpu.jsonl
)
[ "${1:-}" = up-to-round7 ] || files+=($r/gpu-h200-2026-12-03-stop28/call{A,B,C}/zoo-gpu.jsonl)
all=$(mktemp)
trap 'rm -f "$all"' EXIT
# The zoo cases on the GPU (lines with a mode; round 5's timm lines have none).
python -c "
import json, sys
for f in sys.argv[1:]:
    for line in open(f):
        r = json.loads(line)
        if 'mode' in r and r.get('device', 'cuda') == 'cuda':
            print(line, end='')" "${files[@]}" > "$all"
PYTHONPATH=src:bench python -c "import sys, zoo_gpu; from pathlib import Path; print(zoo_gpu.table(Path(sys.argv[1])))" "$all"
