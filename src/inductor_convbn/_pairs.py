"""What a conv -> batch_norm pair is: the words every front end and the verifier share.

The layer kinds a BN folds into, how a ``batch_norm`` call's arguments bind, the rules that
make a pair foldable wherever it is found, the statuses and reason texts of a report, the
report row and its table, and how a graph node is named after the user's module. Nothing
here finds pairs or folds them: the plugin's stages, the FX fuser, the training layer and
the verifier each walk their own graph and judge what they find with these.
"""

from __future__ import annotations

import dataclasses
import inspect
import operator
import re
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "LAYER_KINDS",
    "LAYER_META",
    "LayerKind",
    "PairReport",
    "PairTable",
    "constant_of",
    "affine_reason",
    "bind_batch_norm",
    "bind_channel_affine",
    "data_users",
    "describe_node",
    "format_pairs",
    "is_per_channel",
    "layer_kind_of_function",
    "layer_kind_of_module",
    "module_name",
    "reason_not_to_fold",
    "start_of_leading_views",
]


# --- Layer kinds --------------------------------------------------------------------------

_CONV_PARAMS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_CONV_TRANSPOSE_PARAMS = (
    "input", "weight", "bias", "stride", "padding", "output_padding", "groups", "dilation",
)  # fmt: skip
_LINEAR_PARAMS = ("input", "weight", "bias")


@dataclasses.dataclass(frozen=True)
class LayerKind:
    """A layer a batch norm folds into: how a model builds it and how dynamo records it."""

    name: str  # "conv2d", "conv_transpose1d", "linear", ...
    rank: int  # spatial dims; 0 for linear
    transposed: bool
    module: type[nn.Module]
    function: Callable[..., Any]  # the call in dynamo's graph (F.conv2d is torch.conv2d)
    params: tuple[str, ...]  # the function's parameters: builtins have no signature

    @property
    def batched_rank(self) -> int:
        """The rank of a batched output: BN normalises dim 1, the channels, only then."""
        return self.rank + 2


LAYER_KINDS: tuple[LayerKind, ...] = (
    LayerKind("conv1d", 1, False, nn.Conv1d, torch.conv1d, _CONV_PARAMS),
    LayerKind("conv2d", 2, False, nn.Conv2d, torch.conv2d, _CONV_PARAMS),
    LayerKind("conv3d", 3, False, nn.Conv3d, torch.conv3d, _CONV_PARAMS),
    LayerKind(
        "conv_transpose1d", 1, True, nn.ConvTranspose1d, torch.conv_transpose1d,
        _CONV_TRANSPOSE_PARAMS,
    ),
    LayerKind(
        "conv_transpose2d", 2, True, nn.ConvTranspose2d, torch.conv_transpose2d,
        _CONV_TRANSPOSE_PARAMS,
    ),
    LayerKind(
        "conv_transpose3d", 3, True, nn.ConvTranspose3d, torch.conv_transpose3d,
        _CONV_TRANSPOSE_PARAMS,
    ),
    LayerKind("linear", 0, False, nn.Linear, F.linear, _LINEAR_PARAMS),
)  # fmt: skip


def _aten_overloads(name: str) -> list[Any]:
    # A graph of aten calls (dynamo tracing a torch.export or pre-dispatch make_fx module)
    # calls the op of the kind's name, ``torch.ops.aten.conv2d.default``, with the
    # torch-level parameters; ``out=`` overloads write elsewhere and are not layers.
    packet = getattr(torch.ops.aten, name)
    return [getattr(packet, o) for o in packet.overloads() if o != "out"]


_BY_FUNCTION = {k.function: k for k in LAYER_KINDS} | {
    op: k for k in LAYER_KINDS for op in _aten_overloads(k.name)
}


def layer_kind_of_function(target: Any) -> LayerKind | None:
    """The layer kind of a ``call_function`` target of dynamo's graph (a torch function,
    or the aten op of the same name and parameters), else None."""
    try:
        return _BY_FUNCTION.get(target)
    except TypeError:  # an unhashable target
        return None


def layer_kind_of_module(module: nn.Module, *, exact: bool = True) -> LayerKind | None:
    """The layer kind of a module: its class exactly or, with ``exact=False``, a subclass
    that computes as its class does (torchvision's video ``Conv3DSimple``, which adds only
    a static method). A subclass with a forward of its own could compute anything."""
    for kind in LAYER_KINDS:
        if type(module) is kind.module:
            return kind
        if not exact and isinstance(module, kind.module):
            if all(
                getattr(type(module), name, None) is getattr(kind.module, name, None)
                for name in ("forward", "_conv_forward")
            ):
                return kind
    return None


def bind_layer(kind: LayerKind, args: Sequence[Any], kwargs: dict[str, Any]) -> dict[str, Any]:
    """A layer call's arguments by parameter name (defaults not filled in); ValueError when
    they do not fit the layer's parameters."""
    if len(args) > len(kind.params) or any(k not in kind.params for k in kwargs):
        raise ValueError(f"arguments do not fit {kind.name}{kind.params}")
    return {**dict(zip(kind.params, args, strict=False)), **kwargs}


# --- batch_norm calls ---------------------------------------------------------------------

_BATCH_NORM_SIGNATURE = inspect.signature(F.batch_norm)
# torch.batch_norm is a builtin without an inspectable signature.
_TORCH_BATCH_NORM_PARAMS = (
    "input", "weight", "bias", "running_mean", "running_var", "training", "momentum", "eps",
    "cudnn_enabled",
)  # fmt: skip
# torch.batch_norm and the aten op share their parameters.
_POSITIONAL_BATCH_NORMS = (torch.batch_norm, torch.ops.aten.batch_norm.default)
BATCH_NORM_FUNCTIONS = (F.batch_norm, *_POSITIONAL_BATCH_NORMS)
# Exact types: a subclass may change forward, and then the fold would not compute it.
BATCH_NORM_MODULES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def bind_batch_norm(target: Any, args: Sequence[Any], kwargs: dict[str, Any]) -> dict[str, Any]:
    """A ``batch_norm`` call's arguments by ``F.batch_norm``'s names, defaults filled in.

    Takes ``F.batch_norm``, ``torch.batch_norm`` and ``aten.batch_norm`` calls,
    positional or by keyword.
    """
    if target in _POSITIONAL_BATCH_NORMS:
        arguments = dict(zip(_TORCH_BATCH_NORM_PARAMS, args, strict=False))
        arguments.update(kwargs)
        arguments.pop("cudnn_enabled", None)
        return arguments
    bound = _BATCH_NORM_SIGNATURE.bind(*args, **kwargs)
    bound.apply_defaults()
    return dict(bound.arguments)


# --- Reading a tensor's metadata ----------------------------------------------------------

# Tensor methods and attributes that read metadata only: a fold changes none of it, so a
# layer output they read has no other user (timm's BatchNormAct2d asserts ``x.ndim``).
METADATA_METHODS = frozenset(
    {
        "dim", "size", "numel", "stride", "is_contiguous", "ndimension", "nelement",
        "element_size", "get_device", "is_floating_point", "is_complex", "storage_offset",
        "has_names", "is_signed", "is_inference", "__len__",
    }
)  # fmt: skip
METADATA_ATTRIBUTES = frozenset(
    {
        "shape", "ndim", "dtype", "device", "layout", "requires_grad", "is_cuda", "is_cpu",
        "is_sparse", "is_quantized", "is_meta", "is_mkldnn", "is_nested", "names", "is_leaf",
        "grad_fn", "output_nr", "_version", "itemsize", "nbytes", "is_xpu", "is_mps",
    }
)  # fmt: skip


# Methods whose argument 1 gives only a shape (timm's LeViT: ``bn(x.flatten(0, 1)).reshape_as(x)``
# with x the linear output).
_LIKE_METHODS = frozenset({"reshape_as", "view_as", "expand_as"})


def data_users(node: torch.fx.Node) -> list[torch.fx.Node]:
    """The users of ``node`` that read its values, not only its metadata (``x.ndim``,
    ``x.size()``, ``y.reshape_as(x)``), in a ``torch.fx`` or dynamo graph."""

    def reads_values(user: torch.fx.Node) -> bool:
        if user.op == "call_method" and user.target in METADATA_METHODS:
            return False
        if user.op == "call_method" and user.target in _LIKE_METHODS:
            return user.args[0] is node
        if user.op == "call_function" and user.target is getattr and len(user.args) == 2:
            return user.args[1] not in METADATA_ATTRIBUTES
        return True

    return [user for user in node.users if reads_values(user)]


# --- Per-channel affine maps (frozen BatchNorm) -------------------------------------------

_MULS = (operator.mul, torch.mul)
_ADDS = (operator.add, torch.add)


def _operands(
    node: torch.fx.Node, functions: tuple[Any, ...], method: str
) -> tuple[Any, Any] | None:
    """The two operands of ``a * b`` / ``a + b`` (as an operator, a torch function or a
    method, no ``alpha`` or ``out``), else None."""
    if node.kwargs or len(node.args) != 2:
        return None
    if (node.op == "call_function" and node.target in functions) or (
        node.op == "call_method" and node.target == method
    ):
        return node.args[0], node.args[1]
    return None


def bind_channel_affine(layer: torch.fx.Node) -> dict[str, Any] | None:
    """``layer(...) * scale + shift`` (either operand order; the shift may be missing), the
    form of a frozen BatchNorm's forward, as ``{"scale", "shift", "output"}``; else None.

    Found by what the graph computes, not by a module's class: torchvision's and
    detectron2's ``FrozenBatchNorm2d`` compute ``x * scale + shift`` from buffers in forward.
    Only the operands are bound here; ``affine_reason`` says whether they are per channel.
    """
    if len(layer.users) != 1:
        return None
    mul = next(iter(layer.users))
    operands = _operands(mul, _MULS, "mul")
    if operands is None or (operands[0] is layer) == (operands[1] is layer):
        return None
    scale = operands[1] if operands[0] is layer else operands[0]
    bound = {"scale": scale, "shift": None, "output": mul, "nodes": [mul]}
    if len(mul.users) == 1:
        add = next(iter(mul.users))
        operands = _operands(add, _ADDS, "add")
        if operands is not None and (operands[0] is mul) != (operands[1] is mul):
            bound["shift"] = operands[1] if operands[0] is mul else operands[0]
            bound["output"] = add
            bound["nodes"] = [add, mul]
    return bound


def affine_reason(layer_value: Any, bound: dict[str, Any]) -> str:
    """Why ``bind_channel_affine``'s map is not a fold of the layer's output channels; ""
    when it is: each operand a tensor of the layer's dtype that varies along dim 1 only
    (no batch dim: a scale computed per sample folds into no one weight)."""
    if not isinstance(layer_value, torch.Tensor) or layer_value.dim() < 2:
        return AFFINE_NOT_PER_CHANNEL
    operands = [bound["scale"]] + ([] if bound["shift"] is None else [bound["shift"]])
    for operand in operands:
        value = None
        if isinstance(operand, torch.fx.Node):
            value = operand.meta.get("example_value", operand.meta.get("val"))
        if not isinstance(value, torch.Tensor) or value.dtype != layer_value.dtype:
            return AFFINE_NOT_PER_CHANNEL
        if not is_per_channel(value.shape, layer_value.dim(), layer_value.shape[1]):
            return AFFINE_NOT_PER_CHANNEL
    return ""


def is_per_channel(shape: Sequence[Any], rank: int, channels: Any) -> bool:
    """Whether a tensor of ``shape`` broadcast against a layer output of ``rank`` dims and
    ``channels`` channels varies along dim 1 only (or not at all)."""
    padded = [1] * (rank - len(shape)) + list(shape)
    return len(padded) == rank and all(
        isinstance(d, int) and (d == 1 or (i == 1 and d == channels)) for i, d in enumerate(padded)
    )


# --- Statuses and reasons -----------------------------------------------------------------

FOLDED = "folded"
SKIPPED = "skipped"  # folding would change results
KEPT = "kept"  # safe to fold, but the policy judged it not worth it
FUSED = "fused"  # swapped for a fused training layer (memory_efficient)

# Why a pair cannot be folded without changing results, wherever it is found.
NO_RUNNING_STATS = "BN has no running statistics (track_running_stats=False)"
BN_TRAINING = "BN is in training mode"
OTHER_USERS = "conv output has other users"
LINEAR_NOT_2D = "linear output is not 2-D: BN normalises dim 1, not the output features"
CONV_NOT_BATCHED = "conv output is not batched: BN normalises dim 1, not the output channels"
# Found at module level (the FX fuser, the training layer).
CONV_REUSED = "conv module is called more than once: folding would change its other calls"
BN_REUSED = "BN module is called more than once"
HAS_HOOKS = "conv or BN module has forward hooks, which folding would drop"
STATS_NOT_ATTRIBUTES = "batch_norm statistics or affine are not attributes of the model"
EPS_NOT_CONSTANT = "batch_norm eps is not a constant"
CHANNELS_DIFFER = "BN has {features} features, the {kind} has {channels}"
LINEAR_ASSUMED_2D = "linear output assumed 2-D; pass example inputs to fuse() to check"
# Found in a recorded run (fx.fold_modules, memory_efficient with example inputs).
NOT_OWN_CONV = "the layer's forward does not return its own convolution of its own weight and bias"
PARAMETRIZED = "the layer's weight is parametrized (computed in forward)"
BN_IN_FORWARD = (
    "batch_norm is called in a forward that does more than normalise its input; "
    "fx.fuse can fold it when torch.fx traces the model"
)
BN_NOT_OWN_TENSORS = "the BN module's batch_norm does not read its own statistics and affine"
AFTER_NOT_CHILDREN = (
    "the BN module computes more than batch_norm followed by calls of its own child modules"
)
MODULE_ALIASED = "the BN module is registered under more than one name"
IS_ROOT = "the BN is the model itself"
OVER_BUDGET = "over the time budget: max_overhead went to pairs saving more bytes per FLOP"
CHANGED_OUTPUTS = "the changed model did not compute what the model did on the example inputs"
# Why the training layer leaves a pair as it is.
NOT_A_CONV = "the layer is not an nn.Conv1d/2d/3d: there is no fused training layer for it"
CONV_SUBCLASS = (
    "the layer is a subclass of nn.Conv1d/2d/3d with a forward of its own (timm's "
    "Conv2dSame pads in forward): the fused training layer would not compute it"
)
BN_TYPE = "the BN is neither the nn.BatchNorm of the conv's rank nor an nn.SyncBatchNorm"
FUNCTIONAL_BN = (
    "a functional batch_norm: only BatchNorm modules are swapped (memory_efficient(model, x) "
    "also swaps a BatchNorm subclass, found by running the model)"
)
TENSORS_READ = "the model reads the conv's or the BN's tensors elsewhere in forward"
FROZEN_NOT_SWAPPED = (
    "a frozen BN (a per-channel affine map): there is no fused training layer for it"
)
BN_NOT_BATCH_NORM = (
    "the BN module's batch_norm call is not nn.BatchNorm's (eps, training, statistics)"
)
# A layer followed by ``* scale + shift`` that is no per-channel affine map (not reported).
AFFINE_NOT_PER_CHANNEL = "the scale or shift is not one value per output channel"

# How the plugin folded a pair.
FOLDED_ONCE = "once, at compile time (freezing)"
FOLDED_IN_PACKAGE = "once, when the package is built (AOTInductor)"
FOLDED_PER_CALL = "recomputed every call, from the live parameters"
FOLDED_FOR_GRAD = "into the weight, differentiably, in a graph that needs gradients"
# Why the plugin did not fold a pair it matched: it would change results.
NOT_FINITE = "the folded weight or bias is not finite in {dtype}: folding would change results"
STATS_NOT_FINITE = "the BN statistics or parameters are not finite"
FLOAT16_PER_CALL = (
    "float16 without freezing: the folded weight can overflow float16 where conv and BN "
    "apart do not, and its values are not known when compiling (compile with freezing to "
    "fold it once, checked)"
)
FLOAT16_FOR_GRAD = (
    "float16 in a graph that needs gradients: the folded weight can overflow float16 where "
    "conv and BN apart do not, and its values are not known when compiling"
)
AFFINE_FLOAT16 = (
    "a frozen BN in float16: its fold is made before its values are known, and the folded "
    "weight can overflow float16 where conv and BN apart do not"
)
AFFINE_NO_SHAPES = (
    "a frozen BN, in a graph this torch hands over without shapes (torch 2.6-2.11 under "
    "freezing): whether its scale is per channel cannot be checked, so it is left to "
    "Inductor's own binary folding"
)
# Why the "auto" policy keeps a pair unfolded without freezing: it would cost time.
KEPT_AFFINE_PER_CALL = (
    "a frozen BN without freezing: folding it every call is not judged worth it (compile "
    "with freezing to fold it once, or use policy='always')"
)
KEPT_BIAS_PEELED = (
    "on {device}, Inductor adds a conv bias in a pointwise kernel just as it applies "
    "the BN, so folding every call only adds work (compile with freezing to fold once)"
)
KEPT_FUSED = (
    "the BN runs inside the next pointwise kernel ({user}), so folding every call "
    "costs more than it saves (compile with freezing to fold once)"
)
KEPT_LARGE_WEIGHT = (
    "the weight ({weight} elements) outweighs the output ({output}), so folding every "
    "call costs more than it saves (compile with freezing to fold once)"
)
# What the verifier says of a pair it counted.
NOT_MATCHED = "eligible, but the pattern did not match"
FOLDED_CACHED = "from the FX graph cache"
KEPT_CACHED = "by policy, from the FX graph cache"
UNSAFE_CACHED = "unsafe to fold, from the FX graph cache"


def reason_not_to_fold(
    kind: LayerKind,
    *,
    has_running_stats: bool,
    training: Any,
    other_users: bool,
    output_rank: int | None = None,
) -> str:
    """Why folding a layer -> batch_norm pair would change results; "" when it would not.

    These hold wherever the pair is found: a BN without running statistics normalises with
    batch statistics even in eval; a training BN does; a layer output used elsewhere would
    see the fold too; BN normalises dim 1, the channels only of a batched output.
    ``output_rank`` None: not known, not checked.
    """
    if not has_running_stats:
        return NO_RUNNING_STATS
    if training is not False:
        return BN_TRAINING
    if other_users:
        return OTHER_USERS
    return rank_reason(kind, output_rank)


# Calls that reshape a tensor without moving its data. A chain of them that only merges the
# leading dims of a linear layer's output, (B, N, C) -> (B*N, C), keeps the features as the
# last dim, so a BatchNorm1d after it folds into the layer as it would right after it
# (timm's LeViT: ``bn(linear(x).flatten(0, 1))``). Inductor removes such views before the
# plugin's freezing and per-call stages see the graph.
_VIEW_METHODS = ("flatten", "view", "reshape")
_VIEW_FUNCTIONS = (torch.flatten, torch.reshape)


def start_of_leading_views(node: torch.fx.Node) -> torch.fx.Node | None:
    """Where a chain of single-user views ending at ``node`` starts, when the chain only
    merges leading dims and ends at rank 2; None when ``node`` is no such chain."""
    chain = []
    while (node.op == "call_method" and node.target in _VIEW_METHODS) or (
        node.op == "call_function" and node.target in _VIEW_FUNCTIONS
    ):
        chain.append(node)
        source = node.args[0] if node.args else None
        if not isinstance(source, torch.fx.Node) or len(data_users(source)) != 1:
            return None
        node = source
    if not chain:
        return None
    found = [n.meta.get("example_value", n.meta.get("val")) for n in (node, *chain)]
    values = [v for v in found if isinstance(v, torch.Tensor) and v.dim() >= 2]
    if len(values) != len(found):
        return None
    features = values[0].shape[-1]
    if values[-1].dim() != 2 or any(v.shape[-1] != features for v in values):
        return None
    return node


def rank_reason(kind: LayerKind, output_rank: int | None) -> str:
    """Why a layer output of this rank is not what the fold assumes; "" when it is."""
    if output_rank is None or output_rank == kind.batched_rank:
        return ""
    return LINEAR_NOT_2D if kind.name == "linear" else CONV_NOT_BATCHED


# --- Reports ------------------------------------------------------------------------------


@dataclasses.dataclass
class PairReport:
    """One conv -> batch_norm pair: where, what kind, its status and why."""

    conv: str  # where the conv sits, e.g. "layer1.0.conv1"
    bn: str
    kind: str  # "conv2d", "conv_transpose1d", "linear", ...
    status: str  # FOLDED, FUSED, SKIPPED or KEPT
    reason: str = ""


@dataclasses.dataclass
class PairTable:
    """A report of pairs, one row each; the three reports build on it."""

    pair_reports: list[PairReport]
    done: ClassVar[str] = FOLDED  # the status of a pair the tool changed
    title: ClassVar[str] = "inductor_convbn"

    @property
    def pairs(self) -> int:
        """conv -> batch_norm pairs found."""
        return len(self.pair_reports)

    @property
    def skipped(self) -> list[tuple[str, str]]:
        """``(conv, reason)`` for each pair left as it was."""
        return [(p.conv, p.reason) for p in self.pair_reports if p.status != self.done]

    def _done_count(self) -> int:
        return sum(p.status == self.done for p in self.pair_reports)

    def __str__(self) -> str:
        return format_pairs(self._head(), self._rows())

    def _head(self) -> str:
        return f"{self.title}: {self.done} {self._done_count()} of {self.pairs} conv->bn pairs"

    def _rows(self) -> Sequence[PairReport]:
        return self.pair_reports


def format_pairs(head: str, pair_reports: Sequence[PairReport]) -> str:
    """``head``, then one aligned row per pair: where, kind, status and reason."""
    if not pair_reports:
        return head
    rows = [("conv", "bn", "kind", "status")] + [
        (p.conv, p.bn, p.kind, p.status + (f": {p.reason}" if p.reason else ""))
        for p in pair_reports
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = [head]
    for r in rows:
        cells = (c.ljust(w) for c, w in zip(r[:3], widths, strict=True))
        lines.append("  " + "  ".join(cells) + "  " + r[3])
    return "\n".join(lines)


# --- Naming -------------------------------------------------------------------------------


def constant_of(module: torch.nn.Module | None, node: torch.fx.Node) -> torch.Tensor | None:
    """The value of a ``get_attr`` node (a constant of a frozen graph), else None."""
    if module is None or node.op != "get_attr":
        return None
    value: Any = module
    for atom in str(node.target).split("."):
        value = getattr(value, atom, None)
    return value if isinstance(value, torch.Tensor) else None


# On a layer node that a fold created: the ``describe_node`` of the layer it replaced.
LAYER_META = "inductor_convbn_layer"


def describe_node(node: torch.fx.Node) -> str:
    """Where a layer sits in the user's model, e.g. ``layer1.0.conv1``, from fx metadata.

    Dynamo records the module path in ``nn_module_stack`` and AOT autograd keeps it on the
    aten nodes, so the verifier's independent count and the plugin name a pair alike. A
    layer a fold created carries the name of the one it replaced (``LAYER_META``).
    """
    if LAYER_META in node.meta:
        return str(node.meta[LAYER_META])
    stack = node.meta.get("nn_module_stack")
    if stack:
        path = list(stack.values())[-1][0]
        return _normalize_module_path(path)
    return node.name


def _normalize_module_path(path: str) -> str:
    path = re.sub(r"^[LG]\['[^']*'\]", "", path)  # the root: a local or a global
    path = re.sub(r"\._modules\['([^']*)'\]", r".\1", path)
    path = re.sub(r"\[['\"]?([^\]'\"]*)['\"]?\]", r".\1", path)
    return path.lstrip(".") or "<root>"


def module_name(path: str, names: set[str]) -> str:
    """``path`` as the model's own module name: dynamo's paths start from whatever variable
    held the model (``model.layer1.0.conv1``), and that prefix differs between releases."""
    atoms = path.split(".")
    for i in range(len(atoms)):
        candidate = ".".join(atoms[i:])
        if candidate in names:
            return candidate
    return path
