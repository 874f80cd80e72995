"""Training memory against step time: ``memory_efficient`` with time budgets, against the
unfused model and torch's own activation-memory budget, timed interleaved in one process.

    python bench/training_budget.py --model resnet50 --batch-size 256 --dtype bfloat16 \\
        --mode compiled --json OUT/resnet50-256-bfloat16-compiled.json

Variants: ``plain`` (the unfused model, the baseline of every ratio), ``fused`` (every pair,
``max_overhead=None``), ``budget=B`` (``memory_efficient(model, x, max_overhead=B)``), and
compiled only, ``torch budget=B`` (the plain model compiled under
``torch._functorch.config.activation_memory_budget = B``). ``bfloat16`` is bf16 autocast on a
channels-last model and input. Each variant's first step is checked against the plain eager
model (loss and gradients); on CUDA its memory is measured alone: what is allocated at the
end of forward beyond the model and optimizer state, and the peak of the step.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parent))

import inductor_convbn  # noqa: E402
from inductor_convbn import _compat, _harness, _pass  # noqa: E402
from inductor_convbn.testing import randomize_batch_norm  # noqa: E402
from trainer import Trainer, gradients  # noqa: E402
from variants import ratio_stats, sync  # noqa: E402

# Each variant's first step (loss and gradients) is judged against the same step in float64,
# by the largest relative error (norm of the difference over the norm) of any of them, next to
# the plain eager step's own: a deep model's training step is ill-conditioned, and float32
# eager itself is off float64 by up to 2.6% in ResNet50's BN gradients (CPU, batch 16), so
# two float32 implementations differ by as much. A variant may be off by twice eager's own
# error plus the dtype's tolerance.
TOLERANCES = {"float32": 1e-3, "bfloat16": 5e-2}
OWN_ERROR_MARGIN = 2


def relative_error(actual: list[torch.Tensor], expected: list[torch.Tensor]) -> float:
    return max(
        float((a.double() - e.double()).norm() / e.double().norm().clamp_min(1e-30))
        for a, e in zip(actual, expected, strict=True)
    )


def _compiled(model: torch.nn.Module, torch_budget: float | None = None) -> Any:
    """The model compiled without the plugin (each with a code object of its own), under
    torch's activation-memory budget if one is given."""
    if torch_budget is None:
        return _harness.compile_variant(model, plugin=False)

    def backend(gm: torch.fx.GraphModule, example_inputs: Any) -> Any:
        with _pass.removed(), _compat.activation_memory_budget(torch_budget):
            return _compat.compile_fx(gm, example_inputs)

    return torch.compile(_harness.fresh_callable(model), backend=backend)


def build(
    name: str, model: torch.nn.Module, x: torch.Tensor, mode: str, dtype: str
) -> tuple[Trainer, dict[str, Any]]:
    """The variant ``name`` and what ``memory_efficient`` estimated for it."""
    model = copy.deepcopy(model)
    info: dict[str, Any] = {}
    torch_budget = None
    if name == "fused" or name.startswith("budget="):
        budget = None if name == "fused" else float(name.partition("=")[2])
        model = inductor_convbn.memory_efficient(model, x, inplace=True, max_overhead=budget)
        report = inductor_convbn.memory_efficient_report(model)
        info = {
            "fused": report.fused,
            "pairs": report.pairs,
            "estimated_overhead": report.estimated_overhead,
            "estimated_saved_mib": report.estimated_saved_bytes / 2**20,
        }
    elif name.startswith("torch budget="):
        torch_budget = float(name.partition("=")[2])
    if mode == "eager":
        return Trainer(model, model, dtype), info
    return Trainer(model, _compiled(model, torch_budget), dtype), info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--dtype", choices=list(TOLERANCES), default="float32")
    parser.add_argument("--mode", choices=["eager", "compiled"], default="eager")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--budgets", type=float, nargs="*", default=[0.05, 0.1, 0.2])
    parser.add_argument("--torch-budgets", type=float, nargs="*", default=[0.5])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument(
        "--random-bn",
        action="store_true",
        help="random BN weights and biases (torchvision's init is 1 and 0): a deep model then "
        "amplifies rounding, and even plain torch.compile's gradients leave eager's far behind "
        "(ResNet50 bf16: 1.4 relative)",
    )
    parser.add_argument("--json", type=Path)
    parser.add_argument(
        "--only",
        nargs="*",
        help="build (compile) and check these variants only, e.g. to fill the compile caches "
        "in parallel processes before the timed run",
    )
    parser.add_argument(
        "--warm",
        action="store_true",
        help="compile the variants and stop: no float64 reference (a ResNet50 one at batch 256 "
        "holds about 40 GiB), no check, no timing; for the processes that fill the caches",
    )
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    fmt = torch.channels_last if args.dtype == "bfloat16" else torch.contiguous_format
    model = getattr(torchvision.models, args.model)(num_classes=100)
    if args.random_bn:
        model = randomize_batch_norm(model)
    model = model.to(device).train().to(memory_format=fmt)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch_size, 3, args.image_size, args.image_size, generator=generator)
    x = x.to(device).to(memory_format=fmt)
    target = torch.randint(0, 100, (args.batch_size,), generator=generator).to(device)
    names = ["plain", "fused", *(f"budget={b:g}" for b in args.budgets)]
    if args.mode == "compiled":
        names += [f"torch budget={b:g}" for b in args.torch_budgets]
    if args.only is not None:
        names = [n for n in names if n in args.only]

    if args.warm:
        with _harness.tf32_off():  # as below: the cache keys see the TF32 flags
            for name in names:
                trainer, _ = build(name, model, x, args.mode, args.dtype)
                trainer.step(x, target)  # the first call compiles
        return

    with _harness.tf32_off():
        exact_model = copy.deepcopy(model).double().to(memory_format=torch.contiguous_format)
        exact_x = x.double().contiguous()
        exact = gradients(Trainer(exact_model, exact_model, "float32"), exact_x, target)
        del exact_model, exact_x
        eager = copy.deepcopy(model)
        own = relative_error(gradients(Trainer(eager, eager, args.dtype), x, target), exact)
        del eager
        allowed = OWN_ERROR_MARGIN * own + TOLERANCES[args.dtype]
        trainers, infos, errors = {}, {}, {}
        for name in names:
            trainer, infos[name] = build(name, model, x, args.mode, args.dtype)
            actual = gradients(trainer, x, target)  # the first call compiles
            errors[name] = relative_error(actual, exact)
            if not errors[name] <= allowed:
                raise AssertionError(
                    f"{name}: the first step's loss or gradients are {errors[name]:.2e} off "
                    f"float64's (relative); plain eager is {own:.2e} off; allowed {allowed:.2e}"
                )
            for _ in range(2):
                trainer.step(x, target)
            trainer.measure_memory(x, target)
            trainers[name] = trainer
        per_step: dict[str, list[float]] = {n: [] for n in names}
        for r in range(args.rounds):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                sync(device)
                start = time.perf_counter()
                for _ in range(args.steps):
                    trainers[name].step(x, target)
                sync(device)
                per_step[name].append((time.perf_counter() - start) / args.steps)

    if "plain" not in trainers:
        return
    plain = trainers["plain"].memory
    summary = {}
    for name, times in per_step.items():
        memory = trainers[name].memory
        summary[name] = {**ratio_stats(times, per_step["plain"]), **memory, **infos[name]}
        summary[name]["relative_error_first_step"] = errors[name]
        if plain:
            for key in ("after_forward_mib", "peak_mib"):
                summary[name][key.replace("_mib", "_ratio")] = memory[key] / plain[key]
    result = {
        "model": args.model,
        "batch_size": args.batch_size,
        "dtype": args.dtype if args.dtype == "float32" else "bfloat16 autocast, channels_last",
        "mode": args.mode,
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "random_bn": args.random_bn,
        "eager_relative_error_vs_float64": own,
        "rounds": args.rounds,
        "steps_per_round": args.steps,
        "summary": summary,
        "per_step_s": per_step,
    }
    print(table(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


def table(result: dict[str, Any]) -> str:
    """The result as a Markdown table, memory and time as ratios to the plain model."""
    rows = [
        f"**{result['model']}, batch {result['batch_size']}, {result['dtype']}, "
        f"{result['mode']}** ({result['device']}, torch {result['torch']})",
        "",
        "| variant | fused | est. overhead | ms/step | step ratio (range) "
        "| MiB end of fwd (ratio) | peak MiB (ratio) | grad error vs fp64 |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, s in result["summary"].items():
        fused = f"{s['fused']}/{s['pairs']}" if "fused" in s else "-"
        estimate = f"{s['estimated_overhead']:.1%}" if "estimated_overhead" in s else "-"
        memory = (
            f"{s['after_forward_mib']:.0f} ({s['after_forward_ratio']:.2f}) | "
            f"{s['peak_mib']:.0f} ({s['peak_ratio']:.2f})"
            if "after_forward_ratio" in s
            else "- | -"
        )
        rows.append(
            f"| {name} | {fused} | {estimate} | {s['median_s'] * 1e3:.1f} | {s['ratio']:.3f} "
            f"({s['ratio_min']:.2f}-{s['ratio_max']:.2f}) | {memory} | "
            f"{s['relative_error_first_step']:.1e} |"
        )
    return "\n".join(rows)


if __name__ == "__main__":
    main()
