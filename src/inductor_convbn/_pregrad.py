"""The ``"grad"`` stage: fold eval BatchNorm into the conv in graphs that need gradients.

When a compiled graph needs gradients (an eval model called without ``torch.no_grad()``,
or frozen-BN fine-tuning), AOT autograd saves the conv output for the BN's backward, so
the post-grad stage finds the conv output used twice and cannot fold. This stage runs
before AOT autograd, on the graph dynamo captured, and replaces ``batch_norm(conv(x, w,
b))`` with ``conv(x, w', b')`` where ``w', b'`` are computed from ``w``, ``b`` and the BN
tensors by ``fold_conv_bn_weights``, a differentiable function: gradients reach the conv
weight and the BN's affine parameters, and the conv output need not be saved.
"""

from __future__ import annotations

import inspect
import operator
import time
from collections.abc import Callable
from typing import Any, cast

import torch
import torch.nn.functional as F

from ._fold import fold_conv_bn_weights
from ._registry import Decision, _record, describe_node, pass_time

__all__ = ["FLOAT16_FOR_GRAD", "FOLDED_FOR_GRAD", "fold_for_grad"]

FOLDED_FOR_GRAD = "into the weight, differentiably, in a graph that needs gradients"
FLOAT16_FOR_GRAD = (
    "float16 in a graph that needs gradients: the folded weight can overflow float16 where "
    "conv and BN apart do not, and its values are not known when compiling"
)

_CONV_PARAMS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_CONV_TRANSPOSE_PARAMS = (
    "input", "weight", "bias", "stride", "padding", "output_padding", "groups", "dilation",
)  # fmt: skip
# The layer calls of dynamo's graph (torch.nn.functional.conv2d is torch.conv2d), and the
# names of their parameters: builtins have no signature to bind to.
_LAYERS: dict[Any, tuple[str, ...]] = {
    torch.conv1d: _CONV_PARAMS,
    torch.conv2d: _CONV_PARAMS,
    torch.conv3d: _CONV_PARAMS,
    torch.conv_transpose1d: _CONV_TRANSPOSE_PARAMS,
    torch.conv_transpose2d: _CONV_TRANSPOSE_PARAMS,
    torch.conv_transpose3d: _CONV_TRANSPOSE_PARAMS,
    F.linear: ("input", "weight", "bias"),
}
_TRANSPOSED = (torch.conv_transpose1d, torch.conv_transpose2d, torch.conv_transpose3d)
_BN_SIGNATURE = inspect.signature(F.batch_norm)


def _example(node: Any) -> Any:
    return node.meta.get("example_value") if isinstance(node, torch.fx.Node) else None


def _requires_grad(node: Any) -> bool:
    value = _example(node)
    return isinstance(value, torch.Tensor) and value.requires_grad


def _bind(node: torch.fx.Node, names: tuple[str, ...]) -> dict[str, Any] | None:
    if len(node.args) > len(names) or any(k not in names for k in node.kwargs):
        return None
    return {**dict(zip(names, node.args, strict=False)), **node.kwargs}


def fold_for_grad(graph: torch.fx.Graph) -> int:
    """Fold each eval conv -> batch_norm pair of a dynamo graph that gradients flow through.

    Does nothing when grad mode is off: AOT autograd then builds an inference graph, and
    the post-grad stage folds there. Returns how many pairs it folded.
    """
    if not torch.is_grad_enabled():
        return 0
    start = time.perf_counter()
    count = 0
    for bn in list(graph.nodes):
        if bn.op != "call_function" or bn.target is not F.batch_norm:
            continue
        layer = bn.args[0] if bn.args else bn.kwargs.get("input")
        if not isinstance(layer, torch.fx.Node) or layer.op != "call_function":
            continue
        names = _LAYERS.get(layer.target)
        if names is None or len(layer.users) > 1:
            continue
        conv = _bind(layer, names)
        if conv is None:
            continue
        bound = _BN_SIGNATURE.bind(*bn.args, **bn.kwargs)
        bound.apply_defaults()
        norm = bound.arguments
        if norm["training"] is not False or norm["running_mean"] is None:
            continue
        if norm["running_var"] is None or not isinstance(norm["eps"], (int, float)):
            continue
        if layer.target is F.linear and getattr(_example(layer), "ndim", None) != 2:
            continue  # BN normalises dim 1, the features only of a 2-D linear output
        tensors = (conv["input"], conv["weight"], conv.get("bias"), norm["weight"], norm["bias"])
        if not any(_requires_grad(t) for t in tensors):
            continue  # no gradient goes through this pair: the post-grad stage sees it
        groups = conv.get("groups", 1)
        if not isinstance(groups, int):
            continue
        if getattr(_example(layer), "dtype", None) == torch.float16:  # also fp16 autocast
            _record(Decision(describe_node(layer), False, FLOAT16_FOR_GRAD, unsafe=True))
            continue
        with graph.inserting_before(layer):
            # Traced by AOT autograd, which records the fold's ops and their backward.
            folded = graph.call_function(
                fold_conv_bn_weights,
                (
                    conv["weight"], conv.get("bias"), norm["running_mean"], norm["running_var"],
                    float(norm["eps"]), norm["weight"], norm["bias"],
                ),
                {"transposed": layer.target in _TRANSPOSED, "groups": groups},
            )  # fmt: skip
            weight = graph.call_function(operator.getitem, (folded, 0))
            bias = graph.call_function(operator.getitem, (folded, 1))
            conv.update(weight=weight, bias=bias)
            given = [n for n in names if n in conv]
            positional = names[: next((i for i, n in enumerate(names) if n not in conv), None)]
            new_layer = graph.call_function(
                cast(Callable[..., Any], layer.target),
                tuple(conv[n] for n in positional),
                {n: conv[n] for n in given if n not in positional},
            )
        new_layer.meta = dict(layer.meta)
        bn.replace_all_uses_with(new_layer)
        graph.erase_node(bn)
        graph.erase_node(layer)
        _record(Decision(describe_node(new_layer), True, FOLDED_FOR_GRAD))
        count += 1
    pass_time.total_s += time.perf_counter() - start
    return count
