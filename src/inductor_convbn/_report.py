"""``verify()``: compile a model with the plugin, count its conv -> batch_norm pairs
independently of the pattern matcher, run it, and compare with eager."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import inspect
import itertools
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from . import _compat, _pass, _registry

__all__ = ["FoldReport", "PairReport", "find_pairs", "verify"]

FOLDED = "folded"
SKIPPED = "skipped"  # folding would change results
KEPT = "kept"  # safe to fold, but the policy judged it not worth it
NOT_MATCHED = "eligible, but the pattern did not match"
# Why a pair is not folded; the FX fuser uses the same words.
NO_RUNNING_STATS = "BN has no running statistics (track_running_stats=False)"
BN_TRAINING = "BN is in training mode"
OTHER_USERS = "conv output has other users"
LINEAR_NOT_2D = "linear output is not 2-D: BN normalises dim 1, not the output features"

# Layer calls as dynamo records them (torch.nn.functional.conv2d is torch.conv2d).
_LAYER_FNS: dict[Any, str] = {
    torch.conv1d: "conv1d",
    torch.conv2d: "conv2d",
    torch.conv3d: "conv3d",
    torch.conv_transpose1d: "conv_transpose1d",
    torch.conv_transpose2d: "conv_transpose2d",
    torch.conv_transpose3d: "conv_transpose3d",
    F.linear: "linear",
}
_BN_FNS = (F.batch_norm,)
_BN_SIGNATURE = inspect.signature(F.batch_norm)
_LAYER_MODULES: tuple[tuple[type, str], ...] = (
    (torch.nn.Conv1d, "conv1d"),
    (torch.nn.Conv2d, "conv2d"),
    (torch.nn.Conv3d, "conv3d"),
    (torch.nn.ConvTranspose1d, "conv_transpose1d"),
    (torch.nn.ConvTranspose2d, "conv_transpose2d"),
    (torch.nn.ConvTranspose3d, "conv_transpose3d"),
    (torch.nn.Linear, "linear"),
)

# Tolerances against eager per output dtype (TF32 off). The folded conv rounds differently
# from conv followed by BN, and the difference grows with depth.
DEFAULT_TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-7, 1e-7),
    torch.float32: (1e-4, 1e-4),
    torch.float16: (2e-2, 2e-2),
    torch.bfloat16: (8e-2, 8e-2),
}


@dataclasses.dataclass
class PairReport:
    """One conv -> batch_norm pair of the model's graph."""

    conv: str  # where the conv sits, e.g. "layer1.0.conv1"
    bn: str
    kind: str  # "conv2d", "conv_transpose1d", "linear", ...
    status: str  # FOLDED, SKIPPED or KEPT
    reason: str = ""


@dataclasses.dataclass
class FoldReport:
    """What ``verify()`` found: every pair, which were folded, why the rest were not."""

    pair_reports: list[PairReport]
    folded: int
    max_abs_error: float
    outputs_match: bool  # the compiled output is within (rtol, atol) of eager
    rtol: float
    atol: float
    fx_graph_cache_hits: int = 0
    policy: str = "auto"
    freezing: bool = False
    # With verify(grad=True): the largest difference of a parameter gradient from eager's
    # (``outputs_match`` covers the gradients too); None when gradients were not compared.
    max_grad_error: float | None = None

    @property
    def pairs(self) -> int:
        """conv -> batch_norm pairs in the model's graph, counted without the pattern matcher."""
        return len(self.pair_reports)

    @property
    def missed(self) -> list[str]:
        """Pairs that could have been folded safely but were not: a plugin bug."""
        return [p.conv for p in self.pair_reports if p.reason == NOT_MATCHED]

    @property
    def skipped(self) -> list[tuple[str, str]]:
        """``(where, reason)`` for each pair that was not folded."""
        return [(p.conv, p.reason) for p in self.pair_reports if p.status != FOLDED]

    @property
    def kept(self) -> list[str]:
        """Pairs safe to fold that the policy kept, because folding them would cost time."""
        return [p.conv for p in self.pair_reports if p.status == KEPT]

    def __str__(self) -> str:
        mode = f"policy={self.policy}" + (", freezing" if self.freezing else "")
        errors = f"max abs error vs eager {self.max_abs_error:.3g}"
        if self.max_grad_error is not None:
            mode += ", with gradients"
            errors += f", in gradients {self.max_grad_error:.3g}"
        head = (
            f"inductor_convbn ({mode}): folded {self.folded} of {self.pairs} conv->bn pairs; "
            f"{errors} ({'within' if self.outputs_match else 'OUTSIDE'} "
            f"rtol={self.rtol:g}, atol={self.atol:g})"
        )
        if self.fx_graph_cache_hits:
            head += f"; {self.fx_graph_cache_hits} graph(s) from the FX graph cache"
        return format_pairs(head, self.pair_reports)


def format_pairs(head: str, pair_reports: Sequence[PairReport]) -> str:
    """``head``, then one aligned row per pair: where, kind, status and reason."""
    if not pair_reports:
        return head
    rows = [("conv", "bn", "kind", "status")] + [
        (p.conv, p.bn, p.kind, p.status + (f": {p.reason}" if p.reason else ""))
        for p in pair_reports
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = [head]
    for r in rows:
        cells = (c.ljust(w) for c, w in zip(r[:3], widths, strict=True))
        lines.append("  " + "  ".join(cells) + "  " + r[3])
    return "\n".join(lines)


def _layer_kind(gm: torch.fx.GraphModule, node: torch.fx.Node) -> str | None:
    if node.op == "call_function":
        return _LAYER_FNS.get(node.target)
    if node.op == "call_module":  # dynamo without nn-module inlining (torch < 2.5)
        module = gm.get_submodule(str(node.target))
        for cls, kind in _LAYER_MODULES:
            if type(module) is cls:
                return kind
    return None


def _bn_state(gm: torch.fx.GraphModule, node: torch.fx.Node) -> tuple[bool, Any] | None:
    """``(has_running_stats, training)`` when ``node`` is a batch norm, else None."""
    if node.op == "call_function" and node.target in _BN_FNS:
        bound = _BN_SIGNATURE.bind(*node.args, **node.kwargs)
        bound.apply_defaults()
        return bound.arguments["running_mean"] is not None, bound.arguments["training"]
    if node.op == "call_module":
        module = gm.get_submodule(str(node.target))
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            has_stats = module.running_mean is not None
            return has_stats, module.training or not has_stats
    return None


def _rank(node: torch.fx.Node) -> int | None:
    value = node.meta.get("example_value", node.meta.get("val"))
    return value.dim() if isinstance(value, torch.Tensor) else None


def find_pairs(gm: torch.fx.GraphModule) -> list[tuple[str, str, str, str]]:
    """Every conv -> batch_norm pair of a dynamo graph: ``(conv, bn, kind, reason)``.

    ``reason`` is empty when the pair can be folded without changing results, else why not.
    This reads the graph dynamo captured, before AOT autograd and Inductor, so it does not
    depend on the pattern matcher it checks.
    """
    pairs = []
    for node in gm.graph.nodes:
        state = _bn_state(gm, node)
        if state is None or not node.args or not isinstance(node.args[0], torch.fx.Node):
            continue
        layer = node.args[0]
        kind = _layer_kind(gm, layer)
        if kind is None:
            continue
        has_stats, training = state
        if not has_stats:
            reason = NO_RUNNING_STATS
        elif training is not False:
            reason = BN_TRAINING
        elif len(layer.users) > 1:
            reason = OTHER_USERS
        elif kind == "linear" and _rank(layer) != 2:
            reason = LINEAR_NOT_2D
        else:
            reason = ""
        pairs.append((_registry.describe_node(layer), _registry.describe_node(node), kind, reason))
    return pairs


def _fresh_callable(model: Callable[..., Any]) -> Callable[..., Any]:
    """A wrapper with a code object of its own.

    Dynamo keys its cache on code objects: compiling ``model`` itself could reuse code
    compiled earlier for another instance of the same class, with or without the plugin.
    """
    namespace: dict[str, Any] = {"model": model}
    code = compile(
        "def run(*args, **kwargs):\n    return model(*args, **kwargs)\n",
        f"<inductor_convbn.verify:{next(_wrapper_ids)}>",
        "exec",
    )
    exec(code, namespace)
    return namespace["run"]


_wrapper_ids = itertools.count()


@contextlib.contextmanager
def _tf32_off() -> Iterator[None]:
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


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


def compile_variant(
    model: Callable[..., Any],
    *,
    plugin: bool = True,
    dynamic: bool | None = None,
    policy: str = "auto",
    freezing: bool = False,
) -> tuple[Callable[..., Any], list[tuple[str, str, str, str]]]:
    """``torch.compile`` ``model``, with the plugin or without; also return the pairs its
    graphs hold.

    The pairs list fills when the compiled callable first runs. The plugin applies to this
    compile only. ``freezing`` applies to the first call, under ``no_grad``: dynamo must
    trace with freezing on to hand parameters over as constants, so it is set around that
    call, not just around Inductor's compile.
    """
    pairs: list[tuple[str, str, str, str]] = []

    def backend(gm: torch.fx.GraphModule, example_inputs: Sequence[Any]) -> Any:
        pairs.extend(find_pairs(gm))
        plugin_cm = _pass.installed(policy) if plugin else contextlib.nullcontext()
        with plugin_cm:
            return _compat.compile_fx(gm, example_inputs)

    compiled = torch.compile(_fresh_callable(model), backend=backend, dynamic=dynamic)
    if freezing:
        compiled = _FirstCallPatched(compiled, freezing=True)
    return compiled, pairs


class _FirstCallPatched:
    """Calls ``fn`` with Inductor's config patched for its first call (the compile) only."""

    def __init__(self, fn: Callable[..., Any], **config: Any) -> None:
        self.fn = fn
        self.config: dict[str, Any] | None = config

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.config is None:
            return self.fn(*args, **kwargs)
        config, self.config = self.config, None
        with _compat.inductor_config.patch(config):
            return self.fn(*args, **kwargs)


_verify_lock = threading.RLock()


def verify(
    model: torch.nn.Module,
    *example_inputs: Any,
    rtol: float | None = None,
    atol: float | None = None,
    dynamic: bool | None = None,
    policy: str = "auto",
    freezing: bool = False,
    grad: bool = False,
) -> FoldReport:
    """Compile a copy of ``model`` with the plugin, run it, and report the folds.

    Runs under ``torch.no_grad()`` with TF32 off. ``model`` itself is left as it is.
    Tolerances default per output dtype (``DEFAULT_TOLERANCES``). ``policy`` is
    ``install()``'s; ``freezing`` compiles with Inductor freezing on. ``grad=True`` runs
    with gradients instead (an eval model called without ``no_grad``, or frozen-BN
    fine-tuning) and also compares the gradients of the parameters with eager's, each
    relative to its largest element. Calls from several threads run one at a time; a
    model compiled in another thread meanwhile, outside ``verify()``, is counted too.
    """
    if not isinstance(model, torch.nn.Module):
        hint = (
            " (for a torchvision model by name: inductor_convbn.testing.torchvision_model)"
            if isinstance(model, str)
            else ""
        )
        raise TypeError(f"verify() takes an nn.Module, got {type(model).__name__}{hint}")
    if not example_inputs:
        raise TypeError("verify() needs at least one example input")
    _registry.check_choice("policy", policy, _registry.POLICIES)
    if not isinstance(freezing, bool):
        raise TypeError(f"freezing must be a bool, got {type(freezing).__name__} {freezing!r}")
    if not isinstance(grad, bool):
        raise TypeError(f"grad must be a bool, got {type(grad).__name__} {grad!r}")
    if grad and freezing:
        raise ValueError("freezing compiles for inference: verify() takes grad or freezing")
    reference = model
    candidate = copy.deepcopy(model)
    grad_mode = torch.enable_grad() if grad else torch.no_grad()
    # The counters and the pass's records are process-wide: one verify() at a time reads
    # them, so that calls from several threads don't count each other's folds.
    with _verify_lock:
        _registry.take_decisions()
        before = _compat.counters["inductor"].copy()
        with grad_mode, _tf32_off():
            expected = reference(*example_inputs)
            compiled, pairs = compile_variant(
                candidate, dynamic=dynamic, policy=policy, freezing=freezing
            )
            actual = compiled(*example_inputs)
            grads = (
                (_gradients(reference, expected), _gradients(candidate, actual)) if grad else None
            )
        delta = _compat.counters["inductor"] - before
        decisions = _registry.take_decisions()
    error, dtype = _max_abs_error(actual, expected)
    default_rtol, default_atol = DEFAULT_TOLERANCES.get(dtype, (1e-4, 1e-4))
    rtol = default_rtol if rtol is None else rtol
    atol = default_atol if atol is None else atol

    grad_error = None
    if grads is not None:
        grad_error = _max_abs_error(grads[1], grads[0])[0]
        # A weight gradient sums over the batch and the image: its error grows with its
        # size, so each gradient is compared relative to its largest element.
        scales = [1.0 if e is None else max(1.0, float(e.abs().max())) for e in grads[0]]
        scaled = [
            [None if g is None else g / c for g, c in zip(gs, scales, strict=True)] for gs in grads
        ]
        actual, expected = (actual, scaled[1]), (expected, scaled[0])
    try:
        torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, equal_nan=True)
        outputs_match = True
    except AssertionError:
        outputs_match = False
    names = {name for name, _ in model.named_modules()}
    pairs = [(_module_name(c, names), _module_name(b, names), k, r) for c, b, k, r in pairs]
    decisions = [dataclasses.replace(d, layer=_module_name(d.layer, names)) for d in decisions]
    return FoldReport(
        pair_reports=_attribute(
            pairs,
            decisions,
            delta["inductor_convbn_folded"],
            delta["inductor_convbn_kept"],
            delta["inductor_convbn_unsafe"],
        ),
        folded=delta["inductor_convbn_folded"],
        max_abs_error=error,
        outputs_match=outputs_match,
        rtol=rtol,
        atol=atol,
        fx_graph_cache_hits=delta["fxgraph_cache_hit"],
        policy=policy,
        freezing=freezing,
        max_grad_error=grad_error,
    )


def _gradients(model: torch.nn.Module, output: Any) -> list[torch.Tensor | None]:
    """The gradients of ``model``'s parameters for a fixed pseudo-random output gradient.

    A random cotangent, not ``output.sum()``: BN's output sums to a constant per channel
    in training mode, and a sum would hide an error in the normalisation.
    """
    generator = torch.Generator().manual_seed(0)
    outputs = [
        t for t in _compat.tree_leaves(output) if isinstance(t, torch.Tensor) and t.requires_grad
    ]
    params = [p for p in model.parameters() if p.requires_grad]
    if not outputs or not params:
        raise ValueError("verify(grad=True): no output or no parameter requires grad")
    cotangents = [
        torch.randn(t.shape, generator=generator, dtype=torch.float32).to(t) for t in outputs
    ]
    grads = torch.autograd.grad(outputs, params, cotangents, allow_unused=True)
    return [None if g is None else g.detach() for g in grads]


def _module_name(path: str, names: set[str]) -> str:
    """``path`` as the model's own module name: dynamo's paths start from whatever variable
    held the model (``model.layer1.0.conv1``), and that prefix differs between releases."""
    atoms = path.split(".")
    for i in range(len(atoms)):
        candidate = ".".join(atoms[i:])
        if candidate in names:
            return candidate
    return path


def _attribute(
    pairs: list[tuple[str, str, str, str]],
    decisions: list[_registry.Decision],
    folded: int,
    kept: int,
    unsafe: int = 0,
) -> list[PairReport]:
    """Give each pair its status: the pass's own record where it ran, else the counts.

    On an FX graph cache hit the pass does not run; Inductor replays its counters, so the
    numbers of folded and kept pairs are known but not which pair each one was.
    """
    recorded: dict[str, list[_registry.Decision]] = {}
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
            reports.append(PairReport(conv, bn, kind, FOLDED, "from the FX graph cache"))
        elif unrecorded_kept > 0:
            unrecorded_kept -= 1
            reports.append(PairReport(conv, bn, kind, KEPT, "by policy, from the FX graph cache"))
        elif unrecorded_unsafe > 0:
            unrecorded_unsafe -= 1
            reports.append(
                PairReport(conv, bn, kind, SKIPPED, "unsafe to fold, from the FX graph cache")
            )
        else:
            reports.append(PairReport(conv, bn, kind, SKIPPED, NOT_MATCHED))
    return reports
