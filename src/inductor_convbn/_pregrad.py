"""The ``"grad"`` stage: fold eval BatchNorm into the conv in graphs that need gradients.

When a compiled graph needs gradients (an eval model called without ``torch.no_grad()``,
or frozen-BN fine-tuning), AOT autograd saves the conv output for the BN's backward, so
the per-call stage finds the conv output used twice and cannot fold. This stage runs
before AOT autograd, on the graph dynamo captured, and replaces ``batch_norm(conv(x, w,
b))`` with ``conv(x, w', b')`` where ``w', b'`` are computed from ``w``, ``b`` and the BN
tensors by ``fold_conv_bn_weights``, a differentiable function: gradients reach the conv
weight and the BN's affine parameters, and the conv output need not be saved.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any, cast

import torch

from . import _decide, _pairs
from ._fold import fold_conv_bn_weights

__all__ = ["fold_for_grad"]


def _example(node: Any) -> Any:
    return node.meta.get("example_value") if isinstance(node, torch.fx.Node) else None


def _requires_grad(node: Any) -> bool:
    value = _example(node)
    return isinstance(value, torch.Tensor) and value.requires_grad


def fold_for_grad(graph: torch.fx.Graph) -> int:
    """Fold each eval conv -> batch_norm pair of a dynamo graph that gradients flow through.

    Does nothing when grad mode is off: AOT autograd then builds an inference graph, and
    the later stages fold there. Returns how many pairs it folded.
    """
    if not torch.is_grad_enabled():
        return 0
    with _decide.pass_time.timing():
        return sum(_fold_pair(graph, bn) for bn in list(graph.nodes))


def _fold_pair(graph: torch.fx.Graph, bn: torch.fx.Node) -> bool:
    """Fold the pair ending at ``bn`` when it is one this stage folds; say whether it did."""
    if bn.op != "call_function" or bn.target not in _pairs.BATCH_NORM_FUNCTIONS:
        return False
    norm = _pairs.bind_batch_norm(bn.target, bn.args, bn.kwargs)
    layer = norm["input"]
    if not isinstance(layer, torch.fx.Node) or layer.op != "call_function":
        return False
    kind = _pairs.layer_kind_of_function(layer.target)
    if kind is None:
        return False
    try:
        conv = _pairs.bind_layer(kind, layer.args, layer.kwargs)
    except ValueError:
        return False
    output = _example(layer)
    reason = _pairs.reason_not_to_fold(
        kind,
        has_running_stats=norm["running_mean"] is not None and norm["running_var"] is not None,
        training=norm["training"],
        other_users=len(layer.users) > 1,
        output_rank=output.dim() if isinstance(output, torch.Tensor) else None,
    )
    groups = conv.get("groups", 1)
    if reason or not isinstance(norm["eps"], (int, float)) or not isinstance(groups, int):
        return False  # the verifier reports it; the later stages do not fold it either
    tensors = (conv["input"], conv["weight"], conv.get("bias"), norm["weight"], norm["bias"])
    if not any(_requires_grad(t) for t in tensors):
        return False  # no gradient goes through this pair: the later stages see it
    unsafe = _decide.unsafe_unknown_values(getattr(output, "dtype", None), for_grad=True)
    if unsafe:  # float16, also under autocast
        where = _pairs.describe_node(layer)
        _decide.mark(layer, _decide.Decision(where, False, unsafe, unsafe=True))
        return False
    with graph.inserting_before(layer):
        # Traced by AOT autograd, which records the fold's ops and their backward.
        folded = graph.call_function(
            fold_conv_bn_weights,
            (
                conv["weight"], conv.get("bias"), norm["running_mean"], norm["running_var"],
                float(norm["eps"]), norm["weight"], norm["bias"],
            ),
            {"transposed": kind.transposed, "groups": groups},
        )  # fmt: skip
        weight = graph.call_function(operator.getitem, (folded, 0))
        bias = graph.call_function(operator.getitem, (folded, 1))
        # A transposed conv's bias gradient is the sum of its output gradient, which the
        # CPU kernels (oneDNN) accumulate in float32 with errors of 1e-2 of its size on a
        # large output; the folded bias carries the BN's affine gradients too. Added after
        # the conv, it gets its gradient from Inductor's own reduction, as eager's BN does.
        late_bias = bias if kind.transposed else None
        conv.update(weight=weight, bias=None if kind.transposed else bias)
        names = kind.params
        given = [n for n in names if n in conv]
        positional = names[: next((i for i, n in enumerate(names) if n not in conv), None)]
        new_layer = graph.call_function(
            cast(Callable[..., Any], layer.target),
            tuple(conv[n] for n in positional),
            {n: conv[n] for n in given if n not in positional},
        )
        new_layer.meta = dict(layer.meta)
        result = new_layer
        if late_bias is not None:
            shape = graph.call_method("reshape", (late_bias, [-1] + [1] * kind.rank))
            result = graph.call_function(operator.add, (new_layer, shape))
            result.meta = dict(layer.meta)
    bn.replace_all_uses_with(result)
    graph.erase_node(bn)
    graph.erase_node(layer)
    where = _pairs.describe_node(new_layer)
    _decide.mark(new_layer, _decide.Decision(where, True, _pairs.FOLDED_FOR_GRAD))
    return True
