"""Finding conv -> BatchNorm pairs at module level: what the FX fuser and the training
layer change.

The model is traced with ``torch.fx``; a pair is a layer module whose output goes to a
BatchNorm module, or to a functional ``batch_norm`` reading attributes of the model. Each
pair comes with the module-level reason (if any) that changing its modules would change
what the model computes elsewhere; each front end adds the rules of what it does.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Callable
from typing import Any, cast

import torch
from torch import nn

from . import _pairs

__all__ = [
    "AffinePair",
    "find_affine_pairs",
    "FuseError",
    "ModulePair",
    "find_module_pairs",
    "trace",
]


class FuseError(RuntimeError):
    """The model could not be traced or run; it was not changed.

    ``module`` names the module that was being traced when ``torch.fx`` failed ("" for the
    model's own ``forward``), or is None when the failure was not in tracing.
    """

    def __init__(self, message: str, module: str | None = None) -> None:
        super().__init__(message)
        self.module = module


class _ModulePathTracer(torch.fx.Tracer):
    """The default tracer, remembering which module it was inside when tracing failed."""

    def __init__(self) -> None:
        super().__init__()
        self.failed_in: str | None = None

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        # A fused training layer (inductor_convbn.training) is one step of the graph, and so
        # is a subclass of a layer class that computes as its base, so that it stays one
        # module call that can be folded.
        return (
            getattr(m, "_fx_leaf", False)
            or _pairs.layer_kind_of_module(m, exact=False) is not None
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


def trace(model: nn.Module, *, caller: str, alternative: str) -> torch.fx.GraphModule:
    """``model`` traced by ``torch.fx``; ``FuseError`` naming the module that failed, what
    ``caller`` did not do, and the ``alternative``."""
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
class ModulePair:
    """A layer module whose output goes to a batch norm, in a traced model."""

    layer: torch.fx.Node  # the call_module node of the conv or linear
    bn: torch.fx.Node  # the call_module BN node, or the batch_norm call_function node
    kind: _pairs.LayerKind
    conv: str  # the layer's module path
    bn_name: str  # the BN's module path (a functional BN: the module of its running mean)
    layer_module: nn.Module
    bn_module: nn.Module | None  # None for a functional batch_norm
    running_mean: torch.Tensor | None
    running_var: torch.Tensor | None
    weight: torch.Tensor | None
    bias: torch.Tensor | None
    eps: Any
    training: Any
    layer_calls: int = 1  # how often the model calls the layer module
    bn_calls: int = 1  # and the BN module
    reason: str = ""  # why the pair is left alone; empty while nothing says so
    note: str = ""  # said of a folded pair

    def report(self, status: str, reason: str) -> _pairs.PairReport:
        return _pairs.PairReport(self.conv, self.bn_name, self.kind.name, status, reason)

    def fold_reason(self) -> str:
        """Why folding the BN into the layer would change results, at module level;
        empty when it would not."""
        return (
            self.reason
            or _pairs.reason_not_to_fold(
                self.kind,
                has_running_stats=self.running_mean is not None and self.running_var is not None,
                training=self.training,
                other_users=len(_pairs.data_users(self.layer)) > 1,
            )
            or self.module_reason()
        )

    def module_reason(self, *, moves_bn: bool = False) -> str:
        """Why changing the pair's modules would change what else the model computes.

        ``moves_bn``: the BN module itself is replaced, not only its call here.
        """
        if len(_pairs.data_users(self.layer)) > 1:
            return _pairs.OTHER_USERS
        if self.layer_calls > 1:
            return _pairs.CONV_REUSED
        if moves_bn and self.bn_calls > 1:
            return _pairs.BN_REUSED
        modules = (self.layer_module, self.bn_module)
        if any(m._forward_hooks or m._forward_pre_hooks for m in modules if m is not None):
            return _pairs.HAS_HOOKS
        if not isinstance(self.eps, (int, float)):
            return _pairs.EPS_NOT_CONSTANT
        channels = getattr(
            self.layer_module, "out_features" if self.kind.name == "linear" else "out_channels"
        )
        features = getattr(self.bn_module, "num_features", None)
        if features is None and self.running_mean is not None:
            features = self.running_mean.numel()
        if features is not None and features != channels:
            return _pairs.CHANNELS_DIFFER.format(
                features=features, kind=self.kind.name, channels=channels
            )
        return ""


def find_module_pairs(gm: torch.fx.GraphModule) -> list[ModulePair]:
    """Every layer-module -> batch_norm edge of the traced graph, in graph order.

    ``ModulePair.reason`` says why a functional BN's tensors cannot be read; the rules of
    what a front end does are its own (``fold_reason``, ``module_reason``).
    """
    calls = Counter(n.target for n in gm.graph.nodes if n.op == "call_module")
    pairs = []
    for node in gm.graph.nodes:
        pair = _pair_ending_at(gm, node)
        if pair is not None:
            pair.layer_calls = calls[pair.layer.target]
            pair.bn_calls = calls[node.target] if node.op == "call_module" else 1
            pairs.append(pair)
    return pairs


def _pair_ending_at(gm: torch.fx.GraphModule, node: torch.fx.Node) -> ModulePair | None:
    """The pair whose batch_norm is ``node``, or None when ``node`` ends no pair."""
    reason = ""
    bn_module: nn.Module | None = None
    if node.op == "call_module":
        bn_module = bn = gm.get_submodule(str(node.target))
        if type(bn) not in _pairs.BATCH_NORM_MODULES:
            return None
        source = node.args[0] if node.args else node.kwargs.get("input")
        values = {key: getattr(bn, key) for key in _STAT_KEYS}
        eps, training, bn_name = bn.eps, bn.training, str(node.target)
    elif node.op == "call_function" and node.target in _pairs.BATCH_NORM_FUNCTIONS:
        arguments = _pairs.bind_batch_norm(node.target, node.args, node.kwargs)
        source, eps, training = arguments["input"], arguments["eps"], arguments["training"]
        bn_name = _owner(arguments["running_mean"]) or node.name
        values, reason = _model_tensors(gm, [arguments[key] for key in _STAT_KEYS])
    else:
        return None
    if not isinstance(source, torch.fx.Node) or source.op != "call_module":
        return None  # not a module's output
    layer = gm.get_submodule(str(source.target))
    kind = _pairs.layer_kind_of_module(layer, exact=False)
    if kind is None:
        return None  # not a layer we fold into
    return ModulePair(
        source, node, kind, str(source.target), bn_name, layer, bn_module, **values,
        eps=eps, training=training, reason=reason,
    )  # fmt: skip


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
            return values, _pairs.STATS_NOT_ATTRIBUTES
        value: Any = gm
        for atom in str(argument.target).split("."):
            value = getattr(value, atom)
        if not isinstance(value, torch.Tensor):
            return values, _pairs.STATS_NOT_ATTRIBUTES
        values[key] = value
    return values, ""


def _owner(value: Any) -> str:
    """The module path holding a get_attr target: ``head`` for ``head.running_mean``."""
    if isinstance(value, torch.fx.Node) and value.op == "get_attr":
        return str(value.target).rpartition(".")[0] or "<root>"
    return ""


@dataclasses.dataclass
class AffinePair:
    """A layer module whose output goes only to ``* scale + shift``, one of each per output
    channel, computed from the model's own tensors alone: a frozen BatchNorm traced through
    (torchvision's ``FrozenBatchNorm2d``), found by what it computes."""

    layer: torch.fx.Node  # the call_module node of the conv or linear
    nodes: list[torch.fx.Node]  # the affine map's own nodes, its output first
    kind: _pairs.LayerKind
    conv: str
    bn_name: str  # the module holding the scale's tensors
    layer_module: nn.Module
    scale: torch.Tensor
    shift: torch.Tensor | None
    layer_calls: int = 1

    def report(self, status: str, reason: str) -> _pairs.PairReport:
        return _pairs.PairReport(self.conv, self.bn_name, self.kind.name, status, reason)

    def fold_reason(self) -> str:
        if self.layer_calls > 1:
            return _pairs.CONV_REUSED
        if self.layer_module._forward_hooks or self.layer_module._forward_pre_hooks:
            return _pairs.HAS_HOOKS
        return ""


def find_affine_pairs(gm: torch.fx.GraphModule) -> list[AffinePair]:
    """Every layer module followed by a per-channel affine map of the model's tensors."""
    calls = Counter(n.target for n in gm.graph.nodes if n.op == "call_module")
    pairs = []
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        layer = gm.get_submodule(str(node.target))
        kind = _pairs.layer_kind_of_module(layer, exact=False)
        bound = _pairs.bind_channel_affine(node) if kind is not None else None
        if kind is None or bound is None:
            continue
        owners: list[str] = []
        scale = _constant_value(gm, bound["scale"], owners)
        shift = None if bound["shift"] is None else _constant_value(gm, bound["shift"], owners)
        channels = getattr(layer, "out_features" if kind.name == "linear" else "out_channels")
        operands = [scale] + ([] if bound["shift"] is None else [shift])
        if not all(
            isinstance(t, torch.Tensor)
            and t.is_floating_point()
            and _pairs.is_per_channel(t.shape, kind.batched_rank, channels)
            for t in operands
        ):
            continue  # computed from the input, or not one value per channel: no pair
        # The module whose forward computed the map (fx bakes a scale computed from buffers
        # alone into a constant, so its owner is the call stack, not the tensor's name).
        owned = [o for o in owners if o != "<root>"]
        bn_name = _pairs.describe_node(bound["output"]) if not owned else owned[0]
        pairs.append(
            AffinePair(
                node,
                bound["nodes"],
                kind,
                str(node.target),
                bn_name,
                layer,
                scale,
                shift,
                layer_calls=calls[node.target],
            )  # fmt: skip
        )
    return pairs


def _constant_value(gm: torch.fx.GraphModule, node: Any, owners: list[str]) -> Any:
    """The value of ``node`` when it is computed from the model's attributes alone (each
    owner module's path added to ``owners``), else None."""
    if not isinstance(node, torch.fx.Node):
        return node
    if node.op == "get_attr":
        value: Any = gm
        for atom in str(node.target).split("."):
            value = getattr(value, atom, None)
        owners.append(str(node.target).rpartition(".")[0] or "<root>")
        return value
    if node.op not in ("call_function", "call_method"):
        return None
    missing = False

    def arg(a: torch.fx.Node) -> Any:  # map_arg calls it for the nodes only
        nonlocal missing
        value = _constant_value(gm, a, owners)
        missing = missing or value is None
        return value

    args = torch.fx.node.map_arg(node.args, arg)
    kwargs = torch.fx.node.map_arg(node.kwargs, arg)
    if missing:
        return None
    with torch.no_grad():
        if node.op == "call_method":
            return getattr(args[0], str(node.target))(*args[1:], **kwargs)
        return cast(Callable[..., Any], node.target)(*args, **kwargs)
