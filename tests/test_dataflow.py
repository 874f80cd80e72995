"""Pairs found by recording one run: ``fx.fold_modules`` and ``memory_efficient(model, x)``.

Each model here is small and built to hit one rule; the real models are in
tests/test_real_models.py. Every fold is checked against the unchanged model in eager.
"""

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import inductor_convbn
from inductor_convbn import _dataflow, _pairs, fx
from inductor_convbn.testing import randomize_batch_norm


def _x(batch=2, channels=3, size=8):
    return torch.randn(batch, channels, size, size, generator=torch.Generator().manual_seed(1))


def _fold(model, *inputs):
    """Fold a copy of ``model`` and check it against ``model`` in eager."""
    folded = fx.fold_modules(model, *inputs)
    with torch.no_grad():
        torch.testing.assert_close(folded(*inputs), model(*inputs), rtol=1e-5, atol=1e-5)
    return folded, fx.fuse_report(folded)


class BatchNormAct(nn.BatchNorm2d):
    """A BN subclass that adds child modules after the normalisation, as timm's does."""

    def __init__(self, channels, act=None):
        super().__init__(channels)
        self.drop = nn.Identity()
        self.act = act or nn.SiLU()

    def forward(self, x):
        if self.training and self.track_running_stats:
            self.num_batches_tracked.add_(1)
        x = F.batch_norm(
            x, self.running_mean, self.running_var, self.weight, self.bias,
            self.training, 0.0 if self.momentum is None else self.momentum, self.eps,
        )  # fmt: skip
        return self.act(self.drop(x))


class BatchNormNotCounting(BatchNormAct):
    """A BN subclass that does not count its batches, as nn.BatchNorm does."""

    def forward(self, x):
        if self.training:
            self.num_batches_tracked.sub_(1)  # and BatchNormAct adds it back
        return super().forward(x)


class BatchNormThenScale(BatchNormAct):
    """A BN subclass that computes something after the normalisation itself."""

    def forward(self, x):
        return super().forward(x) * 2


class PadSame(nn.Conv2d):
    """A conv that pads in its forward, with Python control flow (timm's Conv2dSame)."""

    def forward(self, x):
        if x.shape[-1] % 2 == 0:
            x = F.pad(x, (0, 1, 0, 1))
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class WeightStandardized(nn.Conv2d):
    """A conv that convolves with a weight computed in forward: a fold of its parameter
    would be standardised away."""

    def forward(self, x):
        w = (self.weight - self.weight.mean()) / (self.weight.std() + 1e-5)
        return F.conv2d(x, w, self.bias, self.stride, self.padding)


class Frozen(nn.Module):
    """A frozen BN: buffers, and ``x * scale + shift`` in forward (torchvision's form)."""

    def __init__(self, channels, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("weight", torch.rand(channels, generator=g) + 0.5)
        self.register_buffer("bias", torch.rand(channels, generator=g) - 0.5)
        self.register_buffer("running_mean", torch.rand(channels, generator=g) - 0.5)
        self.register_buffer("running_var", torch.rand(channels, generator=g) + 0.5)

    def forward(self, x):
        scale = self.weight * (self.running_var + 1e-5).rsqrt()
        shift = self.bias - self.running_mean * scale
        return x * scale.reshape(1, -1, 1, 1) + shift.reshape(1, -1, 1, 1)


class Untraceable(nn.Module):
    """Python control flow on a tensor value: torch.fx cannot trace it."""

    def __init__(self, bn=None, conv=None):
        super().__init__()
        self.conv = conv or nn.Conv2d(3, 4, 3, padding=1)
        self.bn = bn or nn.BatchNorm2d(4)
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        y = self.bn(self.conv(x))
        if y.mean() > 100:
            return y
        return self.head(y)


def _untraceable(**kwargs):
    return randomize_batch_norm(Untraceable(**kwargs)).eval()


def test_untraceable_model_folds_and_keeps_its_class():
    model = _untraceable()
    with pytest.raises(fx.FuseError):
        fx.fuse(model)
    folded, report = _fold(model, _x())
    assert type(folded) is Untraceable
    assert isinstance(folded.bn, nn.Identity)
    assert (report.folded, report.pairs) == (1, 1)
    assert isinstance(model.bn, nn.BatchNorm2d)  # the model itself is left as it was


def test_inplace_folds_the_model_itself():
    model = _untraceable()
    reference = copy.deepcopy(model)
    folded = fx.fold_modules(model, _x(), inplace=True)
    assert folded is model and isinstance(model.bn, nn.Identity)
    with torch.no_grad():
        torch.testing.assert_close(model(_x()), reference(_x()), rtol=1e-5, atol=1e-5)


def test_bn_subclass_keeps_what_it_does_after_the_normalisation():
    act = nn.PReLU(4)  # with a parameter of its own: its state_dict key must survive
    model = _untraceable(bn=BatchNormAct(4, act))
    folded, report = _fold(model, _x())
    assert report.folded == 1
    assert isinstance(folded.bn, _dataflow.AfterNorm)
    assert folded.bn.order == ("drop", "act")
    assert "bn.act.weight" in folded.state_dict()


def test_bn_subclass_computing_more_after_its_normalisation_is_refused():
    _, report = _fold(_untraceable(bn=BatchNormThenScale(4)), _x())
    assert report.skipped == [("conv", _pairs.AFTER_NOT_CHILDREN)]


def test_conv_subclass_that_pads_in_forward_is_folded():
    _, report = _fold(_untraceable(conv=PadSame(3, 4, 3)), _x())
    assert (report.folded, report.pairs) == (1, 1)


def test_conv_that_computes_its_weight_in_forward_is_refused():
    _, report = _fold(_untraceable(conv=WeightStandardized(3, 4, 3, padding=1)), _x())
    assert report.skipped == [("conv", _pairs.NOT_OWN_CONV)]


def test_frozen_bn_module_is_folded():
    model = _untraceable(bn=Frozen(4))
    folded, report = _fold(model, _x())
    assert (report.folded, report.pairs) == (1, 1)
    assert isinstance(folded.bn, nn.Identity)


class OtherUser(Untraceable):
    def forward(self, x):
        y = self.conv(x)
        return self.head(self.bn(y)) + y.mean()


class ReturnsConvOutput(Untraceable):
    def forward(self, x):
        y = self.conv(x)
        return self.bn(y), y


class Keeper(nn.Module):
    """Keeps what it is given, for code after forward to read."""

    def forward(self, x):
        self.kept = x
        return x


class KeepsConvOutput(Untraceable):
    def __init__(self):
        super().__init__()
        self.keeper = Keeper()

    def forward(self, x):
        y = self.conv(x)
        self.keeper(y)
        return self.head(self.bn(y))


class ConvTwice(Untraceable):
    def forward(self, x):
        return self.bn(self.conv(x)) + self.conv(x).sum()


class BnTwice(Untraceable):
    def __init__(self):
        super().__init__()
        self.conv2 = nn.Conv2d(3, 4, 1)

    def forward(self, x):
        return self.bn(self.conv(x)) + self.bn(self.conv2(x))


class ReadsBnStats(Untraceable):
    def forward(self, x):
        return self.bn(self.conv(x)) + self.bn.running_mean.sum()


class TiedWeight(Untraceable):
    def __init__(self):
        super().__init__()
        self.other = nn.Conv2d(3, 4, 3, padding=1)
        self.other.weight = self.conv.weight

    def forward(self, x):
        return self.bn(self.conv(x)) + self.other(x)


class FunctionalInForward(Untraceable):
    def forward(self, x):
        bn = self.bn
        return F.batch_norm(self.conv(x), bn.running_mean, bn.running_var, bn.weight, bn.bias)


class Aliased(Untraceable):
    def __init__(self):
        super().__init__()
        self.norm = self.bn

    def forward(self, x):
        return self.norm(self.conv(x))


def _hooked():
    model = Untraceable()
    model.bn.register_forward_hook(lambda module, args, output: output * 2)
    return model


def _pre_hooked():
    model = Untraceable()
    model.conv.register_forward_pre_hook(lambda module, args: None)
    return model


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (OtherUser, _pairs.OTHER_USERS),
        (ReturnsConvOutput, _pairs.OTHER_USERS),
        (KeepsConvOutput, _pairs.OTHER_USERS),
        (ConvTwice, _pairs.CONV_REUSED),  # the second call's output goes to no BN
        (ReadsBnStats, _pairs.TENSORS_READ),
        (TiedWeight, _pairs.TENSORS_READ),
        (FunctionalInForward, _pairs.BN_IN_FORWARD),
        (Aliased, _pairs.MODULE_ALIASED),
        (_hooked, _pairs.HAS_HOOKS),
        (_pre_hooked, _pairs.HAS_HOOKS),
    ],
)
def test_unsafe_pairs_are_refused_with_their_reason(make, reason):
    model = randomize_batch_norm(make()).eval()
    _, report = _fold(model, _x())
    assert report.pairs >= 1
    assert report.folded == 0
    assert {r for _, r in report.skipped} == {reason}


def test_conv_called_twice_is_refused():
    class Twice(Untraceable):
        def forward(self, x):
            return self.bn(self.conv(x)) + self.bn2(self.conv(x))

    model = Twice()
    model.bn2 = nn.BatchNorm2d(4)
    randomize_batch_norm(model).eval()
    _, report = _fold(model, _x())
    assert report.skipped == [("conv", _pairs.CONV_REUSED), ("conv", _pairs.CONV_REUSED)]


def test_bn_called_twice_is_refused():
    _, report = _fold(randomize_batch_norm(BnTwice()).eval(), _x())
    assert report.skipped == [("conv", _pairs.BN_REUSED), ("conv2", _pairs.BN_REUSED)]


def test_training_bn_and_bn_without_running_stats_are_refused():
    _, report = _fold(_untraceable().train(), _x())
    assert report.skipped == [("conv", _pairs.BN_TRAINING)]
    model = _untraceable(bn=nn.BatchNorm2d(4, track_running_stats=False))
    _, report = _fold(model, _x())
    assert report.skipped == [("conv", _pairs.NO_RUNNING_STATS)]


def test_unbatched_input_is_refused():
    # Unbatched, BatchNorm1d normalises dim 1: the length (7), not the channels.
    model = nn.Sequential(nn.Conv1d(3, 4, 3), nn.BatchNorm1d(7))
    model = randomize_batch_norm(model).eval()
    _, report = _fold(model, torch.randn(3, 9))
    assert report.skipped == [("0", _pairs.CONV_NOT_BATCHED)]


def test_parametrized_weight_is_refused():
    model = _untraceable()
    nn.utils.parametrizations.weight_norm(model.conv)
    _, report = _fold(model, _x())
    assert report.skipped == [("conv", _pairs.PARAMETRIZED)]


def test_fold_that_changes_the_outputs_is_undone(monkeypatch):
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 5, 1), nn.BatchNorm2d(5)
    )
    model = randomize_batch_norm(model).eval()
    fold = fx.fold_conv_bn_weights

    def wrong_for_five_channels(weight, *args, **kwargs):
        w, b = fold(weight, *args, **kwargs)
        return (w, b + 1) if weight.shape[0] == 5 else (w, b)

    monkeypatch.setattr(fx, "fold_conv_bn_weights", wrong_for_five_channels)
    _, report = _fold(model, _x())
    assert report.skipped == [("3", _pairs.CHANGED_OUTPUTS)]
    assert report.folded == 1


def test_model_that_does_not_run_raises_and_changes_nothing():
    model = _untraceable()
    with pytest.raises(fx.FuseError, match="did not run on the example inputs"):
        fx.fold_modules(model, torch.randn(2, 5, 8, 8), inplace=True)
    assert isinstance(model.bn, nn.BatchNorm2d)


def test_recording_changes_no_state():
    model = _untraceable().train()
    state = copy.deepcopy(model.state_dict())
    rng = torch.random.get_rng_state()
    _dataflow.record_pairs(model, (_x(),), caller="test")
    assert torch.equal(torch.random.get_rng_state(), rng)
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_folded_model_pickles_and_keeps_its_report():
    model = _untraceable(bn=BatchNormAct(4))
    folded = fx.fold_modules(model, _x())
    buffer = io.BytesIO()
    torch.save(folded, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert fx.fuse_report(loaded) == fx.fuse_report(folded)
    assert fx.fuse_report(copy.deepcopy(folded)).folded == 1
    with torch.no_grad():
        torch.testing.assert_close(loaded(_x()), model(_x()), rtol=1e-5, atol=1e-5)


def test_folded_model_exports():
    # (Untraceable branches on a value, which torch.export cannot take either.)
    model = nn.Sequential(PadSame(3, 4, 3), BatchNormAct(4), nn.Conv2d(4, 2, 1))
    model = randomize_batch_norm(model).eval()
    folded = fx.fold_modules(model, _x())
    exported = torch.export.export(folded, (_x(),))
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(_x()), model(_x()), rtol=1e-5, atol=1e-5)
    assert not any(
        n.target is torch.ops.aten.batch_norm.default or "batch_norm" in str(n.target)
        for n in exported.graph.nodes
    )


# --- memory_efficient with example inputs --------------------------------------------------


def _grads(model, x):
    out = model(x)
    loss = (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum()
    loss.backward()
    return out


def _assert_trains_alike(model, converted, x):
    out, out_converted = _grads(model, x), _grads(converted, x)
    torch.testing.assert_close(out_converted, out, rtol=1e-4, atol=1e-5)
    state = converted.state_dict(keep_vars=True)
    for name, p in model.named_parameters():
        torch.testing.assert_close(state[name].grad, p.grad, rtol=1e-4, atol=1e-5, msg=name)
    for name, b in model.named_buffers():
        torch.testing.assert_close(state[name], b, rtol=1e-4, atol=1e-5, msg=name)


def test_memory_efficient_swaps_in_an_untraceable_model():
    model = _untraceable().train()
    with pytest.raises(fx.FuseError, match="pass example inputs"):
        inductor_convbn.memory_efficient(model)
    converted = inductor_convbn.memory_efficient(model, _x())
    report = inductor_convbn.memory_efficient_report(converted)
    assert (report.fused, report.pairs) == (1, 1)
    assert isinstance(converted.conv, inductor_convbn.FusedConvBatchNorm2d)
    _assert_trains_alike(model, converted, _x())


def test_memory_efficient_keeps_a_bn_subclass_children():
    model = _untraceable(bn=BatchNormAct(4, nn.PReLU(4))).train()
    converted = inductor_convbn.memory_efficient(model, _x())
    assert inductor_convbn.memory_efficient_report(converted).fused == 1
    assert isinstance(converted.bn, _dataflow.AfterNorm)
    assert converted.state_dict().keys() == model.state_dict().keys()
    _assert_trains_alike(model, converted, _x())


def test_memory_efficient_undoes_a_swap_that_changes_the_running_state():
    model = _untraceable(bn=BatchNormNotCounting(4)).train()
    converted = inductor_convbn.memory_efficient(model, _x())
    report = inductor_convbn.memory_efficient_report(converted)
    assert report.skipped == [("conv", _pairs.CHANGED_OUTPUTS)]
    assert type(converted.bn) is BatchNormNotCounting


def test_memory_efficient_refuses_a_conv_that_pads_in_forward_and_a_frozen_bn():
    model = _untraceable(conv=PadSame(3, 4, 3)).train()
    report = inductor_convbn.memory_efficient_report(inductor_convbn.memory_efficient(model, _x()))
    assert report.skipped == [("conv", _pairs.CONV_SUBCLASS)]
    model = _untraceable(bn=Frozen(4)).train()
    report = inductor_convbn.memory_efficient_report(inductor_convbn.memory_efficient(model, _x()))
    assert report.skipped == [("conv", _pairs.FROZEN_NOT_SWAPPED)]


def test_memory_efficient_with_inputs_agrees_with_the_traced_finder():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 5, 1), nn.BatchNorm2d(5)
    ).train()
    traced = inductor_convbn.memory_efficient_report(inductor_convbn.memory_efficient(model))
    found = inductor_convbn.memory_efficient_report(inductor_convbn.memory_efficient(model, _x()))
    assert found.pair_reports == traced.pair_reports


def test_memory_efficient_keeps_a_sync_batch_norm_as_it_is():
    # Without a process group it runs as plain batch norm, which is what the run records.
    model = _untraceable(bn=nn.SyncBatchNorm(4)).train()
    converted = inductor_convbn.memory_efficient(model, _x())
    assert inductor_convbn.memory_efficient_report(converted).fused == 1
    assert type(converted.conv.bn) is nn.SyncBatchNorm
    _assert_trains_alike(model, converted, _x())
