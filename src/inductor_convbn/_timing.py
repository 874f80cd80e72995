"""Side-by-side timing of compiled variants, interleaved so machine noise hits all alike."""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from . import _compat, _report

__all__ = ["compare_compiled"]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _first_call(fn: Callable[..., Any], args: tuple[Any, ...], device: torch.device) -> float:
    start = time.perf_counter()
    fn(*args)
    _sync(device)
    return time.perf_counter() - start


def compare_compiled(
    model: torch.nn.Module, *args: Any, rounds: int = 7, calls: int = 5
) -> dict[str, dict[str, float]]:
    """Compile ``model`` plainly and with the plugin; time the first call and steady state.

    Both compiles run with Inductor's caches off, so their first-call times are honest
    compile times. Steady-state calls alternate between the variants, ``calls`` at a time,
    for ``rounds`` rounds; the median per call is reported in seconds.
    """
    device = next(iter(model.parameters())).device
    with torch.no_grad(), _compat.no_compile_caches():
        plain = torch.compile(_report._fresh_callable(copy.deepcopy(model)))
        plain_first = _first_call(plain, args, device)
        plugin, _ = _report.compile_with_plugin(copy.deepcopy(model))
        plugin_first = _first_call(plugin, args, device)
        samples: dict[str, list[float]] = {"torch.compile": [], "torch.compile + plugin": []}
        for _ in range(rounds):
            for name, fn in (("torch.compile", plain), ("torch.compile + plugin", plugin)):
                _sync(device)
                start = time.perf_counter()
                for _ in range(calls):
                    fn(*args)
                _sync(device)
                samples[name].append((time.perf_counter() - start) / calls)
    first = {"torch.compile": plain_first, "torch.compile + plugin": plugin_first}
    return {
        name: {"first_call_s": first[name], "median_call_s": statistics.median(times)}
        for name, times in samples.items()
    }
