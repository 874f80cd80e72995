"""The ``"grad"`` stage: fold in dynamo's graph, before AOT autograd.

When a compiled graph needs gradients (an eval model called without ``torch.no_grad()``,
or frozen-BN fine-tuning), AOT autograd saves the conv output for the BN's backward, so
the per-call stage finds the conv output used twice and cannot fold. This stage runs
before AOT autograd, on the graph dynamo captured, and replaces ``batch_norm(conv(x, w,
b))`` with ``conv(x, w', b')`` where ``w', b'`` are computed from ``w``, ``b`` and the BN
tensors by ``fold_conv_bn_weights``, a differentiable function: gradients reach the conv
weight and the BN's affine parameters, and the conv output need not be saved.

A frozen BatchNorm (``conv(x) * scale + shift`` per channel, ``_pairs.bind_channel_affine``)
is folded here in every graph, with gradients or without: no later stage knows its form.
Under freezing its fold is computed from constants, so Inductor computes it once.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any, cast

import torch

from . import _compat, _decide, _pairs
from ._fold import fold_conv_affine_weights, fold_conv_bn_weights

__all__ = ["fold_for_grad"]


def _example(node: Any) -> Any:
    return node.meta.get("example_value") if isinstance(node, torch.fx.Node) else None


def _requires_grad(node: Any) -> bool:
    value = _example(node)
    return isinstance(value, torch.Tensor) and value.requires_grad


def fold_for_grad(graph: torch.fx.Graph, *, policy: str = "auto") -> int:
    """Fold each eval conv -> batch_norm pair of a dynamo graph that gradients flow through,
    and each conv -> frozen BN pair of any graph. Returns how many pairs it folded.

    With grad mode off AOT autograd builds an inference graph, where the later stages fold
    the batch norms; a frozen BN is folded here then too: under freezing, or with
    ``policy="always"``.
    """
    grad = torch.is_grad_enabled()
    folded = 0
    with _decide.pass_time.timing():
        for node in list(graph.nodes):
            if node.graph is not graph or node.op != "call_function":
                continue  # erased by an earlier fold
            if grad and node.target in _pairs.BATCH_NORM_FUNCTIONS:
                folded += _fold_batch_norm(graph, node)
            elif _pairs.layer_kind_of_function(node.target) is not None:
                folded += _fold_affine(graph, node, grad=grad, policy=policy)
    return folded


def _bind_layer(layer: Any) -> tuple[_pairs.LayerKind, dict[str, Any]] | None:
    if not isinstance(layer, torch.fx.Node) or layer.op != "call_function":
        return None
    kind = _pairs.layer_kind_of_function(layer.target)
    if kind is None:
        return None
    try:
        conv = _pairs.bind_layer(kind, layer.args, layer.kwargs)
    except ValueError:
        return None
    if not isinstance(conv.get("groups", 1), int):
        return None
    return kind, conv


def _fold_batch_norm(graph: torch.fx.Graph, bn: torch.fx.Node) -> bool:
    """Fold the pair ending at ``bn`` when it is one this stage folds; say whether it did."""
    norm = _pairs.bind_batch_norm(bn.target, bn.args, bn.kwargs)
    layer = bn_input = norm["input"]
    bound = _bind_layer(layer)
    if bound is None and isinstance(layer, torch.fx.Node):  # linear -> views -> BN1d?
        layer = _pairs.start_of_leading_views(layer)
        bound = _bind_layer(layer)
        if bound is None or bound[0].name != "linear":
            return False
    if bound is None:
        return False
    kind, conv = bound
    output = _example(layer)
    bn_value = _example(bn_input)
    reason = _pairs.reason_not_to_fold(
        kind,
        has_running_stats=norm["running_mean"] is not None and norm["running_var"] is not None,
        training=norm["training"],
        other_users=len(_pairs.data_users(layer)) > 1,
        output_rank=bn_value.dim() if isinstance(bn_value, torch.Tensor) else None,
    )
    if reason or not isinstance(norm["eps"], (int, float)):
        return False  # the verifier reports it; the later stages do not fold it either
    tensors = (conv["input"], conv["weight"], conv.get("bias"), norm["weight"], norm["bias"])
    if not any(_requires_grad(t) for t in tensors):
        return False  # no gradient goes through this pair: the later stages see it
    unsafe = _decide.unsafe_unknown_values(getattr(output, "dtype", None), for_grad=True)
    if unsafe:  # float16, also under autocast
        where = _pairs.describe_node(layer)
        _decide.mark(layer, _decide.Decision(where, False, unsafe, unsafe=True))
        return False
    fold_args = (
        conv["weight"], conv.get("bias"), norm["running_mean"], norm["running_var"],
        float(norm["eps"]), norm["weight"], norm["bias"],
    )  # fmt: skip
    fold = (fold_conv_bn_weights, fold_args)
    if bn_input is not layer:
        return _fold_in_place(graph, layer, kind, conv, fold, bn, bn_input)
    _replace(graph, layer, kind, conv, fold, [bn], grad=True)
    return True


def _fold_affine(graph: torch.fx.Graph, layer: torch.fx.Node, *, grad: bool, policy: str) -> bool:
    """Fold ``layer(...) * scale + shift`` per channel when this stage folds it."""
    bound = _bind_layer(layer)
    affine = _pairs.bind_channel_affine(layer)
    if bound is None or affine is None:
        return False
    kind, conv = bound
    output = _example(layer)
    where = _pairs.describe_node(layer)
    if output is None:  # torch 2.6-2.11 under freezing: a graph without shapes
        _decide.record(_decide.Decision(where, False, _pairs.AFFINE_NO_SHAPES))
        return False
    if _pairs.affine_reason(output, affine):
        return False  # some other arithmetic: no pair
    if _pairs.rank_reason(kind, output.dim()):
        return False  # the verifier reports it
    if output.dtype == torch.float16:  # the fold is made before its values are known
        _decide.mark(layer, _decide.Decision(where, False, _pairs.AFFINE_FLOAT16, unsafe=True))
        return False
    if grad:
        how = _pairs.FOLDED_FOR_GRAD
    elif _compat.inductor_config.freezing:
        how = _pairs.FOLDED_ONCE
    elif policy == "always":
        how = _pairs.FOLDED_PER_CALL
    else:
        _decide.mark(layer, _decide.Decision(where, False, _pairs.KEPT_AFFINE_PER_CALL))
        return False
    fold_args = (conv["weight"], conv.get("bias"), affine["scale"], affine["shift"])
    fold = (fold_conv_affine_weights, fold_args)
    _replace(graph, layer, kind, conv, fold, affine["nodes"], grad=grad, how=how)
    return True


def _layer_call(
    kind: _pairs.LayerKind, conv: dict[str, Any]
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The positional and keyword arguments that call a layer with ``conv``'s arguments."""
    names = kind.params
    given = [n for n in names if n in conv]
    positional = names[: next((i for i, n in enumerate(names) if n not in conv), None)]
    return tuple(conv[n] for n in positional), {n: conv[n] for n in given if n not in positional}


def _fold_nodes(
    graph: torch.fx.Graph,
    kind: _pairs.LayerKind,
    conv: dict[str, Any],
    fold: tuple[Callable[..., Any], tuple[Any, ...]],
) -> tuple[torch.fx.Node, torch.fx.Node]:
    """The folded weight and bias, computed in the graph by ``fold`` at the insert point
    (traced by AOT autograd, which records the fold's ops and their backward)."""
    fold_fn, fold_args = fold
    folded = graph.call_function(
        fold_fn, fold_args, {"transposed": kind.transposed, "groups": conv.get("groups", 1)}
    )
    weight = graph.call_function(operator.getitem, (folded, 0))
    return weight, graph.call_function(operator.getitem, (folded, 1))


def _fold_in_place(
    graph: torch.fx.Graph,
    layer: torch.fx.Node,
    kind: _pairs.LayerKind,
    conv: dict[str, Any],
    fold: tuple[Callable[..., Any], tuple[Any, ...]],
    bn: torch.fx.Node,
    bn_input: torch.fx.Node,
) -> bool:
    """Fold a BN that reads ``layer`` through views: the layer itself takes the folded
    weight and bias (its shape-only users stay as they are), and the BN's users read the
    views. The fold is computed before the layer, so its inputs must come before it."""
    order = {n: i for i, n in enumerate(graph.nodes)}
    inputs = [a for a in fold[1] if isinstance(a, torch.fx.Node)]
    if any(order[a] > order[layer] for a in inputs):
        return False  # a BN tensor computed after the layer: not folded, the verifier says
    with graph.inserting_before(layer):
        weight, bias = _fold_nodes(graph, kind, conv, fold)
    layer.args, layer.kwargs = _layer_call(kind, {**conv, "weight": weight, "bias": bias})
    bn.replace_all_uses_with(bn_input)
    graph.erase_node(bn)
    _decide.mark(layer, _decide.Decision(_pairs.describe_node(layer), True, _pairs.FOLDED_FOR_GRAD))
    return True


def _replace(
    graph: torch.fx.Graph,
    layer: torch.fx.Node,
    kind: _pairs.LayerKind,
    conv: dict[str, Any],
    fold: tuple[Callable[..., Any], tuple[Any, ...]],
    chain: list[torch.fx.Node],
    *,
    grad: bool,
    how: str = _pairs.FOLDED_FOR_GRAD,
) -> None:
    """Replace ``layer`` and the nodes after it, ``chain`` (the last one first), with the
    layer called on the folded weight and bias, computed in the graph by ``fold``."""
    output = chain[0]
    with graph.inserting_before(output):
        weight, bias = _fold_nodes(graph, kind, conv, fold)
        # A transposed conv's bias gradient is the sum of its output gradient, which the
        # CPU kernels (oneDNN) accumulate in float32 with errors of 1e-2 of its size on a
        # large output; the folded bias carries the BN's affine gradients too. Added after
        # the conv, it gets its gradient from Inductor's own reduction, as eager's BN does.
        late_bias = bias if grad and kind.transposed else None
        conv = {**conv, "weight": weight, "bias": None if late_bias is not None else bias}
        new_layer = graph.call_function(
            cast(Callable[..., Any], layer.target), *_layer_call(kind, conv)
        )
        new_layer.meta = dict(layer.meta)
        result = new_layer
        if late_bias is not None:
            shape = graph.call_method("reshape", (late_bias, [-1] + [1] * kind.rank))
            result = graph.call_function(operator.add, (new_layer, shape))
            result.meta = dict(layer.meta)
    output.replace_all_uses_with(result)
    for node in [*chain, layer]:
        graph.erase_node(node)
    decision = _decide.Decision(_pairs.describe_node(new_layer), True, how)
    if how == _pairs.FOLDED_ONCE:
        # Under freezing no cache skips this stage (Inductor bypasses the AOT autograd
        # cache for frozen graphs), and torch 2.6 drops the mark on the way: count now.
        _decide.record(decision)
    else:
        _decide.mark(new_layer, decision)
