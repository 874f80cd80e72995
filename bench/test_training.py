"""ResNet18 training steps: memory and step time, fused against unfused, timed interleaved.

    pytest bench/test_training.py --device cuda --benchmark-json=OUT/training.json

``test_training_memory``: BN in training mode; ``memory_efficient(model)`` against the plain
model, in eager and under ``torch.compile``. ``test_frozen_bn``: the model trains with its BN
layers in eval mode (frozen-BN fine-tuning); the plugin's "grad" stage against plain
compile and against Inductor's own ``efficient_conv_bn_eval_fx_passes``.

Every variant's first step is checked against the plain eager model (loss and gradients).
On CUDA each variant's memory is measured alone after warm-up: what is allocated at the end
of forward beyond the model and optimizer state (the activations saved for backward), and
the peak of the whole step. Step times go to the JSON's ``extra_info`` as medians and as
per-round ratios to the plain variant of the same mode.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

import inductor_convbn
from inductor_convbn import _compat, _harness
from inductor_convbn.testing import randomize_batch_norm
from trainer import Trainer, gradients
from variants import ratio_stats, sync

torchvision = pytest.importorskip("torchvision")

# (batch size, dtype: "float32", or "bfloat16" for bf16 autocast)
CUDA_CONFIGS = [(64, "float32"), (64, "bfloat16"), (256, "float32"), (256, "bfloat16")]
CUDA_FROZEN_CONFIGS = [(64, "float32"), (64, "bfloat16")]
CPU_CONFIGS = [(8, "float32")]
SMOKE_CONFIGS = [(4, "float32")]
TRAINING_VARIANTS = ["eager", "eager+fused", "compile", "compile+fused"]
FROZEN_VARIANTS = [
    "eager", "eager+fused", "compile", "compile+plugin", "compile+efficient_conv_bn_eval",
]  # fmt: skip
# The plain variant each one is a ratio to.
BASELINES = {"eager": "eager", "compile": "compile"}
TOLERANCES = {"float32": (2e-3, 2e-3), "bfloat16": (1e-1, 1e-1)}


def _configs(config, frozen: bool):
    if config.getoption("--smoke"):
        return SMOKE_CONFIGS
    if config.getoption("--device") == "cuda":
        return CUDA_FROZEN_CONFIGS if frozen else CUDA_CONFIGS
    return CPU_CONFIGS


def pytest_generate_tests(metafunc):
    for name, frozen in (("training_config", False), ("frozen_config", True)):
        if name in metafunc.fixturenames:
            configs = _configs(metafunc.config, frozen)
            ids = [f"{dtype}-b{batch}" for batch, dtype in configs]
            metafunc.parametrize(name, configs, ids=ids)


def _compile(model: nn.Module, *, plugin: bool = False, **config: Any) -> Callable[..., Any]:
    """``torch.compile`` with the plugin or an Inductor config for this model's compiles only."""
    return _harness.compile_variant(model, plugin=plugin, config=config)


def _build(name: str, model: nn.Module, dtype: str) -> Trainer:
    mode, _, kind = name.partition("+")
    model = copy.deepcopy(model)
    if kind == "fused":
        model = inductor_convbn.memory_efficient(model, inplace=True)
    if mode == "eager":
        return Trainer(model, model, dtype)
    if kind == "plugin":
        return Trainer(model, _compile(model, plugin=True), dtype)
    if kind == "efficient_conv_bn_eval":
        return Trainer(model, _compile(model, efficient_conv_bn_eval_fx_passes=True), dtype)
    return Trainer(model, _compile(model), dtype)


def _run(benchmark, request, config, names: list[str], frozen: bool) -> None:
    device = request.config.getoption("--device")
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    smoke = request.config.getoption("--smoke")
    rounds = request.config.getoption("--rounds") or (1 if smoke else 7)
    batch, dtype = config
    size = 64 if smoke else 224
    _compat.dynamo_reset()
    torch.manual_seed(0)
    model = randomize_batch_norm(torchvision.models.resnet18(num_classes=100)).to(device).train()
    if frozen:
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.eval()
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, size, size, generator=generator).to(device)
    target = torch.randint(0, 100, (batch,), generator=generator).to(device)

    with _harness.tf32_off():
        trainers = {name: _build(name, model, dtype) for name in names}
        rtol, atol = TOLERANCES[dtype]
        expected = gradients(trainers["eager"], x, target)
        max_error = {}
        for name, trainer in trainers.items():
            # The first step compiles; every variant starts from the same weights.
            actual = gradients(trainer, x, target)
            torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, msg=name)
            max_error[name] = max(
                float((a - e).abs().max()) for a, e in zip(actual, expected, strict=True)
            )
        for trainer in trainers.values():
            for _ in range(2):
                trainer.step(x, target)
            trainer.measure_memory(x, target)
        per_step: dict[str, list[float]] = {n: [] for n in names}
        steps = 1 if smoke else 5

        def one_round():
            done = len(per_step[names[0]])
            order = names[done % len(names) :] + names[: done % len(names)]
            for name in order:
                trainer = trainers[name]
                sync(x.device)
                start = time.perf_counter()
                for _ in range(steps):
                    trainer.step(x, target)
                sync(x.device)
                per_step[name].append((time.perf_counter() - start) / steps)

        benchmark.pedantic(one_round, rounds=rounds, iterations=1)

    summary = {}
    for name, times in per_step.items():
        base = per_step.get(BASELINES[name.partition("+")[0]], per_step["eager"])
        summary[name] = {
            **ratio_stats(times, base),
            **trainers[name].memory,
            "max_abs_error_first_step": max_error[name],
        }
    benchmark.extra_info.update(
        {
            "model": "resnet18",
            "bn": "eval (frozen)" if frozen else "training",
            "dtype": dtype if dtype == "float32" else "bfloat16 autocast",
            "batch_size": batch,
            "image_size": size,
            "steps_per_round": steps,
            "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
            "torch": torch.__version__,
            "summary": summary,
            "per_step_s": per_step,
        }
    )
    _print_table(benchmark.extra_info)


def _print_table(info: dict[str, Any]) -> None:
    print(f"\nresnet18, BN {info['bn']}, {info['dtype']}, batch {info['batch_size']}:")
    for name, s in info["summary"].items():
        memory = (
            f"  fwd {s['after_forward_mib']:8.1f} MiB  peak {s['peak_mib']:8.1f} MiB"
            if "peak_mib" in s
            else ""
        )
        print(
            f"  {name:32s} {s['median_s'] * 1e3:8.2f} ms/step  ratio {s['ratio']:.3f} "
            f"({s['ratio_min']:.2f}-{s['ratio_max']:.2f}){memory}"
        )


# --smoke (CI, CPU): one compiled variant per test, to check the suite runs.
SMOKE_VARIANTS = {
    False: ["eager", "eager+fused", "compile+fused"],
    True: ["eager", "compile+plugin"],
}


def test_training_memory(benchmark, request, training_config):
    names = SMOKE_VARIANTS[False] if request.config.getoption("--smoke") else TRAINING_VARIANTS
    _run(benchmark, request, training_config, names, frozen=False)


def test_frozen_bn(benchmark, request, frozen_config):
    names = SMOKE_VARIANTS[True] if request.config.getoption("--smoke") else FROZEN_VARIANTS
    _run(benchmark, request, frozen_config, names, frozen=True)
