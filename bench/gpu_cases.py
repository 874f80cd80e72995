"""The coverage issue's cases on CUDA, one line each: Linear -> BatchNorm1d at batch 1 and 2,
frozen BatchNorm (torchvision's FrozenBatchNorm2d) with freezing and with gradients, and the
transposed-conv gradient case, in float32 and bfloat16 channels_last.

    python bench/gpu_cases.py [DEVICE]   # prints a table; exit status 1 when a case fails
"""

from __future__ import annotations

import sys

import torch
from torch import nn

import inductor_convbn
from inductor_convbn.testing import randomize_batch_norm


def _frozen(channels: int) -> nn.Module:
    from torchvision.ops.misc import FrozenBatchNorm2d

    norm = FrozenBatchNorm2d(channels)
    generator = torch.Generator().manual_seed(channels)
    for name in ("weight", "running_var"):
        getattr(norm, name).copy_(torch.rand(channels, generator=generator) + 0.5)
    for name in ("bias", "running_mean"):
        getattr(norm, name).copy_(torch.rand(channels, generator=generator) - 0.5)
    return norm


def _linear() -> nn.Module:
    torch.manual_seed(0)
    return randomize_batch_norm(nn.Sequential(nn.Linear(64, 10), nn.BatchNorm1d(10)))


def _frozen_bn_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3), _frozen(16), nn.SiLU(), nn.Conv2d(16, 8, 1, bias=False), _frozen(8)
    )


def _transposed() -> nn.Module:
    torch.manual_seed(0)
    return randomize_batch_norm(
        nn.Sequential(nn.ConvTranspose3d(3, 4, 3, stride=2), nn.BatchNorm3d(4))
    )


def _cases():
    """(name, model builder, input, dtype, verify() options, pairs); a fresh model each."""
    for dtype in (torch.float32, torch.bfloat16):
        for batch in (1, 2):
            x = torch.randn(batch, 64)
            for mode in (
                {"freezing": True},
                {"policy": "always", "freezing": False},
                {"grad": True},
            ):
                yield f"linear-bn1d batch {batch}", _linear, x, dtype, mode, 1
        x = torch.randn(4, 3, 16, 16)
        for mode in ({"freezing": True}, {"grad": True}):
            yield "conv-frozen-bn", _frozen_bn_model, x, dtype, mode, 2
    x = torch.rand(4, 3, 6, 6, 6)
    yield "conv-transpose3d-bn grad", _transposed, x, torch.float32, {"grad": True}, 1


def main(device: str = "cuda") -> int:
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    failed = 0
    for name, build, x, dtype, mode, pairs in _cases():
        model = build().to(device, dtype).eval()
        x = x.to(device, dtype)
        if x.dim() == 4:
            model, x = (
                model.to(memory_format=torch.channels_last),
                x.to(memory_format=torch.channels_last),
            )
        report = inductor_convbn.verify(model, x, **mode)
        ok = report.outputs_match and report.folded == report.pairs == pairs
        failed += not ok
        first = str(report).splitlines()[0].removeprefix("inductor_convbn ")
        print(f"{'ok ' if ok else 'BAD'} {name:26s} {str(dtype)[6:]:9s} {first}", flush=True)
        if not ok:
            print(report, flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
