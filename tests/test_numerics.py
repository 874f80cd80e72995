"""Adversarial numerics: a fold never changes a result, with or without freezing.

Under freezing the fold is computed once from known values and checked (test_policy.py has
the float16 overflow and an infinite variance); here the rest. Without freezing the fold is
recomputed every call from values only known then: a float16 pair is not folded (its
weight could overflow), and non-finite statistics give non-finite outputs in exactly the
channels eager does.
"""

import pytest
import torch
from torch import nn

import inductor_convbn
from inductor_convbn import _compat, _decide, _pairs, fold_conv_bn_weights
from inductor_convbn._report import DEFAULT_TOLERANCES
from inductor_convbn.testing import randomize_batch_norm
from test_policy import _overflowing_half_model

NAN, INF = float("nan"), float("inf")


def _model(eps=1e-5, conv=nn.Conv2d, relu=True):
    torch.manual_seed(0)
    layers = [conv(4, 6, 3, padding=1), nn.BatchNorm2d(6, eps=eps)] + [nn.ReLU()] * relu
    return randomize_batch_norm(nn.Sequential(*layers)).eval()


def _x(dtype=torch.float32):
    return torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1)).to(dtype)


def _compiled_and_eager(model, x):
    """``model(x)`` compiled with every safe pair folded per call, and eager."""
    with inductor_convbn.installed("always"), torch.no_grad():
        return torch.compile(model)(x), model(x)


@pytest.mark.parametrize(
    ("var", "eps", "freezing"),
    [(0.0, 1e-10, False), (1e-40, 1e-39, True)],
    ids=["zero-per-call", "denormal-freezing"],
)
def test_vanishing_variance_folds_and_matches_eager(var, eps, freezing):
    # The BN scale is 1e5 (variance 0, eps 1e-10) or 3e19 (denormal variance and eps):
    # large, but finite in float32, so the pair is folded.
    model = _model(eps=eps)
    with torch.no_grad():
        model[1].running_var[::2] = var
    with torch.no_grad():
        scale = float((model[1].weight.abs() / (model[1].running_var + eps).sqrt()).max())
    rtol, atol = DEFAULT_TOLERANCES[torch.float32]
    report = inductor_convbn.verify(
        model, _x(), policy="always", freezing=freezing, rtol=rtol, atol=atol * scale
    )
    assert report.outputs_match and report.folded == report.pairs == 1, report


@pytest.mark.parametrize(
    ("layer", "freezing"),
    [("conv", False), ("linear", True)],
    ids=["conv-per-call", "linear-freezing"],
)
def test_eps_zero_folds_and_matches_eager(layer, freezing):
    # Inductor drops the BN's `var + 0`, so eps 0 has a pattern of its own.
    try:
        torch.nn.functional.batch_norm(torch.ones(2, 1), torch.zeros(1), torch.ones(1), eps=0.0)
    except ValueError as error:  # torch 2.11 (not 2.14): "eps must be positive"
        pytest.skip(f"this torch refuses eps 0: {error}")
    if layer == "conv":
        model, x = _model(eps=0.0), _x()
    else:
        torch.manual_seed(0)
        model = randomize_batch_norm(nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6, eps=0.0)))
        model, x = model.eval(), torch.randn(3, 4)
    report = inductor_convbn.verify(model, x, policy="always", freezing=freezing)
    assert report.outputs_match and report.folded == report.pairs == 1, report


def test_denormal_weights_fold_and_match_eager():
    model = _model()
    with torch.no_grad():
        model[0].weight.mul_(1e-38)  # mostly denormal float32
        model[1].running_var.fill_(1e-30)  # a BN scale of 1e15 brings the output back up
    report = inductor_convbn.verify(
        model, _x(), policy="always", atol=1e-4 * 1e15 * 1e-38, freezing=False
    )
    assert report.outputs_match and report.folded == report.pairs == 1, report


@pytest.mark.parametrize("policy", ["auto", "always"])  # one graph: the second is from the cache
def test_float16_is_not_folded_per_call_where_the_fold_would_overflow(policy):
    model = _overflowing_half_model("cpu")
    x = (_x() * 1e-5).half()
    conv, bn = model[0], model[1]
    weight, _ = fold_conv_bn_weights(
        conv.weight, None, bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias,
        transposed=True,
    )  # fmt: skip
    assert not torch.isfinite(weight).all()  # what a fold would have run with
    report = inductor_convbn.verify(model, x, policy=policy, freezing=False)
    assert report.outputs_match and torch.isfinite(model(x)).all(), report
    assert report.pairs == 1 and report.folded == 0, report
    assert report.skipped == [("0", _pairs.FLOAT16_PER_CALL)]
    assert _compat.counters["inductor"][_decide.COUNTER_UNSAFE] == 1


def test_freezing_with_policy_always_skips_the_overflow_once():
    # The joint stage skips the fold it checked; the post-grad stage, which sees the same
    # pair with its parameters now constants, must not fold it per call instead.
    model = _overflowing_half_model("cpu")
    report = inductor_convbn.verify(model, (_x() * 1e-5).half(), policy="always", freezing=True)
    assert report.outputs_match and report.folded == 0, report
    assert report.skipped == [("0", _pairs.NOT_FINITE.format(dtype="float16"))]
    assert _compat.counters["inductor"][_decide.COUNTER_UNSAFE] == 1
    assert _compat.counters["inductor"][_decide.COUNTER_KEPT] == 0


STATS = ["running_mean", "running_var", "weight", "bias"]


@pytest.mark.parametrize("value", [NAN, INF], ids=["nan", "inf"])
def test_freezing_never_folds_non_finite_values(value):
    # A transposed conv: Inductor's own freezing folds a Conv2d + BN on CPU whatever the
    # plugin does, and turns a NaN into numbers (torch 2.14.1; docs/report.md).
    model = _model(conv=nn.ConvTranspose2d)
    # An infinite BN weight is left out: unfolded, Inductor's BN multiplies in another
    # order than eager's, which makes NaN and inf of it differently, plugin or not.
    fields = STATS if value != INF else [f for f in STATS if f != "weight"]
    with torch.no_grad():
        for channel, field in enumerate(fields):  # one per channel, each alone would do
            getattr(model[1], field)[channel] = value
    report = inductor_convbn.verify(model, _x(), policy="always", freezing=True)
    assert report.outputs_match and report.folded == 0, report
    assert report.skipped == [("0", _pairs.STATS_NOT_FINITE)]


@pytest.mark.parametrize(
    ("field", "value"),
    [(f, v) for f in STATS for v in (NAN, INF, -INF) if (f, v) != ("running_var", -INF)],
)
def test_per_call_fold_of_non_finite_values_is_non_finite_where_eager_is(field, value):
    # Without freezing the values are not known when compiling: the fold is made, and
    # spreads a non-finite value over exactly the channel eager spreads it over. (No ReLU,
    # which would turn -inf into 0 in both.)
    model = _model(relu=False)
    with torch.no_grad():
        getattr(model[1], field)[2] = value
    out, expected = _compiled_and_eager(model, _x())
    assert _compat.counters["inductor"][_decide.COUNTER_FOLDED] == 1
    # An infinite variance makes the channel beta, in eager and folded alike.
    assert torch.isfinite(expected[:, 2]).all() == (field == "running_var" and value == INF)
    torch.testing.assert_close(torch.isfinite(out), torch.isfinite(expected))
    assert torch.isnan(out[torch.isnan(expected)]).all()  # NaN wherever eager has NaN
    rtol, atol = DEFAULT_TOLERANCES[torch.float32]
    if field == "weight" and value != value * 0 and abs(value) == INF:
        # An infinite BN weight: eager gives +-inf or NaN by the sign of x - mean; the
        # folded weight is +-inf throughout, and its sums over mixed signs are NaN.
        assert torch.isnan(out[:, 2]).all()
        torch.testing.assert_close(out[:, [0, 1, 3, 4, 5]], expected[:, [0, 1, 3, 4, 5]])
    else:
        torch.testing.assert_close(out, expected, rtol=rtol, atol=atol, equal_nan=True)


def test_max_abs_error_counts_nan_against_a_number_as_infinite():
    from inductor_convbn._report import _max_abs_error

    expected = torch.tensor([1.0, NAN, INF, 2.0])
    assert _max_abs_error(torch.tensor([1.0, NAN, INF, 2.5]), expected)[0] == 0.5
    assert _max_abs_error(torch.tensor([1.0, NAN, INF, NAN]), expected)[0] == INF
    assert _max_abs_error(torch.tensor([1.0, NAN, -INF, 2.0]), expected)[0] == INF
    assert _max_abs_error(torch.tensor([1.0, 0.0, INF, 2.0]), expected)[0] == INF
