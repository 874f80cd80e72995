"""Where an AOTInductor package segfaults on CUDA: each step in its own process.

python package_debug.py STEP   (STEP: plain-fp32, plugin-fp32, plain-bf16cl, plugin-bf16cl,
                               two-packages)
"""

import faulthandler
import os
import sys
import tempfile

faulthandler.enable()
import torch  # noqa: E402

from inductor_convbn import _harness  # noqa: E402
from inductor_convbn.testing import torchvision_model  # noqa: E402


def step(name: str) -> None:
    plugin = name.startswith("plugin") or name == "two-packages"
    half = "bf16" in name or name == "two-packages"
    model = torchvision_model("resnet18").cuda()
    x = torch.randn(32, 3, 224, 224, device="cuda")
    if half:
        model = model.to(torch.bfloat16).to(memory_format=torch.channels_last)
        x = x.to(torch.bfloat16).to(memory_format=torch.channels_last)
    folder = tempfile.mkdtemp()
    print(name, "export+build", flush=True)
    _, run = _harness.build_package(model, (x,), os.path.join(folder, "a.pt2"), plugin=plugin)
    print(name, "built, running", flush=True)
    with torch.no_grad():
        y = run(x)
        torch.cuda.synchronize()
        print(name, "ran", float((y.float() - model(x).float()).abs().max()), flush=True)
    if name == "two-packages":
        _, run2 = _harness.build_package(
            model, (x,), os.path.join(folder, "b.pt2"), plugin=False, config={"freezing": True}
        )
        with torch.no_grad():
            run2(x)
            run(x)
            torch.cuda.synchronize()
        print(name, "two ran", flush=True)


if __name__ == "__main__":
    step(sys.argv[1])
