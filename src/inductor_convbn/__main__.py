"""``inductor-convbn`` (also ``python -m inductor_convbn``): report and time the plugin on a model.

``report MODEL`` compiles the model with the plugin, checks it against eager and prints each
conv -> bn pair; ``bench MODEL`` times plain ``torch.compile`` against ``torch.compile`` with the
plugin. ``report`` is the default: ``python -m inductor_convbn resnet18`` reports on ResNet18.
Argument parsing, model loading and printing only; the work is ``verify()``, ``fx.fuse()`` and
``_harness.compare_compiled``.

torch, torchvision and the rest of the package are imported where first needed, after the
arguments are parsed: importing torch takes seconds, and ``--help``, ``--version`` and a bad
argument should answer at once.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import difflib
import importlib
import json
import logging
import os
import re
import sys
import threading
import time
import traceback
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, TextIO

from . import __version__

if TYPE_CHECKING:
    import torch

    from . import _report

_DTYPES = ("float32", "float16", "bfloat16")
# _decide.POLICIES, which imports torch; tests/test_cli.py keeps the two equal.
_POLICIES = ("auto", "always")
_COMMANDS = ("report", "bench", "export")
_DEFAULT_IMAGE_SIZE = 224
# A model whose first conv is 3-d takes clips: this many frames of this size by default
# (torchvision's video models are trained on 112 x 112).
_DEFAULT_FRAMES, _DEFAULT_CLIP_SIZE = 8, 112
_DEVICE = re.compile(r"(cpu|cuda)(:\d+)?")
# torchvision's model families that build from a name with one input tensor (optical flow
# takes two images; quantized models are classification models again).
_TORCHVISION_FAMILIES = ("classification", "video", "segmentation", "detection")
# Per-round ratios further apart than this factor say the machine, not the plugin, set the
# times: the ratio of the medians then means nothing.
_NOISY_SPREAD = 2.0
_TICK_S = 1.0  # how often the progress line on a terminal is redrawn
_PLOT_EXTRA = "pip install 'inductor_convbn[plot]'"

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
        help="a torchvision model name: classification, video, segmentation, or detection "
        "(its backbone; NAME.backbone for a segmentation model's), with random weights and "
        "BN statistics; or package.module:attribute naming an nn.Module or a function that "
        "returns one when called with no arguments (imported from the current directory too)",
    )
    common.add_argument(
        "--device",
        default=None,
        help="cpu, cuda, cuda:1, ... (default: cuda when available, else cpu)",
    )
    common.add_argument("--dtype", choices=_DTYPES, default="float32")
    common.add_argument(
        "--input-shape",
        metavar="N,C,H,W",
        help="the whole shape of the random input, comma-separated (e.g. 1,3,224,224 or "
        "8,64,32); not together with --batch-size or --image-size",
    )
    common.add_argument(
        "--batch-size", type=int, metavar="N", help="N of the input shape N,C,S,S (default: 1)"
    )
    common.add_argument(
        "--image-size",
        type=int,
        metavar="S",
        help=f"S of the input shape N,C,S,S (default: {_DEFAULT_IMAGE_SIZE}; C is the first "
        f"conv's in_channels; a model whose first conv is 3-d gets N,C,{_DEFAULT_FRAMES},S,S, "
        f"S {_DEFAULT_CLIP_SIZE})",
    )
    common.add_argument(
        "--channels-last", action="store_true", help="model and input in channels_last"
    )
    common.add_argument(
        "--policy",
        choices=_POLICIES,
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
    report.add_argument(
        "--save",
        metavar="PATH",
        help="also fold the model at module level (inductor_convbn.fx.fuse) and torch.save "
        "the folded model's state_dict to PATH, before compiling",
    )
    export = commands.add_parser(
        "export",
        parents=[common],
        help="build an AOTInductor package (.pt2) with every pair folded once, and check it",
        description="torch.export MODEL and build an AOTInductor package of it with the "
        "plugin: every safe conv -> bn pair is folded once, when the package is built. The "
        "package is loaded, run and checked against eager, and each pair shown. Exit status "
        "1 when its output differs from eager or a pair that should have been folded was not.",
    )
    export.add_argument(
        "-o", "--output", metavar="PATH", required=True, help="the package file (.pt2)"
    )
    export.add_argument(
        "--dynamic-batch",
        action="store_true",
        help="export the batch dimension as dynamic, so one package serves every batch size",
    )
    export.add_argument("--json", action="store_true", help="print one JSON object on stdout")
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
    bench.add_argument(
        "--plot",
        metavar="PNG",
        help=f"draw the per-round ratios to this image file (needs matplotlib: {_PLOT_EXTRA})",
    )
    return parser


def _with_default_command(argv: list[str]) -> list[str]:
    """``MODEL ...`` means ``report MODEL ...``; help and version stay top-level."""
    if argv and argv[0] not in (*_COMMANDS, "-h", "--help", "--version"):
        return ["report", *argv]
    return argv


def _parse(argv: list[str]) -> argparse.Namespace:
    """The arguments, checked; torch is imported only once every other check has passed."""
    parser = _parser()
    args = parser.parse_args(_with_default_command(argv))
    if args.command is None:
        parser.error("name a model: inductor-convbn [report|bench] MODEL (see --help)")
    try:
        args.shape = _given_shape(args)
        if args.command == "bench" and (args.rounds < 1 or args.calls < 1):
            raise UsageError("--rounds and --calls must be positive")
        for option in ("save", "plot", "output"):
            _check_output_path(option, getattr(args, option, None))
        if getattr(args, "plot", None) is not None:
            _figure_class()
        _check_device_name(args.device)
        args.device = _device(args.device)
    except UsageError as e:
        parser.error(str(e))
    return args


def _given_shape(args: argparse.Namespace) -> tuple[int, ...] | None:
    """``--input-shape`` as given; None when the model's first conv decides the rank."""
    if args.input_shape is None:
        if (args.batch_size is not None and args.batch_size < 1) or (
            args.image_size is not None and args.image_size < 1
        ):
            raise UsageError("--batch-size and --image-size must be positive")
        return None
    if args.batch_size is not None or args.image_size is not None:
        raise UsageError("--input-shape gives the whole shape: drop --batch-size and --image-size")
    try:
        shape = tuple(int(d) for d in args.input_shape.split(","))
    except ValueError:
        raise UsageError(
            f"--input-shape {args.input_shape}: expected comma-separated integers, e.g. 1,3,224,224"
        ) from None
    if any(d < 1 for d in shape):
        raise UsageError(f"--input-shape {args.input_shape}: every size must be positive")
    _check_layout(args, shape)
    return shape


def _check_layout(args: argparse.Namespace, shape: tuple[int, ...]) -> None:
    if args.channels_last and len(shape) not in (4, 5):
        raise UsageError(f"--channels-last needs a 4-D or 5-D input, not {len(shape)}-D")


def _default_shape(args: argparse.Namespace, model: torch.nn.Module) -> tuple[int, ...]:
    """``N,C,S,S`` with C the first conv's in_channels; ``N,C,T,S,S`` for a 3-d conv."""
    from torch import nn

    first = next((m for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd)), None)
    channels = 3 if first is None else first.in_channels
    batch = 1 if args.batch_size is None else args.batch_size
    if first is not None and len(first.kernel_size) == 3:
        size = _DEFAULT_CLIP_SIZE if args.image_size is None else args.image_size
        shape: tuple[int, ...] = (batch, channels, _DEFAULT_FRAMES, size, size)
    else:
        size = _DEFAULT_IMAGE_SIZE if args.image_size is None else args.image_size
        shape = (batch, channels, size, size)
    _check_layout(args, shape)
    return shape


def _check_output_path(option: str, path: str | None) -> None:
    """Fail before the minutes of compiling rather than after, when PATH cannot be written."""
    if path is None:
        return
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise UsageError(f"--{option} {path}: there is no folder {folder}")
    if os.path.isdir(path):
        raise UsageError(f"--{option} {path}: is a folder; name a file")


def _figure_class() -> Any:
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise UsageError(f"--plot needs matplotlib, not installed here: {_PLOT_EXTRA}") from None
    return Figure


def _check_device_name(name: str | None) -> None:
    if name is not None and not _DEVICE.fullmatch(name):
        raise UsageError(f"--device {name}: not a device this runs on (cpu, cuda, cuda:1, ...)")


def _device(name: str | None) -> torch.device:
    import torch

    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {name}: CUDA is not available here")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"--device {name}: there are {torch.cuda.device_count()} CUDA devices")
    return device


def load_model(spec: str) -> torch.nn.Module:
    """The model ``spec`` names, in eval mode.

    ``package.module:attribute`` imports the module (the current directory is searched too)
    and takes the attribute, which may be dotted: an ``nn.Module`` is used as it is, any
    other callable is called with no arguments and must return one. Anything else is a
    torchvision model name (``torchvision_model``).
    """
    import torch

    if ":" not in spec:
        return torchvision_model(spec)
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


def torchvision_models() -> dict[str, str]:
    """Every torchvision model name the command line builds, and its family."""
    try:
        import torchvision
    except ImportError:
        raise UsageError(
            "torchvision is needed for named models: pip install torchvision"
        ) from None
    models = torchvision.models
    modules = {
        "classification": models,
        "video": models.video,
        "segmentation": models.segmentation,
        "detection": models.detection,
    }
    return {
        name: family
        for family in _TORCHVISION_FAMILIES
        for name in models.list_models(module=modules[family])
    }


def torchvision_model(spec: str) -> torch.nn.Module:
    """The torchvision model ``spec`` names, random weights and BN statistics, in eval mode.

    A detection model is its backbone (the heads take a list of images and return boxes);
    ``NAME.backbone`` names a segmentation model's backbone, or a detection model's again.
    """
    import torch
    import torchvision

    from . import testing

    name, dot, part = spec.partition(".")
    known = torchvision_models()
    if name not in known:
        raise UsageError(_unknown_model(spec, known))
    family = known[name]
    if dot and (part != "backbone" or family not in ("segmentation", "detection")):
        raise UsageError(
            f"{spec!r}: only segmentation and detection models have a part to name "
            f"(NAME.backbone); {name} is a {family} model"
        )
    if family == "classification":
        return testing.torchvision_model(name)
    torch.manual_seed(0)
    # weights_backbone=None: the default would download ImageNet weights for the backbone.
    kwargs = {"weights_backbone": None} if family in ("segmentation", "detection") else {}
    model = torchvision.models.get_model(name, weights=None, **kwargs)
    if family == "detection" or part == "backbone":
        if family == "detection" and not dot:
            print(
                f"{name} is a detection model: using {name}.backbone (its heads take a list "
                "of images)",
                file=sys.stderr,
            )
        model = model.backbone
    return testing.randomize_zero_weights(testing.randomize_batch_norm(model)).eval()


def _unknown_model(spec: str, known: dict[str, str]) -> str:
    close = difflib.get_close_matches(spec.partition(".")[0], known, n=3, cutoff=0.6)
    if close:
        return f"unknown torchvision model {spec!r}; did you mean {' or '.join(close)}?"
    families = ", ".join(_TORCHVISION_FAMILIES)
    return (
        f"unknown torchvision model {spec!r} (torchvision.models.list_models() names the "
        f"{families} models), and not package.module:attribute"
    )


def _one_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


def _where(error: BaseException) -> str:
    """`` at file.py:LINE``: the innermost frame that raised outside torch and this file."""
    import torch

    torch_dir = os.path.dirname(torch.__file__) + os.sep
    frames = [
        f
        for f in traceback.extract_tb(error.__traceback__)
        if not f.filename.startswith(torch_dir) and f.filename != __file__
    ]
    if not frames:
        return ""
    return f" at {os.path.basename(frames[-1].filename)}:{frames[-1].lineno}"


def _prepare(args: argparse.Namespace) -> tuple[torch.nn.Module, torch.Tensor]:
    """The model and a random input, on the device and in the dtype and layout asked for."""
    import torch

    with _progress("loading", args.model, summary=False):
        model = load_model(args.model)
    if args.shape is None:
        args.shape = _default_shape(args, model)
    dtype = getattr(torch, args.dtype)
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
        # The model's own error first: a model can fail on any input, not only on a shape.
        raise UsageError(
            f"{_one_line(e)} (raised{_where(e)} by {args.model} in eager, on a {args.dtype} "
            f"input of shape {','.join(map(str, args.shape))} on {args.device}; another "
            "input: --input-shape)"
        ) from None
    return model, x


def _columns(stream: TextIO) -> int:
    """The terminal's width: $COLUMNS as shutil reads it, else the terminal's own, else 80."""
    with contextlib.suppress(ValueError):
        if int(os.environ.get("COLUMNS", "")) > 0:
            return int(os.environ["COLUMNS"])
    try:
        return os.get_terminal_size(stream.fileno()).columns
    except (AttributeError, ValueError, OSError):
        return 80


class _StatusLine:
    """One line on a terminal, redrawn in place: the phase, the seconds, what is running.

    Cut to the terminal's width, since a line that wraps leaves a copy of itself at every
    redraw. It stands in for ``sys.stderr`` (and for logging handlers that write there)
    while it is shown, so that torch's warnings and logs clear it first and get lines of
    their own instead of landing in the middle of it.
    """

    def __init__(self, stream: TextIO, phase: str, detail: str) -> None:
        self.stream = stream
        self.base = self.phase = phase
        self.detail = detail
        self.start = time.perf_counter()
        self.lock = threading.Lock()
        self.shown = False
        self.mid_line = False  # someone else's line is unfinished: draw nothing over it

    def set_phase(self, phase: str | None) -> None:
        self.phase = phase or self.base
        self.draw()

    def draw(self) -> None:
        with self.lock:
            if self.mid_line:
                return
            text = f"{self.phase} {time.perf_counter() - self.start:.0f} s: {self.detail}"
            width = _columns(self.stream) - 1  # writing the last column wraps on some terminals
            if len(text) > width:
                text = text[: max(width - 3, 0)] + "..."
            self.stream.write(f"\r{text}\033[K")
            self.stream.flush()
            self.shown = True

    def clear(self) -> None:
        with self.lock:
            self._clear()

    def _clear(self) -> None:
        if self.shown:
            self.stream.write("\r\033[K")  # back to the start of the line, and clear it
            self.shown = False

    # What sys.stderr is asked for while the line stands in for it.
    def write(self, text: str) -> int:
        with self.lock:
            self._clear()
            self.stream.write(text)
            if text:
                self.mid_line = not text.endswith("\n")
        return len(text)

    def flush(self) -> None:
        self.stream.flush()

    def isatty(self) -> bool:
        return True

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)


@contextlib.contextmanager
def _standing_in(line: _StatusLine) -> Iterator[None]:
    """``line`` as ``sys.stderr`` and as the stream of logging handlers writing there."""
    real = line.stream
    loggers = [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]
    handlers = [
        h
        for logger in loggers
        if isinstance(logger, logging.Logger)
        for h in logger.handlers
        if isinstance(h, logging.StreamHandler) and h.stream is real
    ]
    sys.stderr = line
    for h in handlers:
        h.setStream(line)
    try:
        yield
    finally:
        sys.stderr = real
        for h in handlers:
            h.setStream(real)


@contextlib.contextmanager
def _progress(phase: str, detail: str, *, summary: bool = True) -> Iterator[None]:
    """What runs, on stderr, and (with ``summary``) the seconds it took.

    On a terminal a line ticks in place, naming the phase of the compile it is in
    (tracing, compiling, then ``phase`` again); elsewhere one line when it starts. Without
    ``summary``, nothing is left of it: nothing at all off a terminal.
    """
    stream = sys.stderr
    start = time.perf_counter()
    if not stream.isatty():
        if summary:
            print(f"{phase}: {detail} ...", file=stream, flush=True)
        try:
            yield
        finally:
            if summary:
                print(f"{phase}: {detail}: {time.perf_counter() - start:.1f} s", file=stream)
        return
    from . import _harness

    line = _StatusLine(stream, phase, detail)
    done = threading.Event()

    def tick() -> None:
        while not done.wait(_TICK_S):
            line.draw()

    ticker = threading.Thread(target=tick, daemon=True)
    line.draw()
    ticker.start()
    try:
        with _standing_in(line), _harness.phase_listener(line.set_phase):
            yield
    finally:
        done.set()
        ticker.join()
        line.clear()
        if summary:
            seconds = time.perf_counter() - start
            print(f"{phase}: {detail}: {seconds:.1f} s", file=stream, flush=True)


def _describe(args: argparse.Namespace) -> str:
    shape = "x".join(map(str, args.shape))
    layout = ", channels_last" if args.channels_last else ""
    return (
        f"{args.model} ({args.device}, {args.dtype}{layout}, input {shape}, "
        f"{'freezing' if args.freezing else 'no freezing'}, policy {args.policy})"
    )


def _report_json(
    args: argparse.Namespace, report: _report.FoldReport, timing: dict[str, Any] | None
) -> dict[str, Any]:
    from . import _decide

    # Every field of the report, so that one it gains shows up here too.
    fields = dataclasses.asdict(report)
    pair_reports = fields.pop("pair_reports")
    return {
        "model": args.model,
        "device": str(args.device),
        "dtype": args.dtype,
        "input_shape": list(args.shape),
        "channels_last": args.channels_last,
        **fields,
        "pairs": report.pairs,
        "kept": report.kept,
        "missed": report.missed,
        "pass_s": _decide.pass_time.total_s,
        "pass_tracing_s": _decide.pass_time.tracing_s,
        "saved": getattr(args, "save", None),
        "timing": timing,
        "pair_reports": pair_reports,
    }


def _time(args: argparse.Namespace, model: torch.nn.Module, x: torch.Tensor) -> dict[str, Any]:
    from . import _harness

    rounds = getattr(args, "rounds", 7)
    calls = getattr(args, "calls", 5)
    what = f"plain torch.compile against torch.compile + plugin, {rounds} rounds of {calls} calls"
    with _progress("timing", what):
        timing = _harness.compare_compiled(
            model, x, policy=args.policy, freezing=args.freezing, rounds=rounds, calls=calls
        )
    timing["noisy"] = timing["ratio_max"] > _NOISY_SPREAD * timing["ratio_min"]
    return timing


def _timing_line(t: dict[str, Any]) -> str:
    """The medians per call and their quotient: the ratio is the two figures beside it."""
    rounds = len(t["plain_rounds_s"])
    return (
        f"per call, median of {rounds} rounds: torch.compile {t['plain_s'] * 1e3:.3f} ms, "
        f"with the plugin {t['plugin_s'] * 1e3:.3f} ms; plugin / plain {t['ratio']:.2f} "
        f"(lower is faster; rounds {t['ratio_min']:.2f}-{t['ratio_max']:.2f})"
    )


def _warn_if_noisy(t: dict[str, Any]) -> None:
    if t["noisy"]:
        print(
            f"warning: the rounds' ratios range from {t['ratio_min']:.2f} to "
            f"{t['ratio_max']:.2f}, too widely for the ratio to mean anything (a busy "
            "machine, or calls too short to time one by one: inductor-convbn bench with "
            "more --calls)",
            file=sys.stderr,
        )


def _save(args: argparse.Namespace, model: torch.nn.Module, x: torch.Tensor) -> None:
    import torch

    from . import fx

    with _progress("tracing", f"{args.model} with torch.fx, to fold it at module level"):
        try:
            fused = fx.fuse(model, x)
        except fx.FuseError as e:
            message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UsageError(
                f"--save folds at module level, through torch.fx: {message} (the plugin "
                "folds inside torch.compile without tracing: drop --save for the report)"
            ) from None
    torch.save(fused.state_dict(), args.save)
    report = fx.fuse_report(fused)
    print(
        f"saved to {args.save}: the state_dict of inductor_convbn.fx.fuse(model) "
        f"({report.folded} of {report.pairs} conv->bn pairs folded); load it with "
        "fx.fuse(model).load_state_dict(torch.load(PATH))",
        file=sys.stderr,
    )


def _run_report(args: argparse.Namespace) -> int:
    from . import _decide, _report

    model, x = _prepare(args)
    if args.save is not None:
        _save(args, model, x)
    with _progress("checking", f"{_describe(args)} with the plugin, against eager"):
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
        print(json.dumps(_report_json(args, report, timing), indent=2, default=str))
    elif timing is not None:
        print(_timing_line(timing), flush=True)
    if timing is not None:
        _warn_if_noisy(timing)
    return _exit_status(report)


def _run_export(args: argparse.Namespace) -> int:
    import torch

    from . import _report

    model, x = _prepare(args)
    dynamic = ({0: torch.export.Dim("batch", min=1)},) if args.dynamic_batch else None
    with _progress("compiling", f"an AOTInductor package of {_describe(args)}"):
        report = _report.verify_package(model, x, dynamic_shapes=dynamic, package_path=args.output)
    if args.json:
        result = {**_report_json(args, report, None), "package": args.output}
        print(json.dumps(result, indent=2, default=str))
    else:
        print(report, flush=True)
        print(
            f"package: {args.output} (load it with torch._inductor.aoti_load_package, or "
            "from C++ with AOTIModelPackageLoader)",
            flush=True,
        )
    return _exit_status(report)


def _exit_status(report: Any) -> int:
    if report.missed:
        print(
            f"error: {len(report.missed)} pair(s) could have been folded but were not "
            f"({', '.join(report.missed)}): a bug in inductor_convbn, please report it",
            file=sys.stderr,
        )
    if not report.outputs_match:
        print("error: the compiled model's output differs from eager", file=sys.stderr)
    return OK if report.outputs_match and not report.missed else FAILED


def _plot(path: str, timing: dict[str, Any], title: str) -> None:
    """Each round's ratio, the ratio of the medians, and 1 (no difference)."""
    ratios = [
        b / a for a, b in zip(timing["plain_rounds_s"], timing["plugin_rounds_s"], strict=True)
    ]
    rounds = range(1, len(ratios) + 1)
    figure = _figure_class()(figsize=(7, 3.5), layout="constrained")
    axes = figure.subplots()
    axes.plot(rounds, ratios, "o-", label="each round")
    axes.axhline(timing["ratio"], color="C1", label=f"medians' ratio {timing['ratio']:.2f}")
    axes.axhline(1.0, color="gray", linestyle=":", linewidth=1)
    axes.set_xticks(list(rounds))
    axes.set_xlabel("round")
    axes.set_ylabel("plugin / plain, per call\n(lower is faster)")
    axes.set_title(title, fontsize="small")
    axes.legend(fontsize="small")
    figure.savefig(path)


def _run_bench(args: argparse.Namespace) -> int:
    model, x = _prepare(args)
    print(_describe(args), file=sys.stderr)
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
        print(_timing_line(timing), flush=True)
    _warn_if_noisy(timing)
    if args.plot is not None:
        _plot(args.plot, timing, _describe(args))
        print(f"plotted the rounds' ratios to {args.plot}", file=sys.stderr)
    return OK


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status (usage errors exit through argparse)."""
    args = _parse(sys.argv[1:] if argv is None else argv)
    try:
        run = {"report": _run_report, "bench": _run_bench, "export": _run_export}
        return run[args.command](args)
    except UsageError as e:
        print(f"inductor-convbn: error: {e}", file=sys.stderr)
        return USAGE
    except KeyboardInterrupt:
        print("inductor-convbn: interrupted", file=sys.stderr)
        return INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
