"""Whether a CUDA AOTInductor package loads in a fresh process (it segfaults on load in the
process that built it on the lent H200): build in one process, load in another.

python package_split.py build PATH [KIND] ; python package_split.py load PATH [KIND]
KIND: cuda (default), cpu, cuda-embed (kernels embedded in the .so)
"""

import faulthandler
import sys

faulthandler.enable()
import torch  # noqa: E402


def model_and_input(device: str):
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU()
    ).eval()
    return model.to(device), torch.randn(2, 3, 16, 16, device=device)


def main(step: str, path: str, kind: str = "cuda") -> None:
    device = "cpu" if kind == "cpu" else "cuda"
    model, x = model_and_input(device)
    if step == "build":
        config = {"aot_inductor.embed_kernel_binary": True} if kind == "cuda-embed" else {}
        with torch.no_grad():
            exported = torch.export.export(model, (x,))
            torch._inductor.aoti_compile_and_package(
                exported, package_path=path, inductor_configs=config
            )
        print(kind, "built", path, flush=True)
        return
    print(kind, "loading", flush=True)
    run = torch._inductor.aoti_load_package(path)
    print(kind, "loaded", flush=True)
    with torch.no_grad():
        err = float((run(x) - model(x)).abs().max())
    print(kind, "ran, max error", err, flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
