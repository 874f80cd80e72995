"""The plugin's decisions: whether a matched pair can be folded, whether it should be, and
the record of what was decided.

"Can we" and "should we" are apart, as Inductor's ``pad_mm.py`` keeps ``can_pad`` apart
from ``should_pad``: a fold that could change results is never made (``unsafe_*``, under
every policy); a safe fold is made where the policy says it pays (``per_call_cost``).
Each decision is recorded for the verifier and counted in dynamo's counters, under the
names below, which Inductor replays on an FX graph cache hit.
"""

from __future__ import annotations

import dataclasses
import itertools
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from . import _compat, _pairs
from ._fold import fold_conv_bn_weights

__all__ = [
    "COUNTER_CUDNN_FUSED",
    "COUNTER_FOLDED",
    "COUNTER_KEPT",
    "COUNTER_UNSAFE",
    "POLICIES",
    "STAGES",
    "Decision",
    "check_choice",
    "pass_time",
    "per_call_cost",
    "record",
    "record_fusion",
    "take_fusions",
    "take_decisions",
    "unsafe_frozen",
    "unsafe_unknown_values",
]

#: ``"auto"`` folds where folding pays: every pair under freezing (the folded weights
#: become constants, computed once) and, without freezing, only pairs where folding every
#: call costs less than the batch norm it removes. ``"always"`` folds every safe pair.
POLICIES = ("auto", "always")
#: What each stage of the plugin does: ``"grad"`` folds differentiably in graphs that need
#: gradients (on dynamo's graph, before AOT autograd); ``"freezing"`` folds pairs whose
#: tensors freezing makes constants, so the fold is computed once, at compile time;
#: ``"early"`` counts the grad stage's decisions (``count_marks``) and folds as
#: ``"per_call"`` does, before Inductor's own post-grad passes; ``"per_call"`` folds on the
#: graph Inductor lowers what is left, recomputed every call.
STAGES = ("grad", "freezing", "early", "per_call")

# Dynamo's counters["inductor"] keys, one per outcome.
COUNTER_FOLDED = "inductor_convbn_folded"
COUNTER_KEPT = "inductor_convbn_kept"
COUNTER_UNSAFE = "inductor_convbn_unsafe"
# Convs whose bias (+ residual add) + ReLU run inside cuDNN (``_cudnn``).
COUNTER_CUDNN_FUSED = "inductor_convbn_cudnn_fused"


def check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    """A ``TypeError`` for a value that is not a string, a ``ValueError`` for another string."""
    if not isinstance(value, str):
        raise TypeError(
            f"{name} must be a str, one of {choices}, got {type(value).__name__} {value!r}"
        )
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


# --- The record ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Decision:
    """What the plugin did with one matched pair."""

    layer: str  # where the layer sits, ``_pairs.describe_node``
    folded: bool
    reason: str = ""  # how a pair was folded, or why it was not
    unsafe: bool = False  # not folded because the fold would change results

    @property
    def counter(self) -> str:
        if self.folded:
            return COUNTER_FOLDED
        return COUNTER_UNSAFE if self.unsafe else COUNTER_KEPT


_decisions: list[Decision] = []
_decisions_lock = threading.Lock()


def record(decision: Decision, *, count: bool = True) -> None:
    """Keep ``decision`` for the verifier and count it (``count=False``: ``mark`` counts)."""
    with _decisions_lock:
        _decisions.append(decision)
    if count:
        _compat.counters["inductor"][decision.counter] += 1


# The grad stage runs before AOT autograd, outside any compile whose counters Inductor's
# caches replay: on an AOT autograd cache hit it does not run at all. So it marks the layer
# node it decided on, the mark reaches the forward graph Inductor lowers (AOT autograd
# copies ``meta["custom"]`` onto each node it traces from a marked one), and the per-call
# stage "early" counts the marks there, in a compile the FX graph cache replays counters for.
MARK = "inductor_convbn"
_mark_ids = itertools.count()


def mark(node: torch.fx.Node, decision: Decision) -> None:
    """Record ``decision`` uncounted, and mark ``node`` for ``count_marks`` to count."""
    record(decision, count=False)
    node.meta["custom"] = {**node.meta.get("custom", {}), MARK: (decision.counter, next(_mark_ids))}


def count_marks(graph: torch.fx.Graph) -> int:
    """Count the decisions marked on the nodes of a forward or inference graph (a backward
    graph carries the same marks on the layer's gradient nodes); returns how many."""
    if _compat.is_backward_graph(graph):
        return 0
    marks = set()
    for node in graph.nodes:
        custom = node.meta.get("custom", {})
        if MARK in custom:
            marks.add(custom[MARK])
            # Counted: a later stage over the same graph does not count it again.
            node.meta["custom"] = {k: v for k, v in custom.items() if k != MARK}
    for counter, _ in marks:
        _compat.counters["inductor"][counter] += 1
    return len(marks)


_fusions: list[tuple[str, str]] = []


def record_fusion(layer: str, epilogue: str) -> None:
    """Keep for the verifier, and count, a conv whose ``epilogue`` (what follows the conv:
    "bias+ReLU", "bias+add+ReLU") now runs inside cuDNN's convolution."""
    with _decisions_lock:
        _fusions.append((layer, epilogue))
    _compat.counters["inductor"][COUNTER_CUDNN_FUSED] += 1


def take_fusions() -> list[tuple[str, str]]:
    """The ``record_fusion`` records since the last call, oldest first."""
    with _decisions_lock:
        fusions = list(_fusions)
        _fusions.clear()
    return fusions


def take_decisions() -> list[Decision]:
    """The decisions since the last call, oldest first."""
    with _decisions_lock:
        decisions = list(_decisions)
        _decisions.clear()
    return decisions


@dataclasses.dataclass
class PassTime:
    """Seconds this process spent in the plugin's stages: their share of compile time."""

    tracing_s: float = 0.0  # tracing patterns (once per process and structure)
    total_s: float = 0.0  # every stage, tracing included

    @contextmanager
    def timing(self, field: str = "total_s") -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            setattr(self, field, getattr(self, field) + time.perf_counter() - start)


pass_time = PassTime()


# --- Can we fold: safety ------------------------------------------------------------------


def unsafe_frozen(
    tensors: dict[str, torch.Tensor], eps: float, *, transposed: bool, groups: int
) -> str:
    """Why folding these known values would change results; "" if it would not.

    ``tensors`` are the fold's arguments by ``fold_conv_bn_weights``'s names: ``w``, ``b``,
    ``mean``, ``var``, ``gamma``, ``beta`` (the optional ones may be missing). A fold in
    float16 can overflow where the conv and the BN apart do not (a large BN scale, a small
    activation); non-finite statistics would be spread into every weight.
    """
    with _compat.unset_fake_temporarily(), torch.no_grad():
        if not all(bool(torch.isfinite(t).all()) for t in tensors.values()):
            return _pairs.STATS_NOT_FINITE
        weight, bias = fold_conv_bn_weights(
            tensors["w"], tensors.get("b"), tensors["mean"], tensors["var"], eps,
            tensors.get("gamma"), tensors.get("beta"), transposed=transposed, groups=groups,
        )  # fmt: skip
        if bool(torch.isfinite(weight).all()) and bool(torch.isfinite(bias).all()):
            return ""
    return _pairs.NOT_FINITE.format(dtype=str(weight.dtype).removeprefix("torch."))


def unsafe_unknown_values(dtype: torch.dtype | None, *, for_grad: bool) -> str:
    """Why folding values not known at compile time could change results; "" if it could not.

    A float16 fold can overflow (bfloat16 has float32's range), and nothing can check it.
    """
    if dtype != torch.float16:
        return ""
    return _pairs.FLOAT16_FOR_GRAD if for_grad else _pairs.FLOAT16_PER_CALL


# --- Should we fold: cost -----------------------------------------------------------------


def per_call_cost(layer: torch.fx.Node, output: torch.fx.Node) -> str:
    """Why folding this pair on every call would cost more than the BN; "" if it pays.

    Without freezing the replacement refolds the weight from the live parameters each
    call: one read and one write of the weight. Removing the BN saves its pass over the
    output only where that pass would run on its own, and only on CPU, where the folded
    bias goes into the conv kernel.
    """
    value = layer.meta.get("val")
    if not isinstance(value, torch.Tensor):
        return ""
    if value.device.type != "cpu":
        return _pairs.KEPT_BIAS_PEELED.format(device=value.device.type.upper())
    users = list(output.users)
    if users and all(torch.Tag.pointwise in getattr(u.target, "tags", ()) for u in users):
        return _pairs.KEPT_FUSED.format(user=", ".join(str(u.target).split(".")[-2] for u in users))
    weight = layer.args[1] if layer.target is torch.ops.aten.convolution.default else layer.args[-1]
    weight_value = weight.meta.get("val") if isinstance(weight, torch.fx.Node) else None
    if not isinstance(weight_value, torch.Tensor):
        return ""
    weight_numel = _compat.int_hint(weight_value.numel())
    output_numel = _compat.int_hint(value.numel())
    if weight_numel is None or output_numel is None or weight_numel <= output_numel:
        return ""
    return _pairs.KEPT_LARGE_WEIGHT.format(weight=weight_numel, output=output_numel)
