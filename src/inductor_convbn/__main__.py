"""``python -m inductor_convbn MODEL``: fold a torchvision model's conv->bn pairs and report."""

from __future__ import annotations

import argparse
import sys

import torch

from . import _registry, _report, _timing, testing

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m inductor_convbn",
        description="Compile a torchvision model with the conv-bn folding plugin, check it "
        "against eager, and time it against plain torch.compile.",
    )
    parser.add_argument("model", help="torchvision model name, e.g. resnet18")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(_DTYPES), default="float32")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument(
        "--policy",
        choices=_registry.POLICIES,
        default="auto",
        help="auto: fold where it pays (default); always: fold every safe pair",
    )
    parser.add_argument(
        "--no-freezing",
        dest="freezing",
        action="store_false",
        help="compile without Inductor freezing: folds are then recomputed on every call, "
        "and the auto policy keeps the pairs where that costs more than the BN",
    )
    parser.add_argument("--no-timing", action="store_true", help="skip the timing comparison")
    args = parser.parse_args(argv)
    if args.batch_size < 1 or args.image_size < 1:
        parser.error("--batch-size and --image-size must be positive")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: CUDA is not available here")
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    try:
        model = testing.torchvision_model(args.model)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    dtype = _DTYPES[args.dtype]
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    model = model.to(device=args.device, dtype=dtype).to(memory_format=memory_format)
    x = torch.randn(
        args.batch_size,
        3,
        args.image_size,
        args.image_size,
        generator=torch.Generator().manual_seed(0),
    )
    x = x.to(device=args.device, dtype=dtype, memory_format=memory_format)

    print(
        f"compiling {args.model} with the plugin "
        f"({args.device}, {args.dtype}, batch {args.batch_size}, "
        f"{'freezing' if args.freezing else 'no freezing'}) ...",
        flush=True,
    )
    report = _report.verify(model, x, policy=args.policy, freezing=args.freezing)
    print(report, flush=True)

    print(
        f"plugin pass: {_registry.pass_time.total_s:.2f} s of compile time "
        f"({_registry.pass_time.tracing_s:.2f} s tracing patterns)",
        flush=True,
    )
    if not args.no_timing:
        print("timing plain torch.compile against torch.compile + plugin ...", flush=True)
        t = _timing.compare_compiled(model, x, policy=args.policy, freezing=args.freezing)
        print(
            f"  per call: torch.compile {t['plain_s'] * 1e3:.3f} ms, "
            f"+ plugin {t['plugin_s'] * 1e3:.3f} ms; ratio {t['ratio']:.2f} "
            f"(rounds {t['ratio_min']:.2f}-{t['ratio_max']:.2f})"
        )
    return 0 if report.outputs_match and not report.missed else 1


if __name__ == "__main__":
    sys.exit(main())
