"""Count what the generated code of each ResNet18 variant launches per call.

    python bench/inspect_code.py --device cuda [--dtype bfloat16 --channels-last] [--batch-size 1]

Prints, per variant, the generated kernels launched, the extern (cuDNN/aten) calls, and the
constants the compiled module holds: a per-call difference between two variants shows here
before it shows in their timings.
"""

from __future__ import annotations

import argparse
import os
import re
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import variants  # noqa: E402
from inductor_convbn import _compat  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    variants.add_model_arguments(parser)
    parser.add_argument(
        "--variants", default="compile,plugin,freezing,freezing+plugin,offline,offline+freezing"
    )
    parser.add_argument("--dump", default=None, help="write each variant's code to this folder")
    args = parser.parse_args()
    model, x = variants.model_and_input(args)
    names = args.variants.split(",")
    factories = variants.build_variants(
        model, cuda=args.device == "cuda", batch_size=args.batch_size, names=names
    )
    for name, factory in factories.items():
        with torch.no_grad():
            _, code = _compat.run_and_get_code(factory(), x)
        text = "\n".join(code)
        if args.dump:
            os.makedirs(args.dump, exist_ok=True)
            with open(os.path.join(args.dump, name.replace("+", "_") + ".py"), "w") as f:
                f.write(text)
        call = text[text.rfind("def call(") :]
        launches = len(re.findall(r"\.run\(|\bcpp_fused_\w+\(", call))
        externs = re.findall(
            r"extern_kernels\.(\w+)\(|aten\.(\w+)\.default\(|torch\.ops\.\w+\.(\w+)\.", call
        )
        kinds: dict[str, int] = {}
        for groups in externs:
            k = next(g for g in groups if g)
            kinds[k] = kinds.get(k, 0) + 1
        print(f"{name:20s} kernels launched {launches:3d}  extern {sum(kinds.values()):3d} {kinds}")


if __name__ == "__main__":
    main()
