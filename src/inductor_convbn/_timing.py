"""Side-by-side timing of compiled variants, interleaved so machine noise hits all alike."""

from __future__ import annotations

import copy
import statistics
import time
from typing import Any

import torch

from . import _report

__all__ = ["compare_compiled"]


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
) -> dict[str, float]:
    """Compile ``model`` plainly and with the plugin, and time them side by side.

    Both variants compile with or without Inductor freezing alike.
    Calls alternate between the variants, ``calls`` at a time, for ``rounds`` rounds. Returns
    the median seconds per call of each, and the median, lowest and highest per-round ratio
    (plugin / plain). Compile time is not compared here: in one process the second compile
    reuses what the first warmed up. The plugin's own share of compile time is
    ``_registry.pass_time``.
    """
    device = next(iter(model.parameters())).device
    with torch.no_grad():
        plain, _ = _report.compile_variant(copy.deepcopy(model), plugin=False, freezing=freezing)
        plugin, _ = _report.compile_variant(copy.deepcopy(model), policy=policy, freezing=freezing)
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
    return {
        "plain_s": statistics.median(per_call["plain"]),
        "plugin_s": statistics.median(per_call["plugin"]),
        "ratio": statistics.median(ratios),
        "ratio_min": min(ratios),
        "ratio_max": max(ratios),
    }
