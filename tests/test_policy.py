"""Which pairs the default ``policy="auto"`` folds, and that freezing folds them once."""

import pytest
import torch
from torch import nn

import inductor_convbn
from inductor_convbn import _compat, _decide, _pairs
from inductor_convbn.testing import randomize_batch_norm


def _model(*layers):
    torch.manual_seed(0)
    return randomize_batch_norm(nn.Sequential(*layers)).eval()


def _x(*shape, device="cpu"):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(1)).to(device)


def test_auto_keeps_a_batch_norm_that_runs_inside_the_next_pointwise_kernel():
    model = _model(nn.Conv2d(4, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU())
    report = inductor_convbn.verify(model, _x(2, 4, 16, 16), freezing=False)
    assert report.outputs_match and report.pairs == 1 and report.folded == 0, report
    assert report.kept == ["0"] and not report.missed
    assert report.pair_reports[0].reason == _pairs.KEPT_FUSED.format(user="relu")
    assert _compat.counters["inductor"][_decide.COUNTER_KEPT] == 1


def test_auto_folds_a_standalone_batch_norm_over_an_output_larger_than_the_weight():
    # On CPU the folded bias goes into the conv kernel: the BN's own pass is saved.
    model = _model(nn.Conv2d(4, 6, 3, padding=1), nn.BatchNorm2d(6))
    report = inductor_convbn.verify(model, _x(2, 4, 16, 16), freezing=False)
    assert report.outputs_match and report.folded == report.pairs == 1, report


def test_auto_keeps_a_pair_whose_weight_outweighs_its_output():
    model = _model(nn.Conv2d(64, 64, 3), nn.BatchNorm2d(64))
    report = inductor_convbn.verify(model, _x(1, 64, 3, 3), freezing=False)
    assert report.outputs_match and report.folded == 0 and report.kept == ["0"], report
    assert report.pair_reports[0].reason == _pairs.KEPT_LARGE_WEIGHT.format(
        weight=64 * 64 * 9, output=64
    )


@pytest.mark.gpu
def test_auto_keeps_every_pair_on_cuda_without_freezing():
    # Inductor applies a conv bias on CUDA in a pointwise kernel of its own, as it would
    # the BN, so a per-call fold never saves a pass there.
    model = _model(nn.Conv2d(4, 6, 3, padding=1), nn.BatchNorm2d(6)).cuda()
    report = inductor_convbn.verify(model, _x(2, 4, 16, 16, device="cuda"), freezing=False)
    assert report.outputs_match and report.folded == 0 and report.kept == ["0"], report
    assert report.pair_reports[0].reason == _pairs.KEPT_BIAS_PEELED.format(device="CUDA")


ARITHMETIC = {
    torch.ops.aten.add.Tensor,
    torch.ops.aten.sub.Tensor,
    torch.ops.aten.mul.Tensor,
    torch.ops.aten.div.Tensor,
    torch.ops.aten.rsqrt.default,
    torch.ops.aten.sqrt.default,
}


class GraphRecorder(_compat.CustomGraphPass):
    """Records the aten ops of the graph Inductor's post-grad passes receive."""

    def __init__(self):
        self.targets = []

    def __call__(self, graph):
        self.targets.extend(n.target for n in graph.nodes if n.op == "call_function")

    def uuid(self):
        return None


@pytest.mark.parametrize("transposed", [False, True], ids=["conv", "transposed"])
def test_freezing_folds_the_weights_once_at_compile_time(transposed):
    conv = (nn.ConvTranspose2d if transposed else nn.Conv2d)(4, 6, 3, padding=1)
    model = _model(conv, nn.BatchNorm2d(6), nn.ReLU())
    x = _x(2, 4, 16, 16)
    recorder = GraphRecorder()
    config = dict(freezing=True, post_grad_custom_pre_pass=recorder)
    with inductor_convbn.installed(), torch.no_grad(), _compat.inductor_config.patch(config):
        out = torch.compile(model)(x)
    torch.testing.assert_close(out, model(x), rtol=1e-4, atol=1e-4)
    assert _compat.counters["inductor"][_decide.COUNTER_FOLDED] == 1
    # Neither the BN's arithmetic nor the fold's is left for Inductor to run per call: the
    # folded weight and bias are constants.
    assert recorder.targets and not ARITHMETIC & set(recorder.targets), recorder.targets


def test_joint_stage_folds_nothing_without_freezing():
    fold_pass = inductor_convbn.ConvBnFoldPass(stage="freezing")
    model = _model(nn.Conv2d(4, 6, 3), nn.BatchNorm2d(6))
    graph = torch.fx.symbolic_trace(model).graph
    nodes = len(graph.nodes)
    fold_pass(graph)
    assert len(graph.nodes) == nodes
    assert _compat.counters["inductor"][_decide.COUNTER_FOLDED] == 0


def _overflowing_half_model(device):
    # The BN scale (gamma / sqrt(var + eps)) is 1e7: the folded fp16 weight overflows, while
    # conv and BN apart stay finite on small activations. A transposed conv, because on CPU
    # Inductor's own freezing folds a Conv2d + BN itself, overflow and all (it gives NaN).
    conv = nn.ConvTranspose2d(4, 6, 3, padding=1, bias=False)
    model = _model(conv, nn.BatchNorm2d(6, eps=1e-12), nn.ReLU())
    with torch.no_grad():
        model[1].running_mean.zero_()
        model[1].running_var.zero_()
        model[1].weight.fill_(10.0)
    return model.to(device, torch.float16)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_freezing_skips_a_fold_that_overflows_the_dtype(device):
    model = _overflowing_half_model(device)
    x = (_x(2, 4, 8, 8) * 1e-5).to(device, torch.float16)
    report = inductor_convbn.verify(model, x, freezing=True)
    assert report.outputs_match and report.pairs == 1 and report.folded == 0, report
    assert report.skipped == [("0", _pairs.NOT_FINITE.format(dtype="float16"))]
    assert not report.missed and not report.kept
    assert _compat.counters["inductor"][_decide.COUNTER_UNSAFE] == 1


def test_freezing_skips_a_fold_of_non_finite_statistics():
    model = _model(nn.Conv2d(4, 6, 3, padding=1), nn.BatchNorm2d(6))
    with torch.no_grad():
        model[1].running_var[2] = float("inf")
    report = inductor_convbn.verify(model, _x(2, 4, 8, 8), freezing=True)
    assert report.folded == 0 and report.skipped == [("0", _pairs.STATS_NOT_FINITE)], report
