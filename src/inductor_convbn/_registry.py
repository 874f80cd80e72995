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
import threading
import warnings
from collections.abc import Callable, Iterator
from typing import Any, cast

import torch
import torch.nn.functional as F

from . import _compat, _decide, _pairs
from ._fold import fold_conv_bn_weights

aten = torch.ops.aten

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


def _pattern_fns(
    t: FoldTemplate, *, upcast: bool = False
) -> tuple[Callable[..., Any], Callable[..., Any]]:
    """The search and replacement functions of a template; ``upcast``: the replacement's
    output in float32, for the pattern without its final downcast."""
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
        y = layer(a, c, w, b)
        return y.to(torch.float32) if upcast else y

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


# --- Judging a match ----------------------------------------------------------------------

# The fold's tensor arguments, by the names the templates give them.
_FOLD_ARGS = ("w", "b", "mean", "var", "gamma", "beta")
# On a layer node a stage recorded a decision on (unsafe to fold, or kept by the policy):
# its reason, so that a later stage that sees the same node (the per-call stages run twice,
# before and after Inductor's post-grad passes) leaves it alone without counting it again.
_DECIDED_META = "inductor_convbn_decided"

# A judge says what to do with a match: fold it (True, None); leave it to a later stage
# (False, None); or keep it unfolded for a reason (False, the decision to record).
Judgement = tuple[bool, "_decide.Decision | None"]
Judge = Callable[[_compat.Match, torch.fx.Node], Judgement]


@dataclasses.dataclass
class _Run:
    """The stage in progress, read by the pattern's checks."""

    judge: Judge
    how: str  # the reason a fold made here is recorded with
    # Layers already judged unfolded: a pair kept at its BN's last node is seen again at an
    # earlier node, where the template without BN affine matches the head of the same BN.
    kept: set[torch.fx.Node] = dataclasses.field(default_factory=set)


_active: contextvars.ContextVar[_Run | None] = contextvars.ContextVar(
    "inductor_convbn_active", default=None
)


def _layer_node(match: _compat.Match) -> torch.fx.Node:
    return next(n for n in match.nodes if n.target in _LAYER_TARGETS)


def _unsafe_values(
    match: _compat.Match, layer: torch.fx.Node, tensors: dict[str, torch.Tensor]
) -> str:
    """``_decide.unsafe_frozen`` for the match's known fold arguments."""
    conv = layer.target is aten.convolution.default
    return _decide.unsafe_frozen(
        tensors,
        float(match.kwargs.get("eps", 0.0)),
        transposed=conv and bool(layer.args[6]),
        groups=cast(int, layer.args[8]) if conv else 1,
    )


def _fold_tensors(
    match: _compat.Match, value_of: Callable[[torch.fx.Node], torch.Tensor | None]
) -> dict[str, torch.Tensor] | None:
    """The match's fold arguments as tensors, when ``value_of`` knows every one; else None."""
    tensors = {}
    for name in _FOLD_ARGS:
        node = match.kwargs.get(name)
        if isinstance(node, torch.fx.Node):
            value = value_of(node)
            if value is None:
                return None
            tensors[name] = value
    return tensors


def _judge_frozen(frozen: _ConstantValues) -> Judge:
    """The freezing stage folds a pair whose tensors freezing makes constants, and only
    when the fold of their values changes no result; the rest is the per-call stage's."""

    def judge(match: _compat.Match, layer: torch.fx.Node) -> Judgement:
        tensors = _fold_tensors(match, frozen.get)
        if tensors is None:
            return False, None
        reason = _unsafe_values(match, layer, tensors)
        if not reason:
            return True, None
        return False, _decide.Decision(_pairs.describe_node(layer), False, reason, unsafe=True)

    return judge


def _judge_per_call(policy: str) -> Judge:
    """The per-call stage folds a safe pair where ``policy`` says that pays."""

    def judge(match: _compat.Match, layer: torch.fx.Node) -> Judgement:
        if _DECIDED_META in layer.meta:  # an earlier stage said why
            return False, None
        where = _pairs.describe_node(layer)
        module = layer.graph.owning_module
        # Under freezing the parameters are constants here and their fold can be checked;
        # otherwise their values are only known at run time.
        constants = _fold_tensors(match, lambda node: _pairs.constant_of(module, node))
        if constants:
            reason = _unsafe_values(match, layer, constants)
        else:
            value = layer.meta.get("val")
            dtype = value.dtype if isinstance(value, torch.Tensor) else None
            reason = _decide.unsafe_unknown_values(dtype, for_grad=False)
        if reason:
            return False, _decide.Decision(where, False, reason, unsafe=True)
        if policy == "auto":
            reason = _decide.per_call_cost(layer, match.output_node())
            if reason:
                return False, _decide.Decision(where, False, reason)
        return True, None

    return judge


def _early_check(match: _compat.Match) -> bool:
    """The stage's judgement; runs before the costly exact re-match."""
    run = _active.get()
    if run is None:
        return True
    layer = _layer_node(match)
    if layer in run.kept:
        return False
    fold, decision = run.judge(match, layer)
    if decision is not None or (not fold and _DECIDED_META in layer.meta):
        run.kept.add(layer)
    if decision is not None:
        layer.meta[_DECIDED_META] = decision.reason
        _decide.record(decision)
    return fold


def _record_fold(match: _compat.Match) -> bool:
    """Record where a pair is folded; runs after the exact re-match, before the replacement.

    The verifier reads the records to name each pair's outcome.
    """
    run = _active.get()
    how = _pairs.FOLDED_PER_CALL if run is None else run.how
    _decide.record(_decide.Decision(_pairs.describe_node(_layer_node(match)), True, how))
    return True


@functools.cache
def _register(t: FoldTemplate, dtype: torch.dtype, bn_dtype: torch.dtype, device: str) -> bool:
    """Trace and register the template's patterns for these dtypes and device.

    A half-precision template also gets its pattern without the final downcast (see
    ``_compat.register_pattern``): where Inductor keeps that downcast, the full pattern
    matches first, at the later node, and the other finds nothing left to match.
    """
    registered = False
    for upcast in (False, True) if dtype in (torch.float16, torch.bfloat16) else (False,):
        search, replace = _pattern_fns(t, upcast=upcast)
        with _decide.pass_time.timing("tracing_s"), _compat.pattern_tracing_mode():
            registered |= _compat.register_pattern(
                search,
                replace,
                _example_inputs(t, dtype, bn_dtype, device),
                PATTERNS,
                extra_check=_record_fold,
                early_check=_early_check,
                scalar_workaround=t.scalar_args(),
                without_final_downcast=upcast,
            )
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
    # torch 2.14 decomposes batch_norm with rsqrt, 2.11 with sqrt and reciprocal.
    return any(
        not (isinstance(n.args[0], torch.fx.Node) and n.args[0].target is aten.add.Tensor)
        for target in (aten.rsqrt.default, aten.sqrt.default)
        for n in graph.find_nodes(op="call_function", target=target)
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


def fold_frozen(graph: torch.fx.Graph, frozen: list[torch.Tensor]) -> int:
    """The freezing stage: fold the pairs whose tensors are among ``frozen``, the values
    freezing turns the graph's first inputs into; return how many.

    Freezing's constant folding then computes each folded weight once, at compile time.
    Every policy folds here: a fold computed once always pays.
    """
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    values: dict[torch.fx.Node, Any] = dict(zip(placeholders, frozen, strict=False))
    return _apply(graph, _Run(_judge_frozen(_ConstantValues(values)), _pairs.FOLDED_ONCE))


def fold_for_package(graph: torch.fx.Graph) -> int:
    """The freezing stage of an AOTInductor package: its parameters are the graph module's
    constants (``get_attr`` nodes), so every safe pair is folded as under freezing, and each
    folded weight and bias is computed here, once, and stored in the package as a constant of
    its own, whether or not Inductor's freezing is on. Returns how many pairs it folded."""
    module = graph.owning_module
    constants = {}
    for node in graph.find_nodes(op="get_attr"):
        value = _pairs.constant_of(module, node)
        if value is not None:
            constants[node] = value
    folded = _apply(
        graph, _Run(_judge_frozen(_ConstantValues(constants)), _pairs.FOLDED_IN_PACKAGE)
    )
    if folded and module is not None:
        _store_computed_constants(graph, module, _ConstantValues(constants))
    return folded


def _store_computed_constants(
    graph: torch.fx.Graph, module: torch.nn.Module, values: _ConstantValues
) -> None:
    """Replace each layer's weight or bias computed from constants alone (a fold) with a
    constant holding its value, so the package computes it at build time, not every call."""
    count = 0
    for layer in [n for n in graph.nodes if n.op == "call_function" and n.target in _LAYER_TARGETS]:
        for arg in layer.all_input_nodes:
            if arg.op != "call_function":
                continue  # an input, or a constant already
            value = values.get(arg)
            if value is None:
                continue
            while hasattr(module, name := f"_inductor_convbn_folded_{count}"):
                count += 1
            module.register_buffer(name, value.detach().clone())
            with graph.inserting_before(layer):
                constant = graph.get_attr(name)
            constant.meta = {k: v for k, v in arg.meta.items() if k in ("val", "tensor_meta")}
            layer.replace_input_with(arg, constant)
    graph.eliminate_dead_code()


class FreezingWarning(UserWarning):
    """Inductor freezing is on, but dynamo traced without it: nothing is frozen."""


NOTHING_FROZEN = (
    "inductor_convbn: Inductor freezing is on but no parameter was frozen, so the folded "
    "weights are recomputed on every call (or kept by policy). Freezing must be on while "
    "dynamo traces: torch.compile(options={'freezing': True}) turns it on for Inductor "
    "alone. Set torch._inductor.config.freezing = True, or make the first call inside "
    "torch._inductor.config.patch(freezing=True), under torch.no_grad()."
)


def warn_nothing_frozen(graph: torch.fx.Graph) -> None:
    """Warn when an inference graph with layers to fold reaches the freezing stage with
    freezing requested and no frozen parameter (once per process: the warning's location
    is always this line)."""
    if _layers_in(graph) and not _compat.is_backward_graph(graph):
        warnings.warn(NOTHING_FROZEN, FreezingWarning, stacklevel=2)


class _ConstantValues:
    """The values of the graph's nodes that freezing makes constants: the frozen inputs, and
    what is computed from them alone (a weight computed in forward: weight_norm, any
    parametrization, the downcast of a weight under autocast), which freezing's constant
    folding computes at compile time too. Those are computed here, once each."""

    _MAX_DEPTH = 64  # a weight's computation is short; a longer chain is not looked into

    def __init__(self, frozen: dict[torch.fx.Node, Any]) -> None:
        self._values = dict(frozen)

    def get(self, node: torch.fx.Node) -> torch.Tensor | None:
        value = self._value(node, 0)
        return value if isinstance(value, torch.Tensor) else None

    def _value(self, node: torch.fx.Node, depth: int) -> Any:
        if node in self._values:
            return self._values[node]
        value = None
        target = node.target
        if (
            node.op == "call_function"
            and depth < self._MAX_DEPTH
            and callable(target)
            and torch.Tag.nondeterministic_seeded not in getattr(target, "tags", ())
        ):
            known = True

            def arg(a: Any) -> Any:
                nonlocal known
                inner = self._value(a, depth + 1) if known else None
                known = known and inner is not None
                return inner

            args = torch.fx.node.map_arg(node.args, arg)
            kwargs = torch.fx.node.map_arg(node.kwargs, arg)
            if known:
                with _compat.unset_fake_temporarily(), torch.no_grad():
                    value = target(*args, **kwargs)
        self._values[node] = value
        return value


def fold_per_call(graph: torch.fx.Graph, *, policy: str = "auto") -> int:
    """The per-call stage: fold the safe pairs of ``graph`` that ``policy`` says to, each
    recomputed every call from the live parameters; return how many."""
    return _apply(graph, _Run(_judge_per_call(policy), _pairs.FOLDED_PER_CALL))


def _apply(graph: torch.fx.Graph, run: _Run) -> int:
    with _decide.pass_time.timing():
        register_for_graph(graph)
        # Each conv's weight and name, before the fold erases the conv.
        weights = {
            n.args[1]: _pairs.describe_node(n)
            for n in graph.nodes
            if n.target is aten.convolution.default and isinstance(n.args[1], torch.fx.Node)
        }
        token = _active.set(run)
        try:
            folded = PATTERNS.apply(graph)
        finally:
            _active.reset(token)
        if folded:
            _name_folded_convs(graph, weights)
        return folded


def _name_folded_convs(graph: torch.fx.Graph, weights: dict[Any, str]) -> None:
    """Give each conv a fold created the name of the conv it replaced
    (``_pairs.LAYER_META``), found through the fold's arithmetic to the old weight: the
    replacement's nodes carry no module path (torch <= 2.13) or the BN's (2.14)."""
    for node in graph.find_nodes(op="call_function", target=aten.convolution.default):
        if _pairs.LAYER_META in node.meta or weights.get(node.args[1]):
            continue
        seen, frontier = set(), [node.args[1]]
        for _ in range(8):  # the fold is a few ops deep
            found = next((weights[a] for a in frontier if a in weights), None)
            if found is not None:
                node.meta[_pairs.LAYER_META] = found
                break
            seen.update(frontier)
            frontier = [
                a
                for f in frontier
                if isinstance(f, torch.fx.Node)
                for a in f.all_input_nodes
                if a not in seen
            ]
