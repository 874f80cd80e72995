"""The zoo cases on the GPU with no result in any earlier H200 round (every
``bench/results/gpu-h200-*/**/*.jsonl`` line with a mode): freezing first, then *always* in
bfloat16, float32 and float16, small models first.

    PYTHONPATH=$PWD/src python bench/results/gpu-h200-2026-12-03/zoo_rest.py \
        --out $OUT --workers 10 --deadline 300 [--list] [--longest-first]

``--longest-first`` orders the cases by the longest time any earlier round took for the
same model and dtype, longest first, so that the last cases to finish are short ones.
"""

import argparse
import concurrent.futures
import json
import multiprocessing
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "bench/results/gpu-h200-2026-12-01-round4"))
import run_missing  # noqa: E402

import zoo_gpu  # noqa: E402


def _records() -> Iterator[dict]:
    """Every result line of every earlier H200 round."""
    for f in (ROOT / "bench/results").glob("gpu-h200-*/**/*.jsonl"):
        for line in f.read_text().splitlines():
            yield json.loads(line)


def missing() -> list[tuple[str, str, str]]:
    done = set()
    for r in _records():
        if (
            r.get("device", "cuda") == "cuda"
            and "mode" in r
            and "result" in r
            and not r["result"].startswith("ERROR")
        ):
            done.add((r["model"], r["dtype"], r["mode"]))
    names = list(zoo_gpu._zoo().ZOO)
    rank = {m: i for i, m in enumerate(run_missing.ORDER)}
    by_size = sorted(names, key=lambda m: (rank.get(m, -1), names.index(m)))
    todo = []
    for mode, dtypes in (
        ("freezing", zoo_gpu.DTYPES),
        ("always", ("bfloat16", "float32", "float16")),
    ):
        todo += [(m, d, mode) for m in by_size for d in dtypes if (m, d, mode) not in done]
    return todo


def longest_first(cases: list[tuple[str, str, str]]) -> list[tuple[str, str, str]]:
    took: dict[tuple[str, str], float] = {}
    for r in _records():
        if "seconds" in r:
            key = (r["model"], r["dtype"])
            took[key] = max(took.get(key, 0.0), r["seconds"])
    return sorted(cases, key=lambda c: -took.get(c[:2], 1e9))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", type=Path)
    p.add_argument("--workers", type=int, default=10)
    p.add_argument("--deadline", type=float, default=300)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--list", action="store_true")
    p.add_argument("--longest-first", action="store_true")
    args = p.parse_args()
    cases = longest_first(missing()) if args.longest_first else missing()
    if args.list:
        print(len(cases), "cases:", " ".join("/".join(c) for c in cases))
        return
    args.out.mkdir(parents=True, exist_ok=True)
    out = str(args.out / "zoo-gpu.jsonl")
    deadline = time.monotonic() + args.deadline
    pool = concurrent.futures.ProcessPoolExecutor(
        args.workers, mp_context=multiprocessing.get_context("spawn")
    )
    futures = [pool.submit(zoo_gpu.run_case, m, d, mode, args.batch, out) for m, d, mode in cases]
    print(f"{len(cases)} cases", flush=True)
    done = 0
    try:
        for future in concurrent.futures.as_completed(
            futures, timeout=max(1.0, deadline - time.monotonic())
        ):
            done += 1
            r = future.result()
            print(
                f"[{done}/{len(futures)}] {r['model']} {r['dtype']} {r['mode']}: "
                f"{r['result'][:120]} {r.get('folded')}/{r.get('pairs')} err {r.get('error')}"
                f" mag {r.get('magnitude')} ({r['seconds']} s)",
                flush=True,
            )
    except concurrent.futures.TimeoutError:
        print(f"deadline: {done} of {len(futures)} cases done", flush=True)
    os._exit(0)  # leave the cases still running (the caller kills them)


if __name__ == "__main__":
    main()
