"""The table of run.sh's cases: one line per case, from each case's JSON line and rc."""

import json
import pathlib
import sys

for out in sorted(pathlib.Path(sys.argv[1]).glob("*.txt.out")):
    lines = out.read_text().splitlines()
    rows = [json.loads(line) for line in lines if line.startswith("{")]
    said = " ".join(
        f"pairs={r['pairs']} folded={r['folded']} match={r['match']} err={r['error']:.3g}"
        for r in rows
    )
    err = out.with_suffix(".err").read_text().splitlines()
    error = next((line for line in reversed(err) if "Error" in line), "")
    print(out.name.removesuffix(".txt.out"), lines[-1], said or error[:160])
