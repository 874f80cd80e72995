"""Compiling variants of a model in isolation, and timing them side by side.

One place that the verifier, the command line and the benchmarks compile through, so that
each variant gets a code object of its own (dynamo keys its cache on code objects), the
plugin and any Inductor config apply to that variant's compile only, and a config dynamo
reads while it traces (freezing) is on around the first call.
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import itertools
import linecache
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from . import _compat, _cudnn, _pass

__all__ = ["compare_compiled", "compile_variant", "fresh_callable", "phase_listener", "tf32_off"]

# Who hears which phase a compile is in; a context variable, so that a listener sees only
# its own thread's compiles.
_listener: contextvars.ContextVar[Callable[[str | None], None] | None] = contextvars.ContextVar(
    "inductor_convbn_phase_listener", default=None
)


@contextlib.contextmanager
def phase_listener(listener: Callable[[str | None], None]) -> Iterator[None]:
    """Call ``listener`` as compiles in this thread pass through their phases.

    It hears ``"tracing"`` when a compiled variant's first call starts (dynamo traces),
    ``"compiling"`` when a traced graph goes to Inductor, ``"tracing"`` again when that
    compile returns, and ``None`` when the first call is over: back to the caller's phase.
    """
    token = _listener.set(listener)
    try:
        yield
    finally:
        _listener.reset(token)


def _announce(phase: str | None) -> None:
    listener = _listener.get()
    if listener is not None:
        listener(phase)


def fresh_callable(model: Callable[..., Any]) -> Callable[..., Any]:
    """A wrapper with a code object of its own.

    Dynamo keys its cache on code objects: compiling ``model`` itself could reuse code
    compiled earlier for another instance of the same class, with or without the plugin.
    """
    namespace: dict[str, Any] = {"model": model}
    source = "def run(*args, **kwargs):\n    return model(*args, **kwargs)\n"
    filename = f"<inductor_convbn.variant:{next(_wrapper_ids)}>"
    # Without a source file torch.compile (torch < 2.14) wraps the function in one shared
    # frame, whose cache every variant would share: past the recompile limit (8) dynamo
    # would run the model eagerly, silently. With its source in linecache it has one.
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    exec(compile(source, filename, "exec"), namespace)
    return namespace["run"]


_wrapper_ids = itertools.count()


@contextlib.contextmanager
def tf32_off() -> Iterator[None]:
    """TF32 off for matmuls and convolutions, restored on exit."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


class _FirstCall:
    """Calls ``fn``, with Inductor's config patched for its first call (the compile) only.

    The first call is announced to the phase listener.
    """

    def __init__(self, fn: Callable[..., Any], config: dict[str, Any]) -> None:
        self.fn = fn
        self.config = config
        self.called = False

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.called:
            return self.fn(*args, **kwargs)
        self.called = True
        patch = _compat.inductor_config.patch(self.config) if self.config else None
        _announce("tracing")
        try:
            with patch or contextlib.nullcontext():
                return self.fn(*args, **kwargs)
        finally:
            _announce(None)


def compile_variant(
    model: Callable[..., Any],
    *,
    plugin: bool = True,
    policy: str = "auto",
    cudnn_fusion: str = _cudnn.DEFAULT,
    dynamic: bool | None = None,
    config: dict[str, Any] | None = None,
    on_graph: Callable[[torch.fx.GraphModule], Callable[[], None] | None] | None = None,
) -> Callable[..., Any]:
    """``torch.compile`` ``model``, with the plugin or without, under an Inductor config.

    The plugin and ``config`` apply to this compile only; ``config`` is patched around the
    first call too, since dynamo must trace with freezing on to hand parameters over as
    constants. ``on_graph`` sees each graph dynamo captures, before Inductor compiles it;
    it may return a function that takes back what it did, called when that compile fails.
    """
    patches = dict(config or {})

    def backend(gm: torch.fx.GraphModule, example_inputs: Sequence[Any]) -> Any:
        undo = on_graph(gm) if on_graph is not None else None
        plugin_cm = (
            _pass.installed(policy, cudnn_fusion=cudnn_fusion) if plugin else _pass.removed()
        )
        _announce("compiling")
        try:
            with plugin_cm, _compat.inductor_config.patch(patches):
                return _compat.compile_fx(gm, example_inputs)
        except BaseException:
            # Dynamo may discard this graph and trace again (with dynamic shapes, a float
            # it could not keep symbolic restarts the analysis): the graph never runs.
            if callable(undo):
                undo()
            raise
        finally:
            _announce("tracing")  # after a graph break dynamo traces on

    compiled = torch.compile(fresh_callable(model), backend=backend, dynamic=dynamic)
    return _FirstCall(compiled, patches)


def build_package(
    model: torch.nn.Module,
    example_inputs: tuple[Any, ...],
    path: str,
    *,
    plugin: bool = True,
    dynamic_shapes: Any = None,
    config: dict[str, Any] | None = None,
) -> tuple[torch.export.ExportedProgram, Callable[..., Any]]:
    """``torch.export`` ``model`` and build an AOTInductor package of it at ``path``, with
    the plugin or without, under an Inductor ``config`` (``{"freezing": True}``); return the
    exported program and the loaded package."""
    build, load = _compat.aoti_package_functions()
    with torch.no_grad():
        exported = torch.export.export(model, example_inputs, dynamic_shapes=dynamic_shapes)
    plugin_cm = _pass.installed() if plugin else _pass.removed()
    with plugin_cm, torch.no_grad(), _compat.inductor_config.patch(config or {}):
        build(exported, package_path=path)
    return exported, load(path)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def compare_compiled(
    model: torch.nn.Module,
    *args: Any,
    policy: str = "auto",
    freezing: bool = False,
    rounds: int = 7,
    calls: int = 5,
) -> dict[str, Any]:
    """Compile ``model`` plainly and with the plugin, and time them side by side.

    Both variants compile with or without Inductor freezing alike.
    Calls alternate between the variants, ``calls`` at a time, for ``rounds`` rounds. Returns
    the median seconds per call of each (``plain_s``, ``plugin_s``), ``ratio`` = plugin_s /
    plain_s (the quotient of the two figures shown beside it, never contradicting them; it
    lies between the lowest and highest per-round ratio, ``ratio_min`` and ``ratio_max``),
    and each round's seconds per call (``plain_rounds_s``, ``plugin_rounds_s``). Compile
    time is not compared here: in one process the second compile reuses what the first
    warmed up. The plugin's own share of compile time is
    ``_decide.pass_time``.
    """
    device = next(iter(model.parameters())).device
    config = {"freezing": True} if freezing else None
    with torch.no_grad():
        plain = compile_variant(copy.deepcopy(model), plugin=False, config=config)
        plugin = compile_variant(copy.deepcopy(model), policy=policy, config=config)
        for fn in (plain, plugin):
            fn(*args)  # compile
            fn(*args)  # warm up
        per_call: dict[str, list[float]] = {"plain": [], "plugin": []}
        for _ in range(rounds):
            for name, fn in (("plain", plain), ("plugin", plugin)):
                _sync(device)
                start = time.perf_counter()
                for _ in range(calls):
                    fn(*args)
                _sync(device)
                per_call[name].append((time.perf_counter() - start) / calls)
    ratios = [b / a for a, b in zip(per_call["plain"], per_call["plugin"], strict=True)]
    plain_s = statistics.median(per_call["plain"])
    plugin_s = statistics.median(per_call["plugin"])
    return {
        "plain_s": plain_s,
        "plugin_s": plugin_s,
        "ratio": plugin_s / plain_s,
        "ratio_min": min(ratios),
        "ratio_max": max(ratios),
        "plain_rounds_s": per_call["plain"],
        "plugin_rounds_s": per_call["plugin"],
    }
