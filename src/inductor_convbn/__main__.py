"""``inductor-convbn`` (also ``python -m inductor_convbn``): report and time the plugin on a model.

``report MODEL`` compiles the model with the plugin, checks it against eager and prints each
conv -> bn pair; ``bench MODEL`` times plain ``torch.compile`` against ``torch.compile`` with the
plugin. ``report`` is the default: ``python -m inductor_convbn resnet18`` reports on ResNet18.
Argument parsing, model loading and printing only; the work is ``verify()`` and
``_harness.compare_compiled``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import json
import os
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import torch

from . import __version__, _decide, _harness, _report, testing

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_COMMANDS = ("report", "bench")
_DEFAULT_IMAGE_SIZE = 224

# Exit statuses.
OK, FAILED, USAGE, INTERRUPTED = 0, 1, 2, 130


class UsageError(Exception):
    """A bad argument or a model that cannot be loaded: one line on stderr, exit status 2."""


def _model_options() -> argparse.ArgumentParser:
    """The options ``report`` and ``bench`` share: which model, on what input."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "model",
        metavar="MODEL",
        help="a torchvision model name (e.g. resnet18; random weights and BN statistics), or "
        "package.module:attribute naming an nn.Module or a function that returns one when "
        "called with no arguments (imported from the current directory too)",
    )
    common.add_argument(
        "--device",
        default=None,
        help="cpu, cuda, cuda:1, ... (default: cuda when available, else cpu)",
    )
    common.add_argument("--dtype", choices=sorted(_DTYPES), default="float32")
    common.add_argument(
        "--input-shape",
        metavar="N,C,H,W",
        help="the whole shape of the random input, comma-separated (e.g. 1,3,224,224 or "
        "8,64,32); not together with --batch-size or --image-size",
    )
    common.add_argument(
        "--batch-size", type=int, metavar="N", help="N of the input shape N,3,S,S (default: 1)"
    )
    common.add_argument(
        "--image-size",
        type=int,
        help=f"S of the input shape N,3,S,S (default: {_DEFAULT_IMAGE_SIZE})",
    )
    common.add_argument(
        "--channels-last", action="store_true", help="model and input in channels_last"
    )
    common.add_argument(
        "--policy",
        choices=_decide.POLICIES,
        default="auto",
        help="auto: fold where it pays (default); always: fold every safe pair",
    )
    common.add_argument(
        "--no-freezing",
        dest="freezing",
        action="store_false",
        help="compile without Inductor freezing: folds are then recomputed on every call, "
        "and the auto policy keeps the pairs where that costs more than the BN",
    )
    return common


def _parser() -> argparse.ArgumentParser:
    common = _model_options()
    parser = argparse.ArgumentParser(
        prog="inductor-convbn",
        description="Fold a model's conv -> batch_norm pairs inside torch.compile, check the "
        "result against eager, and time it. 'report' is the default command: "
        "'inductor-convbn resnet18' is 'inductor-convbn report resnet18'.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    report = commands.add_parser(
        "report",
        parents=[common],
        help="compile with the plugin, check against eager, show each conv -> bn pair",
        description="Compile MODEL with the plugin, check it against eager and show each "
        "conv -> bn pair: folded, or kept or skipped and why; then time it against plain "
        "torch.compile. Exit status 1 when the outputs differ from eager or a pair that "
        "should have been folded was not, 2 on a usage error.",
    )
    report.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object on stdout instead of the text report (progress goes to stderr)",
    )
    report.add_argument(
        "--no-timing", action="store_true", help="skip the timing against plain torch.compile"
    )
    bench = commands.add_parser(
        "bench",
        parents=[common],
        help="time plain torch.compile against torch.compile with the plugin",
        description="Time plain torch.compile against torch.compile with the plugin, both "
        "with Inductor freezing (or both without, --no-freezing), calls interleaved.",
    )
    bench.add_argument("--rounds", type=int, default=7, help="timed rounds (default: 7)")
    bench.add_argument("--calls", type=int, default=5, help="calls per round (default: 5)")
    bench.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    return parser


def _with_default_command(argv: list[str]) -> list[str]:
    """``MODEL ...`` means ``report MODEL ...``; help and version stay top-level."""
    if argv and argv[0] not in (*_COMMANDS, "-h", "--help", "--version"):
        return ["report", *argv]
    return argv


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = _parser()
    args = parser.parse_args(_with_default_command(argv))
    if args.command is None:
        parser.error("name a model: inductor-convbn [report|bench] MODEL (see --help)")
    try:
        args.shape = _input_shape(args)
        args.device = _device(args.device)
        if args.command == "bench" and (args.rounds < 1 or args.calls < 1):
            raise UsageError("--rounds and --calls must be positive")
    except UsageError as e:
        parser.error(str(e))
    return args


def _input_shape(args: argparse.Namespace) -> tuple[int, ...]:
    """``--input-shape`` as given, else ``(batch, 3, size, size)`` from the other two."""
    if args.input_shape is not None:
        if args.batch_size is not None or args.image_size is not None:
            raise UsageError(
                "--input-shape gives the whole shape: drop --batch-size and --image-size"
            )
        try:
            shape = tuple(int(d) for d in args.input_shape.split(","))
        except ValueError:
            raise UsageError(
                f"--input-shape {args.input_shape}: expected comma-separated integers, "
                "e.g. 1,3,224,224"
            ) from None
        if any(d < 1 for d in shape):
            raise UsageError(f"--input-shape {args.input_shape}: every size must be positive")
    else:
        batch = 1 if args.batch_size is None else args.batch_size
        size = _DEFAULT_IMAGE_SIZE if args.image_size is None else args.image_size
        if batch < 1 or size < 1:
            raise UsageError("--batch-size and --image-size must be positive")
        shape = (batch, 3, size, size)
    if args.channels_last and len(shape) not in (4, 5):
        raise UsageError(f"--channels-last needs a 4-D or 5-D input, not {len(shape)}-D")
    return shape


def _device(name: str | None) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device {name}: not a device (cpu, cuda, cuda:1, ...)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {name}: CUDA is not available here")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"--device {name}: there are {torch.cuda.device_count()} CUDA devices")
    elif device.type != "cpu":
        raise UsageError(f"--device {name}: only cpu and cuda are supported")
    return device


def load_model(spec: str) -> torch.nn.Module:
    """The model ``spec`` names, in eval mode.

    ``package.module:attribute`` imports the module (the current directory is searched too)
    and takes the attribute, which may be dotted: an ``nn.Module`` is used as it is, any
    other callable is called with no arguments and must return one. Anything else is a
    torchvision model name, built with random weights and BN statistics.
    """
    if ":" not in spec:
        try:
            return testing.torchvision_model(spec)
        except (ValueError, RuntimeError) as e:
            raise UsageError(str(e)) from None
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise UsageError(f"{spec!r}: expected package.module:attribute")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as e:
        raise UsageError(f"cannot import {module_name!r}: {_one_line(e)}") from None
    for name in attribute.split("."):
        if not hasattr(obj, name):
            raise UsageError(f"{spec!r}: {module_name} has no attribute {attribute!r}")
        obj = getattr(obj, name)
    if not isinstance(obj, torch.nn.Module):
        if not callable(obj):
            raise UsageError(
                f"{spec!r} is of type {type(obj).__name__}, not an nn.Module or a function "
                "returning one"
            )
        try:
            obj = obj()
        except Exception as e:
            raise UsageError(f"{spec}() failed: {_one_line(e)}") from None
        if not isinstance(obj, torch.nn.Module):
            raise UsageError(
                f"{spec}() returned an object of type {type(obj).__name__}, not an nn.Module"
            )
    return obj.eval()


def _one_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


def _prepare(args: argparse.Namespace) -> tuple[torch.nn.Module, torch.Tensor]:
    """The model and a random input, on the device and in the dtype and layout asked for."""
    model = load_model(args.model)
    dtype = _DTYPES[args.dtype]
    x = torch.randn(args.shape, generator=torch.Generator().manual_seed(0))
    model = model.to(device=args.device, dtype=dtype)
    x = x.to(device=args.device, dtype=dtype)
    if args.channels_last:
        layout = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
        model = model.to(memory_format=layout)
        x = x.contiguous(memory_format=layout)
    try:
        with torch.no_grad():
            model(x)
    except Exception as e:
        raise UsageError(
            f"{args.model} does not run on a {args.dtype} input of shape "
            f"{','.join(map(str, args.shape))} on {args.device} ({_one_line(e)}); "
            "see --input-shape"
        ) from None
    return model, x


@contextlib.contextmanager
def _progress(message: str) -> Iterator[None]:
    """``message ...`` on stderr, then the seconds it took; a ticking clock on a terminal."""
    stream = sys.stderr
    start = time.perf_counter()
    done = threading.Event()
    ticker = None
    if stream.isatty():

        def tick() -> None:
            while not done.wait(1.0):
                stream.write(f"\r{message} ... {time.perf_counter() - start:.0f} s")
                stream.flush()

        ticker = threading.Thread(target=tick, daemon=True)
        stream.write(f"{message} ...")
        stream.flush()
        ticker.start()
    else:
        print(f"{message} ...", file=stream, flush=True)
    try:
        yield
    finally:
        done.set()
        if ticker is not None:
            ticker.join()
            stream.write("\r\033[K")  # back to the start of the line, and clear it
        print(f"{message}: {time.perf_counter() - start:.1f} s", file=stream, flush=True)


def _describe(args: argparse.Namespace) -> str:
    shape = "x".join(map(str, args.shape))
    layout = ", channels_last" if args.channels_last else ""
    return (
        f"{args.model} ({args.device}, {args.dtype}{layout}, input {shape}, "
        f"{'freezing' if args.freezing else 'no freezing'}, policy {args.policy})"
    )


def _report_json(
    args: argparse.Namespace, report: _report.FoldReport, timing: dict[str, float] | None
) -> dict[str, Any]:
    return {
        "model": args.model,
        "device": str(args.device),
        "dtype": args.dtype,
        "input_shape": list(args.shape),
        "channels_last": args.channels_last,
        "policy": report.policy,
        "freezing": report.freezing,
        "pairs": report.pairs,
        "folded": report.folded,
        "kept": report.kept,
        "missed": report.missed,
        "max_abs_error": report.max_abs_error,
        "rtol": report.rtol,
        "atol": report.atol,
        "outputs_match": report.outputs_match,
        "fx_graph_cache_hits": report.fx_graph_cache_hits,
        "pass_s": _decide.pass_time.total_s,
        "pass_tracing_s": _decide.pass_time.tracing_s,
        "timing": timing,
        "pair_reports": [dataclasses.asdict(p) for p in report.pair_reports],
    }


def _time(args: argparse.Namespace, model: torch.nn.Module, x: torch.Tensor) -> dict[str, float]:
    rounds = getattr(args, "rounds", 7)
    calls = getattr(args, "calls", 5)
    with _progress("timing plain torch.compile against torch.compile + plugin"):
        return _harness.compare_compiled(
            model, x, policy=args.policy, freezing=args.freezing, rounds=rounds, calls=calls
        )


def _timing_line(t: dict[str, float]) -> str:
    return (
        f"per call: torch.compile {t['plain_s'] * 1e3:.3f} ms, "
        f"+ plugin {t['plugin_s'] * 1e3:.3f} ms; ratio {t['ratio']:.2f} "
        f"(rounds {t['ratio_min']:.2f}-{t['ratio_max']:.2f})"
    )


def _run_report(args: argparse.Namespace) -> int:
    model, x = _prepare(args)
    with _progress(f"compiling {_describe(args)} with the plugin and checking it against eager"):
        report = _report.verify(model, x, policy=args.policy, freezing=args.freezing)
    if not args.json:
        print(report, flush=True)
        print(
            f"plugin pass: {_decide.pass_time.total_s:.2f} s of compile time "
            f"({_decide.pass_time.tracing_s:.2f} s tracing patterns)",
            flush=True,
        )
    timing = None if args.no_timing else _time(args, model, x)
    if args.json:
        print(json.dumps(_report_json(args, report, timing), indent=2))
    elif timing is not None:
        print(_timing_line(timing))
    if report.missed:
        print(
            f"error: {len(report.missed)} pair(s) could have been folded but were not "
            f"({', '.join(report.missed)}): a bug in inductor_convbn, please report it",
            file=sys.stderr,
        )
    if not report.outputs_match:
        print("error: the compiled model's output differs from eager", file=sys.stderr)
    return OK if report.outputs_match and not report.missed else FAILED


def _run_bench(args: argparse.Namespace) -> int:
    model, x = _prepare(args)
    print(f"{_describe(args)}: {args.rounds} rounds of {args.calls} calls", file=sys.stderr)
    timing = _time(args, model, x)
    if args.json:
        result = {
            "model": args.model,
            "device": str(args.device),
            "dtype": args.dtype,
            "input_shape": list(args.shape),
            "channels_last": args.channels_last,
            "policy": args.policy,
            "freezing": args.freezing,
            **timing,
        }
        print(json.dumps(result, indent=2))
    else:
        print(_timing_line(timing))
    return OK


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status (usage errors exit through argparse)."""
    args = _parse(sys.argv[1:] if argv is None else argv)
    try:
        return _run_report(args) if args.command == "report" else _run_bench(args)
    except UsageError as e:
        print(f"inductor-convbn: error: {e}", file=sys.stderr)
        return USAGE
    except KeyboardInterrupt:
        print("inductor-convbn: interrupted", file=sys.stderr)
        return INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
