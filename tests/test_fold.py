"""The fold formula against eager conv -> BN, for every layer kind it serves."""

import pytest
import torch
from torch import nn

from inductor_convbn import fold_conv_bn_weights
from inductor_convbn._fold import fold_conv_affine_weights
from inductor_convbn.testing import randomize_batch_norm

CONVS = {
    1: (nn.Conv1d, nn.ConvTranspose1d, nn.BatchNorm1d),
    2: (nn.Conv2d, nn.ConvTranspose2d, nn.BatchNorm2d),
    3: (nn.Conv3d, nn.ConvTranspose3d, nn.BatchNorm3d),
}


def _fold_into(layer: nn.Module, bn: nn.BatchNorm1d, transposed: bool = False, groups: int = 1):
    weight, bias = fold_conv_bn_weights(
        layer.weight, layer.bias, bn.running_mean, bn.running_var, bn.eps,
        bn.weight if bn.affine else None, bn.bias if bn.affine else None,
        transposed=transposed, groups=groups,
    )  # fmt: skip
    folded = type(layer).__new__(type(layer))
    folded.__dict__ = dict(layer.__dict__)
    folded._parameters = {"weight": nn.Parameter(weight), "bias": nn.Parameter(bias)}
    return folded


@pytest.mark.parametrize("rank", [1, 2, 3])
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("affine", [False, True])
@pytest.mark.parametrize("groups", [1, 2])
def test_fold_matches_conv_then_bn(rank, transposed, bias, affine, groups):
    torch.manual_seed(0)
    conv_cls, tconv_cls, bn_cls = CONVS[rank]
    cls = tconv_cls if transposed else conv_cls
    conv = cls(4, 6, 3, groups=groups, bias=bias, stride=2, padding=1).double()
    bn = randomize_batch_norm(bn_cls(6, affine=affine, eps=1e-3).double()).eval()
    x = torch.randn(2, 4, *[7] * rank, dtype=torch.double)
    folded = _fold_into(conv, bn, transposed, groups)
    torch.testing.assert_close(folded(x), bn(conv(x)))


@pytest.mark.parametrize("bias", [False, True])
def test_fold_linear_then_batchnorm1d(bias):
    torch.manual_seed(0)
    linear = nn.Linear(5, 6, bias=bias).double()
    bn = randomize_batch_norm(nn.BatchNorm1d(6).double()).eval()
    x = torch.randn(3, 5, dtype=torch.double)
    torch.testing.assert_close(_fold_into(linear, bn)(x), bn(linear(x)))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fold_runs_in_float32_and_casts_back(dtype):
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3)
    bn = randomize_batch_norm(nn.BatchNorm2d(4)).eval()
    weight, bias = fold_conv_bn_weights(
        conv.weight.to(dtype), conv.bias.to(dtype), bn.running_mean.to(dtype),
        bn.running_var.to(dtype), bn.eps, bn.weight.to(dtype), bn.bias.to(dtype),
    )  # fmt: skip
    assert weight.dtype == bias.dtype == dtype
    # One rounding of the float32 result, not a chain of half-precision ops.
    expected_w, expected_b = fold_conv_bn_weights(
        conv.weight.to(dtype).float(), conv.bias.to(dtype).float(),
        bn.running_mean.to(dtype).float(), bn.running_var.to(dtype).float(), bn.eps,
        bn.weight.to(dtype).float(), bn.bias.to(dtype).float(),
    )  # fmt: skip
    assert torch.equal(weight, expected_w.to(dtype))
    assert torch.equal(bias, expected_b.to(dtype))


def test_fold_keeps_channels_last():
    conv = nn.Conv2d(3, 4, 3).to(memory_format=torch.channels_last)
    bn = randomize_batch_norm(nn.BatchNorm2d(4)).eval()
    weight, _ = fold_conv_bn_weights(
        conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps
    )
    assert weight.is_contiguous(memory_format=torch.channels_last)


def test_fold_keeps_float64_precision():
    # Folded in float32, a float64 layer would be off by ~1e-7 relative, which the plugin's
    # float64 tolerance (1e-7) does not cover once the BN scale is above 1.
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3).double()
    bn = randomize_batch_norm(nn.BatchNorm2d(4).double()).eval()
    weight, bias = fold_conv_bn_weights(
        conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias
    )
    assert weight.dtype == bias.dtype == torch.float64
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    torch.testing.assert_close(weight, conv.weight * scale[:, None, None, None], rtol=1e-14, atol=0)
    torch.testing.assert_close(
        bias, (conv.bias - bn.running_mean) * scale + bn.bias, rtol=1e-14, atol=1e-15
    )


@pytest.mark.parametrize("rank", [0, 2, 3])
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shift", [False, True])
def test_affine_fold_matches_conv_then_scale_and_shift(rank, transposed, bias, shift):
    if rank == 0 and transposed:
        pytest.skip("a linear layer is not transposed")
    torch.manual_seed(0)
    groups = 1 if rank == 0 else 2
    if rank == 0:
        layer = nn.Linear(4, 6, bias=bias).double()
    else:
        cls = CONVS[rank][1 if transposed else 0]
        layer = cls(4, 6, 3, groups=groups, bias=bias, stride=2).double()
    x = torch.randn(2, 4, *[5] * rank, dtype=torch.double)
    per_channel = (1, 6) + (1,) * rank
    scale = torch.rand(per_channel, dtype=torch.double) + 0.5
    offset = torch.randn(per_channel, dtype=torch.double) if shift else None
    weight, folded_bias = fold_conv_affine_weights(
        layer.weight, layer.bias, scale, offset, transposed=transposed, groups=groups
    )
    folded = type(layer).__new__(type(layer))
    folded.__dict__ = dict(layer.__dict__)
    folded._parameters = {"weight": nn.Parameter(weight), "bias": nn.Parameter(folded_bias)}
    expected = layer(x) * scale + (0 if offset is None else offset)
    torch.testing.assert_close(folded(x), expected)
