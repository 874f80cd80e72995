"""Frozen BatchNorm on CUDA: conv (with and without bias) -> torchvision FrozenBatchNorm2d,
and a ResNet50 FPN backbone built with it, in fp32 and bf16/fp16 channels_last, in each
stage (grad, freezing, always). One case per process: python frozen_bn.py CASE DTYPE MODE."""

import json
import sys

import torch
import torchvision
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

import inductor_convbn

torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False
MODES = {
    "grad": {"grad": True},
    "freezing": {"freezing": True},
    "always": {"policy": "always", "freezing": False},
}


def _randomize(model):
    generator = torch.Generator().manual_seed(2)
    for module in model.modules():
        if isinstance(module, FrozenBatchNorm2d):
            for name, (low, high) in {
                "weight": (0.5, 1.5), "bias": (-0.5, 0.5), "running_mean": (-0.5, 0.5),
                "running_var": (0.5, 2.0),
            }.items():  # fmt: skip
                buffer = getattr(module, name)
                buffer.copy_(torch.rand(buffer.shape, generator=generator) * (high - low) + low)
    return model


def build(case):
    torch.manual_seed(0)
    if case == "small":
        model = nn.Sequential(
            nn.Conv2d(3, 16, 3, stride=2), FrozenBatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 8, 1, bias=False), FrozenBatchNorm2d(8),
        )  # fmt: skip
        return _randomize(model), torch.randn(4, 3, 32, 32)
    backbone = torchvision.models.detection.backbone_utils.resnet_fpn_backbone(
        backbone_name="resnet50", weights=None, norm_layer=FrozenBatchNorm2d, trainable_layers=3
    )
    return _randomize(backbone), torch.randn(2, 3, 224, 224)


def main(case, dtype_name, mode):
    dtype = getattr(torch, dtype_name)
    model, x = build(case)
    model = model.eval().cuda().to(dtype)
    x = x.cuda().to(dtype)
    if dtype != torch.float32:
        model = model.to(memory_format=torch.channels_last)
        x = x.to(memory_format=torch.channels_last)
    if case == "fpn":  # the FPN returns a dict; verify compares one tensor
        inner = model

        class First(nn.Module):
            def __init__(self):
                super().__init__()
                self.inner = inner

            def forward(self, x):
                return torch.cat([v.flatten(1) for v in self.inner(x).values()], 1)

        model = First().eval()
    report = inductor_convbn.verify(model, x, **MODES[mode])
    first = str(report).splitlines()[0]
    print(json.dumps({
        "case": case, "dtype": dtype_name, "mode": mode, "torch": torch.__version__,
        "pairs": report.pairs, "folded": report.folded, "match": report.outputs_match,
        "error": report.max_abs_error, "plain": report.plain_compile_error, "first": first,
    }))  # fmt: skip


if __name__ == "__main__":
    main(*sys.argv[1:4])
