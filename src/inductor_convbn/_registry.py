"""Conv -> batch_norm pattern/replacement pairs, traced through ``register_replacement``.

The patterns are traced with the running torch's own decompositions, so they match the
post-grad graph that release produces, whatever form its batch-norm decomposition takes.

A traced pattern matches its literals exactly, and stride, padding, dilation, output
padding and groups are literals of ``aten.convolution``. Each one is therefore traced as a
scalar argument with an unlikely sentinel value, which ``scalar_workaround`` turns into a
wildcard (``KeywordArg``); the replacement receives the matched values. One template per
structure (layer kind, rank, transposed, bias, affine) then covers every hyper-parameter,
and every eps but 0, which has a template of its own. Templates are traced lazily, only
for the structures and dtypes a graph holds, once per process.
"""

from __future__ import annotations

import contextvars
import dataclasses
import functools
import inspect
import re
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, cast

import torch
import torch.nn.functional as F

from . import _compat
from ._fold import fold_conv_bn_weights

aten = torch.ops.aten

#: ``"auto"`` folds where folding pays: every pair under freezing (the folded weights
#: become constants, computed once) and, without freezing, only pairs where folding every
#: call costs less than the batch norm it removes. ``"always"`` folds every safe pair.
POLICIES = ("auto", "always")
#: Where the pass runs: ``"grad"`` on dynamo's graph before AOT autograd, in graphs that
#: need gradients (``_pregrad``); ``"joint"`` before Inductor freezes parameters into
#: constants (so the fold is constant-folded); ``"post_grad"`` on the graph Inductor lowers.
STAGES = ("grad", "joint", "post_grad")


def check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    """A ``TypeError`` for a value that is not a string, a ``ValueError`` for another string."""
    if not isinstance(value, str):
        raise TypeError(
            f"{name} must be a str, one of {choices}, got {type(value).__name__} {value!r}"
        )
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


@dataclasses.dataclass(frozen=True)
class Decision:
    """What the pass did with one matched pair."""

    layer: str  # where the layer sits, ``describe_node``
    folded: bool
    reason: str = ""  # how a pair was folded, or why it was not
    unsafe: bool = False  # not folded because the fold would change results


FOLDED_ONCE = "once, at compile time (freezing)"
FOLDED_PER_CALL = "recomputed every call, from the live parameters"


# Decisions since the last take_decisions(), recorded by the pattern's check.
_decisions: list[Decision] = []
_decisions_lock = threading.Lock()


@dataclasses.dataclass
class _Run:
    """The fold() call in progress, read by the pattern's checks."""

    stage: str
    policy: str
    # Inputs freezing turns into constants, with their values: a fold of those alone is
    # computed once, and can be checked before it is made.
    frozen: dict[torch.fx.Node, torch.Tensor] = dataclasses.field(default_factory=dict)
    # Layers already kept: a pair kept at its BN's last node is seen again at an earlier
    # node, where the template without BN affine matches the head of the same BN.
    kept: set[torch.fx.Node] = dataclasses.field(default_factory=set)


_active: contextvars.ContextVar[_Run | None] = contextvars.ContextVar(
    "inductor_convbn_active", default=None
)

PATTERNS = _compat.PatternMatcherPass(pass_name="inductor_convbn")

# The aten ops a folded layer lowers to in the post-grad graph.
_LINEAR_TARGETS = (aten.addmm.default, aten.mm.default)
_LAYER_TARGETS = (aten.convolution.default, *_LINEAR_TARGETS)

_HYPER_PARAMS = ("stride", "padding", "dilation", "output_padding")
# Sentinels for the scalars that become wildcards: distinct from each other and from the
# other literals of the traced graph. (A real value equal to one is harmless: the match binds
# it either way.) Stride > padding keeps the traced transposed conv's output size positive,
# output_padding < stride keeps it legal, and small values keep the fake shapes small.
_SENTINEL_BASE = {
    "stride": 1009,
    "padding": 211,
    "dilation": 401,
    "output_padding": 307,
}
_GROUPS_SENTINEL = 131
_EPS_SENTINEL = 9.876_543e-7


@dataclasses.dataclass(frozen=True)
class FoldTemplate:
    """The structure of a conv (or linear) -> batch_norm pair; one traced pattern each."""

    layer: str  # "conv" or "linear"
    rank: int  # spatial dims of the conv; 0 for linear
    transposed: bool
    bias: bool  # the conv has a bias
    affine: bool  # the batch norm has weight and bias
    # eps exactly 0: Inductor's joint-graph passes drop the ``var + 0``, so that pattern has
    # no add, and eps is no wildcard but the literal 0.
    eps_zero: bool = False

    def tensor_args(self) -> list[str]:
        return [
            "x",
            "w",
            *(["b"] if self.bias else []),
            "mean",
            "var",
            *(["gamma", "beta"] if self.affine else []),
        ]

    def scalar_args(self) -> dict[str, float | int]:
        scalars: dict[str, float | int] = {} if self.eps_zero else {"eps": _EPS_SENTINEL}
        if self.layer == "conv":
            for name in _HYPER_PARAMS:
                for i in range(self.rank):
                    scalars[f"{name}{i}"] = _SENTINEL_BASE[name] + 2 * i
            scalars["groups"] = _GROUPS_SENTINEL
        return scalars


def _templates() -> Iterator[FoldTemplate]:
    """Every structure the registry can fold."""
    for eps_zero in (False, True):
        for bias in (False, True):
            for affine in (True, False):
                yield FoldTemplate("linear", 0, False, bias, affine, eps_zero)
                for rank in (1, 2, 3):
                    for transposed in (False, True):
                        yield FoldTemplate("conv", rank, transposed, bias, affine, eps_zero)


TEMPLATES = tuple(_templates())


def _with_signature(fn: Callable[..., Any], names: list[str]) -> Callable[..., Any]:
    # register_replacement names pattern arguments after the search function's parameters.
    fn.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD) for n in names]
    )
    return fn


def _pattern_fns(t: FoldTemplate) -> tuple[Callable[..., Any], Callable[..., Any]]:
    names = t.tensor_args() + list(t.scalar_args())

    def unpack(args: tuple[Any, ...]) -> tuple[dict[str, Any], dict[str, Any]]:
        a = dict(zip(names, args, strict=True))
        conv_args: dict[str, Any] = {}
        if t.layer == "conv":
            conv_args = {k: [a[f"{k}{i}"] for i in range(t.rank)] for k in _HYPER_PARAMS}
            conv_args["groups"] = a["groups"]
        return a, conv_args

    def layer(a: dict[str, Any], c: dict[str, Any], w: Any, b: Any) -> Any:
        if t.layer == "linear":
            return F.linear(a["x"], w, b)
        return aten.convolution.default(
            a["x"], w, b, c["stride"], c["padding"], c["dilation"], t.transposed,
            c["output_padding"], c["groups"],
        )  # fmt: skip

    def search(*args: Any) -> Any:
        a, c = unpack(args)
        y = layer(a, c, a["w"], a.get("b"))
        return F.batch_norm(
            y, a["mean"], a["var"], a.get("gamma"), a.get("beta"), False, 0.1, a.get("eps", 0.0)
        )

    def replace(*args: Any) -> Any:
        a, c = unpack(args)
        w, b = fold_conv_bn_weights(
            a["w"], a.get("b"), a["mean"], a["var"], a.get("eps", 0.0), a.get("gamma"),
            a.get("beta"),
            transposed=t.transposed, groups=c.get("groups", 1),
        )  # fmt: skip
        return layer(a, c, w, b)

    return _with_signature(search, names), _with_signature(replace, names)


def _example_inputs(
    t: FoldTemplate, dtype: torch.dtype, bn_dtype: torch.dtype, device: str
) -> list[torch.Tensor]:
    # Sizes don't matter (int literals are wildcards in the first match, which re-traces
    # with the real shapes); they only need to be legal with the sentinel hyper-parameters.
    empty = functools.partial(torch.empty, dtype=dtype, device=device)
    g = _GROUPS_SENTINEL if t.layer == "conv" else 1
    if t.layer == "linear":
        x, w = empty(2, 3), empty(2 * g, 3)
    elif t.transposed:
        x, w = empty(1, g, *[3] * t.rank), empty(g, 2, *[1] * t.rank)
    else:
        x, w = empty(1, g, *[3] * t.rank), empty(2 * g, 1, *[1] * t.rank)
    channel = functools.partial(torch.empty, 2 * g, device=device)
    by_name = {
        "x": x,
        "w": w,
        "b": empty(2 * g),
        "mean": channel(dtype=bn_dtype),
        "var": channel(dtype=bn_dtype),
        "gamma": channel(dtype=bn_dtype),
        "beta": channel(dtype=bn_dtype),
    }
    return [by_name[n] for n in t.tensor_args()]


def describe_node(node: torch.fx.Node) -> str:
    """Where a layer sits in the user's model, e.g. ``layer1.0.conv1``, from fx metadata.

    Dynamo records the module path in ``nn_module_stack`` and AOT autograd keeps it on the
    aten nodes, so the verifier's independent count and this pass name a pair alike.
    """
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


# Why a pair is kept unfolded under the "auto" policy without freezing.
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


def per_call_cost_reason(layer: torch.fx.Node, output: torch.fx.Node) -> str:
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
        return KEPT_BIAS_PEELED.format(device=value.device.type.upper())
    users = list(output.users)
    if users and all(torch.Tag.pointwise in getattr(u.target, "tags", ()) for u in users):
        return KEPT_FUSED.format(user=", ".join(str(u.target).split(".")[-2] for u in users))
    weight = layer.args[1] if layer.target is aten.convolution.default else layer.args[-1]
    weight_value = weight.meta.get("val") if isinstance(weight, torch.fx.Node) else None
    if not isinstance(weight_value, torch.Tensor):
        return ""
    weight_numel = _compat.int_hint(weight_value.numel())
    output_numel = _compat.int_hint(value.numel())
    if weight_numel is None or output_numel is None or weight_numel <= output_numel:
        return ""
    return KEPT_LARGE_WEIGHT.format(weight=weight_numel, output=output_numel)


def _layer_node(match: _compat.Match) -> torch.fx.Node:
    return next(n for n in match.nodes if n.target in _LAYER_TARGETS)


def _record(decision: Decision) -> None:
    with _decisions_lock:
        _decisions.append(decision)
    counter = (
        "inductor_convbn_folded"
        if decision.folded
        else "inductor_convbn_unsafe"
        if decision.unsafe
        else "inductor_convbn_kept"
    )
    _compat.counters["inductor"][counter] += 1


def _check_policy(match: _compat.Match) -> bool:
    """Keep a pair the policy says not to fold; runs before the costly exact re-match."""
    run = _active.get()
    if run is None:
        return True
    layer = _layer_node(match)
    if layer in run.kept:
        return False
    if run.stage == "joint":
        # Fold here only what freezing will fold into constants; the rest is left to the
        # post-grad stage, which decides on the cost of folding it every call.
        params = [v for k, v in match.kwargs.items() if k != "x" and isinstance(v, torch.fx.Node)]
        if not all(p in run.frozen for p in params):
            return False
        reason = _not_finite_reason(match, layer, run.frozen)
        if reason:
            run.kept.add(layer)
            _record(Decision(describe_node(layer), False, reason, unsafe=True))
        return not reason
    unsafe = _per_call_unsafe_reason(match, layer)
    if unsafe is not None:
        run.kept.add(layer)
        if unsafe:  # "": the joint stage already said why
            _record(Decision(describe_node(layer), False, unsafe, unsafe=True))
        return False
    if run.policy != "auto":
        return True
    reason = per_call_cost_reason(layer, match.output_node())
    if reason:
        run.kept.add(layer)
        _record(Decision(describe_node(layer), False, reason))
    return not reason


NOT_FINITE = "the folded weight or bias is not finite in {dtype}: folding would change results"
STATS_NOT_FINITE = "the BN statistics or parameters are not finite"
FLOAT16_PER_CALL = (
    "float16 without freezing: the folded weight can overflow float16 where conv and BN "
    "apart do not, and its values are not known when compiling (compile with freezing to "
    "fold it once, checked)"
)


def _per_call_unsafe_reason(match: _compat.Match, layer: torch.fx.Node) -> str | None:
    """Why a post-grad fold could change results: a reason, "" when the joint stage already
    gave it, None when the fold is safe.

    Under freezing the parameters are constants here, and the joint stage has checked their
    fold; one it left unfolded is not folded per call either. Otherwise the values are only
    known at run time, and a float16 fold can overflow (bfloat16 has float32's range).
    """
    constants: dict[torch.fx.Node, torch.Tensor] = {}
    module = layer.graph.owning_module
    for name in _FOLD_ARGS:
        node = match.kwargs.get(name)
        if isinstance(node, torch.fx.Node):
            value = _constant(module, node)
            if value is None:
                constants = {}
                break
            constants[node] = value
    if constants:
        return "" if _not_finite_reason(match, layer, constants) else None
    value = layer.meta.get("val")
    if isinstance(value, torch.Tensor) and value.dtype == torch.float16:
        return FLOAT16_PER_CALL
    return None


def _constant(module: torch.nn.Module | None, node: torch.fx.Node) -> torch.Tensor | None:
    """The value of a ``get_attr`` node (a constant of a frozen graph), else None."""
    if module is None or node.op != "get_attr":
        return None
    value: Any = module
    for atom in str(node.target).split("."):
        value = getattr(value, atom, None)
    return value if isinstance(value, torch.Tensor) else None


def _not_finite_reason(
    match: _compat.Match, layer: torch.fx.Node, values: dict[torch.fx.Node, torch.Tensor]
) -> str:
    """Why folding these frozen values would change results; "" if it would not.

    A fold in fp16 can overflow where the conv and the BN apart do not (a large BN scale,
    a small activation); non-finite statistics would be spread into every weight.
    """
    k = match.kwargs
    tensors = {
        name: values[k[name]] for name in _FOLD_ARGS if isinstance(k.get(name), torch.fx.Node)
    }
    conv = layer.target is aten.convolution.default
    with _compat.unset_fake_temporarily(), torch.no_grad():
        if not all(bool(torch.isfinite(t).all()) for t in tensors.values()):
            return STATS_NOT_FINITE
        weight, bias = fold_conv_bn_weights(
            tensors["w"], tensors.get("b"), tensors["mean"], tensors["var"],
            float(k.get("eps", 0.0)), tensors.get("gamma"), tensors.get("beta"),
            transposed=bool(conv and layer.args[6]), groups=cast(int, layer.args[8]) if conv else 1,
        )  # fmt: skip
        if bool(torch.isfinite(weight).all()) and bool(torch.isfinite(bias).all()):
            return ""
    return NOT_FINITE.format(dtype=str(weight.dtype).removeprefix("torch."))


_FOLD_ARGS = ("w", "b", "mean", "var", "gamma", "beta")


def _record_fold(match: _compat.Match) -> bool:
    """Record where a pair is folded; runs after the exact re-match, before the replacement.

    The verifier reads the records to name each pair's outcome.
    """
    run = _active.get()
    how = FOLDED_ONCE if run is not None and run.stage == "joint" else FOLDED_PER_CALL
    _record(Decision(describe_node(_layer_node(match)), True, how))
    return True


def take_decisions() -> list[Decision]:
    """The decisions since the last call, oldest first."""
    with _decisions_lock:
        decisions = list(_decisions)
        _decisions.clear()
    return decisions


@functools.cache
def _register(t: FoldTemplate, dtype: torch.dtype, bn_dtype: torch.dtype, device: str) -> bool:
    start = time.perf_counter()
    search, replace = _pattern_fns(t)
    with _compat.pattern_tracing_mode():
        registered = _compat.register_pattern(
            search,
            replace,
            _example_inputs(t, dtype, bn_dtype, device),
            PATTERNS,
            extra_check=_record_fold,
            early_check=_check_policy,
            scalar_workaround=t.scalar_args(),
        )
    pass_time.tracing_s += time.perf_counter() - start
    return registered


_register_lock = threading.Lock()


def register_for_graph(graph: torch.fx.Graph) -> None:
    """Trace the templates whose structure and dtype occur in ``graph`` (once per process)."""
    eps_zero = _has_eps_zero(graph)
    for structure, dtype, device in _layers_in(graph):
        # A half-precision layer may be followed by a batch norm of its own dtype or, under
        # autocast or with a float32 BN, by a float32 one.
        bn_dtypes = {dtype, torch.float32}
        for t in TEMPLATES:
            if (t.layer, t.rank, t.transposed, t.bias) != structure or t.eps_zero > eps_zero:
                continue
            for bn_dtype in bn_dtypes:
                with _register_lock:
                    _register(t, dtype, bn_dtype, device)


def _has_eps_zero(graph: torch.fx.Graph) -> bool:
    # A batch norm's rsqrt(var + eps) without its add: eps was 0 (see FoldTemplate.eps_zero).
    return any(
        not (isinstance(n.args[0], torch.fx.Node) and n.args[0].target is aten.add.Tensor)
        for n in graph.find_nodes(op="call_function", target=aten.rsqrt.default)
    )


def _layers_in(graph: torch.fx.Graph) -> set[tuple[tuple[str, int, bool, bool], torch.dtype, str]]:
    found = set()
    for node in graph.nodes:
        val = node.meta.get("val") if node.op == "call_function" else None
        if not isinstance(val, torch.Tensor) or not val.is_floating_point():
            continue
        if node.target is aten.convolution.default:
            structure = ("conv", val.dim() - 2, bool(node.args[6]), node.args[2] is not None)
        elif node.target in _LINEAR_TARGETS and val.dim() == 2:
            structure = ("linear", 0, False, node.target is aten.addmm.default)
        else:
            continue
        if structure[1] in (0, 1, 2, 3):
            found.add((structure, val.dtype, val.device.type))
    return found


@dataclasses.dataclass
class PassTime:
    """Seconds this process spent in the pass: its share of compile time."""

    tracing_s: float = 0.0  # tracing templates (once per process and structure)
    total_s: float = 0.0  # the whole pass, tracing included


pass_time = PassTime()


def fold(graph: torch.fx.Graph, *, stage: str = "post_grad", policy: str = "auto") -> int:
    """Fold the eligible pairs in ``graph`` that ``policy`` says to; return how many."""
    start = time.perf_counter()
    register_for_graph(graph)
    frozen: dict[torch.fx.Node, torch.Tensor] = {}
    if stage == "joint":
        values = _compat.frozen_parameters()
        placeholders = [n for n in graph.nodes if n.op == "placeholder"]
        frozen = dict(zip(placeholders, values, strict=False))
    token = _active.set(_Run(stage, policy, frozen))
    try:
        count = PATTERNS.apply(graph)
    finally:
        _active.reset(token)
    pass_time.total_s += time.perf_counter() - start
    return count
