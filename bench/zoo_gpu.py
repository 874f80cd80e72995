"""The model zoo on a GPU: every torchvision model of tests/test_zoo.py through ``verify()``
in float32, bfloat16 and float16 channels_last, with freezing and with ``policy="always"``.

    python bench/zoo_gpu.py --out OUT [--workers 14] [--deadline 540] [--batch 8]
    python bench/zoo_gpu.py --out OUT --device cpu --dtypes float32 --modes always --batch 1

Runs the (model, dtype, mode) cases in parallel processes, mobile nets first (the models
whose half-precision pairs were missed), and appends one JSON line per case to
``OUT/zoo-gpu.jsonl`` as it finishes, so a run stopped at ``--deadline`` keeps what it did.
``python bench/zoo_gpu.py --table OUT/zoo-gpu.jsonl`` prints the Markdown table of
docs/zoo.md's GPU section.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import multiprocessing
import os
import sys
import time
import traceback
from collections import Counter, defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DTYPES = ("float32", "bfloat16", "float16")
MODES = ("freezing", "always")
# Tolerance per dtype, times the output's magnitude when that is above 1 (random weights).
TOLERANCE = {"float32": 1e-3, "bfloat16": 1.5e-1, "float16": 5e-2}
FIRST = (
    "mobilenet_v3_large", "mobilenet_v3_small", "efficientnet_b0", "mobilenet_v2",
    "efficientnet_v2_s", "mnasnet1_0", "regnet_y_400mf", "shufflenet_v2_x1_0", "resnet18",
    "resnet50", "convnext_tiny", "lraspp_mobilenet_v3_large.backbone",
    "ssdlite320_mobilenet_v3_large.backbone", "fasterrcnn_mobilenet_v3_large_fpn.backbone",
)  # fmt: skip


def _zoo():
    sys.path.insert(0, str(ROOT / "tests"))
    import test_zoo

    return test_zoo


def run_case(
    name: str, dtype_name: str, mode: str, batch: int, out: str, device: str = "cuda"
) -> dict:
    """One model in one dtype and mode; its result is also appended to ``out``."""
    import torch

    import inductor_convbn

    zoo = _zoo()
    start = time.perf_counter()
    result: dict = {"model": name, "dtype": dtype_name, "mode": mode, "device": device}
    if device == "cpu":
        torch.set_num_threads(1)  # one core per case: the cases run side by side
    try:
        torch._dynamo.reset()
        entry = zoo.ZOO[name]
        model = entry.build()
        x, _ = zoo.smallest_input(model, entry.shapes)
        dtype = getattr(torch, dtype_name)
        shape = (batch, *x.shape[1:])
        x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
        fmt = {4: torch.channels_last, 5: torch.channels_last_3d}.get(x.dim())
        model = model.to(device, dtype)
        x = x.to(device, dtype)
        if fmt is not None:
            model, x = model.to(memory_format=fmt), x.to(memory_format=fmt)
        with torch.no_grad():
            out_eager = model(x)
        leaves = [t for t in torch.utils._pytree.tree_leaves(out_eager) if torch.is_tensor(t)]
        magnitude = max(float(t.abs().max()) for t in leaves)
        tol = TOLERANCE[dtype_name] * max(1.0, magnitude)
        report = inductor_convbn.verify(
            model,
            x,
            freezing=mode == "freezing",
            policy="always",
            rtol=TOLERANCE[dtype_name],
            atol=tol,
        )
        skipped = Counter(r for _, r in report.skipped)
        result.update(
            input="x".join(map(str, x.shape)),
            pairs=report.pairs,
            folded=report.folded,
            missed=report.missed,
            skipped=dict(skipped),
            outputs_match=report.outputs_match,
            error=report.max_abs_error,
            magnitude=magnitude,
            result="ok" if report.outputs_match and not report.missed else "FAILED",
        )
    except Exception as e:
        result.update(result=f"ERROR: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
        result["traceback"] = traceback.format_exc()[-2000:]
    result["seconds"] = round(time.perf_counter() - start, 1)
    with open(out, "a") as f:
        f.write(json.dumps(result) + "\n")
    return result


def _cases(models: list[str], dtypes: list[str], modes: list[str]) -> list[tuple[str, str, str]]:
    return [(m, d, mode) for m in models for mode in modes for d in dtypes[::-1]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path)
    parser.add_argument("--workers", type=int, default=14)
    parser.add_argument("--deadline", type=float, default=540, help="seconds")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtypes", nargs="*", default=list(DTYPES), choices=DTYPES)
    parser.add_argument("--modes", nargs="*", default=list(MODES), choices=MODES)
    parser.add_argument("--models", nargs="*")
    parser.add_argument("--table", type=Path, help="print the table of a results file")
    args = parser.parse_args()
    if args.table:
        print(table(args.table))
        return
    names = list(_zoo().ZOO)
    models = args.models or [n for n in FIRST if n in names] + [n for n in names if n not in FIRST]
    args.out.mkdir(parents=True, exist_ok=True)
    out = str(args.out / "zoo-gpu.jsonl")
    deadline = time.monotonic() + args.deadline
    context = multiprocessing.get_context("spawn")
    pool = concurrent.futures.ProcessPoolExecutor(args.workers, mp_context=context)
    cases = _cases(models, args.dtypes, args.modes)
    futures = [pool.submit(run_case, *case, args.batch, out, args.device) for case in cases]
    done = 0
    for future in concurrent.futures.as_completed(futures, timeout=None):
        done += 1
        r = future.result()
        print(
            f"[{done}/{len(futures)}] {r['model']} {r['dtype']} {r['mode']}: {r['result']}"
            f" {r.get('folded')}/{r.get('pairs')} ({r['seconds']} s)",
            flush=True,
        )
        if time.monotonic() > deadline:
            print(f"deadline: {done} of {len(futures)} cases done", flush=True)
            break
    print(table(Path(out)), flush=True)
    os._exit(0)  # leave the cases still running


def table(path: Path) -> str:
    rows: dict[str, dict[tuple[str, str], dict]] = defaultdict(dict)
    for line in path.read_text().splitlines():
        r = json.loads(line)
        rows[r["model"]][(r["dtype"], r["mode"])] = r
    columns = [(d, m) for m in MODES for d in DTYPES]
    head = "| model | " + " | ".join(f"{d} {m}" for d, m in columns) + " |"
    lines = [head, "| " + " | ".join("---" for _ in range(len(columns) + 1)) + " |"]
    totals = Counter()
    for model, cases in rows.items():
        cells = []
        for c in columns:
            r = cases.get(c)
            if r is None:
                cells.append("not run")
                continue
            if r["result"].startswith("ERROR"):
                cells.append(r["result"][:60].replace("|", "/"))
                continue
            totals["cases"] += 1
            totals["ok"] += r["result"] == "ok"
            totals["pairs"] += r["pairs"]
            totals["folded"] += r["folded"]
            totals["missed"] += len(r["missed"])
            mark = "" if r["result"] == "ok" else " FAILED"
            cells.append(f"{r['folded']}/{r['pairs']}{mark}")
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    summary = (
        f"{totals['ok']} of {totals['cases']} cases ok; {totals['folded']} of {totals['pairs']}"
        f" pairs folded, {totals['missed']} eligible pairs missed"
    )
    return summary + "\n\n" + "\n".join(lines)


if __name__ == "__main__":
    main()
