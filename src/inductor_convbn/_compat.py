"""Every private torch import the package makes, in one place.

``torch._inductor`` and ``torch._dynamo`` are private and change between releases. Each
branch below detects a feature rather than comparing versions, and names the torch release
it exists for.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import inspect
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch._dynamo.utils import counters
from torch._guards import TracingContext, tracing
from torch._inductor import config as inductor_config
from torch._inductor import pattern_matcher as _pattern_matcher
from torch._inductor.compile_fx import compile_fx
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files
from torch._inductor.pattern_matcher import (
    Match,
    PatternMatcherPass,
    fwd_only,
    fx_to_pattern,
    register_replacement,
)
from torch._inductor.utils import run_and_get_code
from torch._inductor.virtualized import V as _V
from torch._subclasses.fake_tensor import FakeTensorMode, unset_fake_temporarily
from torch.utils._pytree import tree_leaves, tree_map

__all__ = [
    "CONFIG_IS_THREAD_LOCAL",
    "FIXED_STRIDE_ORDER_TAG",
    "activation_memory_budget",
    "CustomGraphPass",
    "FakeTensorMode",
    "Match",
    "PatternMatcherPass",
    "compile_fx",
    "counters",
    "dynamo_reset",
    "fake_mode_of",
    "frozen_parameters",
    "get_hash_for_files",
    "inductor_config",
    "is_backward_graph",
    "int_hint",
    "pattern_tracing_mode",
    "register_pattern",
    "run_and_get_code",
    "run_before_ddp_split",
    "aot_compilation",
    "aoti_package_functions",
    "tree_leaves",
    "tree_map",
    "unset_fake_temporarily",
]

# torch 2.14 keeps user overrides of Inductor's config in ContextVars: a value set in one
# thread is not seen by another. Older releases keep one process-wide value.
CONFIG_IS_THREAD_LOCAL = isinstance(
    getattr(
        getattr(inductor_config, "_config", {}).get("post_grad_custom_post_pass"),
        "user_override",
        None,
    ),
    contextvars.ContextVar,
)

_REGISTER_PARAMETERS = inspect.signature(register_replacement).parameters
# `skip_duplicates` arrived in torch 2.7; before it a duplicate pattern raised.
_HAS_SKIP_DUPLICATES = "skip_duplicates" in _REGISTER_PARAMETERS
# `search_fn_pattern` (a pre-traced pattern) is in every release from torch 2.6 on; checked
# all the same, since without it the pass is only slower.
_HAS_SEARCH_FN_PATTERN = "search_fn_pattern" in _REGISTER_PARAMETERS
# torch 2.6 keeps the printed form of every registered pattern in one process-wide set and
# fails a bare `assert` on a duplicate.
_SEEN_PATTERNS = getattr(_pattern_matcher, "_seen_patterns", None)


def register_pattern(
    search_fn: Callable[..., Any],
    replace_fn: Callable[..., Any],
    example_inputs: list[Any],
    pass_dict: PatternMatcherPass,
    *,
    extra_check: Callable[[Match], bool],
    scalar_workaround: dict[str, float | int],
    early_check: Callable[[Match], bool] | None = None,
    without_final_downcast: bool = False,
) -> bool:
    """``register_replacement`` for an inference graph; a duplicate pattern is not an error.

    Two templates can trace to the same graph (an fp16 conv followed by an fp16 or an fp32
    batch norm, on some releases); the second registration is then a no-op.

    ``extra_check`` runs after ``register_replacement`` re-traces the pattern with the
    match's real shapes and re-matches it exactly. ``early_check`` runs before that
    re-trace, the costly part of a match, so that a match it rejects costs almost nothing.

    ``without_final_downcast``: register the traced pattern with its last node, a downcast
    from float32 to float16 or bfloat16, taken off, so that it matches a graph where
    Inductor removed that downcast (``replace_fn`` must then return float32). Returns
    False, registering nothing, when the pattern does not end in such a downcast.
    """
    before = {id(e) for entries in _pattern_entries(pass_dict) for e in entries}
    trace = functools.partial(_inference_trace, without_final_downcast=without_final_downcast)
    kwargs: dict[str, Any] = dict(extra_check=extra_check, scalar_workaround=scalar_workaround)
    # Traced once, for the pre-traced pattern and to see whether it ends in a downcast.
    traced = fwd_only(search_fn, _pattern_args(search_fn, example_inputs, scalar_workaround))
    dropped = _as_matched(traced, without_final_downcast)
    if without_final_downcast and not dropped:
        return False  # nothing to take off
    if _HAS_SEARCH_FN_PATTERN:
        # register_replacement's own pattern ignores int, float, list and dtype literals,
        # so it re-traces the search function with each match's real shapes to check the
        # match exactly: the costly part of a match. The literals of conv -> batch_norm do
        # not depend on the shapes (its only ints are unsqueeze dims), so the pattern traced
        # here, literals kept, is exact for every match; torch 2.6 - 2.14 then skip the
        # re-trace (2.15 re-traces all the same, once per set of shapes).
        kwargs["search_fn_pattern"] = fx_to_pattern(
            traced,
            argnames=list(inspect.signature(search_fn).parameters),
            scalar_workaround=scalar_workaround,
        )
    if _HAS_SKIP_DUPLICATES:  # torch >= 2.7
        kwargs["skip_duplicates"] = True
    elif isinstance(_SEEN_PATTERNS, set):  # torch 2.6: look for the duplicate first
        pattern = kwargs.get("search_fn_pattern") or _pattern_matcher.gen_pattern(
            search_fn, example_inputs, trace, scalar_workaround
        )
        if _pattern_matcher.PatternPrettyPrinter.run(pattern) in _SEEN_PATTERNS:
            return False
    registered = bool(
        register_replacement(search_fn, replace_fn, example_inputs, trace, pass_dict, **kwargs)
    )
    if early_check is not None and registered:
        new = [e for entries in _pattern_entries(pass_dict) for e in entries if id(e) not in before]
        if not new:
            # The checks that keep an unsafe fold from being made would not run.
            raise RuntimeError(
                "inductor_convbn: register_replacement registered a pattern, but no new entry "
                "is in PatternMatcherPass.patterns; this torch release stores patterns "
                "differently, and inductor_convbn needs updating for it"
            )
        for entry in new:
            entry.extra_check = _checked_first(early_check, entry.extra_check)
    return registered


def _drop_zero_adds(graph: torch.fx.Graph) -> None:
    """Remove ``x + 0`` as Inductor's joint-graph passes do (``remove_no_ops``, every
    release from torch 2.6 on), so that a pattern traced with a literal 0 (a batch norm with
    eps 0) has the form of the graphs it is matched against."""
    for node in list(graph.find_nodes(op="call_function", target=torch.ops.aten.add.Tensor)):
        x, other = node.args[:2]
        if isinstance(x, torch.fx.Node) and other == 0 and node.kwargs.get("alpha", 1) == 1:
            node.replace_all_uses_with(x)
            graph.erase_node(node)


def _inference_trace(
    fn: Callable[..., Any], args: Any, *, without_final_downcast: bool = False, **kwargs: Any
) -> torch.fx.GraphModule:
    """``fwd_only``, then what Inductor's joint-graph passes do to the graphs a pattern is
    matched against (``x + 0`` removed; with ``without_final_downcast``, a final downcast
    to half precision removed). ``register_replacement`` traces the search function with
    it twice: for the pattern, and, in torch 2.15, again with each match's real shapes to
    check the match exactly; both traces must have the matched graph's form."""
    gm = fwd_only(fn, args, **kwargs)
    _as_matched(gm, without_final_downcast)
    return gm


def _as_matched(gm: torch.fx.GraphModule, without_final_downcast: bool) -> bool:
    """``_inference_trace``'s rewrite of a traced graph, in place; whether a final downcast
    was taken off."""
    _drop_zero_adds(gm.graph)
    dropped = without_final_downcast and _drop_final_downcast(gm.graph)
    gm.recompile()
    return dropped


def _pattern_args(
    search_fn: Callable[..., Any],
    example_inputs: list[Any],
    scalar_workaround: dict[str, float | int],
) -> list[Any]:
    """The search function's arguments: the example tensors, and the sentinel scalars
    that the pattern makes wildcards."""
    tensors = iter(example_inputs)
    names = inspect.signature(search_fn).parameters
    return [scalar_workaround[n] if n in scalar_workaround else next(tensors) for n in names]


def _drop_final_downcast(graph: torch.fx.Graph) -> bool:
    """Make the float32 value before a final downcast to half precision the graph's output;
    say whether there was one.

    Inductor's joint-graph pass ``pointless_convert`` rewrites ``convert(convert(x, bf16),
    float32)`` to ``convert(x, float32)`` in torch releases before 2.14 (2.14 keeps a
    narrower intermediate): a batch norm in half precision followed by an op that computes
    in float32 (SiLU, Hardswish) then loses its final downcast, and a pattern ending in it
    finds nothing to match.
    """
    output = next(n for n in graph.nodes if n.op == "output")
    last = output.args[0]
    if not (
        isinstance(last, torch.fx.Node)
        and last.target is torch.ops.prims.convert_element_type.default
        and last.args[1] in (torch.float16, torch.bfloat16)
        and isinstance(last.args[0], torch.fx.Node)
        and getattr(last.args[0].meta.get("val"), "dtype", None) == torch.float32
    ):
        return False
    output.args = (last.args[0],)
    graph.erase_node(last)
    return True


def _pattern_entries(pass_dict: PatternMatcherPass) -> list[list[Any]]:
    """The pattern entries of ``pass_dict``, each with its ``extra_check``.

    ``PatternMatcherPass.patterns``: ``{(op, target): [PatternEntry, ...]}`` (torch >= 2.1).
    A release that keeps them otherwise raises here: without the entries the plugin's
    checks could not be attached, and every match would fold unchecked.
    """
    patterns = getattr(pass_dict, "patterns", None)
    if not isinstance(patterns, dict) or not all(
        isinstance(entries, list) and all(hasattr(e, "extra_check") for e in entries)
        for entries in patterns.values()
    ):
        raise RuntimeError(
            "inductor_convbn: PatternMatcherPass.patterns is not {(op, target): [entry, ...]} "
            f"on torch {torch.__version__} (found {type(patterns).__name__}); the plugin's "
            "checks cannot be attached, and it will not fold unchecked"
        )
    return list(patterns.values())


def _checked_first(
    first: Callable[[Match], bool], then: Callable[[Match], bool]
) -> Callable[[Match], bool]:
    def check(match: Match) -> bool:
        return first(match) and then(match)

    return check


def int_hint(value: Any) -> int | None:
    """``value`` as an int: itself, or the hint of a symbolic size; None without one."""
    if isinstance(value, int):
        return value
    hint = getattr(getattr(value, "node", None), "hint", None)  # torch.SymInt's SymNode
    return int(hint) if hint is not None else None


@contextlib.contextmanager
def pattern_tracing_mode() -> Iterator[None]:
    """A fresh fake mode for tracing patterns, outside any compilation in progress.

    Mirrors ``torch._inductor.pattern_matcher.init_once_fakemode`` (torch >= 2.1), which is
    tied to Inductor's own pattern modules. Tracing bumps Inductor's counters; they are
    restored so that users counting matches see only real ones.
    """
    saved = counters["inductor"].copy()
    try:
        with tracing(None), unset_fake_temporarily(), FakeTensorMode():
            yield
    finally:
        counters["inductor"] = saved


def frozen_parameters() -> list[torch.Tensor]:
    """The tensors freezing turns into constants, in the order of the graph's first inputs.

    Dynamo hands parameters to the backend as module attributes, and AOT autograd lists
    them first among the graph's inputs, only when it traced with freezing on and grad off;
    Inductor's freezing then makes exactly those constants. Freezing turned on for the
    backend alone (``torch.compile(options={"freezing": True})``) freezes nothing.
    """
    if not inductor_config.freezing:
        return []
    context = TracingContext.try_get()
    # params_flat_unwrap_subclasses: torch >= 2.5; params_flat before it.
    params = getattr(context, "params_flat_unwrap_subclasses", None)
    if params is None:
        params = getattr(context, "params_flat", None)
    return list(params) if params else []


if not hasattr(_V, "aot_compilation"):  # torch >= 2.2 has it
    raise ImportError(
        "inductor_convbn: torch._inductor.virtualized.V has no aot_compilation; this torch "
        "release is not supported (AOTInductor packages could not be told apart)"
    )


def aot_compilation() -> bool:
    """Whether Inductor is compiling ahead of time (AOTInductor, a ``.pt2`` package): the
    graph then reads the parameters as ``get_attr`` constants, whose values are known."""
    # torch >= 2.7 (or so) returns a bool; 2.6 returns the handler itself, a truthy
    # NullHandler when nothing set it: only True means an AOT compilation.
    return _V.aot_compilation is True


def aoti_package_functions() -> tuple[Callable[..., Any], Callable[..., Any]]:
    """``torch._inductor.aoti_compile_and_package`` and ``aoti_load_package`` (torch >= 2.6;
    before, AOTInductor had no package format); a clear error where they are missing."""
    import torch._inductor as inductor

    build = getattr(inductor, "aoti_compile_and_package", None)
    load = getattr(inductor, "aoti_load_package", None)
    if build is None or load is None:
        raise RuntimeError(
            f"torch {torch.__version__} has no AOTInductor packages "
            "(torch._inductor.aoti_compile_and_package / aoti_load_package)"
        )
    return build, load


def activation_memory_budget(budget: float) -> contextlib.AbstractContextManager[Any]:
    """AOT autograd's partitioner under torch's own activation-memory budget (a fraction of
    what the default partitioner saves; torch >= 2.4: ``torch._functorch.config``), for the
    benchmarks that compare it with ``memory_efficient(..., max_overhead=...)``."""
    import torch._functorch.config as functorch_config

    if not hasattr(functorch_config, "activation_memory_budget"):
        raise RuntimeError(
            f"torch {torch.__version__} has no torch._functorch.config.activation_memory_budget"
        )
    return functorch_config.patch(activation_memory_budget=budget)


def dynamo_reset() -> None:
    torch._dynamo.reset()


def is_backward_graph(graph: torch.fx.Graph) -> bool:
    """Whether ``graph`` is the backward half of an AOT autograd joint graph: AOT autograd
    names the incoming gradients ``tangents_N`` (every release from torch 2.0 on; forward
    inputs are ``primals_N``, inference inputs ``argN_1``)."""
    return any(
        n.op == "placeholder" and str(n.target).startswith("tangents")
        for n in graph.find_nodes(op="placeholder")
    )


_before_ddp_split: list[Callable[[torch.fx.GraphModule], None]] = []


def run_before_ddp_split(hook: Callable[[torch.fx.GraphModule], None]) -> None:
    """Have dynamo's DDPOptimizer call ``hook(gm)`` on the graph of a
    DistributedDataParallel module before it cuts it at the gradient buckets' boundaries.

    Idempotent for one hook. DDPOptimizer has no hook of its own, so its ``compile_fn``
    (every release from torch 2.0 on) is wrapped, calling the original after the hooks.
    """
    if hook in _before_ddp_split:
        return
    if not torch.distributed.is_available():
        return  # no DistributedDataParallel, no DDPOptimizer
    from torch._dynamo.backends.distributed import DDPOptimizer

    if not _before_ddp_split:
        original = DDPOptimizer.compile_fn

        @functools.wraps(original)
        def compile_fn(self: Any, gm: torch.fx.GraphModule, *args: Any, **kwargs: Any) -> Any:
            for each in _before_ddp_split:
                each(gm)
            return original(self, gm, *args, **kwargs)

        DDPOptimizer.compile_fn = compile_fn  # type: ignore[method-assign]
    _before_ddp_split.append(hook)


# The tag that has Inductor hand a custom op its inputs in the stride order of the traced
# graph (torch >= 2.4).
FIXED_STRIDE_ORDER_TAG = getattr(torch.Tag, "needs_fixed_stride_order", None)
if FIXED_STRIDE_ORDER_TAG is None:
    raise ImportError(
        f"inductor_convbn: torch {torch.__version__} has no torch.Tag.needs_fixed_stride_order; "
        "this torch release is not supported"
    )


def fake_mode_of(t: torch.Tensor | None) -> contextlib.AbstractContextManager[Any]:
    """The fake mode ``t`` belongs to, entered; a null context for a real tensor."""
    mode = getattr(t, "fake_mode", None)
    return mode if mode is not None else contextlib.nullcontext()
