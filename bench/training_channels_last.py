"""memory_efficient under bf16 autocast, NCHW against channels-last, on CUDA.

    python bench/training_channels_last.py [BATCH]

ResNet18 training steps (cross entropy, no optimizer), compiled, plain and fused, with the
model and input in NCHW and in channels-last; 5 interleaved rounds of 10 steps, the median
per variant, and its ratio to the plain model of the same layout.
"""

import sys
import time

import torch
import torchvision

import inductor_convbn


def step(model, x, y):
    with torch.autocast("cuda", torch.bfloat16):
        loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    for p in model.parameters():
        p.grad = None


def milliseconds(model, x, y, steps=10):
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step(model, x, y)
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps * 1e3


def main(batch: int = 256) -> None:
    torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    x = torch.randn(batch, 3, 224, 224, device="cuda")
    y = torch.randint(0, 100, (batch,), device="cuda")
    inputs = {"nchw": x, "channels_last": x.contiguous(memory_format=torch.channels_last)}
    models = {}
    for layout in inputs:
        base = torchvision.models.resnet18(num_classes=100).cuda().train()
        if layout == "channels_last":
            base = base.to(memory_format=torch.channels_last)
        models["plain", layout] = torch.compile(base)
        models["fused", layout] = torch.compile(inductor_convbn.memory_efficient(base))
    for (_, layout), model in models.items():
        for _ in range(2):  # compile and warm up
            step(model, inputs[layout], y)
    times = {key: [] for key in models}
    for _ in range(5):
        for (name, layout), model in models.items():
            times[name, layout].append(milliseconds(model, inputs[layout], y))
    median = {key: sorted(v)[len(v) // 2] for key, v in times.items()}
    print(f"ResNet18, bf16 autocast, batch {batch}, {torch.cuda.get_device_name()}")
    print("| variant | layout | ms/step | ratio to plain |\n| --- | --- | --- | --- |")
    for (name, layout), ms in median.items():
        print(
            f"| compile{'+fused' if name == 'fused' else ''} | {layout} | {ms:.2f} |"
            f" {ms / median['plain', layout]:.2f} |"
        )


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:]))
