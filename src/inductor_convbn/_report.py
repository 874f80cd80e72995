"""``verify()``: compile a model with the plugin, count its conv -> batch_norm pairs
independently of the pattern matcher, run it, and compare with eager."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import os
import tempfile
import threading
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch

from . import _compat, _cudnn, _decide, _harness, _pairs
from ._pairs import AFFINE_NO_SHAPES, FOLDED, KEPT, NOT_MATCHED, SKIPPED, PairReport

__all__ = ["FoldReport", "PairReport", "find_pairs", "verify", "verify_package"]

# Tolerances against eager per output dtype (TF32 off). The folded conv rounds differently
# from conv followed by BN, and the difference grows with depth.
DEFAULT_TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-7, 1e-7),
    torch.float32: (1e-4, 1e-4),
    torch.float16: (2e-2, 2e-2),
    torch.bfloat16: (8e-2, 8e-2),
}


# Gradients are judged at this multiple of the output's rtol. A fold moves the BN's affine
# gradients into the conv's weight and bias gradients (dL/dgamma = sum(dL/dw' * w) / std
# + dL/db' * (b - mean) / std): two sums over the batch and the image whose difference
# cancels to the true value, since the running mean is the conv output's mean. In float32
# that difference is 1e-4 - 3e-4 of its size on a large output (ConvTranspose3d, 2M
# elements); PyTorch's own efficient_conv_bn_eval computes it the same way.
GRAD_RTOL_FACTOR = 10

# An output outside the tolerances is blamed on the plugin only when its error exceeds this
# multiple of plain torch.compile's own (the same config, without the plugin): both reorder
# float sums, and on a large output (random weights, half precision) that alone can exceed
# any fixed tolerance.
PLAIN_COMPILE_MARGIN = 2.0


@dataclasses.dataclass
class FoldReport(_pairs.PairTable):
    """What ``verify()`` found: every pair, which were folded, why the rest were not."""

    folded: int
    max_abs_error: float
    # The compiled output is within (rtol, atol) of eager, or its error is at most
    # PLAIN_COMPILE_MARGIN times plain torch.compile's; and the gradients match (grad=True).
    outputs_match: bool
    rtol: float
    atol: float
    # Plain torch.compile's max abs error against eager (the same config, no plugin): None
    # where it was not compiled (verify(plain=None) compiles it only when the plugin's output
    # is outside the tolerances).
    plain_compile_error: float | None = None
    within_tolerance: bool = True  # the output alone is within (rtol, atol) of eager
    fx_graph_cache_hits: int = 0
    policy: str = "auto"
    freezing: bool = False
    # With verify(grad=True): the largest error of a parameter gradient, relative to its
    # size (``_judge_gradients``), against the float64 eager model (against the eager model
    # itself where float64 does not run); ``outputs_match`` covers the gradients too. None
    # when gradients were not compared.
    max_grad_error: float | None = None
    # Eager's own such error against float64: the float32 noise the plugin is judged by.
    eager_grad_error: float | None = None
    # plain torch.compile's such error, where it was compiled (as plain_compile_error)
    plain_grad_error: float | None = None
    gradients_match: bool | None = None  # None when gradients were not compared
    package: bool = False  # an AOTInductor package (verify_package), not torch.compile
    # Convs whose bias (+ residual add) + ReLU run inside cuDNN's convolution (``_cudnn``);
    # each such pair's row says so where the pass ran (not on an FX graph cache hit).
    cudnn_fused: int = 0

    @property
    def missed(self) -> list[str]:
        """Pairs that could have been folded safely but were not: a plugin bug."""
        return [p.conv for p in self.pair_reports if p.reason == NOT_MATCHED]

    @property
    def kept(self) -> list[str]:
        """Pairs safe to fold that the policy kept, because folding them would cost time."""
        return [p.conv for p in self.pair_reports if p.status == KEPT]

    def __str__(self) -> str:
        mode = f"policy={self.policy}" + (", freezing" if self.freezing else "")
        if self.package:
            mode = "AOTInductor package"
        head = (
            f"inductor_convbn ({mode}): folded {self.folded} of {self.pairs} conv->bn pairs"
            f"{self._how_to_fold_kept()}; max abs error vs eager {self.max_abs_error:.3g}"
        )
        if self.plain_compile_error is not None:
            head += f" ({self._plain_name()}: {self.plain_compile_error:.3g})"
        head += f" {self._output_judgement()}"
        if self.max_grad_error is not None:
            head = head.replace(f"({mode})", f"({mode}, with gradients)", 1)
            head += f"; in gradients {self.max_grad_error:.3g} of their size"
            others = []
            if self.eager_grad_error is not None:  # else against eager: no float64
                head += " vs float64"
                others.append(f"eager's own: {self.eager_grad_error:.3g}")
            if self.plain_grad_error is not None:
                others.append(f"{self._plain_name()}'s: {self.plain_grad_error:.3g}")
            if others:
                head += f" ({'; '.join(others)})"
            head += " (within)" if self.gradients_match else " (OUTSIDE)"
        if self.cudnn_fused:
            head += f"; {self.cudnn_fused} conv(s) with their epilogue in cuDNN"
        if self.fx_graph_cache_hits:
            head += f"; {self.fx_graph_cache_hits} graph(s) from the FX graph cache"
        return _pairs.format_pairs(head, self.pair_reports)

    def _within_plain_compile(self) -> bool:
        plain = self.plain_compile_error
        return plain is not None and self.max_abs_error <= PLAIN_COMPILE_MARGIN * plain

    def _plain_name(self) -> str:
        return "the package without the plugin" if self.package else "plain torch.compile"

    def _output_judgement(self) -> str:
        tolerance = f"rtol={self.rtol:g}, atol={self.atol:g}"
        plain = self._plain_name()
        if self.within_tolerance:
            return f"(within {tolerance})"
        margin = f"{PLAIN_COMPILE_MARGIN:g}x {plain}'s error"
        if self._within_plain_compile():
            return f"(outside {tolerance}, as {plain} is; within {margin})"
        if self.plain_compile_error is None:
            return f"(OUTSIDE {tolerance})"
        return f"(OUTSIDE {tolerance}, and beyond {margin})"

    def _how_to_fold_kept(self) -> str:
        unseen = sum(p.reason == AFFINE_NO_SHAPES for p in self.pair_reports)
        kept = len(self.kept) - unseen
        said = []
        if kept and self.freezing:
            said.append(f"{kept} kept by policy={self.policy}: policy='always' folds them")
        elif kept:
            said.append(
                f"{kept} kept by policy={self.policy}: freezing folds them once, at compile"
                " time; policy='always' on every call"
            )
        if unseen:
            said.append(f"{unseen} left to Inductor's binary folding: this torch gives no shapes")
        return f" ({'; '.join(said)})" if said else ""


def _layer_kind(gm: torch.fx.GraphModule, node: torch.fx.Node) -> _pairs.LayerKind | None:
    if node.op == "call_function":
        return _pairs.layer_kind_of_function(node.target)
    if node.op == "call_module":  # dynamo without nn-module inlining (torch < 2.5)
        return _pairs.layer_kind_of_module(gm.get_submodule(str(node.target)))
    return None


def _batch_norm(gm: torch.fx.GraphModule, node: torch.fx.Node) -> dict[str, Any] | None:
    """``input``, ``has_running_stats`` and ``training`` of a batch norm node, else None."""
    if node.op == "call_function" and node.target in _pairs.BATCH_NORM_FUNCTIONS:
        arguments = _pairs.bind_batch_norm(node.target, node.args, node.kwargs)
        return {
            "input": arguments["input"],
            "has_running_stats": arguments["running_mean"] is not None
            and arguments["running_var"] is not None,
            "training": arguments["training"],
        }
    if node.op == "call_module":
        module = gm.get_submodule(str(node.target))
        if type(module) in _pairs.BATCH_NORM_MODULES:
            has_stats = module.running_mean is not None
            return {
                "input": node.args[0] if node.args else node.kwargs.get("input"),
                "has_running_stats": has_stats,
                "training": module.training or not has_stats,
            }
    return None


def _rank(node: torch.fx.Node) -> int | None:
    value = node.meta.get("example_value", node.meta.get("val"))
    return value.dim() if isinstance(value, torch.Tensor) else None


Pair = tuple[str, str, str, str]  # (conv, bn, kind, reason)

# The BN of a row for a fold that the report's own walk did not find as a pair.
UNKNOWN_BN = "(not found by verify)"


def find_pairs(gm: torch.fx.GraphModule) -> list[Pair]:
    """Every conv -> batch_norm pair of a dynamo graph: ``(conv, bn, kind, reason)``.

    ``reason`` is empty when the pair can be folded without changing results, else why not.
    This reads the graph dynamo captured, before AOT autograd and Inductor, so it does not
    depend on the pattern matcher it checks; it shares only the tables of ``_pairs``.
    """
    pairs = []
    for node in gm.graph.nodes:
        affine = _frozen_batch_norm(gm, node)
        if affine is not None:
            pairs.append(affine)
            continue
        norm = _batch_norm(gm, node)
        if norm is None or not isinstance(norm["input"], torch.fx.Node):
            continue
        layer = norm["input"]
        rank = _rank(layer)
        kind = _layer_kind(gm, layer)
        if kind is None:  # a linear layer's output reshaped to (N, features)?
            start = _pairs.start_of_leading_views(layer)
            if start is None or getattr(_layer_kind(gm, start), "name", None) != "linear":
                continue
            layer, kind = start, _layer_kind(gm, start)
            assert kind is not None
        reason = _pairs.reason_not_to_fold(
            kind,
            has_running_stats=norm["has_running_stats"],
            training=norm["training"],
            other_users=len(_pairs.data_users(layer)) > 1,
            output_rank=rank,
        )
        pairs.append((_pairs.describe_node(layer), _pairs.describe_node(node), kind.name, reason))
    return pairs


def _frozen_batch_norm(gm: torch.fx.GraphModule, layer: torch.fx.Node) -> Pair | None:
    """``layer`` and the per-channel affine map after it (a frozen BN), as a pair."""
    kind = _layer_kind(gm, layer)
    affine = _pairs.bind_channel_affine(layer) if kind is not None else None
    if kind is None or affine is None:
        return None
    value = layer.meta.get("example_value", layer.meta.get("val"))
    if _pairs.affine_reason(value, affine):
        return None
    reason = _pairs.rank_reason(kind, _rank(layer))
    return _pairs.describe_node(layer), _pairs.describe_node(affine["output"]), kind.name, reason


def _max_abs_error(actual: Any, expected: Any) -> tuple[float, torch.dtype]:
    flat_actual = _compat.tree_leaves(actual)
    flat_expected = _compat.tree_leaves(expected)
    if len(flat_actual) != len(flat_expected):
        raise AssertionError("compiled and eager outputs differ in structure")
    error, dtype = 0.0, torch.float32
    for a, e in zip(flat_actual, flat_expected, strict=True):
        if isinstance(e, torch.Tensor) and e.is_floating_point():
            a, e = a.detach(), e.detach()
            same = (a == e) | (torch.isnan(a) & torch.isnan(e))  # inf == inf included
            diff = torch.where(same, 0.0, (a.double() - e.double()).abs())
            # NaN against a number, or inf against -inf, is as far off as it gets (max()
            # would skip a NaN).
            diff = torch.nan_to_num(diff, nan=float("inf"), posinf=float("inf"))
            error = max(error, float(diff.max()) if diff.numel() else 0.0)
            dtype = e.dtype
    return error, dtype


_verify_lock = threading.RLock()


def verify(
    model: torch.nn.Module,
    *example_inputs: Any,
    rtol: float | None = None,
    atol: float | None = None,
    dynamic: bool | None = None,
    policy: str = "auto",
    freezing: bool | None = None,
    grad: bool = False,
    plain: bool | None = None,
    cudnn_fusion: str = _cudnn.DEFAULT,
) -> FoldReport:
    """Compile a copy of ``model`` with the plugin, run it, and report the folds.

    Runs under ``torch.no_grad()`` with TF32 off. ``model`` itself is left as it is.
    ``policy`` and ``cudnn_fusion`` are ``install()``'s. ``freezing`` compiles with
    Inductor freezing on; by default it is on unless ``grad=True``, as on the command line.

    The output is judged against eager with tolerances that default per output dtype
    (``DEFAULT_TOLERANCES``). Outside them, the model is also compiled without the plugin
    (``plain=None``; ``plain=True`` always does, ``False`` never) in the same config, and
    the plugin is blamed only for an error beyond ``PLAIN_COMPILE_MARGIN`` times plain
    torch.compile's own. The report gives both errors and says which judged.

    ``grad=True`` runs with gradients instead (an eval model called without ``no_grad``, or
    frozen-BN fine-tuning) and also compares the parameters' gradients with those of a
    float64 copy of the eager model: the plugin's error may exceed eager's own by
    ``GRAD_RTOL_FACTOR * rtol`` of each gradient's size (``_judge_gradients``), or plain
    torch.compile's, compiled as for the output (``plain``) when the gradients are outside
    that. Calls from
    several threads run one at a time; a model compiled in another thread meanwhile,
    outside ``verify()``, is counted too.
    """
    _check_model(model, example_inputs, "verify")
    _decide.check_choice("policy", policy, _decide.POLICIES)
    _decide.check_choice("cudnn_fusion", cudnn_fusion, _cudnn.CUDNN_FUSION)
    for name, value in (("freezing", freezing), ("plain", plain)):
        if value is not None and not isinstance(value, bool):
            raise TypeError(f"{name} must be a bool or None, got {type(value).__name__} {value!r}")
    if not isinstance(grad, bool):
        raise TypeError(f"grad must be a bool, got {type(grad).__name__} {grad!r}")
    if freezing is None:
        freezing = not grad
    if grad and freezing:
        raise ValueError("freezing compiles for inference: verify() takes grad or freezing")
    reference = model
    candidate = copy.deepcopy(model)
    config = {"freezing": True} if freezing else None
    grad_mode = torch.enable_grad if grad else torch.no_grad
    # The counters and the pass's records are process-wide: one verify() at a time reads
    # them, so that calls from several threads don't count each other's folds.
    with _verify_lock:
        _decide.take_decisions()
        _decide.take_fusions()
        before = _compat.counters["inductor"].copy()
        pairs: list[Pair] = []
        with grad_mode(), _harness.tf32_off():
            expected = reference(*example_inputs)
            compiled = _harness.compile_variant(
                candidate,
                dynamic=dynamic,
                policy=policy,
                cudnn_fusion=cudnn_fusion,
                config=config,
                on_graph=functools.partial(_count_pairs, pairs),
            )
            actual = compiled(*example_inputs)
            grads = (
                (
                    _gradients(reference, reference, expected, example_inputs),
                    _gradients(candidate, compiled, actual, example_inputs),
                    _float64_gradients(reference, example_inputs),
                )
                if grad
                else None
            )
        delta = _compat.counters["inductor"] - before
        decisions = _decide.take_decisions()
        fusions = _decide.take_fusions()

    @functools.cache  # compiled once, for the output and the gradients
    def plain_compiled() -> tuple[torch.nn.Module, Callable[..., Any]]:
        plain_model = copy.deepcopy(model)
        compiled = _harness.compile_variant(
            plain_model, plugin=False, dynamic=dynamic, config=config
        )
        return plain_model, compiled

    def plain_output() -> Any:
        with grad_mode(), _harness.tf32_off():
            return plain_compiled()[1](*example_inputs)

    judged = _judge_output(actual, expected, rtol, atol, plain, plain_output)
    rtol, atol, outputs_match = judged.rtol, judged.atol, judged.outputs_match
    gradients = None
    if grads is not None:
        gradients = _judge_gradients(*grads, rtol=GRAD_RTOL_FACTOR * rtol)
        if plain or (plain is None and not gradients.match):
            with torch.enable_grad(), _harness.tf32_off():
                plain_model, run = plain_compiled()
                plain_grads = _gradients(plain_model, run, run(*example_inputs), example_inputs)
            gradients = _judge_gradients(*grads, rtol=GRAD_RTOL_FACTOR * rtol, plain=plain_grads)
        outputs_match = outputs_match and gradients.match
    return FoldReport(
        pair_reports=_pair_reports(model, pairs, decisions, delta, fusions),
        folded=delta[_decide.COUNTER_FOLDED],
        cudnn_fused=delta[_decide.COUNTER_CUDNN_FUSED],
        max_abs_error=judged.error,
        outputs_match=outputs_match,
        rtol=rtol,
        atol=atol,
        plain_compile_error=judged.plain_error,
        within_tolerance=judged.within_tolerance,
        fx_graph_cache_hits=delta["fxgraph_cache_hit"],
        policy=policy,
        freezing=freezing,
        max_grad_error=None if gradients is None else gradients.error,
        eager_grad_error=None if gradients is None else gradients.eager_error,
        plain_grad_error=None if gradients is None else gradients.plain_error,
        gradients_match=None if gradients is None else gradients.match,
    )


def _check_model(model: Any, example_inputs: tuple[Any, ...], caller: str) -> None:
    if not isinstance(model, torch.nn.Module):
        hint = (
            " (for a torchvision model by name: inductor_convbn.testing.torchvision_model)"
            if isinstance(model, str)
            else ""
        )
        raise TypeError(f"{caller}() takes an nn.Module, got {type(model).__name__}{hint}")
    if not example_inputs:
        raise TypeError(f"{caller}() needs at least one example input")


@dataclasses.dataclass
class _Judged:
    error: float
    rtol: float
    atol: float
    within_tolerance: bool
    plain_error: float | None
    outputs_match: bool


def _judge_output(
    actual: Any,
    expected: Any,
    rtol: float | None,
    atol: float | None,
    plain: bool | None,
    plain_output: Callable[[], Any],
) -> _Judged:
    """The plugin's output against eager: within the tolerances (per output dtype by
    default), or else (``plain=None``; always with ``plain=True``) against plain compile's
    error, ``plain_output()`` being the output without the plugin."""
    error, dtype = _max_abs_error(actual, expected)
    default_rtol, default_atol = DEFAULT_TOLERANCES.get(dtype, (1e-4, 1e-4))
    rtol = default_rtol if rtol is None else rtol
    atol = default_atol if atol is None else atol
    try:
        torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, equal_nan=True)
        within_tolerance = True
    except AssertionError:
        within_tolerance = False
    plain_error = None
    if plain or (plain is None and not within_tolerance):
        plain_error = _max_abs_error(plain_output(), expected)[0]
    outputs_match = within_tolerance or (
        plain_error is not None and error <= PLAIN_COMPILE_MARGIN * plain_error
    )
    return _Judged(error, rtol, atol, within_tolerance, plain_error, outputs_match)


def _pair_reports(
    model: torch.nn.Module,
    pairs: list[Pair],
    decisions: list[_decide.Decision],
    delta: Any,
    fusions: Sequence[tuple[str, str]] = (),
) -> list[PairReport]:
    """Each pair's row, named after the model's own modules; a folded pair whose conv was
    handed to cuDNN (``fusions``: the fused conv carries the module path of the conv or of
    the BN folded into it) says with what."""
    names = {name for name, _ in model.named_modules()}
    rename = _pairs.module_name
    pairs = [(rename(c, names), rename(b, names), k, r) for c, b, k, r in pairs]
    decisions = [dataclasses.replace(d, layer=rename(d.layer, names)) for d in decisions]
    reports = _attribute(
        pairs,
        decisions,
        delta[_decide.COUNTER_FOLDED],
        delta[_decide.COUNTER_KEPT],
        delta[_decide.COUNTER_UNSAFE],
    )
    epilogues = {rename(layer, names): epilogue for layer, epilogue in fusions}
    for report in reports:
        epilogue = epilogues.get(report.conv) or epilogues.get(report.bn)
        if report.status == FOLDED and epilogue:
            report.reason = f"{report.reason}; {epilogue} in cuDNN's convolution"
    return reports


def verify_package(
    model: torch.nn.Module,
    *example_inputs: Any,
    dynamic_shapes: Any = None,
    package_path: str | os.PathLike[str] | None = None,
    rtol: float | None = None,
    atol: float | None = None,
    plain: bool | None = None,
) -> FoldReport:
    """Export ``model`` with ``torch.export``, build an AOTInductor package of it with the
    plugin, load it, run it on ``example_inputs``, and report the folds, as ``verify()``
    does for ``torch.compile``. In a package the parameters are constants: every safe pair
    is folded once, when the package is built.

    ``dynamic_shapes`` is ``torch.export``'s. ``package_path`` keeps the package there
    (a ``.pt2`` file); by default it is built in a temporary directory and removed. The
    output is judged as by ``verify()``, a package built without the plugin standing for
    plain compile (``plain``).
    """
    _check_model(model, example_inputs, "verify_package")
    with contextlib.ExitStack() as stack:
        if package_path is None:
            folder = stack.enter_context(tempfile.TemporaryDirectory())
            package_path = os.path.join(folder, "model.pt2")
        path = os.fspath(package_path)
        with _verify_lock:
            _decide.take_decisions()
            before = _compat.counters["inductor"].copy()
            with _harness.tf32_off():
                exported, package = _harness.build_package(
                    copy.deepcopy(model), example_inputs, path, dynamic_shapes=dynamic_shapes
                )
            delta = _compat.counters["inductor"] - before
            decisions = _decide.take_decisions()
        with torch.no_grad(), _harness.tf32_off():
            expected = model(*example_inputs)
            actual = package(*example_inputs)

        def plain_output() -> Any:
            plain_path = os.path.join(stack.enter_context(tempfile.TemporaryDirectory()), "p.pt2")
            with torch.no_grad(), _harness.tf32_off():
                _, plain_package = _harness.build_package(
                    copy.deepcopy(model), example_inputs, plain_path, plugin=False,
                    dynamic_shapes=dynamic_shapes,
                )  # fmt: skip
                return plain_package(*example_inputs)

        judged = _judge_output(actual, expected, rtol, atol, plain, plain_output)
    return FoldReport(
        pair_reports=_pair_reports(model, find_pairs(exported.module()), decisions, delta),
        folded=delta[_decide.COUNTER_FOLDED],
        max_abs_error=judged.error,
        outputs_match=judged.outputs_match,
        rtol=judged.rtol,
        atol=judged.atol,
        plain_compile_error=judged.plain_error,
        within_tolerance=judged.within_tolerance,
        policy="auto",
        freezing=False,
        package=True,
    )


Gradients = list[list[torch.Tensor | None]]  # per output gradient, per parameter


def _count_pairs(pairs: list[Pair], gm: torch.fx.GraphModule) -> Callable[[], None]:
    """Add the pairs of ``gm`` to ``pairs``; return how to take them back (a graph dynamo
    discards, tracing again, is not part of the model that runs)."""
    found = find_pairs(gm)
    start = len(pairs)
    pairs.extend(found)

    def undo() -> None:
        del pairs[start : start + len(found)]

    return undo


def _gradients(
    model: torch.nn.Module, run: Callable[..., Any], output: Any, inputs: tuple[Any, ...]
) -> Gradients:
    """The gradients of ``model``'s parameters for two output gradients: a fixed
    pseudo-random one on ``output``, then a constant one (the loss ``out.mean()``) on a
    second ``run(*inputs)``. (Not one output with ``retain_graph``: a compiled backward
    may reuse its saved tensors' memory, and is right only once.)

    Random, because BN's output sums to a constant per channel in training mode, and a
    sum alone would hide an error in the normalisation; constant, because with it every
    bias gradient is a sum over the whole output, where summation error shows most.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    generator = torch.Generator().manual_seed(0)
    grads: Gradients = []
    for second in (False, True):
        if second:
            output = run(*inputs)
        outputs = [
            t
            for t in _compat.tree_leaves(output)
            if isinstance(t, torch.Tensor) and t.requires_grad
        ]
        if not outputs or not params:
            raise ValueError("verify(grad=True): no output or no parameter requires grad")
        cotangents = [
            torch.full(t.shape, 1.0 / t.numel())
            if second
            else torch.randn(t.shape, generator=generator, dtype=torch.float32)
            for t in outputs
        ]
        found = torch.autograd.grad(
            outputs,
            params,
            [c.to(t) for c, t in zip(cotangents, outputs, strict=True)],
            allow_unused=True,
        )
        grads.append([None if g is None else g.detach() for g in found])
    return grads


def _float64_gradients(model: torch.nn.Module, example_inputs: tuple[Any, ...]) -> Gradients | None:
    """``_gradients`` of a float64 copy of ``model``; None where float64 does not run
    (a device without it, a model that fixes its own dtype)."""

    def to_float64(value: Any) -> Any:
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            return value.detach().double().requires_grad_(value.requires_grad)
        return value

    exact = copy.deepcopy(model).double()
    try:
        inputs = _compat.tree_map(to_float64, example_inputs)
        return _gradients(exact, exact, exact(*inputs), inputs)
    except (RuntimeError, TypeError, NotImplementedError):
        return None


class _GradientJudgement(NamedTuple):
    error: float  # the plugin's largest gradient error
    eager_error: float | None  # eager's own against float64; None without float64
    match: bool
    plain_error: float | None = None  # plain torch.compile's, where it was compiled


def _judge_gradients(
    eager: Gradients,
    plugin: Gradients,
    exact: Gradients | None,
    *,
    rtol: float,
    plain: Gradients | None = None,
) -> _GradientJudgement:
    """The plugin's and eager's largest gradient errors against float64 (against eager,
    where ``exact`` is None), and whether the plugin's is within ``rtol`` plus twice
    eager's own error, gradient by gradient; with ``plain`` (plain torch.compile's
    gradients), plus twice the larger of eager's and plain torch.compile's error: the
    plugin is not blamed for what the compile without it gets (a float16 backward that
    overflows in one and not in the other).

    Each error is relative to the gradient's largest element, and to at least 1% of the
    largest element of any gradient: a weight gradient sums over the batch and the image,
    so its float32 error grows with its size, while a gradient that is zero but for
    rounding (a conv bias before a training-mode BN) has no size to be relative to. Some
    float32 kernels sum with an error far above ``rtol`` (the CPU transposed convs' bias
    gradient: 1e-2 of its size on a large output): the plugin is judged by the error it
    adds to what eager itself gets.
    """
    truths = eager if exact is None else exact
    others = plugin if plain is None else plain  # without plain: no bar of its own
    worst_plugin, worst_eager, worst_plain, match = 0.0, 0.0, 0.0, True
    for eager_grads, plugin_grads, plain_grads, true_grads in zip(
        eager, plugin, others, truths, strict=True
    ):
        sizes = [0.0 if t is None else float(t.abs().max()) for t in true_grads]
        floor = 1e-2 * max(sizes, default=0.0)
        for e, p, c, t, size in zip(
            eager_grads, plugin_grads, plain_grads, true_grads, sizes, strict=True
        ):
            if e is None and p is None:
                continue
            if e is None or p is None or t is None:
                return _GradientJudgement(
                    float("inf"), None if exact is None else worst_eager, False
                )
            scale = max(size, floor) or 1.0
            err_plugin = _max_abs_error(p, t)[0] / scale
            err_eager = _max_abs_error(e, t)[0] / scale
            err_plain = 0.0 if plain is None or c is None else _max_abs_error(c, t)[0] / scale
            worst_plugin = max(worst_plugin, err_plugin)
            worst_eager = max(worst_eager, err_eager)
            worst_plain = max(worst_plain, err_plain)
            match = match and err_plugin <= rtol + 2 * max(err_eager, err_plain)
    return _GradientJudgement(
        worst_plugin,
        None if exact is None else worst_eager,
        match,
        None if plain is None else worst_plain,
    )


def _attribute(
    pairs: list[Pair],
    decisions: list[_decide.Decision],
    folded: int,
    kept: int,
    unsafe: int = 0,
) -> list[PairReport]:
    """Give each pair its status: the pass's own record where it ran, else the counts.

    On an FX graph cache hit the pass does not run; Inductor replays its counters, so the
    numbers of folded and kept pairs are known but not which pair each one was.
    """
    recorded: dict[str, list[_decide.Decision]] = {}
    for d in decisions:
        recorded.setdefault(d.layer, []).append(d)
    unrecorded_folded = folded - sum(d.folded for d in decisions)
    unrecorded_kept = kept - sum(not d.folded and not d.unsafe for d in decisions)
    unrecorded_unsafe = unsafe - sum(d.unsafe for d in decisions)
    reports = []
    for conv, bn, kind, reason in pairs:
        if reason:
            reports.append(PairReport(conv, bn, kind, SKIPPED, reason))
        elif recorded.get(conv):
            d = recorded[conv].pop(0)
            status = FOLDED if d.folded else SKIPPED if d.unsafe else KEPT
            reports.append(PairReport(conv, bn, kind, status, d.reason))
        elif unrecorded_folded > 0:
            unrecorded_folded -= 1
            reports.append(PairReport(conv, bn, kind, FOLDED, _pairs.FOLDED_CACHED))
        elif unrecorded_kept > 0:
            unrecorded_kept -= 1
            reports.append(PairReport(conv, bn, kind, KEPT, _pairs.KEPT_CACHED))
        elif unrecorded_unsafe > 0:
            unrecorded_unsafe -= 1
            reports.append(PairReport(conv, bn, kind, SKIPPED, _pairs.UNSAFE_CACHED))
        else:
            reports.append(PairReport(conv, bn, kind, SKIPPED, NOT_MATCHED))
    # A fold of a pair this walk did not find still gets its row: the table lists every
    # fold, and never counts more folds than pairs.
    for d in (d for ds in recorded.values() for d in ds):
        status = FOLDED if d.folded else SKIPPED if d.unsafe else KEPT
        reports.append(PairReport(d.layer, UNKNOWN_BN, "?", status, d.reason))
    for status, count, reason in (
        (FOLDED, unrecorded_folded, _pairs.FOLDED_CACHED),
        (KEPT, unrecorded_kept, _pairs.KEPT_CACHED),
        (SKIPPED, unrecorded_unsafe, _pairs.UNSAFE_CACHED),
    ):
        reports.extend(PairReport("?", UNKNOWN_BN, "?", status, reason) for _ in range(count))
    return reports
