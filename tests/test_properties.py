"""Property-based: for any conv -> BN the compiled, folded model matches eager, and the
plugin folds exactly the pairs an independent count says it can.

Hypothesis draws the conv (rank, channels, groups, kernel, stride, padding, dilation,
transposed, output padding, bias), the BN (affine, eps, statistics, track_running_stats,
training, dtype), what follows it, the input (dtype, layout, batch size, size) and whether
to compile with freezing. The expected fold count comes from that description, not from the
graph.

Two runs of the same property: ``test_fold_matches_eager`` with a few dozen derandomized
examples (the default run and CI), ``test_fold_matches_eager_many`` with hundreds of random
ones under ``-m slow``. ``HYPOTHESIS_PROFILE=slow`` gives the first one the slow settings too.
"""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from torch import nn

import inductor_convbn
from inductor_convbn import _compat, _report

# Compiling takes seconds: no deadline. The autouse fixture of conftest runs once per test,
# not per example, so each example resets dynamo itself.
_COMMON = dict(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
settings.register_profile("ci", max_examples=24, derandomize=True, **_COMMON)
settings.register_profile("slow", max_examples=300, **_COMMON)
CI = settings.get_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
SLOW = settings.get_profile("slow")

CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
TCONV = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
CHANNELS_LAST = {2: torch.channels_last, 3: torch.channels_last_3d}
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


@dataclasses.dataclass(frozen=True)
class Case:
    rank: int
    transposed: bool
    groups: int
    in_per_group: int
    out_per_group: int
    kernel: int
    stride: int
    padding: int
    dilation: int
    output_padding: int
    bias: bool
    affine: bool
    eps: float
    track_running_stats: bool
    bn_training: bool
    after: str  # what uses the BN output: "none", "relu", "add" (the conv output too)
    dtype: torch.dtype
    bn_float32: bool  # a half-precision conv followed by a float32 BN
    channels_last: bool
    batch: int
    size: int
    freezing: bool
    seed: int

    def output_size(self) -> int:
        span = self.dilation * (self.kernel - 1)
        if self.transposed:
            return (self.size - 1) * self.stride - 2 * self.padding + span + self.output_padding + 1
        return (self.size + 2 * self.padding - span - 1) // self.stride + 1

    def expected_folds(self) -> int:
        """Whether the pair may be folded, from the description alone."""
        eligible = self.track_running_stats and not self.bn_training and self.after != "add"
        # Per call, a float16 fold is never made: its weight could overflow.
        checkable = self.freezing or self.dtype != torch.float16
        return int(eligible and checkable)


@st.composite
def cases(draw: st.DrawFn) -> Case:
    rank = draw(st.sampled_from([1, 2, 3]))
    transposed = draw(st.booleans())
    groups = draw(st.sampled_from([1, 2, 3]))
    in_per_group = draw(st.integers(1, 3))
    # Depthwise (one input channel per group) comes out often with these ranges.
    out_per_group = draw(st.integers(1, 3))
    stride = draw(st.integers(1, 3))
    dilation = draw(st.integers(1, 2))
    output_padding = draw(st.integers(0, max(stride, dilation) - 1)) if transposed else 0
    dtype = draw(st.sampled_from(DTYPES))
    half = dtype in (torch.float16, torch.bfloat16)
    case = Case(
        rank=rank,
        transposed=transposed,
        groups=groups,
        in_per_group=in_per_group,
        out_per_group=out_per_group,
        kernel=draw(st.integers(1, 3)),
        stride=stride,
        padding=draw(st.integers(0, 2)),
        dilation=dilation,
        output_padding=output_padding,
        bias=draw(st.booleans()),
        affine=draw(st.booleans()),
        eps=draw(st.sampled_from([1e-5, 1e-3, 0.1, 1e-12])),
        # Mostly foldable pairs, some that must be left alone.
        track_running_stats=draw(st.sampled_from([True, True, True, False])),
        bn_training=draw(st.sampled_from([False, False, False, True])),
        after=draw(st.sampled_from(["none", "relu", "relu", "add"])),
        dtype=dtype,
        bn_float32=half and draw(st.booleans()),
        channels_last=rank > 1 and draw(st.booleans()),
        batch=draw(st.integers(1, 3)),
        size=draw(st.integers(1, 7 if rank < 3 else 5)),
        # Inductor's freezing cannot compile a float64 conv on CPU, plugin or not: its weight
        # prepacking rejects double (torch 2.14.1).
        freezing=dtype != torch.float64 and draw(st.booleans()),
        seed=draw(st.integers(0, 2**16)),
    )
    assume(case.output_size() >= 1)
    # Batch statistics (training mode, or no running statistics) need more than one value
    # per channel.
    batch_statistics = case.bn_training or not case.track_running_stats
    assume(not batch_statistics or case.batch * case.output_size() ** rank > 1)
    return case


class ConvBn(nn.Module):
    def __init__(self, case: Case) -> None:
        super().__init__()
        in_channels = case.groups * case.in_per_group
        out_channels = case.groups * case.out_per_group
        conv_cls = (TCONV if case.transposed else CONV)[case.rank]
        extra = dict(output_padding=case.output_padding) if case.transposed else {}
        self.conv = conv_cls(
            in_channels, out_channels, case.kernel, stride=case.stride, padding=case.padding,
            dilation=case.dilation, groups=case.groups, bias=case.bias, **extra,
        )  # fmt: skip
        self.bn = BN[case.rank](
            out_channels,
            eps=case.eps,
            affine=case.affine,
            track_running_stats=case.track_running_stats,
        )
        self.after = case.after

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        z = self.bn(y)
        if self.after == "relu":
            return torch.relu(z)
        if self.after == "add":
            return z + y
        return z


def build(case: Case) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(case.seed)
    model = ConvBn(case).eval()
    bn = model.bn
    with torch.no_grad():
        if bn.running_mean is not None:
            bn.running_mean.uniform_(-1.0, 1.0)
            # Down to tiny variances: with eps=1e-12 the BN scale reaches 1e3.
            bn.running_var.copy_(10 ** torch.empty_like(bn.running_var).uniform_(-6, 1))
        if case.affine:
            bn.weight.uniform_(-2.0, 2.0)
            bn.bias.uniform_(-1.0, 1.0)
    bn.train(case.bn_training)
    model.to(case.dtype)
    if case.bn_float32:
        bn.float()
    x = torch.randn(case.batch, case.groups * case.in_per_group, *[case.size] * case.rank)
    x = x.to(case.dtype)
    if case.channels_last:
        model.to(memory_format=CHANNELS_LAST[case.rank])
        x = x.contiguous(memory_format=CHANNELS_LAST[case.rank])
    return model, x


def bn_scale(model: nn.Module, case: Case) -> float:
    """The largest factor the BN multiplies by: |gamma| / sqrt(running_var + eps)."""
    gamma = model.bn.weight.abs().max().item() if case.affine else 1.0
    if not case.track_running_stats or case.bn_training:
        return gamma  # normalised by batch statistics; no fold
    return gamma / (model.bn.running_var.min().item() + case.eps) ** 0.5


def check(case: Case) -> None:
    _compat.dynamo_reset()
    model, x = build(case)
    rtol, atol = _report.DEFAULT_TOLERANCES[case.dtype]
    # Rounding errors, the folded weight's included, are multiplied by the BN scale, which
    # reaches 2e3 here (variance 1e-6, eps 1e-12, |gamma| 2): the tolerance is in its units.
    atol *= max(1.0, bn_scale(model, case))
    report = inductor_convbn.verify(
        model, x, policy="always", freezing=case.freezing, rtol=rtol, atol=atol
    )
    # A graph dynamo gave up on would run eagerly and match trivially: the pair must have
    # been seen in the compiled graph.
    assert report.pairs == 1, report
    assert report.folded == case.expected_folds(), (case, report)
    assert not report.missed, report
    assert report.outputs_match, (case, report)


@given(cases())
@CI
def test_fold_matches_eager(case):
    check(case)


@pytest.mark.slow
@given(cases())
@SLOW
def test_fold_matches_eager_many(case):
    check(case)
