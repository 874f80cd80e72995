"""The fold formula: the one place that turns a conv and an eval BatchNorm into one conv.

An eval BatchNorm is an affine map per channel, so ``bn(conv(x)) == conv'(x)`` with::

    scale = bn_weight / sqrt(running_var + eps)       (bn_weight = 1 when affine=False)
    w'    = w * scale      (over the output-channel axis of w)
    b'    = (b - running_mean) * scale + bn_bias      (b = 0 when the conv has no bias)

A per-channel affine map ``y * scale + shift`` (a frozen BN, whose statistics are buffers
folded into ``scale`` and ``shift`` in its forward) folds the same way:
``w' = w * scale``, ``b' = b * scale + shift`` (``fold_conv_affine_weights``).

The math runs in float32 (float64 for a float64 layer) and the result is cast back to the conv
weight's dtype, so every model loses no more precision than one rounding of the folded weight.
"""

from __future__ import annotations

import torch

__all__ = ["fold_conv_affine_weights", "fold_conv_bn_weights"]


def fold_conv_bn_weights(
    conv_weight: torch.Tensor,
    conv_bias: torch.Tensor | None,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    eps: float,
    bn_weight: torch.Tensor | None = None,
    bn_bias: torch.Tensor | None = None,
    *,
    transposed: bool = False,
    groups: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(weight, bias)`` of the conv (or linear) layer that computes ``bn(conv(x))``.

    ``conv_weight`` is laid out as torch lays out conv weights: ``(out, in / groups, *k)``,
    or ``(in, out / groups, *k)`` when ``transposed``; a linear weight ``(out, in)`` is the
    non-transposed case. Works on real, fake and traced tensors alike.
    """
    # float32 at the least; a float64 layer folded in float32 would lose half its digits.
    dtype = torch.promote_types(conv_weight.dtype, torch.float32)
    scale = torch.rsqrt(running_var.to(dtype) + eps)
    if bn_weight is not None:
        scale = scale * bn_weight.to(dtype)

    weight = _scale_out_channels(conv_weight.to(dtype), scale, transposed, groups)
    mean = running_mean.to(dtype)
    bias = -mean if conv_bias is None else conv_bias.to(dtype) - mean
    bias = bias * scale
    if bn_bias is not None:
        bias = bias + bn_bias.to(dtype)
    return weight.to(conv_weight.dtype), bias.to(conv_weight.dtype)


def fold_conv_affine_weights(
    conv_weight: torch.Tensor,
    conv_bias: torch.Tensor | None,
    scale: torch.Tensor,
    shift: torch.Tensor | None = None,
    *,
    transposed: bool = False,
    groups: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(weight, bias)`` of the layer that computes ``conv(x) * scale + shift``,
    for a ``scale`` and ``shift`` per output channel (of any shape that broadcasts along
    the channel dim only: a frozen BN's ``(1, C, 1, 1)``, or one element for all)."""
    dtype = torch.promote_types(conv_weight.dtype, torch.float32)
    channels = conv_weight.shape[1] * groups if transposed else conv_weight.shape[0]
    scale = scale.to(dtype).reshape(-1).expand(channels)
    weight = _scale_out_channels(conv_weight.to(dtype), scale, transposed, groups)
    # ``scale * 0.0``, not zeros nor ``scale * 0``: Inductor drops ``zeros + shift`` (and
    # from torch 2.8 ``x * 0``, an int zero) to a view of the shift, and torch 2.6-2.12
    # cannot lower a convolution whose bias is a view of another shape.
    bias = scale * 0.0 if conv_bias is None else conv_bias.to(dtype) * scale
    if shift is not None:
        bias = bias + shift.to(dtype).reshape(-1).expand(channels)
    return weight.to(conv_weight.dtype), bias.to(conv_weight.dtype)


def _scale_out_channels(
    weight: torch.Tensor, scale: torch.Tensor, transposed: bool, groups: int
) -> torch.Tensor:
    kernel_dims = [1] * (weight.dim() - 2)
    if transposed:
        # Output channel g * (out / groups) + j of a transposed conv lives at
        # weight[g * (in / groups) + i, j]: scale dim 1 within each group.
        weight = weight.unflatten(0, (groups, -1)) * scale.reshape(groups, 1, -1, *kernel_dims)
        return weight.flatten(0, 1)
    return weight * scale.reshape(-1, *[1] * (weight.dim() - 1))
