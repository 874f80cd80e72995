"""Where memory_efficient's extra step time goes on the GPU: the profiler's top kernels of
one training step, plain and fused, and each fused pair's conv timed alone against its FLOPs
and the bytes its fusion saves.

    python recompute_profile.py --model resnet50 --batch-size 64 --dtype bfloat16
"""

import argparse
import copy
import json
import time

import torch
import torchvision
from torch import nn
from torch.profiler import ProfilerActivity, profile

import inductor_convbn
from inductor_convbn.testing import randomize_batch_norm


def step_fn(model, x, target, bf16):
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", torch.bfloat16, enabled=bf16):
            out = model(x)
        nn.functional.cross_entropy(out.float(), target).backward()
        opt.step()

    return step


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="resnet50")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--dtype", default="bfloat16")
    a = p.parse_args()
    bf16 = a.dtype == "bfloat16"
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.manual_seed(0)
    model = randomize_batch_norm(getattr(torchvision.models, a.model)()).cuda().train()
    fmt = torch.channels_last if bf16 else torch.contiguous_format
    model = model.to(memory_format=fmt)
    x = torch.randn(a.batch_size, 3, 224, 224, device="cuda").to(memory_format=fmt)
    target = torch.randint(0, 1000, (a.batch_size,), device="cuda")
    fused = inductor_convbn.memory_efficient(copy.deepcopy(model), x)
    steps = {"plain": step_fn(model, x, target, bf16), "fused": step_fn(fused, x, target, bf16)}
    for s in steps.values():
        for _ in range(3):
            s()
    torch.cuda.synchronize()
    times = {n: [] for n in steps}
    for _ in range(5):
        for n, s in steps.items():
            torch.cuda.synchronize()
            t = time.perf_counter()
            for _ in range(3):
                s()
            torch.cuda.synchronize()
            times[n].append((time.perf_counter() - t) / 3)
    med = {n: sorted(t)[len(t) // 2] * 1e3 for n, t in times.items()}
    print(
        f"{a.model} b{a.batch_size} {a.dtype}: ms/step",
        {n: round(v, 2) for n, v in med.items()},
        "ratio",
        round(med["fused"] / med["plain"], 3),
    )
    for n, s in steps.items():
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(2):
                s()
            torch.cuda.synchronize()
        ka = prof.key_averages()
        cuda_total = sum(e.self_device_time_total for e in ka) / 2e3
        kernels = sum(e.count for e in ka if e.device_type == torch.autograd.DeviceType.CUDA) / 2
        print(f"-- {n}: CUDA busy {cuda_total:.2f} ms/step, {kernels:.0f} kernels/step")
        print(ka.table(sort_by="self_device_time_total", row_limit=14, max_name_column_width=60))
    # Each fused pair: its conv forward alone (what backward recomputes), its FLOPs, saved bytes.
    rows = []
    inputs = {}
    hooks = [
        m.register_forward_pre_hook(lambda m, args: inputs.__setitem__(m, args[0].detach()))
        for m in fused.modules()
        if type(m).__name__.startswith("FusedConvBatchNorm")
    ]
    with torch.no_grad(), torch.autocast("cuda", torch.bfloat16, enabled=bf16):
        fused(x)
    for h in hooks:
        h.remove()
    for name, m in fused.named_modules():
        if m not in inputs:
            continue
        xi = inputs[m].to(torch.bfloat16 if bf16 else torch.float32)
        w = m.conv.weight.to(xi.dtype)
        conv = m.conv

        def f(xi=xi, w=w, conv=conv):
            args = (conv.stride, conv.padding, conv.dilation, conv.groups)
            return nn.functional.conv2d(xi, w, None, *args)

        with torch.no_grad():
            out = f()
            for _ in range(3):
                f()
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(20):
                f()
            end.record()
            torch.cuda.synchronize()
        ms = start.elapsed_time(end) / 20
        flops = 2 * out.numel() * w.shape[1] * w.shape[2] * w.shape[3]
        saved = out.numel() * out.element_size() / 2**20
        inp = xi.numel() * xi.element_size() / 2**20
        rows.append(
            {"pair": name, "ms": ms, "gflop": flops / 1e9, "saved_mib": saved, "in_mib": inp}
        )
    tot = sum(r["ms"] for r in rows)
    extra = med["fused"] - med["plain"]
    print(f"sum of fused convs' forward alone: {tot:.2f} ms; step {med['plain']:.2f}, +{extra:.2f}")
    for r in sorted(rows, key=lambda r: -r["saved_mib"] / r["gflop"])[:60]:
        print(
            f"  {r['pair']:28s} {r['ms']:.3f} ms {r['gflop']:7.2f} GF saved {r['saved_mib']:7.1f}"
            f" MiB  in {r['in_mib']:7.1f}  TF/s {r['gflop'] / r['ms']:.1f}"
        )
    print(json.dumps({"rows": rows, "step_ms": med}))


if __name__ == "__main__":
    main()
