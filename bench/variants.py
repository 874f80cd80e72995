"""The ResNet18 variants the benchmark suite times side by side.

Each variant is compiled with a backend of its own that patches Inductor's config around
that one compile, and wraps the model in a code object of its own: variants never share
dynamo's cache entries, and no variant's config leaks into another's (see
docs/benchmarks.md, "How not to fool yourself").
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from inductor_convbn import _compat, _decide, _harness, _report
from inductor_convbn.testing import torchvision_model

BASELINE = "compile"
# Variants that do not go through torch.compile.
NOT_COMPILED = ("eager", "eager+fx.fuse", "jit.freeze")


@dataclasses.dataclass
class Variant:
    name: str
    run: Callable[..., Any]
    compile_s: float = 0.0  # first call, compile included, minus one warm call
    folded: int = 0  # pairs the plugin folded while compiling this variant
    kept: int = 0  # pairs the plugin kept (auto policy)
    cudnn_fused: int = 0  # convs the plugin handed to cuDNN's fused convolution


def fold_offline(model: torch.nn.Module) -> tuple[torch.nn.Module, int]:
    """``model`` with each conv -> BN module pair folded by torch's own
    ``fuse_conv_bn_eval`` (the ideal a perfect fold can reach, independent of our code),
    and the number of pairs folded."""
    model = copy.deepcopy(model)
    folded = 0
    traced = torch.fx.symbolic_trace(model)
    modules = dict(traced.named_modules())
    for node in traced.graph.nodes:
        if node.op != "call_module" or not isinstance(modules[node.target], torch.nn.BatchNorm2d):
            continue
        conv_node = node.args[0]
        if not (
            isinstance(conv_node, torch.fx.Node)
            and conv_node.op == "call_module"
            and isinstance(modules[conv_node.target], torch.nn.Conv2d)
            and len(conv_node.users) == 1
        ):
            continue
        fused = torch.nn.utils.fusion.fuse_conv_bn_eval(
            modules[conv_node.target], modules[node.target]
        )
        _set_submodule(traced, conv_node.target, fused)
        node.replace_all_uses_with(conv_node)
        traced.graph.erase_node(node)
        folded += 1
    traced.recompile()
    return traced, folded


def count_pairs(model: torch.nn.Module) -> int:
    """Conv2d -> BatchNorm2d module pairs ``fold_offline`` folds: an independent count."""
    return fold_offline(model)[1]


def _set_submodule(root: torch.nn.Module, target: str, module: torch.nn.Module) -> None:
    parent, _, name = target.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)


def _compiled(
    model: torch.nn.Module,
    *,
    plugin: bool = False,
    policy: str = "auto",
    cudagraphs: bool = False,
    **config: Any,
) -> Callable[..., Any]:
    patches = dict(config)
    if cudagraphs:
        patches["triton.cudagraphs"] = True  # what mode="reduce-overhead" sets
    return _harness.compile_variant(
        copy.deepcopy(model), plugin=plugin, policy=policy, config=patches
    )


def _jit_frozen(model: torch.nn.Module) -> Callable[..., Any]:
    scripted = torch.jit.script(copy.deepcopy(model))
    return torch.jit.optimize_for_inference(torch.jit.freeze(scripted))


def build_variants(
    model: torch.nn.Module, *, cuda: bool, batch_size: int, names: Sequence[str] | None = None
) -> dict[str, Callable[[], Callable[..., Any]]]:
    """Factories for every variant that applies to this configuration, by name."""
    offline, _ = fold_offline(model)
    factories: dict[str, Callable[[], Callable[..., Any]]] = {
        "eager": lambda: copy.deepcopy(model),
        BASELINE: lambda: _compiled(model),
        "plugin": lambda: _compiled(model, plugin=True),
        "plugin-always": lambda: _compiled(model, plugin=True, policy="always"),
        "freezing": lambda: _compiled(model, freezing=True),
        "freezing+plugin": lambda: _compiled(model, plugin=True, freezing=True),
        "efficient_conv_bn_eval": lambda: _compiled(model, efficient_conv_bn_eval_fx_passes=True),
        "offline": lambda: _compiled(offline),
        "offline+freezing": lambda: _compiled(offline, freezing=True),
        "jit.freeze": lambda: _jit_frozen(model),
    }
    fx = _fx_module()
    if fx is not None:
        factories["eager+fx.fuse"] = lambda: fx.fuse(copy.deepcopy(model))
    if cuda and batch_size == 1:
        factories["compile (reduce-overhead)"] = lambda: _compiled(model, cudagraphs=True)
        factories["plugin (reduce-overhead)"] = lambda: _compiled(
            model, plugin=True, cudagraphs=True
        )
        factories["freezing+plugin (reduce-overhead)"] = lambda: _compiled(
            model, plugin=True, freezing=True, cudagraphs=True
        )
    if names is not None:
        unknown = set(names) - set(factories)
        if unknown:
            raise ValueError(f"unknown variants {sorted(unknown)}; known: {sorted(factories)}")
        factories = {n: factories[n] for n in names}
    return factories


def _fx_module() -> Any:
    try:
        from inductor_convbn import fx  # the FX module fuser, where this version has it
    except ImportError:
        return None
    return fx


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# TF32 off, as verify() has it: every variant is checked against eager at fp32 tolerances.
tf32_off = _harness.tf32_off

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of a script that builds ResNet18 and its input: see model_and_input."""
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--channels-last", action="store_true")


def model_and_input(args: argparse.Namespace) -> tuple[torch.nn.Module, torch.Tensor]:
    """ResNet18 with random BN state, and an input, as add_model_arguments' options say."""
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    dtype = DTYPES[args.dtype]
    model = torchvision_model("resnet18").to(args.device, dtype).to(memory_format=fmt)
    x = torch.randn(args.batch_size, 3, args.image_size, args.image_size)
    return model, x.to(args.device, dtype).to(memory_format=fmt)


def prepare(
    factories: dict[str, Callable[[], Callable[..., Any]]],
    x: torch.Tensor,
    expected: torch.Tensor,
    *,
    rtol: float,
    atol: float,
    not_compiled: Sequence[str] = NOT_COMPILED,
) -> tuple[dict[str, Variant], dict[str, str]]:
    """Build, compile and check each variant against eager; return those that work and
    why the others were dropped (a variant that fails to build, say TorchScript on a
    release that dropped it, is reported, not fatal)."""
    variants: dict[str, Variant] = {}
    dropped: dict[str, str] = {}
    for name, factory in factories.items():
        before = _compat.counters["inductor"].copy()
        graphs_before = _compat.counters["stats"]["unique_graphs"]
        try:
            run = factory()
            sync(x.device)
            start = time.perf_counter()
            out = run(x)
            sync(x.device)
            first = time.perf_counter() - start
            start = time.perf_counter()
            out = run(x)
            sync(x.device)
            warm = time.perf_counter() - start
        except Exception as e:  # noqa: BLE001 - reported in the results, by design
            dropped[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
            continue
        delta = _compat.counters["inductor"] - before
        graphs = _compat.counters["stats"]["unique_graphs"] - graphs_before
        if name not in not_compiled and graphs < 1:
            # Dynamo ran it eagerly (past a recompile limit, or a reused cache entry).
            raise AssertionError(f"{name}: dynamo compiled no graph for this variant")
        torch.testing.assert_close(
            out, expected, rtol=rtol, atol=atol, msg=lambda m, n=name: f"{n}: {m}"
        )
        variants[name] = Variant(
            name,
            run,
            compile_s=max(first - warm, 0.0),
            folded=delta[_decide.COUNTER_FOLDED],
            kept=delta[_decide.COUNTER_KEPT],
            cudnn_fused=delta[_decide.COUNTER_CUDNN_FUSED],
        )
    return variants, dropped


def time_interleaved(
    variants: dict[str, Variant], x: torch.Tensor, *, rounds: int, calls: int, offset: int = 0
) -> dict[str, list[float]]:
    """Seconds per call of each variant, one entry per round. Every round times each
    variant once, ``calls`` calls in a row, in an order rotated from round to round, so
    that drift and noise hit every variant alike."""
    names = list(variants)
    per_call: dict[str, list[float]] = {n: [] for n in names}
    for r in range(offset, offset + rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            run = variants[name].run
            sync(x.device)
            start = time.perf_counter()
            for _ in range(calls):
                run(x)
            sync(x.device)
            per_call[name].append((time.perf_counter() - start) / calls)
    return per_call


def summarize(per_call: dict[str, list[float]]) -> dict[str, dict[str, float]]:
    """Median seconds per call of each variant, and its per-round ratio to the baseline."""
    return {name: ratio_stats(times, per_call[BASELINE]) for name, times in per_call.items()}


def ratio_stats(times: list[float], base: list[float]) -> dict[str, float]:
    """The median of ``times``, and the median and range of its per-round ratios to ``base``."""
    ratios = [t / b for t, b in zip(times, base, strict=True)]
    return {
        "median_s": statistics.median(times),
        "ratio": statistics.median(ratios),
        "ratio_min": min(ratios),
        "ratio_max": max(ratios),
    }


def run_config(
    model: torch.nn.Module,
    x: torch.Tensor,
    *,
    rounds: int,
    calls: int,
    names: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Everything for one configuration: checked variants, interleaved timings, summary."""
    rtol, atol = _report.DEFAULT_TOLERANCES[x.dtype]
    with torch.no_grad(), tf32_off():
        expected = model(x)
        factories = build_variants(
            model, cuda=x.device.type == "cuda", batch_size=x.shape[0], names=names
        )
        variants, dropped = prepare(factories, x, expected, rtol=rtol, atol=atol)
        per_call = time_interleaved(variants, x, rounds=rounds, calls=calls)
    return results(variants, per_call, dropped)


def results(
    variants: dict[str, Variant], per_call: dict[str, list[float]], dropped: dict[str, str]
) -> dict[str, Any]:
    """One configuration's results, as the JSON of every benchmark script has them."""
    return {
        "summary": summarize(per_call),
        "per_call_s": per_call,
        "compile_s": {n: v.compile_s for n, v in variants.items()},
        "folded": {n: v.folded for n, v in variants.items()},
        "kept": {n: v.kept for n, v in variants.items()},
        "cudnn_fused": {n: v.cudnn_fused for n, v in variants.items()},
        "dropped": dropped,
    }
