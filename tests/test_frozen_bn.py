"""Frozen BatchNorm: a per-channel affine map from constant buffers after a conv, found by
what it computes (torchvision's and detectron2's FrozenBatchNorm2d), folded in every stage."""

import copy

import pytest
import torch
from torch import nn

import inductor_convbn
from inductor_convbn import _compat, _decide, _pairs, verify

torchvision_ops = pytest.importorskip("torchvision.ops.misc")


class _AffineNorm(nn.Module):
    """detectron2's FrozenBatchNorm2d with gradients: the scale and shift built from
    buffers as (C,) tensors, reshaped and cast, then ``shift + x * scale`` reversed."""

    def __init__(self, channels, eps=1e-5, rank=2):
        super().__init__()
        self.shape = (1, -1) + (1,) * rank  # fixed: torch.fx < 2.14 cannot reshape by x.dim()
        for name, init in (("weight", 1.0), ("bias", 0.0), ("running_mean", 0.0)):
            self.register_buffer(name, torch.full((channels,), init))
        self.register_buffer("running_var", torch.ones(channels))
        self.eps = eps

    def forward(self, x):
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        return shift.reshape(self.shape).to(x.dtype) + scale.reshape(self.shape).to(x.dtype) * x


def _randomize(model):
    generator = torch.Generator().manual_seed(2)
    for module in model.modules():
        if isinstance(module, (torchvision_ops.FrozenBatchNorm2d, _AffineNorm)):
            for name, (low, high) in {
                "weight": (0.5, 1.5), "bias": (-0.5, 0.5), "running_mean": (-0.5, 0.5),
                "running_var": (0.5, 2.0),
            }.items():  # fmt: skip
                buffer = getattr(module, name)
                buffer.copy_(torch.rand(buffer.shape, generator=generator) * (high - low) + low)
    return model


def _model(norm="torchvision", transposed=False):
    torch.manual_seed(0)
    frozen = torchvision_ops.FrozenBatchNorm2d if norm == "torchvision" else _AffineNorm
    conv = nn.ConvTranspose2d if transposed else nn.Conv2d
    model = nn.Sequential(
        conv(3, 8, 3, stride=2), frozen(8), nn.ReLU(), conv(8, 4, 1, bias=False), frozen(4)
    )
    return _randomize(model).eval()


_X = torch.randn(2, 3, 12, 12, generator=torch.Generator().manual_seed(1))


def _skip_without_shapes(report):
    if report.pair_reports and report.pair_reports[0].reason == _pairs.AFFINE_NO_SHAPES:
        pytest.skip("this torch hands the grad stage no shapes under freezing")


@pytest.mark.parametrize("norm", ["torchvision", "detectron2"])
@pytest.mark.parametrize(
    "mode",
    [{"grad": True}, {"freezing": True}, {"policy": "always", "freezing": False}],
    ids=str,
)
def test_frozen_bn_is_folded_in_every_stage(norm, mode):
    report = verify(_model(norm), _X, **mode)
    _skip_without_shapes(report)
    assert report.pairs == report.folded == 2 and report.outputs_match, report
    assert report.pair_reports[0].bn == "1" and report.pair_reports[0].kind == "conv2d"


def test_frozen_bn_after_a_transposed_conv_with_grad():
    report = verify(_model(transposed=True), _X, grad=True)
    assert report.pairs == report.folded == 2 and report.outputs_match, report


def test_frozen_bn_without_freezing_is_kept_by_the_auto_policy_with_the_reason():
    report = verify(_model(), _X, freezing=False)
    assert report.pairs == 2 and report.folded == 0, report
    assert {p.reason for p in report.pair_reports} == {_pairs.KEPT_AFFINE_PER_CALL}


def test_under_freezing_the_fold_is_computed_once():
    """The generated code computes no scale: freezing made the whole fold a constant."""
    inductor_convbn.install()
    model = _model()
    with torch.no_grad(), _compat.inductor_config.patch(freezing=True):
        compiled = torch.compile(model)
        _, code = _compat.run_and_get_code(compiled, _X)
    if _compat.counters["inductor"][_decide.COUNTER_KEPT] == 2:
        pytest.skip("this torch hands the grad stage no shapes under freezing")
    assert _compat.counters["inductor"][_decide.COUNTER_FOLDED] == 2
    assert "rsqrt" not in "\n".join(code)
    with torch.no_grad():
        torch.testing.assert_close(compiled(_X), model(_X))


def test_fine_tuning_a_frozen_bn_backbone_saves_no_conv_output_and_trains_like_eager():
    model = _model()
    model[0].weight.requires_grad_(False)  # a frozen stem, as detection backbones have
    reference = copy.deepcopy(model)
    inductor_convbn.install()
    compiled = torch.compile(model)
    for run, m in ((reference, reference), (compiled, model)):
        optimizer = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.1)
        for _ in range(2):
            optimizer.zero_grad()
            run(_X).square().mean().backward()
            optimizer.step()
    torch.testing.assert_close(model[3].weight, reference[3].weight)
    assert _compat.counters["inductor"][_decide.COUNTER_FOLDED] == 2


def test_a_per_sample_scale_is_no_frozen_bn():
    class PerSample(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x):
            scale = x.mean(dim=(1, 2, 3)).reshape(-1, 1, 1, 1)  # one scale per sample
            return self.conv(x) * scale + 1.0

    report = verify(PerSample().eval(), _X, policy="always", freezing=False)
    assert report.pairs == report.folded == 0 and report.outputs_match, report


def test_an_unbatched_conv_before_a_frozen_bn_is_reported_and_not_folded():
    """Unbatched, the conv's dim 1 is its length: a scale along it is none per channel."""
    model = nn.Sequential(
        nn.Conv1d(3, 4, 1), _randomize(nn.Sequential(_AffineNorm(7, rank=0)))
    ).eval()
    report = verify(model, torch.randn(3, 7), grad=True)
    assert report.pairs == 1 and report.folded == 0 and report.outputs_match, report
    assert report.skipped[0][1] == _pairs.CONV_NOT_BATCHED


def test_detection_backbone_with_frozen_bn():
    backbone_utils = pytest.importorskip("torchvision.models.detection.backbone_utils")
    torch.manual_seed(0)
    backbone = backbone_utils.resnet_fpn_backbone(
        backbone_name="resnet18", weights=None, norm_layer=torchvision_ops.FrozenBatchNorm2d
    )
    report = verify(_randomize(backbone).eval(), torch.randn(1, 3, 64, 64), grad=True)
    assert report.pairs == report.folded == 20 and report.outputs_match, report


def test_fx_fuse_folds_frozen_bn():
    from inductor_convbn import fx

    model = _model("torchvision")
    fused = fx.fuse(model, _X)
    report = fx.fuse_report(fused)
    assert report.pairs == report.folded == 2, report
    assert [(p.conv, p.bn) for p in report.pair_reports] == [("0", "1"), ("3", "4")]
    assert not any(isinstance(m, type(model[1])) for m in fused.modules())
    with torch.no_grad():
        torch.testing.assert_close(fused(_X), model(_X))


def test_fx_fuse_leaves_an_affine_map_that_reads_the_input():
    """detectron2's form casts its scale to ``x.dtype``: traced by fx, the conv output is
    read twice, and the scale depends on it; no pair (the compiled plugin folds it)."""
    from inductor_convbn import fx

    model = _model("detectron2")
    fused = fx.fuse(model, _X)
    assert fx.fuse_report(fused).pairs == 0
    with torch.no_grad():
        torch.testing.assert_close(fused(_X), model(_X))


def test_fx_fuse_frozen_bn_detection_backbone():
    from inductor_convbn import fx

    backbone_utils = pytest.importorskip("torchvision.models.detection.backbone_utils")
    torch.manual_seed(0)
    backbone = backbone_utils.resnet_fpn_backbone(
        backbone_name="resnet18", weights=None, norm_layer=torchvision_ops.FrozenBatchNorm2d
    )
    backbone = _randomize(backbone).eval()
    x = torch.randn(1, 3, 64, 64)
    fused = fx.fuse(backbone, x)
    assert fx.fuse_report(fused).folded == fx.fuse_report(fused).pairs == 20
    with torch.no_grad():
        torch.testing.assert_close(fused(x), backbone(x), rtol=1e-4, atol=1e-4)
