#!/usr/bin/env bash
# Calls B and C: the zoo cases no round has a result for (issue 15), longest first.
# The results of the calls before this one must be in bench/results (zoo_rest reads them).
set -uo pipefail
out=${OUT:?}
secs=${1:-560}
export PYTHONPATH=$PWD/src:$PWD/bench PYTHONUNBUFFERED=1 TORCHINDUCTOR_CACHE_DIR=/tmp/ind-cache
setsid timeout $((secs + 5)) python3 bench/results/gpu-h200-2026-12-03/zoo_rest.py --out "$out" \
  --workers 15 --deadline $((secs - 15)) --longest-first > "$out/zoo-rest.txt" 2>&1 & P=$!
wait $P; kill -- -$P 2>/dev/null
grep "cases\|deadline" "$out/zoo-rest.txt"; grep "^\[" "$out/zoo-rest.txt" | grep -v ": ok"
echo "ok lines: $(grep -c ': ok' "$out/zoo-rest.txt")"
