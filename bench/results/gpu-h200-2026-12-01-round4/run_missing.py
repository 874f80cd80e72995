"""The zoo's freezing cases on the GPU that have no result yet in round3/round4, cheap first.

    PYTHONPATH=$PWD/src python bench/results/gpu-h200-2026-12-01-round4/run_missing.py \
        --out $OUT --workers 14 --deadline 500 [--list]

Each case is bench/zoo_gpu.py's run_case (mode freezing, batch 8); it appends to
OUT/zoo-gpu.jsonl. Order: the models missing only float32 and the small ones first, the huge
ones last (ORDER below, then the rest of the zoo's order).
"""

import argparse
import concurrent.futures
import json
import multiprocessing
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT / "bench"))
import zoo_gpu  # noqa: E402

# The models with all three dtypes missing, roughly by size (compile time), smallest first.
ORDER = (
    "googlenet", "efficientnet_b2", "s3d", "densenet169", "densenet201", "densenet161",
    "resnet101", "efficientnet_b3", "regnet_x_8gf", "regnet_y_8gf", "resnet152",
    "efficientnet_b4", "vgg19", "vgg19_bn", "convnext_base", "efficientnet_v2_m",
    "resnext101_32x8d", "resnext101_64x4d", "wide_resnet101_2", "regnet_x_16gf",
    "regnet_y_16gf", "regnet_x_32gf", "regnet_y_32gf", "efficientnet_b5", "swin_b",
    "swin_v2_b", "vit_l_32", "vit_l_16", "efficientnet_b6", "convnext_large",
    "efficientnet_v2_l", "efficientnet_b7", "regnet_y_128gf", "vit_h_14",
)  # fmt: skip


def missing() -> list[tuple[str, str]]:
    done = set()
    files = list((HERE.parent / "gpu-h200-2026-12-01-round3").glob("*.jsonl"))
    files += list(HERE.glob("*.jsonl"))
    for f in files:
        for line in f.read_text().splitlines():
            r = json.loads(line)
            if r["mode"] == "freezing":
                done.add((r["model"], r["dtype"]))
    names = list(zoo_gpu._zoo().ZOO)
    todo = [(m, d) for m in names for d in zoo_gpu.DTYPES if (m, d) not in done]
    partial = [c for c in todo if sum(m == c[0] for m, _ in todo) < 3]
    rest = [c for c in todo if c not in partial]
    rank = {m: i for i, m in enumerate(ORDER)}
    rest.sort(key=lambda c: (rank.get(c[0], len(ORDER)), names.index(c[0])))
    return partial + rest


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", type=Path)
    p.add_argument("--workers", type=int, default=14)
    p.add_argument("--deadline", type=float, default=500)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--list", action="store_true")
    args = p.parse_args()
    cases = missing()
    if args.list:
        print(len(cases), "cases:", " ".join(f"{m}/{d}" for m, d in cases))
        return
    args.out.mkdir(parents=True, exist_ok=True)
    out = str(args.out / "zoo-gpu.jsonl")
    deadline = time.monotonic() + args.deadline
    pool = concurrent.futures.ProcessPoolExecutor(
        args.workers, mp_context=multiprocessing.get_context("spawn")
    )
    futures = [pool.submit(zoo_gpu.run_case, m, d, "freezing", args.batch, out) for m, d in cases]
    print(f"{len(cases)} cases", flush=True)
    done = 0
    try:
        for future in concurrent.futures.as_completed(
            futures, timeout=max(1.0, deadline - time.monotonic())
        ):
            done += 1
            r = future.result()
            print(
                f"[{done}/{len(futures)}] {r['model']} {r['dtype']}: {r['result'][:120]}"
                f" {r.get('folded')}/{r.get('pairs')} err {r.get('error')} mag"
                f" {r.get('magnitude')} ({r['seconds']} s)",
                flush=True,
            )
    except concurrent.futures.TimeoutError:
        print(f"deadline: {done} of {len(futures)} cases done", flush=True)
    if os.path.exists(out):
        print(zoo_gpu.table(Path(out)), flush=True)
    os._exit(0)  # leave the cases still running


if __name__ == "__main__":
    main()
