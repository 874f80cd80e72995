"""Compile ResNet18 once in this process and print the compile time as JSON.

Run by bench/test_resnet18.py in a fresh process per measurement, with a fresh Inductor
cache directory: in one process, a second compile reuses the kernels and caches the first
one warmed up, so compile times are only comparable across processes.

    python bench/compile_time.py VARIANT --device cpu --dtype float32 --batch-size 1
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="inductor_convbn-compile-time-")
os.environ["TORCHINDUCTOR_FX_GRAPH_CACHE"] = "0"
os.environ["TORCHINDUCTOR_AUTOGRAD_CACHE"] = "0"

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import variants  # noqa: E402
from inductor_convbn import (
    _decide,  # noqa: E402
)

VARIANTS = ("compile", "plugin", "plugin-always", "freezing", "freezing+plugin")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("variant", choices=VARIANTS)
    variants.add_model_arguments(parser)
    args = parser.parse_args()
    model, x = variants.model_and_input(args)
    factory = variants.build_variants(
        model, cuda=args.device == "cuda", batch_size=args.batch_size, names=[args.variant]
    )[args.variant]
    with torch.no_grad():
        run = factory()
        start = time.perf_counter()
        run(x)
        if args.device == "cuda":
            torch.cuda.synchronize()
        compile_s = time.perf_counter() - start
    print(
        json.dumps(
            {
                "variant": args.variant,
                "compile_s": compile_s,
                "pass_s": _decide.pass_time.total_s,
                "tracing_s": _decide.pass_time.tracing_s,
            }
        )
    )


if __name__ == "__main__":
    main()
