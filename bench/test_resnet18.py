"""ResNet18 eval under no_grad: every variant checked against eager, then timed interleaved.

    pytest bench/ --benchmark-json=bench/results/cpu.json             # this machine's CPU
    pytest bench/ --device cuda --benchmark-json=bench/results/gpu.json
    python bench/report.py bench/results/*.json                       # -> docs/benchmarks.md

Each pytest-benchmark round times every variant once, in rotated order; the per-variant
seconds and ratios to plain ``torch.compile`` go to the JSON's ``extra_info``.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest
import torch

import variants
from inductor_convbn import _compat, _report
from inductor_convbn.testing import torchvision_model

pytest.importorskip("torchvision")

CORE = ["compile", "plugin", "freezing", "freezing+plugin", "offline", "offline+freezing"]
SMOKE = ["eager", *CORE]
# (dtype, channels_last, batch, image size, variants or None for all)
CPU_CONFIGS = [
    ("float32", False, 1, 224, None),
    ("float32", False, 8, 224, None),
]
CUDA_CONFIGS = [
    ("float32", False, 1, 224, None),
    ("float32", False, 32, 224, None),
    ("float32", False, 256, 224, [*CORE, "jit.freeze"]),
    ("bfloat16", True, 1, 224, None),
    ("bfloat16", True, 32, 224, None),
    ("bfloat16", True, 256, 224, CORE),
]
SMOKE_CONFIGS = [("float32", False, 1, 64, SMOKE)]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def _configs(config):
    if config.getoption("--smoke"):
        return SMOKE_CONFIGS
    return CUDA_CONFIGS if config.getoption("--device") == "cuda" else CPU_CONFIGS


def pytest_generate_tests(metafunc):
    if "bench_config" in metafunc.fixturenames:
        configs = _configs(metafunc.config)
        ids = [f"{d}{'-cl' if cl else ''}-b{b}-{s}px" for d, cl, b, s, _ in configs]
        metafunc.parametrize("bench_config", configs, ids=ids)


def _environment(device: str) -> dict[str, str]:
    env = {"torch": torch.__version__, "python": platform.python_version()}
    if device == "cuda":
        env["device"] = torch.cuda.get_device_name()
        env["cuda"] = str(torch.version.cuda)
    else:
        env["device"] = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    return env


def test_resnet18_variants(benchmark, bench_config, request):
    device = request.config.getoption("--device")
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    smoke = request.config.getoption("--smoke")
    rounds = request.config.getoption("--rounds") or (2 if smoke else 9)
    dtype_name, channels_last, batch, size, names = bench_config
    _compat.dynamo_reset()  # this config's variants only; each compiles afresh
    dtype = DTYPES[dtype_name]
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = torchvision_model("resnet18").to(device, dtype).to(memory_format=fmt)
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))
    x = x.to(device, dtype).to(memory_format=fmt)
    pairs = variants.count_pairs(model)

    rtol, atol = _report.DEFAULT_TOLERANCES[dtype]
    with torch.no_grad(), variants.tf32_off():
        expected = model(x)
        factories = variants.build_variants(
            model, cuda=device == "cuda", batch_size=batch, names=names
        )
        built, dropped = variants.prepare(factories, x, expected, rtol=rtol, atol=atol)
        # Enough calls per round that one round of one variant takes about 50 ms.
        per_call_s = min(v for v in _probe(built, x).values())
        calls = max(1, min(50, round(0.05 / per_call_s)))
        per_call: dict[str, list[float]] = {n: [] for n in built}

        def one_round():
            for name, times in variants.time_interleaved(
                built, x, rounds=1, calls=calls, offset=len(per_call[variants.BASELINE])
            ).items():
                per_call[name].extend(times)

        benchmark.pedantic(one_round, rounds=rounds, iterations=1, warmup_rounds=1)

    # The plugin saw every pair: under freezing it folds them all; without, it folds or
    # keeps each one (the report says why), and a variant without it folds nothing.
    assert built["freezing+plugin"].folded == pairs
    assert built["plugin"].folded + built["plugin"].kept == pairs
    assert built["compile"].folded == built["compile"].kept == 0

    benchmark.extra_info.update(
        {
            "model": "resnet18",
            "dtype": dtype_name,
            "channels_last": channels_last,
            "batch_size": batch,
            "image_size": size,
            "pairs": pairs,
            "calls_per_round": calls,
            "environment": _environment(device),
            "summary": variants.summarize(per_call),
            "per_call_s": per_call,
            "compile_s": {n: v.compile_s for n, v in built.items()},
            "folded": {n: v.folded for n, v in built.items()},
            "kept": {n: v.kept for n, v in built.items()},
            "dropped": dropped,
        }
    )


def _probe(built, x):
    return {n: t[0] for n, t in variants.time_interleaved(built, x, rounds=1, calls=1).items()}


COMPILE_VARIANTS = ["compile", "plugin", "freezing", "freezing+plugin"]


def test_resnet18_compile_time(benchmark, request):
    """First-call time of ResNet18 per variant, one fresh process each (alternating)."""
    device = request.config.getoption("--device")
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    smoke = request.config.getoption("--smoke")
    repeats = 1 if smoke else 3
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "compile_time.py")
    args = ["--device", device, "--image-size", "64" if smoke else "224"]
    names = ["compile", "freezing+plugin"] if smoke else COMPILE_VARIANTS
    results: dict[str, list[dict]] = {n: [] for n in names}

    def one_round():
        for name in names:
            out = subprocess.run(
                [sys.executable, script, name, *args], capture_output=True, text=True, check=True
            )
            results[name].append(json.loads(out.stdout.strip().splitlines()[-1]))

    benchmark.pedantic(one_round, rounds=repeats, iterations=1)
    for name in names:
        assert len(results[name]) == repeats
    benchmark.extra_info.update(
        {
            "model": "resnet18",
            "environment": _environment(device),
            "compile_s": {n: [r["compile_s"] for r in rs] for n, rs in results.items()},
            "pass_s": {n: [r["pass_s"] for r in rs] for n, rs in results.items()},
            "tracing_s": {n: [r["tracing_s"] for r in rs] for n, rs in results.items()},
        }
    )
