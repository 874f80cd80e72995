"""``fx.fold_modules`` and ``memory_efficient(model, x)`` on models of other libraries,
built without downloads: timm (BatchNormAct2d, Conv2dSame), ultralytics' YOLOv8n (a
forward torch.fx cannot trace) and a torchvision FPN backbone with frozen BatchNorm.

Each pair count is checked against an independent count: module hooks alone, a conv whose
output tensor is the input of a BN module.
"""

import copy

import pytest
import torch
from torch import nn

import inductor_convbn
from inductor_convbn import _pairs, fx
from inductor_convbn.testing import randomize_batch_norm

TIMM_MODELS = [
    "efficientnet_b0",  # BatchNormAct2d
    "mobilenetv3_large_100",
    "tf_efficientnet_b0",  # Conv2dSame: pads in forward, with Python control flow
    "regnetx_002",
    "lcnet_050",
    "repvgg_a0",  # BNs that follow no conv (the identity branch)
    # Random weights make its float32 output 23% off the float64 one: folds are judged
    # against float64.
    "efficientnetv2_rw_t",
]
MODELS = [*TIMM_MODELS, "yolov8n", "resnet18_fpn_frozen_bn"]


def _frozen_batch_norm_types():
    from torchvision.ops import FrozenBatchNorm2d

    return (FrozenBatchNorm2d,)


def _build(name):
    torch.manual_seed(0)
    if name == "yolov8n":
        tasks = pytest.importorskip("ultralytics.nn.tasks")
        model = tasks.DetectionModel("yolov8n.yaml", verbose=False)
    elif name == "resnet18_fpn_frozen_bn":
        from torchvision.models.detection.backbone_utils import resnet_fpn_backbone

        (frozen,) = _frozen_batch_norm_types()
        model = resnet_fpn_backbone(
            backbone_name="resnet18", weights=None, norm_layer=frozen, trainable_layers=5
        )
        _randomize_frozen(model)
    else:
        timm = pytest.importorskip("timm")
        model = timm.create_model(name, pretrained=False)
    return randomize_batch_norm(model)


def _randomize_frozen(model):
    generator = torch.Generator().manual_seed(0)
    for module in model.modules():
        if isinstance(module, _frozen_batch_norm_types()):
            for key, (low, high) in {
                "weight": (0.5, 1.5), "bias": (-0.5, 0.5),
                "running_mean": (-0.5, 0.5), "running_var": (0.5, 2.0),
            }.items():  # fmt: skip
                t = getattr(module, key)
                t.copy_(torch.rand(t.shape, generator=generator) * (high - low) + low)


def _x(batch=2):
    return torch.randn(batch, 3, 64, 64, generator=torch.Generator().manual_seed(1))


def _independent_pairs(model, x):
    """``(conv, bn)`` modules where the conv's output tensor is the BN module's input (of a
    copy of ``model``: a run in training mode would update its running statistics)."""
    model = copy.deepcopy(model)
    outputs = {}  # id -> (tensor, conv): the tensor stays alive, so its id stays unique
    pairs = []
    bn_types = (nn.modules.batchnorm._BatchNorm, *_frozen_batch_norm_types())
    handles = []
    for module in model.modules():
        if isinstance(module, nn.modules.conv._ConvNd):
            handles.append(
                module.register_forward_hook(
                    lambda m, args, out: outputs.__setitem__(id(out), (out, m))
                )
            )
        if isinstance(module, bn_types):
            handles.append(
                module.register_forward_pre_hook(
                    lambda m, args: (
                        pairs.append((outputs[id(args[0])][1], m))
                        if id(args[0]) in outputs
                        else None
                    )
                )
            )
    try:
        with torch.no_grad():
            model(x)
    finally:
        for handle in handles:
            handle.remove()
    return pairs


def _leaves(out):
    return [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


def _assert_close(actual, expected, rel, what):
    """Within ``rel`` of the tensor's own scale."""
    scale = expected.abs().max().clamp_min(1e-12)
    assert (actual - expected).abs().max() <= rel * scale, what


@pytest.mark.parametrize("name", MODELS)
def test_fold_modules_folds_every_pair(name):
    model = _build(name).eval()
    x = _x(batch=1)
    folded = fx.fold_modules(model, x)
    report = fx.fuse_report(folded)
    assert type(folded) is type(model)
    assert report.pairs == len(_independent_pairs(model, x))
    assert report.folded == report.pairs, report.skipped
    bn_types = (nn.modules.batchnorm._BatchNorm, *_frozen_batch_norm_types())
    left = [m for _, m in _independent_pairs(folded, x) if isinstance(m, bn_types)]
    assert left == []
    with torch.no_grad():
        exact = _leaves(copy.deepcopy(model).double()(x.double()))
        for a, b, e in zip(_leaves(folded(x)), _leaves(model(x)), exact, strict=True):
            # No farther from float64 than float32 eager is, give or take 1e-5.
            own = (b.double() - e).abs().max()
            assert (a.double() - e).abs().max() <= 2 * own + 1e-5 * e.abs().max(), name


@pytest.mark.parametrize("name", ["efficientnet_b0", "tf_efficientnet_b0", "yolov8n"])
def test_folded_model_exports(name):
    model = _build(name).eval()
    x = _x(batch=1)
    exported = torch.export.export(fx.fold_modules(model, x), (x,))
    # Judged against the export of the model itself: on torch 2.6, exporting YOLOv8n
    # unfolded already moves one output by 4e-3 of its scale (the fold adds 3e-7). Run
    # once first, as fold_modules ran it: YOLO's head caches its anchors on a first call.
    with torch.no_grad():
        model(x)
    plain = torch.export.export(model, (x,))
    with torch.no_grad():
        outputs = zip(_leaves(exported.module()(x)), _leaves(plain.module()(x)), strict=True)
        for a, b in outputs:
            _assert_close(a, b, 1e-4, name)


def _loss(out):
    return sum((t * torch.linspace(-1, 1, t.numel()).view_as(t)).sum() for t in _leaves(out))


def _eligible(model, x):
    """Pairs the fused training layer computes: a plain nn.Conv2d and a BatchNorm2d."""
    return [
        (c, b)
        for c, b in _independent_pairs(model, x)
        if type(c) is nn.Conv2d and isinstance(b, nn.BatchNorm2d)
    ]


@pytest.mark.parametrize("name", MODELS)
def test_memory_efficient_swaps_every_eligible_pair_and_trains_alike(name):
    model = _build(name).train()
    x = _x()
    converted = inductor_convbn.memory_efficient(model, x)
    report = inductor_convbn.memory_efficient_report(converted)
    assert report.pairs == len(_independent_pairs(model, x))
    assert report.fused == len(_eligible(model, x)), report.skipped
    allowed = {_pairs.CONV_SUBCLASS, _pairs.FROZEN_NOT_SWAPPED}
    assert {reason for _, reason in report.skipped} <= allowed
    assert converted.state_dict().keys() == model.state_dict().keys()

    reference = copy.deepcopy(model)
    torch.manual_seed(2)  # the same dropout masks in both
    _loss(reference(x)).backward()
    torch.manual_seed(2)
    _loss(converted(x)).backward()
    state = converted.state_dict(keep_vars=True)
    for key, p in reference.named_parameters():
        if p.grad is None:
            assert state[key].grad is None, key
        else:
            _assert_close(state[key].grad, p.grad, 1e-4, key)
    for key, b in reference.named_buffers():
        if b.is_floating_point():
            _assert_close(state[key], b, 1e-4, key)
        else:
            assert torch.equal(state[key], b), key
