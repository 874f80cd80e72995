"""AOTInductor packages timed side by side: ResNet18/50 packaged with the plugin, without
it, and torch.compile + freezing + plugin, all loaded in one process and interleaved.

    python bench/package_timing.py [--model resnet50] [--device cuda] [--dtype bfloat16]
        [--batch-size 32] [--channels-last] [--rounds 20] [--calls 10] [--json OUT]

Each variant is checked against eager first. Ratios are per round, against the package
built without the plugin (lower is faster).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import variants  # noqa: E402
from inductor_convbn import _harness  # noqa: E402
from inductor_convbn.testing import torchvision_model  # noqa: E402

BASELINE = "package"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    variants.add_model_arguments(parser)
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--calls", type=int, default=10)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    dtype = variants.DTYPES[args.dtype]
    model = torchvision_model(args.model).to(args.device, dtype).to(memory_format=fmt)
    x = torch.randn(args.batch_size, 3, args.image_size, args.image_size)
    x = x.to(args.device, dtype).to(memory_format=fmt)
    with torch.no_grad(), _harness.tf32_off():
        expected = model(x)
        folder = tempfile.mkdtemp()

        def package(plugin: bool, freezing: bool = False):
            path = os.path.join(folder, f"{plugin}-{freezing}.pt2")
            config = {"freezing": True} if freezing else None
            built = _harness.build_package(
                copy.deepcopy(model), (x,), path, plugin=plugin, config=config
            )
            return built[1]

        factories = {
            BASELINE: lambda: package(False),
            "package+plugin": lambda: package(True),
            "package+freezing": lambda: package(False, freezing=True),
            "package+freezing+plugin": lambda: package(True, freezing=True),
            "compile+freezing+plugin": lambda: _harness.compile_variant(
                copy.deepcopy(model), config={"freezing": True}
            ),
        }
        tol = 1e-3 if dtype == torch.float32 else 1e-1
        packages = [name for name in factories if name.startswith(BASELINE)]
        built, dropped = variants.prepare(
            factories, x, expected, rtol=tol, atol=tol, not_compiled=packages
        )
        per_call = variants.time_interleaved(built, x, rounds=args.rounds, calls=args.calls)
    stats = {n: variants.ratio_stats(t, per_call[BASELINE]) for n, t in per_call.items()}
    layout = " channels_last" if args.channels_last else ""
    print(f"{args.model} {args.device} {args.dtype} batch {args.batch_size}{layout};", end=" ")
    print(f"{args.rounds} rounds x {args.calls} calls")
    for name, s in stats.items():
        print(
            f"  {name:26s} {s['median_s'] * 1e3:8.3f} ms  vs package {s['ratio']:.3f}"
            f" (rounds {s['ratio_min']:.3f}-{s['ratio_max']:.3f}; folded {built[name].folded})"
        )
    for name, why in dropped.items():
        print(f"  {name}: dropped: {why}")
    if args.json:
        result = {"args": {**vars(args), "json": str(args.json)}, "stats": stats}
        args.json.write_text(json.dumps({**result, "dropped": dropped}, indent=2))


if __name__ == "__main__":
    main()
