"""Is the swin_v2 bfloat16 compile error (``CantSplit.__init__() missing 2 required
positional arguments``) torch's or this package's? Compile swin_v2_t in bfloat16,
channels_last, batch 8, on CUDA, without freezing: plain ``torch.compile``, then with the
plugin installed (policy "always"). Each way prints ok or its error.

    PYTHONPATH=$PWD/src python swin_check.py plain|plugin [model]
"""

import sys
import traceback

import torch
import torchvision

import inductor_convbn

way = sys.argv[1]
name = sys.argv[2] if len(sys.argv) > 2 else "swin_v2_t"
model = getattr(torchvision.models, name)().eval().cuda().to(torch.bfloat16)
model = model.to(memory_format=torch.channels_last)
x = torch.randn(8, 3, 256, 256, device="cuda", dtype=torch.bfloat16)
x = x.to(memory_format=torch.channels_last)
if way == "plugin":
    inductor_convbn.install(policy="always")
try:
    with torch.no_grad():
        out = torch.compile(model)(x)
        err = (out.float() - model(x).float()).abs().max().item()
    print(f"{name} bf16 {way}: ok, max abs error {err:.3g}", flush=True)
except Exception as e:
    print(f"{name} bf16 {way}: {type(e).__name__}: {str(e).splitlines()[0][:300]}", flush=True)
    traceback.print_exc()
