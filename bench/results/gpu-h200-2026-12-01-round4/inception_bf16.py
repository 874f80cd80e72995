"""inception_v3 in bfloat16 (or --dtype float32) channels_last, batch 8, on the GPU with
freezing, TF32 off: max abs error against eager of plain torch.compile and of torch.compile
with the plugin.

    PYTHONPATH=$PWD/src python bench/results/gpu-h200-2026-12-01-round4/inception_bf16.py [float32]

Built as tests/test_zoo.py's ZOO["inception_v3"].build() (random weights and BN statistics),
input as bench/zoo_gpu.py makes it. Also against a float64 copy of eager.
"""

import copy
import sys
import time
from pathlib import Path

import torch

import inductor_convbn

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT / "tests"))
import test_zoo  # noqa: E402

torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False
print("torch", torch.__version__, torch.cuda.get_device_name(), flush=True)
entry = test_zoo.ZOO["inception_v3"]
model = entry.build()
x, _ = test_zoo.smallest_input(model, entry.shapes)
DTYPE = getattr(torch, sys.argv[1] if len(sys.argv) > 1 else "bfloat16")
print("dtype", DTYPE, flush=True)
x = torch.randn((8, *x.shape[1:]), generator=torch.Generator().manual_seed(1))
m64 = copy.deepcopy(model).to("cuda", torch.float64)
model = model.to("cuda", DTYPE).to(memory_format=torch.channels_last)
xb = x.to("cuda", DTYPE).to(memory_format=torch.channels_last)
with torch.no_grad():
    eager = model(xb).float()
    ref64 = m64(xb.double()).float()
mag = float(eager.abs().max())
print(
    f"input {tuple(xb.shape)}; eager magnitude {mag:.4g}; float64 magnitude"
    f" {float(ref64.abs().max()):.4g}; eager vs float64 {float((eager - ref64).abs().max()):.4g}",
    flush=True,
)


def run(label: str, plugin: bool) -> None:
    torch._dynamo.reset()
    if plugin:
        inductor_convbn.install()
    else:
        inductor_convbn.uninstall()
    before = torch._dynamo.utils.counters["inductor"]["inductor_convbn_folded"]
    start = time.perf_counter()
    compiled = torch.compile(copy.deepcopy(model))
    with torch._inductor.config.patch(freezing=True), torch.no_grad():
        out = compiled(xb).float()
    folded = torch._dynamo.utils.counters["inductor"]["inductor_convbn_folded"] - before
    print(
        f"{label}: vs eager {float((out - eager).abs().max()):.4g}; vs float64"
        f" {float((out - ref64).abs().max()):.4g}; magnitude {float(out.abs().max()):.4g};"
        f" plugin folds {folded}; {time.perf_counter() - start:.0f} s",
        flush=True,
    )


run("plain torch.compile, freezing", plugin=False)
run("torch.compile + plugin, freezing", plugin=True)
inductor_convbn.uninstall()
