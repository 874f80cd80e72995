"""``fuse()``: fold eval BatchNorm into the conv module before it, without ``torch.compile``.

For eager inference, export pipelines and quantization prep: trace the model with
``torch.fx``, replace each conv (or linear) module whose only user is an eval BatchNorm by a
folded copy, drop the BatchNorm, and return the ``torch.fx.GraphModule``::

    from inductor_convbn import fx

    fused = fx.fuse(model.eval())       # `model` itself is left as it is
    print(fx.fuse_report(fused))        # each conv -> bn pair: folded, or skipped and why

The weights come from ``inductor_convbn.fold_conv_bn_weights``, the formula the compiled
plugin uses too.
"""

from __future__ import annotations

import copy
import dataclasses
from collections import Counter
from collections.abc import Callable
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from . import _compat
from ._fold import fold_conv_bn_weights
from ._report import (
    _BN_SIGNATURE,
    _LAYER_MODULES,
    BN_TRAINING,
    FOLDED,
    LINEAR_NOT_2D,
    NO_RUNNING_STATS,
    OTHER_USERS,
    SKIPPED,
    PairReport,
    format_pairs,
)

__all__ = ["FuseError", "FuseReport", "fuse", "fuse_report"]

# Why a pair is not folded, in the words of _report's reasons; these only arise at module level.
CONV_REUSED = "conv module is called more than once: folding would change its other calls"
HAS_HOOKS = "conv or BN module has forward hooks, which folding would drop"
STATS_NOT_ATTRIBUTES = "batch_norm statistics or affine are not attributes of the model"
EPS_NOT_CONSTANT = "batch_norm eps is not a constant"
CONV_NOT_BATCHED = "conv output is not batched: BN normalises dim 1, not the output channels"
# A note on a folded pair, not a reason to skip it.
LINEAR_ASSUMED_2D = "linear output assumed 2-D; pass example inputs to fuse() to check"

_REPORT_KEY = "inductor_convbn.fuse_report"

_LAYER_KINDS: dict[type, str] = dict(_LAYER_MODULES)
# Exact types: a subclass may change forward, and then the fold would not compute it.
_BN_MODULES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
# torch.batch_norm is a builtin without an inspectable signature.
_TORCH_BATCH_NORM_PARAMS = (
    "input",
    "weight",
    "bias",
    "running_mean",
    "running_var",
    "training",
    "momentum",
    "eps",
    "cudnn_enabled",
)


class FuseError(RuntimeError):
    """``fuse()`` could not trace or run the model; the model was not changed.

    ``module`` names the module that was being traced when ``torch.fx`` failed ("" for the
    model's own ``forward``), or is None when the failure was not in tracing.
    """

    def __init__(self, message: str, module: str | None = None) -> None:
        super().__init__(message)
        self.module = module


@dataclasses.dataclass
class FuseReport:
    """What ``fuse()`` found: every conv -> batch_norm pair, and why any was not folded.

    Pairs are named by the model's own module names (``layer1.0.conv1``); a functional
    ``batch_norm`` is named by the module that holds its running mean.
    """

    pair_reports: list[PairReport]

    @property
    def pairs(self) -> int:
        """conv -> batch_norm pairs in the traced graph."""
        return len(self.pair_reports)

    @property
    def folded(self) -> int:
        return sum(p.status == FOLDED for p in self.pair_reports)

    @property
    def skipped(self) -> list[tuple[str, str]]:
        """``(conv, reason)`` for each pair that was not folded."""
        return [(p.conv, p.reason) for p in self.pair_reports if p.status != FOLDED]

    def __str__(self) -> str:
        head = f"inductor_convbn.fx: folded {self.folded} of {self.pairs} conv->bn pairs"
        return format_pairs(head, self.pair_reports)


def fuse(model: nn.Module, *example_inputs: Any) -> torch.fx.GraphModule:
    """Trace a copy of ``model`` with ``torch.fx`` and fold each eval BatchNorm into its conv.

    A pair is a ``Conv1d/2d/3d``, ``ConvTranspose1d/2d/3d`` or ``Linear`` module whose output
    goes only to a ``BatchNorm1d/2d/3d`` (or ``SyncBatchNorm``) module, or to
    ``F.batch_norm`` / ``torch.batch_norm`` reading attributes of the model. Each folded pair
    becomes one new layer module holding the folded weight and bias (a layer without bias gets
    one), in the layer's dtype, device, memory format and ``requires_grad``; BatchNorm modules
    no longer called are removed.

    Left alone, each with its reason in the report: BN in training mode or without running
    statistics, a conv whose output has other users, a conv module called more than once, a
    conv or BN with forward hooks, mismatched channel counts.

    ``example_inputs`` are optional. When given, they run through the traced model once on
    fake tensors (no compute, no state change) to check that each layer output has the rank
    the fold assumes: batched for a conv, 2-D for a linear (BN normalises dim 1). Without
    them, a conv input is assumed batched, and a linear -> BN pair is folded with a note.

    Returns the ``GraphModule``; ``fuse_report()`` gives what was folded. ``model`` is not
    modified. Raises ``FuseError``, naming the module, when ``torch.fx`` cannot trace it.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fuse() takes an nn.Module, got {type(model).__name__}")
    gm = _trace(copy.deepcopy(model))
    pairs = _find_pairs(gm)
    if example_inputs:
        _check_ranks(gm, pairs, example_inputs)
    else:
        for p in pairs:
            if p.kind == "linear" and not p.reason:
                p.note = LINEAR_ASSUMED_2D

    reports = []
    for pair in pairs:
        if pair.reason:
            reports.append(PairReport(pair.conv, pair.bn_name, pair.kind, SKIPPED, pair.reason))
            continue
        _fold(gm, pair)
        reports.append(PairReport(pair.conv, pair.bn_name, pair.kind, FOLDED, pair.note))
    gm.delete_all_unused_submodules()
    gm.graph.lint()
    gm.recompile()
    gm.meta[_REPORT_KEY] = FuseReport(reports)
    return gm


def fuse_report(fused: torch.fx.GraphModule) -> FuseReport:
    """The report of the ``fuse()`` call that made ``fused`` (kept by ``copy.deepcopy``)."""
    report = getattr(fused, "meta", {}).get(_REPORT_KEY)
    if not isinstance(report, FuseReport):
        raise ValueError("this module was not made by inductor_convbn.fx.fuse()")
    return report


class _ModulePathTracer(torch.fx.Tracer):
    """The default tracer, remembering which module it was inside when tracing failed."""

    def __init__(self) -> None:
        super().__init__()
        self.failed_in: str | None = None

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        # A fused training layer (inductor_convbn.training) is one step of the graph, and so
        # is a subclass of a layer class that computes as its base (_layer_kind), so that it
        # stays one module call that can be folded.
        return (
            getattr(m, "_fx_leaf", False)
            or _layer_kind(m) is not None
            or super().is_leaf_module(m, module_qualified_name)
        )

    def call_module(
        self,
        m: nn.Module,
        forward: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> Any:
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            # The innermost module sees the exception first; outer frames keep its name.
            if self.failed_in is None:
                try:
                    self.failed_in = self.path_of_module(m)
                except NameError:  # a module created inside forward, not a submodule
                    self.failed_in = f"<unregistered {type(m).__name__}>"
            raise


def _trace(
    model: nn.Module,
    caller: str = "fuse()",
    alternative: str = "fold without tracing through torch.compile with inductor_convbn.install()",
) -> torch.fx.GraphModule:
    tracer = _ModulePathTracer()
    try:
        graph = tracer.trace(model)
    except Exception as e:
        where = tracer.failed_in or ""
        if where:
            what = f"module {where!r} ({type(_submodule_or_none(model, where)).__name__})"
        else:
            what = f"the forward of {type(model).__name__}"
        raise FuseError(
            f"torch.fx cannot trace {what}: {type(e).__name__}: {e}\n"
            f"{caller} changed nothing. Make that module traceable by torch.fx "
            f"(no Python control flow on tensor values), or {alternative}.",
            module=where,
        ) from e
    return torch.fx.GraphModule(tracer.root, graph, type(model).__name__)


def _submodule_or_none(model: nn.Module, path: str) -> nn.Module | None:
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None


_STAT_KEYS = ("running_mean", "running_var", "weight", "bias")


@dataclasses.dataclass
class _Pair:
    layer: torch.fx.Node  # the call_module node of the conv or linear
    bn: torch.fx.Node  # the call_module BN node, or the batch_norm call_function node
    kind: str  # "conv2d", "conv_transpose1d", "linear", ...
    conv: str  # names for the report
    bn_name: str
    bn_module: nn.Module | None  # None for a functional batch_norm
    running_mean: torch.Tensor | None
    running_var: torch.Tensor | None
    weight: torch.Tensor | None
    bias: torch.Tensor | None
    eps: Any
    training: Any
    reason: str = ""  # why it is not folded; empty when it is
    note: str = ""  # said of a folded pair


def _find_pairs(gm: torch.fx.GraphModule) -> list[_Pair]:
    """Every layer-module -> batch_norm edge of the graph, with the reason not to fold it."""
    calls = Counter(n.target for n in gm.graph.nodes if n.op == "call_module")
    pairs = []
    for node in gm.graph.nodes:
        pair = _pair_ending_at(gm, node)
        if pair is None:
            continue
        pair.reason = pair.reason or _reason_not_to_fold(gm, pair, calls)
        pairs.append(pair)
    return pairs


def _pair_ending_at(gm: torch.fx.GraphModule, node: torch.fx.Node) -> _Pair | None:
    """The pair whose batch_norm is ``node``, or None when ``node`` ends no pair."""
    reason = ""
    bn_module: nn.Module | None = None
    if node.op == "call_module":
        bn_module = bn = gm.get_submodule(str(node.target))
        if type(bn) not in _BN_MODULES:
            return None
        source = node.args[0] if node.args else node.kwargs.get("input")
        values = {key: getattr(bn, key) for key in _STAT_KEYS}
        eps, training, bn_name = bn.eps, bn.training, str(node.target)
    elif node.op == "call_function" and node.target in (F.batch_norm, torch.batch_norm):
        arguments = _batch_norm_arguments(node)
        source, eps, training = arguments["input"], arguments["eps"], arguments["training"]
        bn_name = _owner(arguments["running_mean"]) or node.name
        values, reason = _model_tensors(gm, [arguments[key] for key in _STAT_KEYS])
    else:
        return None
    if not isinstance(source, torch.fx.Node) or source.op != "call_module":
        return None  # not a module's output
    kind = _layer_kind(gm.get_submodule(str(source.target)))
    if kind is None:
        return None  # not a layer we fold into
    return _Pair(
        source, node, kind, str(source.target), bn_name, bn_module, **values,
        eps=eps, training=training, reason=reason,
    )  # fmt: skip


def _layer_kind(module: nn.Module) -> str | None:
    """The kind of a layer module the fold computes: one of the layer classes, or a subclass
    that computes as it does (torchvision's video ``Conv3DSimple``, which adds only a static
    method). A subclass with a forward of its own could compute anything."""
    for cls, kind in _LAYER_KINDS.items():
        if isinstance(module, cls) and all(
            getattr(type(module), name, None) is getattr(cls, name, None)
            for name in ("forward", "_conv_forward")
        ):
            return kind
    return None


def _batch_norm_arguments(node: torch.fx.Node) -> dict[str, Any]:
    if node.target is F.batch_norm:
        bound = _BN_SIGNATURE.bind(*node.args, **node.kwargs)
        bound.apply_defaults()
        return dict(bound.arguments)
    arguments = dict(zip(_TORCH_BATCH_NORM_PARAMS, node.args, strict=False))
    arguments.update(node.kwargs)
    return arguments


def _model_tensors(
    gm: torch.fx.GraphModule, arguments: list[Any]
) -> tuple[dict[str, torch.Tensor | None], str]:
    """A functional batch_norm's tensors, when each is None or an attribute of the model.

    A tensor computed in forward may change from call to call: a fold would freeze it.
    """
    values: dict[str, torch.Tensor | None] = dict.fromkeys(_STAT_KEYS)
    for key, argument in zip(_STAT_KEYS, arguments, strict=True):
        if argument is None:
            continue
        if not isinstance(argument, torch.fx.Node) or argument.op != "get_attr":
            return values, STATS_NOT_ATTRIBUTES
        value: Any = gm
        for atom in str(argument.target).split("."):
            value = getattr(value, atom)
        if not isinstance(value, torch.Tensor):
            return values, STATS_NOT_ATTRIBUTES
        values[key] = value
    return values, ""


def _owner(value: Any) -> str:
    """The module path holding a get_attr target: ``head`` for ``head.running_mean``."""
    if isinstance(value, torch.fx.Node) and value.op == "get_attr":
        return str(value.target).rpartition(".")[0] or "<root>"
    return ""


def _reason_not_to_fold(gm: torch.fx.GraphModule, pair: _Pair, calls: Counter[Any]) -> str:
    """Why folding ``pair`` would change what the model computes; empty when it would not."""
    if pair.running_mean is None or pair.running_var is None:
        return NO_RUNNING_STATS
    if pair.training is not False:
        return BN_TRAINING
    if len(pair.layer.users) > 1:
        return OTHER_USERS
    if calls[pair.layer.target] > 1:
        return CONV_REUSED
    layer = gm.get_submodule(pair.conv)
    if any(m._forward_hooks or m._forward_pre_hooks for m in (layer, pair.bn_module) if m):
        return HAS_HOOKS
    if not isinstance(pair.eps, (int, float)):
        return EPS_NOT_CONSTANT
    channels = getattr(layer, "out_features" if pair.kind == "linear" else "out_channels")
    if pair.running_mean.numel() != channels:
        return f"BN has {pair.running_mean.numel()} features, the {pair.kind} has {channels}"
    return ""


def _check_ranks(gm: torch.fx.GraphModule, pairs: list[_Pair], example_inputs: Any) -> None:
    """Skip pairs whose layer output does not have the rank the fold assumes.

    BN normalises dim 1. That is a conv's channel dim only when the conv input is batched,
    and a linear's feature dim only when its output is 2-D.
    """
    eligible = [p for p in pairs if not p.reason]
    if not eligible:
        return
    ranks: dict[str, int] = {}
    handles = [
        gm.get_submodule(p.conv).register_forward_hook(
            lambda module, args, output, conv=p.conv: ranks.__setitem__(conv, output.dim())
        )
        for p in eligible
    ]
    fake_mode = _compat.FakeTensorMode(allow_non_fake_inputs=True)
    try:
        # Fake parameters and buffers: a BN in training mode updates only the fakes.
        with fake_mode, torch.no_grad():
            state: dict[str, torch.Tensor] = {
                name: fake_mode.from_tensor(t)
                for name, t in [
                    *gm.named_parameters(remove_duplicate=False),
                    *gm.named_buffers(remove_duplicate=False),
                ]
            }
            inputs = tuple(
                fake_mode.from_tensor(a) if isinstance(a, torch.Tensor) else a
                for a in example_inputs
            )
            torch.func.functional_call(gm, state, inputs)
    except Exception as e:
        raise FuseError(
            f"the example inputs did not run through the traced model on fake tensors: "
            f"{type(e).__name__}: {e}\nfuse() changed nothing; call it without example inputs."
        ) from e
    finally:
        for handle in handles:
            handle.remove()
    for p in eligible:
        if p.kind == "linear" and ranks.get(p.conv) != 2:
            p.reason = LINEAR_NOT_2D
        elif p.kind != "linear" and ranks.get(p.conv) != int(p.kind[-2]) + 2:
            p.reason = CONV_NOT_BATCHED


def _fold(gm: torch.fx.GraphModule, pair: _Pair) -> None:
    """Put a folded copy of the layer in its place and route the BN's users to it."""
    layer = gm.get_submodule(pair.conv)
    layer_weight = cast(torch.Tensor, layer.weight)
    layer_bias = cast("torch.Tensor | None", layer.bias)
    assert pair.running_mean is not None and pair.running_var is not None
    with torch.no_grad():
        weight, bias = fold_conv_bn_weights(
            layer_weight,
            layer_bias,
            pair.running_mean,
            pair.running_var,
            float(pair.eps),
            pair.weight,
            pair.bias,
            transposed=pair.kind.startswith("conv_transpose"),
            groups=getattr(layer, "groups", 1),
        )
        # empty_like keeps the weight's strides: channels_last stays channels_last.
        weight = torch.empty_like(layer_weight).copy_(weight)
    grad = layer_weight.requires_grad
    folded = copy.deepcopy(layer)
    folded.weight = nn.Parameter(weight, requires_grad=grad)
    folded.bias = nn.Parameter(
        bias, requires_grad=grad if layer_bias is None else layer_bias.requires_grad
    )
    parent, _, name = pair.conv.rpartition(".")
    setattr(gm.get_submodule(parent), name, folded)

    # A functional batch_norm's get_attr nodes; BN modules no longer called go at the end.
    attr_nodes = [a for a in pair.bn.all_input_nodes if a.op == "get_attr"]
    pair.bn.replace_all_uses_with(pair.layer)
    gm.graph.erase_node(pair.bn)
    for attr in attr_nodes:
        if not attr.users:
            gm.graph.erase_node(attr)
