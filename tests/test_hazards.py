"""Graph hazards: shapes of a model around a conv -> BN pair that a fold could get wrong.

Each case compiles with every safe pair folded (``policy="always"``) and compares with
eager; the expected pairs and folds are read off the model as written. test_plugin.py has
a conv output used by a BN and an add, a BN in training mode and one without running stats.
"""

import copy

import pytest
import torch
from torch import nn

import inductor_convbn
from inductor_convbn import _compat, _decide
from inductor_convbn._pairs import OTHER_USERS
from inductor_convbn.testing import randomize_batch_norm


def _x(channels=4, batch=2):
    return torch.randn(batch, channels, 8, 8, generator=torch.Generator().manual_seed(1))


def _prepared(model):
    return randomize_batch_norm(model).eval()


class ConvCalledTwice(nn.Module):
    """One conv module, called twice, each call followed by its own BN."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn1, self.bn2 = nn.BatchNorm2d(4), nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn2(self.conv(self.bn1(self.conv(x))))


class SharedWeight(nn.Module):
    """Two conv modules holding the same weight Parameter, each with its BN."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(4, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.conv2.weight = self.conv1.weight
        self.bn1, self.bn2 = nn.BatchNorm2d(4), nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn1(self.conv1(x)) - self.bn2(self.conv2(x))


class BnOutputUsedTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 6, 3)
        self.bn = nn.BatchNorm2d(6)

    def forward(self, x):
        z = self.bn(self.conv(x))
        return z * z.mean(dim=(2, 3), keepdim=True) + z


class InPlaceAfterBn(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 6, 3)
        self.bn = nn.BatchNorm2d(6)

    def forward(self, x):
        z = self.bn(self.conv(x))
        z.relu_()
        z.mul_(2.0).add_(1.0)
        return z


class ConvOutputToTwoBns(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 6, 3)
        self.bn1, self.bn2 = nn.BatchNorm2d(6), nn.BatchNorm2d(6, eps=1e-3)

    def forward(self, x):
        y = self.conv(x)
        return self.bn1(y) * self.bn2(y)


@pytest.mark.parametrize(
    ("cls", "pairs", "folded", "freezing"),
    [
        # Each call of the conv is a node of its own: each pair folds on its own.
        (ConvCalledTwice, 2, 2, False),
        (ConvCalledTwice, 2, 2, True),
        # Freezing hands the shared Parameter over once; both folds read it.
        (SharedWeight, 2, 2, False),
        (SharedWeight, 2, 2, True),
        (BnOutputUsedTwice, 1, 1, False),
        (InPlaceAfterBn, 1, 1, False),
        (ConvOutputToTwoBns, 2, 0, False),
    ],
)
def test_hazard_matches_eager(cls, pairs, folded, freezing):
    torch.manual_seed(0)
    model = _prepared(cls())
    report = inductor_convbn.verify(model, _x(), policy="always", freezing=freezing)
    assert report.outputs_match, report
    assert (report.pairs, report.folded) == (pairs, folded), report
    assert not report.missed, report
    if folded == 0:
        assert {reason for _, reason in report.skipped} == {OTHER_USERS}


def test_batch_norm_in_training_mode_inside_an_eval_model_keeps_training():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(4, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 6, 3), nn.BatchNorm2d(6)
    )
    model = _prepared(model)
    model[4].train()  # e.g. a BN left in training mode by accident
    twin = copy.deepcopy(model)
    before = model[4].running_mean.clone()
    x = _x()
    with inductor_convbn.installed("always"), torch.no_grad():
        out = torch.compile(model)(x)
        expected = twin(x)
    assert _compat.counters["inductor"][_decide.COUNTER_FOLDED] == 1  # the eval pair only
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
    # The training-mode BN updated its running statistics, as in eager.
    assert not torch.equal(model[4].running_mean, before)
    torch.testing.assert_close(model[4].running_mean, twin[4].running_mean)
    torch.testing.assert_close(model[4].running_var, twin[4].running_var)


def test_compiled_model_follows_every_value_and_mode_change():
    # Without freezing the fold is recomputed from the live tensors on every call: each
    # in-place update shows at the next call, without recompiling.
    torch.manual_seed(0)
    model = _prepared(nn.Sequential(nn.Conv2d(4, 6, 3), nn.BatchNorm2d(6)))
    conv, bn = model
    x = _x()
    with inductor_convbn.installed("always"), torch.no_grad():
        compiled = torch.compile(model)
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-4)
        for tensor in (bn.running_mean, bn.running_var, bn.weight, bn.bias, conv.weight, conv.bias):
            tensor.mul_(1.5).add_(0.25)
            torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-4)
        assert _compat.counters["stats"]["unique_graphs"] == 1
        # Back to training mode: dynamo's guard on `training` recompiles, and the BN
        # normalises with batch statistics and updates its running ones, as in eager.
        model.train()
        twin = copy.deepcopy(model)
        torch.testing.assert_close(compiled(x), twin(x), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(bn.running_mean, twin[1].running_mean)
        torch.testing.assert_close(bn.running_var, twin[1].running_var)
    assert _compat.counters["inductor"][_decide.COUNTER_FOLDED] == 1
