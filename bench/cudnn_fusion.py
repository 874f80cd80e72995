"""cuDNN fusion under freezing: the plugin with and without it, against Inductor's own
freezing and TorchScript's ``freeze`` + ``optimize_for_inference``, timed interleaved in one
process, as ratios to plain ``torch.compile`` (lower is faster).

    python bench/cudnn_fusion.py --model resnet18 --dtype bfloat16 --channels-last \\
        --batch-size 32 --json OUT/resnet18-bfloat16-cl-32.json [--tf32] [--lock FILE]

``--lock FILE`` holds an exclusive lock on FILE while timing, so that several of these
processes may compile side by side and still time one at a time; ``--barrier DIR:N`` first
waits until N processes have compiled (each leaves a file in DIR), so that none times while
another compiles. Each variant's output is
checked against eager (TF32 as the run says). The JSON has each variant's ratio with its
per-round range, its compile time, and the convs the plugin handed to cuDNN.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import fcntl
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from inductor_convbn import _harness, _report  # noqa: E402
from inductor_convbn.testing import torchvision_model  # noqa: E402
from variants import _jit_frozen, prepare, results, time_interleaved  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
VARIANTS = (
    "compile",
    "freezing",
    "freezing+plugin",
    "freezing+plugin (cudnn auto)",
    "freezing+plugin (cudnn always)",
    "jit.freeze",
)
CUDAGRAPHS = {"triton.cudagraphs": True}  # what mode="reduce-overhead" sets


def factories(model: torch.nn.Module) -> dict[str, Any]:
    def compiled(**kw: Any) -> Any:
        return lambda: _harness.compile_variant(copy.deepcopy(model), **kw)

    freezing = {"freezing": True}
    return {
        "compile": compiled(plugin=False),
        "freezing": compiled(plugin=False, config=freezing),
        "freezing+plugin": compiled(cudnn_fusion="off", config=freezing),
        "freezing+plugin (cudnn auto)": compiled(cudnn_fusion="auto", config=freezing),
        "freezing+plugin (cudnn always)": compiled(cudnn_fusion="always", config=freezing),
        "jit.freeze": lambda: _jit_frozen(model),
        "freezing (reduce-overhead)": compiled(plugin=False, config={**freezing, **CUDAGRAPHS}),
        "freezing+plugin (reduce-overhead)": compiled(
            cudnn_fusion="off", config={**freezing, **CUDAGRAPHS}
        ),
        "freezing+plugin (cudnn auto; reduce-overhead)": compiled(
            cudnn_fusion="auto", config={**freezing, **CUDAGRAPHS}
        ),
    }


def wait_for(barrier: str | None, name: str) -> None:
    if barrier is None:
        return
    folder, _, count = barrier.rpartition(":")
    Path(folder).mkdir(parents=True, exist_ok=True)
    (Path(folder) / name).touch()
    deadline = time.monotonic() + 300  # a process that died never arrives
    while len(list(Path(folder).iterdir())) < int(count) and time.monotonic() < deadline:
        time.sleep(0.5)


@contextlib.contextmanager
def tf32(on: bool) -> Iterator[None]:
    if not on:
        with _harness.tf32_off():
            yield
        return
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@contextlib.contextmanager
def locked(path: str | None) -> Iterator[None]:
    if path is None:
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--tf32", action="store_true", help="TF32 on (default off)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--calls", type=int, default=10)
    parser.add_argument("--lock", help="a file to lock while timing")
    parser.add_argument("--barrier", help="DIR:N, wait for N compiled processes first")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)

    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    dtype = DTYPES[args.dtype]
    model = torchvision_model(args.model).to(args.device, dtype).to(memory_format=fmt)
    x = torch.randn(args.batch_size, 3, args.image_size, args.image_size)
    x = x.to(args.device, dtype).to(memory_format=fmt)
    rtol, atol = _report.DEFAULT_TOLERANCES[dtype]
    if args.tf32 and dtype == torch.float32:
        rtol, atol = _report.DEFAULT_TOLERANCES[torch.bfloat16]
    every = factories(model)
    names = args.variants.split(",")
    unknown = sorted(set(names) - set(every))
    if unknown:
        parser.error(f"unknown variants {unknown}; known: {sorted(every)}")
    chosen = {name: every[name] for name in names}
    with torch.no_grad(), tf32(args.tf32):
        expected = model(x)
        variants, dropped = prepare(chosen, x, expected, rtol=rtol, atol=atol)
        wait_for(args.barrier, str(args.json.stem if args.json else id(args)))
        start = time.perf_counter()
        with locked(args.lock):
            waited = time.perf_counter() - start
            per_call = time_interleaved(variants, x, rounds=args.rounds, calls=args.calls)
    result = {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "torch": torch.__version__,
        "device_name": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        **results(variants, per_call, dropped),
        "lock_wait_s": waited,
    }
    line = " ".join(
        f"{n}={s['ratio']:.3f}[{s['ratio_min']:.2f}-{s['ratio_max']:.2f}]"
        for n, s in result["summary"].items()
    )
    tag = f"{args.model} {args.dtype}{' tf32' if args.tf32 else ''}"
    tag += f"{' CL' if args.channels_last else ''} b{args.batch_size}"
    print(f"{tag}: {line} fused={result['cudnn_fused']} dropped={dropped}", flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
