"""Training with less memory: a conv + BatchNorm that keeps only the conv input for backward.

In training, a conv saves its input for backward and the BatchNorm after it saves its own
input, the conv output. ``FusedConvBatchNorm2d`` saves the conv input and the per-channel
batch statistics only, and recomputes the conv output in backward: one activation-sized
buffer less per pair, for one more convolution per backward::

    import inductor_convbn

    model = inductor_convbn.memory_efficient(model)   # a converted copy
    print(inductor_convbn.memory_efficient_report(model))

It works in eager and under ``torch.compile``, with autocast, and in eval mode, where it runs
the conv with the BN folded into its weight (differentiably: gradients still reach the conv
and the BN's affine parameters).
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from typing import Any, cast

import torch
from torch import nn

from . import _budget, _dataflow, _pairs
from ._fold import fold_conv_bn_weights
from ._modules import ModulePair, find_module_pairs, trace

__all__ = [
    "FusedConvBatchNorm1d",
    "FusedConvBatchNorm2d",
    "FusedConvBatchNorm3d",
    "MemoryEfficientReport",
    "memory_efficient",
    "memory_efficient_report",
]


class _ConvBatchNormTrain(torch.autograd.Function):
    """``batch_norm(conv(x))`` in training mode, saving ``x`` rather than ``conv(x)``.

    Returns the normalised output, and the batch mean and inverse standard deviation (not
    differentiable) from which the caller updates the running statistics. The forward is
    plain aten ops, which torch.compile fuses with what follows (the BN's normalisation
    with the ReLU after it). The backward is one custom op, opaque on purpose: traced as
    plain ops, AOT autograd would see the conv in forward and its recomputation in
    backward as one expression, merge them, and save the conv output after all.
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        bn_weight: torch.Tensor | None,
        bn_bias: torch.Tensor | None,
        running_mean: torch.Tensor | None,
        running_var: torch.Tensor | None,
        momentum: float,
        eps: float,
        stride: list[int],
        padding: list[int],
        dilation: list[int],
        groups: int,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        y = torch.convolution(
            x, weight, bias, stride, padding, dilation, False, [0] * len(stride), groups
        )
        # With running statistics, the BN kernel updates them as nn.BatchNorm's call does.
        out, mean, invstd = torch.ops.aten.native_batch_norm(
            y, bn_weight, bn_bias, running_mean, running_var, True, momentum, eps
        )
        ctx.save_for_backward(x, weight, bias, bn_weight, mean, invstd)
        ctx.hyper = (eps, stride, padding, dilation, groups)
        ctx.mark_non_differentiable(mean, invstd)
        # No zero-filled gradients for the statistics: backward does not read them.
        ctx.set_materialize_grads(False)
        return out, mean, invstd

    @staticmethod
    def backward(
        ctx: Any, grad_out: torch.Tensor | None, _grad_mean: Any, _grad_invstd: Any
    ) -> tuple[torch.Tensor | None, ...]:
        if grad_out is None:
            return (None,) * 14
        x, weight, bias, bn_weight, mean, invstd = ctx.saved_tensors
        mask = [bool(n) for n in ctx.needs_input_grad[:5]]
        # The opaque op where a compiler traces backward; in eager its body, which spares
        # the custom op's dispatch (eager steps of small convs are bound by the CPU).
        backward: Callable[..., Any] = _conv_bn_train_backward_impl
        if torch.compiler.is_compiling():
            backward = _conv_bn_train_backward
        grads = backward(grad_out, x, weight, bias, bn_weight, mean, invstd, *ctx.hyper, mask)
        return (*(g if need else None for g, need in zip(grads, mask, strict=True)),) + (None,) * 9


def _channels_last(x: torch.Tensor) -> torch.memory_format | None:
    """The channels-last format to run a CUDA half-precision 2-D or 3-D conv in, or None."""
    if x.device.type != "cuda" or x.dtype not in (torch.float16, torch.bfloat16):
        return None
    return {4: torch.channels_last, 5: torch.channels_last_3d}.get(x.dim())


def _like(grad: torch.Tensor, t: torch.Tensor, channels_last: torch.memory_format) -> torch.Tensor:
    """``grad`` in the memory format of ``t`` (an empty placeholder stays as it is)."""
    if grad.dim() != t.dim():
        return grad
    keep = not t.is_contiguous() and t.is_contiguous(memory_format=channels_last)
    return grad.contiguous(memory_format=channels_last if keep else torch.contiguous_format)


def _conv_bn_train_backward_impl(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    bn_weight: torch.Tensor | None,
    mean: torch.Tensor,
    invstd: torch.Tensor,
    eps: float,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
    output_mask: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients for x, weight, bias, bn_weight, bn_bias (empty where not asked for)."""
    layout = _channels_last(x)
    tensors = (grad_out, x, weight)
    if layout is not None and not all(t.is_contiguous(memory_format=layout) for t in tensors):
        # cuDNN's half-precision convs want channels-last; given NCHW tensors (what the
        # forward saved, under torch.compile too) they transpose inside every call.
        # Converting once is faster (bf16 ResNet18, batch 256, H100: the compiled step from
        # 2.46x to 1.79x the unfused one). The gradients go back in the layouts of x and
        # weight, as the op's fake function (this same code) says.
        g, x_, w = (t.contiguous(memory_format=layout) for t in tensors)
        converted = _conv_bn_train_backward_impl(
            g, x_, w, bias, bn_weight, mean, invstd, eps, stride, padding, dilation, groups,
            output_mask,
        )  # fmt: skip
        return (_like(converted[0], x, layout), _like(converted[1], weight, layout), *converted[2:])
    conv_args = (stride, padding, dilation, False, [0] * len(stride), groups)
    need_x, need_w, need_b, need_gamma, need_beta = output_mask
    need_conv = need_x or need_w or need_b
    # The conv output, recomputed: this is the buffer the forward did not keep.
    y = torch.convolution(x, weight, bias, *conv_args)
    grad_y, grad_gamma, grad_beta = torch.ops.aten.native_batch_norm_backward(
        grad_out, y, bn_weight, None, None, mean, invstd, True, eps,
        [need_conv, need_gamma, need_beta],
    )  # fmt: skip
    del y
    grad_x = grad_w = grad_b = None
    if need_conv:
        grad_x, grad_w, grad_b = torch.ops.aten.convolution_backward(
            grad_y, x, weight, None if bias is None else [bias.shape[0]], *conv_args,
            [need_x, need_w, need_b],
        )  # fmt: skip
    grads = (grad_x, grad_w, grad_b, grad_gamma, grad_beta)
    # A fresh empty tensor for each gradient not asked for: outputs may not alias.
    return tuple(x.new_empty(0) if g is None else g for g in grads)  # type: ignore[return-value]


_conv_bn_train_backward = torch.library.custom_op(
    "inductor_convbn::conv_bn_train_backward",
    _conv_bn_train_backward_impl,
    mutates_args=(),
    # Written out: torch < 2.7 cannot infer a schema from `list[int]` or `Tensor | None`.
    schema=(
        "(Tensor grad_out, Tensor x, Tensor weight, Tensor? bias, Tensor? bn_weight, "
        "Tensor mean, Tensor invstd, float eps, int[] stride, int[] padding, int[] dilation, "
        "int groups, bool[] output_mask) -> (Tensor, Tensor, Tensor, Tensor, Tensor)"
    ),
)
# The op's fake (meta) function is its own body: every aten op it calls has one.
_conv_bn_train_backward.register_fake(_conv_bn_train_backward_impl)


def _sync_group(bn: nn.modules.batchnorm._BatchNorm) -> Any:
    """The process group whose batch ``bn`` normalises over, or None for the local batch.

    What ``nn.SyncBatchNorm.forward`` decides: a SyncBatchNorm in training mode, with
    ``torch.distributed`` initialised and more than one process in its ``process_group``
    (None: the world); otherwise it is plain batch norm.
    """
    if not isinstance(bn, nn.SyncBatchNorm) or not bn.training:
        return None
    distributed = torch.distributed
    if not (distributed.is_available() and distributed.is_initialized()):
        return None
    group = bn.process_group or distributed.group.WORLD
    return group if distributed.get_world_size(group) > 1 else None


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half precision, as the batch-norm kernels accumulate; else ``dtype``."""
    return torch.promote_types(dtype, torch.float32)


def _global_batch_stats(
    y: torch.Tensor, group: Any
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-channel mean and biased variance of ``y`` over the batches of every process in
    ``group``, and the number of values per channel there.

    Each process's mean, variance and count are gathered, not summed, so that batches of
    different sizes (an empty one too) weigh by their counts, as in ``nn.SyncBatchNorm``;
    they are combined by the parallel-variance formula, which avoids the cancellation of a
    sum of squares.
    """
    channels = y.shape[1]
    dims = [0, *range(2, y.dim())]
    acc = _accumulation_dtype(y.dtype)
    count = y.numel() // channels
    if count > 0:
        var, mean = torch.var_mean(y.to(acc), dims, correction=0)
    else:  # an empty batch still takes part in the collective, with count 0
        mean = var = y.new_zeros(channels, dtype=acc)
    local = torch.cat([mean, var, mean.new_full((1,), count)])
    world = torch.distributed.get_world_size(group)
    gathered = [torch.empty_like(local) for _ in range(world)]
    torch.distributed.all_gather(gathered, local, group=group)
    stats = torch.stack(gathered)
    means, variances, counts = stats[:, :channels], stats[:, channels:-1], stats[:, -1:]
    total = counts.sum()
    mean = (counts * means).sum(0) / total
    var = (counts * (variances + (means - mean).square())).sum(0) / total
    return mean, var, total


class _ConvSyncBatchNormTrain(torch.autograd.Function):
    """``_ConvBatchNormTrain`` for a SyncBatchNorm: the statistics of the whole group's batch.

    Forward normalises with the mean and variance over every process's batch
    (``_global_batch_stats``). Backward recomputes the conv, all-reduces the per-channel
    sums of the output gradient and of the gradient times the centred output, and takes the
    conv output's gradient from those global sums, as ``nn.SyncBatchNorm``'s backward does.
    The BN's weight and bias get this process's share of their gradients (the sums over
    its own batch), which DistributedDataParallel averages, again as for SyncBatchNorm.
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        bn_weight: torch.Tensor | None,
        bn_bias: torch.Tensor | None,
        eps: float,
        stride: list[int],
        padding: list[int],
        dilation: list[int],
        groups: int,
        group: Any,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        y = torch.convolution(
            x, weight, bias, stride, padding, dilation, False, [0] * len(stride), groups
        )
        mean, var, count = _global_batch_stats(y, group)
        out = torch.ops.aten.native_batch_norm(y, bn_weight, bn_bias, mean, var, False, 0.0, eps)[0]
        invstd = torch.rsqrt(var + eps)
        ctx.save_for_backward(x, weight, bias, bn_weight, mean, invstd, count)
        ctx.hyper = (stride, padding, dilation, groups)
        ctx.group = group
        ctx.affine_dtype = None if bn_weight is None else bn_weight.dtype
        ctx.mark_non_differentiable(mean, var, count)
        return out, mean, var, count

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor, *_: Any) -> tuple[torch.Tensor | None, ...]:
        x, weight, bias, bn_weight, mean, invstd, count = ctx.saved_tensors
        need_x, need_w, need_b, need_gamma, need_beta = ctx.needs_input_grad[:5]
        y, sum_dy, sum_dy_centred = _sync_bn_backward_reduce(
            grad_out, x, weight, bias, mean, *ctx.hyper
        )
        # In the dtype of the BN's parameters, which autocast leaves in float32.
        grad_gamma = (sum_dy_centred * invstd).to(ctx.affine_dtype) if need_gamma else None
        grad_beta = sum_dy.to(ctx.affine_dtype) if need_beta else None
        grad_x = grad_w = grad_b = None
        if need_x or need_w or need_b:
            # Every process computes this: the all-reduce pairs up across the group.
            sums = torch.cat([sum_dy, sum_dy_centred])
            torch.distributed.all_reduce(sums, group=ctx.group)
            mask = [need_x, need_w, need_b]
            grads = _sync_bn_backward_elemt(
                grad_out, x, weight, bias, y, mean, invstd, bn_weight, sums, count, *ctx.hyper,
                mask,
            )  # fmt: skip
            grad_x, grad_w, grad_b = (g if n else None for g, n in zip(grads, mask, strict=True))
        return (grad_x, grad_w, grad_b, grad_gamma, grad_beta) + (None,) * 6


# The SyncBatchNorm backward in two opaque ops, for the reason given in _ConvBatchNormTrain,
# with the all-reduce between them: the conv output they pass on lives in backward only.
def _sync_bn_backward_reduce_impl(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    mean: torch.Tensor,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The conv output, recomputed, and this process's per-channel sums of the output
    gradient and of the output gradient times the centred conv output."""
    y = torch.convolution(
        x, weight, bias, stride, padding, dilation, False, [0] * len(stride), groups
    )
    shape, dims = [1, -1] + [1] * (y.dim() - 2), [0, *range(2, y.dim())]
    dy = grad_out.to(mean.dtype)
    return y, dy.sum(dims), (dy * (y.to(mean.dtype) - mean.view(shape))).sum(dims)


def _sync_bn_backward_elemt_impl(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    y: torch.Tensor,
    mean: torch.Tensor,
    invstd: torch.Tensor,
    bn_weight: torch.Tensor | None,
    sums: torch.Tensor,
    count: torch.Tensor,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
    output_mask: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients for x, weight and bias (empty where not asked for), from the group's
    ``sums`` (of the output gradient, then of it times the centred output)."""
    shape = [1, -1] + [1] * (y.dim() - 2)
    mean_dy, mean_dy_centred = (sums / count).chunk(2)
    centred = y.to(mean.dtype) - mean.view(shape)
    scale = invstd if bn_weight is None else invstd * bn_weight.to(invstd.dtype)
    grad_y = grad_out.to(mean.dtype) - mean_dy.view(shape)
    grad_y = (grad_y - centred * (invstd.square() * mean_dy_centred).view(shape)) * scale.view(
        shape
    )
    del centred
    grads = torch.ops.aten.convolution_backward(
        grad_y.to(grad_out.dtype), x, weight, None if bias is None else [bias.shape[0]],
        stride, padding, dilation, False, [0] * len(stride), groups, output_mask,
    )  # fmt: skip
    # A fresh empty tensor for each gradient not asked for: outputs may not alias.
    return tuple(x.new_empty(0) if g is None else g for g in grads)  # type: ignore[return-value]


_CONV_SCHEMA = "int[] stride, int[] padding, int[] dilation, int groups"
_sync_bn_backward_reduce = torch.library.custom_op(
    "inductor_convbn::sync_bn_backward_reduce",
    _sync_bn_backward_reduce_impl,
    mutates_args=(),
    schema=(
        f"(Tensor grad_out, Tensor x, Tensor weight, Tensor? bias, Tensor mean, {_CONV_SCHEMA})"
        " -> (Tensor, Tensor, Tensor)"
    ),
)
_sync_bn_backward_reduce.register_fake(_sync_bn_backward_reduce_impl)
_sync_bn_backward_elemt = torch.library.custom_op(
    "inductor_convbn::sync_bn_backward_elemt",
    _sync_bn_backward_elemt_impl,
    mutates_args=(),
    schema=(
        "(Tensor grad_out, Tensor x, Tensor weight, Tensor? bias, Tensor y, Tensor mean, "
        "Tensor invstd, Tensor? bn_weight, Tensor sums, Tensor count, "
        f"{_CONV_SCHEMA}, bool[] output_mask) -> (Tensor, Tensor, Tensor)"
    ),
)
_sync_bn_backward_elemt.register_fake(_sync_bn_backward_elemt_impl)


def _conv_padding(conv: nn.modules.conv._ConvNd) -> list[int]:
    """The conv's padding as numbers per side, or ValueError when it is not symmetric."""
    if conv.padding_mode != "zeros":
        return [0] * len(conv.kernel_size)  # the input is padded before the conv
    if conv.padding == "valid":
        return [0] * len(conv.kernel_size)
    if conv.padding == "same":
        totals = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size, strict=True)]
        if any(t % 2 for t in totals):
            raise ValueError(
                "padding='same' with an even kernel pads one side more than the other, "
                "which torch.convolution cannot express"
            )
        return [t // 2 for t in totals]
    return list(cast("tuple[int, ...]", conv.padding))


class _FusedConvBatchNormNd(nn.Module):
    _fx_leaf = True  # torch.fx traces it as one call_module
    _conv_type: type[nn.modules.conv._ConvNd]
    _bn_type: type[nn.modules.batchnorm._BatchNorm]

    conv: nn.modules.conv._ConvNd
    bn: nn.modules.batchnorm._BatchNorm

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, ...],
        stride: int | tuple[int, ...] = 1,
        padding: str | int | tuple[int, ...] = 0,
        dilation: int | tuple[int, ...] = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: Any = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        conv_type = cast(Any, self._conv_type)
        self.conv = conv_type(
            in_channels, out_channels, kernel_size, stride=stride, padding=padding,
            dilation=dilation, groups=groups, bias=bias, padding_mode=padding_mode,
            device=device, dtype=dtype,
        )  # fmt: skip
        bn_type = cast(Any, self._bn_type)
        self.bn = bn_type(
            out_channels, eps=eps, momentum=momentum, affine=affine,
            track_running_stats=track_running_stats, device=device, dtype=dtype,
        )  # fmt: skip
        self._padding = _conv_padding(self.conv)

    @classmethod
    def from_modules(cls, conv: nn.Module, bn: nn.Module) -> _FusedConvBatchNormNd:
        """The fused layer computing ``bn(conv(x))``, sharing ``conv`` and ``bn`` (no copy).

        Its ``state_dict`` is the pair's, under ``conv.`` and ``bn.``: a checkpoint of the
        pair loads into it, and ``to_modules()`` gives the pair back.
        """
        if type(conv) is not cls._conv_type or type(bn) not in (cls._bn_type, nn.SyncBatchNorm):
            raise TypeError(
                f"{cls.__name__}.from_modules() takes an {cls._conv_type.__name__} and a "
                f"{cls._bn_type.__name__} or SyncBatchNorm, got {type(conv).__name__} and "
                f"{type(bn).__name__}"
            )
        conv_nd = cast(nn.modules.conv._ConvNd, conv)
        bn_nd = cast(nn.modules.batchnorm._BatchNorm, bn)
        if bn_nd.num_features != conv_nd.out_channels:
            raise ValueError(
                f"the BN has {bn_nd.num_features} features, the conv {conv_nd.out_channels} "
                "output channels"
            )
        fused = cls.__new__(cls)
        nn.Module.__init__(fused)
        fused.conv = conv_nd
        fused.bn = bn_nd
        fused._padding = _conv_padding(conv_nd)
        fused.training = conv_nd.training  # and each module keeps its own mode: a frozen
        return fused  # (eval) BN in a training model stays frozen

    def to_modules(self) -> tuple[nn.Module, nn.Module]:
        """The plain ``(conv, bn)`` pair this layer computes, sharing its parameters."""
        return self.conv, self.bn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv, bn = self.conv, self.bn
        if conv.padding_mode != "zeros":
            x = nn.functional.pad(x, conv._reversed_padding_repeated_twice, mode=conv.padding_mode)
        use_batch_stats = bn.training or bn.running_mean is None
        if not use_batch_stats:
            return self._folded_forward(x)
        weight, bias = conv.weight, conv.bias
        device_type = x.device.type
        if torch.is_autocast_enabled(device_type):
            # What autocast does to a conv; the BN then runs on the conv's output dtype.
            dtype = torch.get_autocast_dtype(device_type)
            x, weight = x.to(dtype), weight.to(dtype)
            bias = None if bias is None else bias.to(dtype)
        conv_args = (list(conv.stride), self._padding, list(conv.dilation), conv.groups)
        group = _sync_group(bn)
        # In eager, the BN kernel updates the running statistics, as in nn.BatchNorm's own
        # call: no extra kernels (eager steps of small convs are bound by the CPU). Compiled,
        # they are updated below, in ops Inductor fuses; so are a cumulative average (its
        # factor is a tensor) and a batch of one (it raises first, changing nothing).
        in_kernel = (
            group is None
            and bn.training
            and bn.running_mean is not None
            and bn.momentum is not None
            and x.shape[0] > 1
            and not torch.compiler.is_compiling()
        )
        with torch.autocast(device_type, enabled=False):
            if group is not None:
                out, mean, var, count = _ConvSyncBatchNormTrain.apply(
                    x, weight, bias, bn.weight, bn.bias, bn.eps, *conv_args, group
                )
            else:
                running = (bn.running_mean, bn.running_var) if in_kernel else (None, None)
                out, mean, invstd = _ConvBatchNormTrain.apply(
                    x, weight, bias, bn.weight, bn.bias, *running,
                    bn.momentum if in_kernel else 0.0, bn.eps, *conv_args,
                )  # fmt: skip
                count = out.numel() // out.shape[1]
        if group is None and bn.training and count <= 1:
            # What nn.BatchNorm says: one value per channel has no variance. (SyncBatchNorm
            # does not check the group's count.)
            raise ValueError(
                f"Expected more than 1 value per channel when training, got input size {out.size()}"
            )
        if in_kernel:
            assert bn.num_batches_tracked is not None
            with torch.no_grad():
                bn.num_batches_tracked.add_(1)
        elif bn.training and bn.running_mean is not None:
            if group is None:
                # invstd = 1 / sqrt(var + eps), in float32 at least (the kernel's
                # accumulation type).
                var = invstd.pow(-2) - bn.eps
            self._update_running_stats(count, mean, var)
        return out

    def _folded_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Eval mode: the conv with the BN folded into its weight, still differentiable."""
        conv, bn = self.conv, self.bn
        assert bn.running_mean is not None and bn.running_var is not None
        weight, bias = fold_conv_bn_weights(
            conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps, bn.weight,
            bn.bias, groups=conv.groups,
        )  # fmt: skip
        return torch.convolution(
            x, weight, bias, list(conv.stride), self._padding, list(conv.dilation), False,
            [0] * len(conv.stride), conv.groups,
        )  # fmt: skip

    def _update_running_stats(
        self, count: int | torch.Tensor, mean: torch.Tensor, var: torch.Tensor
    ) -> None:
        """What ``nn.BatchNorm`` does in training, from the batch's ``count`` values per
        channel and their mean and biased ``var``: unbiased variance, momentum or average."""
        bn = self.bn
        assert bn.running_mean is not None and bn.running_var is not None
        running_mean, running_var = bn.running_mean, bn.running_var
        factor: float | torch.Tensor = 0.0 if bn.momentum is None else bn.momentum
        with torch.no_grad():
            if bn.num_batches_tracked is not None:
                bn.num_batches_tracked.add_(1)
                if bn.momentum is None:  # a cumulative moving average
                    # A tensor, not float(): torch.compile keeps it in the graph.
                    factor = 1.0 / bn.num_batches_tracked.to(running_mean.dtype)
            var = var * (count / (count - 1))
            running_mean.mul_(1 - factor).add_(mean.to(running_mean.dtype) * factor)
            running_var.mul_(1 - factor).add_(var.to(running_var.dtype) * factor)

    def extra_repr(self) -> str:
        return "saves the conv input only; recomputes the conv in backward"


class FusedConvBatchNorm1d(_FusedConvBatchNormNd):
    """``nn.BatchNorm1d(nn.Conv1d(x))``, keeping only the conv input for backward.

    Takes the arguments of ``nn.Conv1d`` then those of ``nn.BatchNorm1d``; see
    ``FusedConvBatchNorm2d``.
    """

    _conv_type = nn.Conv1d
    _bn_type = nn.BatchNorm1d


class FusedConvBatchNorm2d(_FusedConvBatchNormNd):
    """``nn.BatchNorm2d(nn.Conv2d(x))``, keeping only the conv input for backward.

    Takes the arguments of ``nn.Conv2d`` then those of ``nn.BatchNorm2d``, and behaves as
    that pair does: training mode normalises with the batch statistics and updates the
    running ones (unbiased variance; ``momentum=None`` for a cumulative average;
    ``num_batches_tracked``), eval mode uses the running ones. The conv output is not saved
    for backward but recomputed, so training keeps one activation-sized buffer less.
    The pair lives on as ``.conv`` and ``.bn``; ``from_modules()`` / ``to_modules()``
    convert from and to it.
    """

    _conv_type = nn.Conv2d
    _bn_type = nn.BatchNorm2d


class FusedConvBatchNorm3d(_FusedConvBatchNormNd):
    """``nn.BatchNorm3d(nn.Conv3d(x))``, keeping only the conv input for backward.

    Takes the arguments of ``nn.Conv3d`` then those of ``nn.BatchNorm3d``; see
    ``FusedConvBatchNorm2d``.
    """

    _conv_type = nn.Conv3d
    _bn_type = nn.BatchNorm3d


_FUSED_TYPES: dict[type, type[_FusedConvBatchNormNd]] = {
    t._conv_type: t for t in (FusedConvBatchNorm1d, FusedConvBatchNorm2d, FusedConvBatchNorm3d)
}


@dataclasses.dataclass
class MemoryEfficientReport(_pairs.PairTable):
    """What ``memory_efficient()`` found: each conv -> BN pair, fused or why not.

    With example inputs, each pair's estimate too (``costs``, by conv path): the bytes its
    fused layer keeps out of memory until backward and the FLOPs it adds there, on those
    inputs; ``estimated_overhead`` is what the fused pairs add to a training step's FLOPs.
    """

    done = _pairs.FUSED
    title = "inductor_convbn.memory_efficient"
    costs: dict[str, _budget.PairCost] = dataclasses.field(default_factory=dict)
    step_flops: int | None = None  # of a training step on the example inputs
    max_overhead: float | None = None

    @property
    def fused(self) -> int:
        return self._done_count()

    @property
    def estimated_saved_bytes(self) -> int:
        """Bytes the fused pairs keep out of memory until backward, on the example inputs."""
        return sum(self.costs[p.conv].saved_bytes for p in self._fused_with_costs())

    @property
    def estimated_overhead(self) -> float | None:
        """The fused pairs' recomputation as a fraction of a training step's FLOPs."""
        if not self.step_flops:
            return None
        added = sum(self.costs[p.conv].recompute_flops for p in self._fused_with_costs())
        return added / self.step_flops

    def _fused_with_costs(self) -> list[_pairs.PairReport]:
        return [p for p in self.pair_reports if p.status == self.done and p.conv in self.costs]

    def _head(self) -> str:
        head = super()._head()
        overhead = self.estimated_overhead
        if overhead is None:
            return head
        budget = "" if self.max_overhead is None else f"max_overhead={self.max_overhead:g}; "
        return (
            f"{head} ({budget}estimated on the example inputs: "
            f"{_mib(self.estimated_saved_bytes)} less at the end of forward, "
            f"+{overhead:.1%} step FLOPs)"
        )

    def _rows(self) -> list[_pairs.PairReport]:
        return [self._with_cost(p) for p in self.pair_reports]

    def _with_cost(self, p: _pairs.PairReport) -> _pairs.PairReport:
        cost = self.costs.get(p.conv)
        if cost is None or not self.step_flops:
            return p
        share = cost.recompute_flops / self.step_flops
        status = f"{p.status} [{_mib(cost.saved_bytes)}, +{share:.1%}]"
        return dataclasses.replace(p, status=status)


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


_REPORT_ATTRIBUTE = "_inductor_convbn_memory_efficient"


class _OriginalStateDictKeys:
    """State-dict hooks on the converted model that keep the original model's keys.

    ``layer1.0.conv1.conv.weight`` is saved as ``layer1.0.conv1.weight`` and
    ``layer1.0.conv1.bn.running_mean`` as ``layer1.0.bn1.running_mean``, and loaded back
    from those names, so checkpoints move between the plain and the converted model.
    A class rather than a closure, so that the converted model pickles.
    """

    def __init__(self) -> None:
        self.to_original: dict[str, str] = {}  # converted key -> original key

    def save(self, module: nn.Module, state_dict: dict[str, Any], prefix: str, *_: Any) -> None:
        renamed = {prefix + c: prefix + o for c, o in self.to_original.items()}
        items = list(state_dict.items())
        state_dict.clear()  # refilled in the same order, so the keys keep their places
        for key, value in items:
            state_dict[renamed.get(key, key)] = value

    def load(self, state_dict: dict[str, Any], prefix: str, *_: Any) -> None:
        for converted, original in self.to_original.items():
            if prefix + original in state_dict and prefix + converted not in state_dict:
                state_dict[prefix + converted] = state_dict.pop(prefix + original)


def memory_efficient(
    model: nn.Module,
    *example_inputs: Any,
    inplace: bool = False,
    max_overhead: float | None = None,
) -> nn.Module:
    """Swap each conv -> BatchNorm pair of ``model`` for a ``FusedConvBatchNorm{1,2,3}d``.

    Pairs are found by dataflow: a conv module whose only user is a BatchNorm module of the
    same rank, each called once, with no hooks. Without ``example_inputs`` the dataflow is a
    ``torch.fx`` trace of the model; with them, the record of one run of the model on them
    (no lasting change to its state), which needs no tracing (ultralytics' YOLO) and also
    takes a BatchNorm subclass that calls child modules after its normalisation (timm's
    ``BatchNormAct2d``: drop, activation): those children keep running after the fused
    layer, in the BN's place. The converted model then runs on the example inputs once
    more and must compute what the model did (outputs and running statistics); a swap
    that does not is undone and reported.

    ``max_overhead``: the extra training-step time to spend, as a fraction of the step
    (``0.1``: at most 10% more), estimated from FLOPs on the example inputs (needed). The
    pairs that save the most bytes per FLOP recomputed are fused first, as long as their
    recomputation stays within it; the others are kept, and the report says so. ``None``
    (the default) fuses every pair.

    The fused layer takes the conv's place and an ``nn.Identity`` the BN's; both modules'
    tensors live on inside it, so the parameters are the same tensors, and the model's
    ``state_dict`` keeps its original keys. ``memory_efficient_report(model)`` lists every
    pair and why any was left as it was, with each pair's estimated bytes and FLOPs when
    there are example inputs.

    Works on a deep copy unless ``inplace``; the model's class and forward are kept.
    Raises ``inductor_convbn.fx.FuseError`` when ``torch.fx`` cannot trace the model (no
    example inputs) or the model does not run on the example inputs.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"memory_efficient() takes an nn.Module, got {type(model).__name__}")
    if max_overhead is not None:
        if isinstance(max_overhead, bool) or not isinstance(max_overhead, (int, float)):
            raise TypeError(f"max_overhead is a fraction of the step, got {max_overhead!r}")
        if not max_overhead >= 0:  # also NaN
            raise ValueError(f"max_overhead must be 0 or more, got {max_overhead}")
        if not example_inputs:
            raise ValueError(
                "max_overhead needs example inputs, memory_efficient(model, x, "
                "max_overhead=...): the costs come from the convs' shapes on them"
            )
    target = model if inplace else _copy(model)
    gm: torch.fx.GraphModule | None = None
    if not example_inputs:
        gm = trace(
            target,
            caller="memory_efficient()",
            alternative=(
                "pass example inputs, memory_efficient(model, x), to find the pairs by "
                "running the model, or build the layers with "
                "FusedConvBatchNorm2d.from_modules(conv, bn)"
            ),
        )
    else:
        run = _dataflow.record_pairs(
            target, example_inputs, caller="memory_efficient()", count_flops=True
        )
    keys = target.__dict__.get("_inductor_convbn_keys")
    if keys is None:
        keys = _OriginalStateDictKeys()
        target.__dict__["_inductor_convbn_keys"] = keys
        target._register_state_dict_hook(keys.save)
        target._register_load_state_dict_pre_hook(keys.load)
    if gm is not None:
        report = MemoryEfficientReport(_swap_traced(target, gm, keys))
    else:
        report = _swap_found(target, run, keys, max_overhead)
    target.__dict__[_REPORT_ATTRIBUTE] = report
    return target


def _swap_traced(
    target: nn.Module, gm: torch.fx.GraphModule, keys: _OriginalStateDictKeys
) -> list[_pairs.PairReport]:
    """Swap the pairs of a ``torch.fx`` trace of ``target``."""
    reports = []
    for pair in find_module_pairs(gm):
        reason = _reason_not_to_swap(gm, pair)
        reports.append(pair.report(_pairs.SKIPPED if reason else _pairs.FUSED, reason))
        if not reason:
            conv, bn = target.get_submodule(pair.conv), target.get_submodule(pair.bn_name)
            _swap(target, pair.conv, pair.bn_name, conv, bn, nn.Identity(), keys)
    return reports


def _swap_found(
    target: nn.Module,
    run: _dataflow.Run,
    keys: _OriginalStateDictKeys,
    max_overhead: float | None,
) -> MemoryEfficientReport:
    """Swap the pairs found in a run of ``target`` (within ``max_overhead``), keeping those
    that compute what it did."""
    statuses: dict[int, tuple[str, str]] = {}  # pair id -> (status, reason)
    for p in run.pairs:
        reason = _reason_not_to_swap_run(p)
        statuses[id(p)] = (_pairs.SKIPPED, reason) if reason else (_pairs.FUSED, "")
    convs = tuple(_FUSED_TYPES)
    costs = {p.conv: _pair_cost(p) for p in run.pairs if isinstance(p.layer_module, convs)}
    assert run.forward_flops is not None  # counted: memory_efficient asked for them
    step = _budget.step_flops(run.forward_flops)
    eligible = [p for p in run.pairs if statuses[id(p)][0] == _pairs.FUSED]
    if max_overhead is not None:
        chosen, _ = _budget.choose_within_budget(
            [costs[p.conv] for p in eligible], step, max_overhead
        )
        for i, pair in enumerate(eligible):
            if i not in chosen:
                statuses[id(pair)] = (_pairs.KEPT, _pairs.OVER_BUDGET)
        eligible = [p for i, p in enumerate(eligible) if i in chosen]
    for pair in _dataflow.apply_checked(
        target, run, eligible, lambda p: _swap_run(target, p, keys)
    ):
        statuses[id(pair)] = (_pairs.SKIPPED, _pairs.CHANGED_OUTPUTS)
    reports = [p.report(*statuses[id(p)]) for p in run.pairs]
    return MemoryEfficientReport(reports, costs, step or None, max_overhead)


def _pair_cost(pair: _dataflow.RunPair) -> _budget.PairCost:
    weight = cast(nn.modules.conv._ConvNd, pair.layer_module).weight
    return _budget.conv_cost(weight.shape, pair.output_shape, pair.output_itemsize)


def _copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` whose SyncBatchNorms share the original's process groups
    (a process group cannot be copied: it is a handle on the processes' connection)."""
    groups = [m.process_group for m in model.modules() if isinstance(m, nn.SyncBatchNorm)]
    return copy.deepcopy(model, {id(g): g for g in groups if g is not None})


def memory_efficient_report(model: nn.Module) -> MemoryEfficientReport:
    """The report of the ``memory_efficient()`` call that converted ``model``."""
    report = getattr(model, "__dict__", {}).get(_REPORT_ATTRIBUTE)
    if not isinstance(report, MemoryEfficientReport):
        raise ValueError("this module was not converted by inductor_convbn.memory_efficient()")
    return report


def _reason_not_to_swap(gm: torch.fx.GraphModule, pair: ModulePair) -> str:
    """Why the pair keeps its two modules; empty when it gets a fused layer."""
    if pair.bn_module is None:
        return _pairs.FUNCTIONAL_BN
    reason = _modules_reason(pair.layer_module, pair.bn_module, exact_bn=True)
    if reason:
        return reason
    reason = pair.module_reason(moves_bn=True)
    if reason:
        return reason
    owners = (f"{pair.conv}.", f"{pair.bn.target}.")
    if any(n.op == "get_attr" and str(n.target).startswith(owners) for n in gm.graph.nodes):
        return _pairs.TENSORS_READ  # swapping the modules would move those tensors
    return _padding_reason(pair.layer_module)


def _reason_not_to_swap_run(pair: _dataflow.RunPair) -> str:
    """Why a pair found in a run keeps its modules; empty when it gets a fused layer."""
    if pair.frozen:
        return _pairs.FROZEN_NOT_SWAPPED
    if pair.reason:
        return pair.reason
    assert pair.bn_module is not None
    reason = _modules_reason(pair.layer_module, pair.bn_module, exact_bn=False)
    if reason:
        return reason
    bn = cast(nn.modules.batchnorm._BatchNorm, pair.bn_module)
    # The BN's forward called batch_norm with its own tensors (the finder checked); the
    # fused layer computes what nn.BatchNorm's forward does, so the call must be that one.
    tracking = not bn.training or bn.track_running_stats
    if (
        pair.eps != bn.eps
        or pair.training != (bn.training or (bn.running_mean is None and bn.running_var is None))
        or (pair.running_mean is None) == (tracking and bn.running_mean is not None)
        or (bn.training and bn.momentum is not None and pair.momentum != bn.momentum)
    ):
        return _pairs.BN_NOT_BATCH_NORM
    return _padding_reason(pair.layer_module)


def _modules_reason(layer: nn.Module, bn: nn.Module, *, exact_bn: bool) -> str:
    """Why the fused layer cannot compute this conv and BN; empty when it can.

    ``exact_bn``: the BN module goes into the fused layer as it is; otherwise the fused
    layer gets an ``nn.BatchNorm`` on the BN's own tensors, and a subclass will do.
    """
    fused_type = _FUSED_TYPES.get(type(layer))
    if fused_type is None:
        own_forward = _pairs.layer_kind_of_module(layer, exact=False) is None
        if own_forward and isinstance(layer, tuple(_FUSED_TYPES)):
            return _pairs.CONV_SUBCLASS
        return _pairs.NOT_A_CONV
    if type(bn) not in (fused_type._bn_type, nn.SyncBatchNorm) and (
        exact_bn or not isinstance(bn, fused_type._bn_type)
    ):
        return _pairs.BN_TYPE
    return ""


def _padding_reason(layer: nn.Module) -> str:
    try:
        _conv_padding(cast(nn.modules.conv._ConvNd, layer))
    except ValueError as e:
        return str(e)
    return ""


def _swap(
    model: nn.Module,
    conv_path: str,
    bn_path: str,
    conv: nn.Module,
    bn: nn.Module,
    replacement: nn.Module,
    keys: _OriginalStateDictKeys,
) -> _dataflow.Undo:
    """Put the fused layer of ``conv`` and ``bn`` at ``conv_path`` and ``replacement`` at
    ``bn_path``; returns what undoes it."""
    fused = _FUSED_TYPES[type(conv)].from_modules(conv, bn)
    originals = {conv_path: model.get_submodule(conv_path), bn_path: model.get_submodule(bn_path)}
    for path, new in ((conv_path, fused), (bn_path, replacement)):
        _dataflow.set_module(model, path, new)
    added = []
    for child, path in (("conv", conv_path), ("bn", bn_path)):
        for key in getattr(fused, child).state_dict(keep_vars=True):
            added.append(f"{conv_path}.{child}.{key}")
            keys.to_original[added[-1]] = f"{path}.{key}"

    def undo() -> None:
        for path, module in originals.items():
            _dataflow.set_module(model, path, module)
        for key in added:
            del keys.to_original[key]

    return undo


def _swap_run(
    model: nn.Module, pair: _dataflow.RunPair, keys: _OriginalStateDictKeys
) -> _dataflow.Undo:
    """Swap a pair found in a run; a BN subclass's children stay in the BN's place."""
    assert pair.bn_module is not None
    bn_type = _FUSED_TYPES[type(pair.layer_module)]._bn_type
    bn = pair.bn_module
    if type(bn) not in (bn_type, nn.SyncBatchNorm):
        bn = _as_plain_batch_norm(cast(nn.modules.batchnorm._BatchNorm, bn), bn_type)
    return _swap(model, pair.conv, pair.bn_name, pair.layer_module, bn, pair.replacement(), keys)


def _as_plain_batch_norm(
    bn: nn.modules.batchnorm._BatchNorm, bn_type: type[nn.modules.batchnorm._BatchNorm]
) -> nn.modules.batchnorm._BatchNorm:
    """An ``nn.BatchNorm`` of ``bn_type`` on the same parameters and buffers as ``bn``, a
    subclass whose normalisation is ``nn.BatchNorm``'s: the fused layer computes that."""
    plain = bn_type.__new__(bn_type)
    nn.Module.__init__(plain)
    for attribute in ("num_features", "eps", "momentum", "affine", "track_running_stats"):
        setattr(plain, attribute, getattr(bn, attribute))
    plain.training = bn.training
    for name, parameter in bn._parameters.items():
        plain.register_parameter(name, parameter)
    for name, buffer in bn._buffers.items():
        plain.register_buffer(name, buffer, persistent=name not in bn._non_persistent_buffers_set)
    return plain
