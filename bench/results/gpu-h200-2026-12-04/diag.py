"""Where the time goes: ResNet18 under freezing with the plugin, cuDNN fusion off and
always, generated code and a profile of each (CUDA and CPU time per call)."""

import copy
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

from inductor_convbn import _compat, _harness
from inductor_convbn.testing import torchvision_model

out_dir, dtype_name, batch = sys.argv[1], sys.argv[2], int(sys.argv[3])
dtype = getattr(torch, dtype_name)
fmt = torch.channels_last if dtype != torch.float32 else torch.contiguous_format
model = torchvision_model("resnet18").cuda().to(dtype).to(memory_format=fmt)
x = torch.randn(batch, 3, 224, 224, device="cuda", dtype=dtype).to(memory_format=fmt)
with torch.no_grad(), _harness.tf32_off():
    for mode in ("off", "always"):
        fn = _harness.compile_variant(
            copy.deepcopy(model), cudnn_fusion=mode, config={"freezing": True}
        )
        _, code = _compat.run_and_get_code(fn, x)
        src = "\n".join(code)
        with open(f"{out_dir}/code-{dtype_name}-{batch}-{mode}.py", "w") as f:
            f.write(src)
        calls = {
            k: src.count(k)
            for k in (
                "inductor_convbn.conv_relu",
                "inductor_convbn.conv_add_relu",
                "extern_kernels.convolution",
                "clone",
                "copy_",
                "triton_",
                "empty_strided_cuda",
            )
        }
        for _ in range(10):
            fn(x)
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(50):
            fn(x)
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t) / 50
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(20):
                fn(x)
            torch.cuda.synchronize()
        events = prof.key_averages()
        cuda_total = sum(e.self_device_time_total for e in events) / 20 / 1e3
        print(
            f"== {dtype_name} b{batch} fusion={mode}: wall {wall * 1e3:.3f} ms/call, "
            f"GPU busy {cuda_total:.3f} ms/call, code {calls}"
        )
        print(
            events.table(sort_by="self_device_time_total", row_limit=14, max_name_column_width=60)
        )
