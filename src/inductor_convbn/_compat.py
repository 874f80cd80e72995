"""Every private torch import the package makes, in one place.

``torch._inductor`` and ``torch._dynamo`` are private and change between releases. Each
branch below detects a feature rather than comparing versions, and names the torch release
it exists for.
"""

from __future__ import annotations

import contextlib
import contextvars
import inspect
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch._dynamo.utils import counters
from torch._guards import tracing
from torch._inductor import config as inductor_config
from torch._inductor import pattern_matcher as _pattern_matcher
from torch._inductor.compile_fx import compile_fx
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files
from torch._inductor.pattern_matcher import (
    Match,
    PatternMatcherPass,
    fwd_only,
    register_replacement,
)
from torch._subclasses.fake_tensor import FakeTensorMode, unset_fake_temporarily
from torch.utils._pytree import tree_leaves

__all__ = [
    "CONFIG_IS_THREAD_LOCAL",
    "CustomGraphPass",
    "Match",
    "PatternMatcherPass",
    "compile_fx",
    "counters",
    "dynamo_reset",
    "get_hash_for_files",
    "inductor_config",
    "pattern_tracing_mode",
    "register_pattern",
    "tree_leaves",
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

# `skip_duplicates` arrived in torch 2.7; before it a duplicate pattern raised.
_HAS_SKIP_DUPLICATES = "skip_duplicates" in inspect.signature(register_replacement).parameters
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
) -> bool:
    """``register_replacement`` for an inference graph; a duplicate pattern is not an error.

    Two templates can trace to the same graph (an fp16 conv followed by an fp16 or an fp32
    batch norm, on some releases); the second registration is then a no-op.
    """
    kwargs: dict[str, Any] = dict(extra_check=extra_check, scalar_workaround=scalar_workaround)
    if _HAS_SKIP_DUPLICATES:  # torch >= 2.7
        kwargs["skip_duplicates"] = True
        return bool(
            register_replacement(
                search_fn, replace_fn, example_inputs, fwd_only, pass_dict, **kwargs
            )
        )
    if isinstance(_SEEN_PATTERNS, set):  # torch 2.6: look for the duplicate first
        pattern = _pattern_matcher.gen_pattern(
            search_fn, example_inputs, fwd_only, scalar_workaround
        )
        if _pattern_matcher.PatternPrettyPrinter.run(pattern) in _SEEN_PATTERNS:
            return False
    return bool(
        register_replacement(search_fn, replace_fn, example_inputs, fwd_only, pass_dict, **kwargs)
    )


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


def dynamo_reset() -> None:
    torch._dynamo.reset()
