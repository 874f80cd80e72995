"""The Inductor pass, and the verbs that put it in and take it out of Inductor's config."""

from __future__ import annotations

import contextlib
import contextvars
import os
import threading
from collections.abc import Callable, Iterator
from typing import Any

import torch

from . import _compat, _pregrad, _registry

__all__ = ["ConvBnFoldPass", "install", "installed", "is_installed", "uninstall"]

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
# The files whose content decides what the pass does; their hash is the pass's cache key.
_SOURCE_FILES = tuple(
    os.path.join(_PACKAGE_DIR, name)
    for name in ("_compat.py", "_fold.py", "_registry.py", "_pregrad.py", "_pass.py")
)


# The Inductor config field each stage of the pass hooks into.
_HOOKS = {
    "grad": "pre_grad_custom_pass",
    "joint": "joint_custom_post_pass",
    "post_grad": "post_grad_custom_post_pass",
}


class ConvBnFoldPass(_compat.CustomGraphPass):
    """Runs the pass that was installed before it (if any), then folds conv -> batch_norm.

    One instance per stage: ``"grad"`` runs on dynamo's graph, before AOT autograd, and
    folds pairs that gradients flow through, differentiably (``_pregrad``); it folds under
    every policy, since there the fold also saves the memory of the conv output.
    ``"joint"`` runs on the graph AOT autograd hands Inductor, before
    freezing turns parameters into constants, and folds only pairs whose parameters freezing
    will make constants, so their folded weights are computed once, at compile time.
    ``"post_grad"`` runs on the graph Inductor lowers, where a fold is recomputed on every
    call, from the live parameters; ``policy`` (``_registry.POLICIES``) says where that pays.

    Being a ``CustomGraphPass`` with a ``uuid()`` keeps Inductor's FX graph cache on: a
    bare function as a custom pass makes every compile bypass the cache.
    """

    def __init__(self, previous: Any = None, *, stage: str = "post_grad", policy: str = "auto"):
        _registry.check_choice("stage", stage, _registry.STAGES)
        _registry.check_choice("policy", policy, _registry.POLICIES)
        self.previous = previous
        self.stage = stage
        self.policy = policy

    def _chained(self) -> tuple[Callable[[torch.fx.Graph], None], ...]:
        if self.previous is None:
            return ()
        if isinstance(self.previous, (list, tuple)):  # torch >= 2.14 accepts a list
            return tuple(self.previous)
        return (self.previous,)

    def __call__(self, graph: torch.fx.Graph) -> None:
        for other in self._chained():
            other(graph)
        if self.stage == "grad":
            _pregrad.fold_for_grad(graph)
            return
        if self.stage == "joint" and not _compat.frozen_parameters():
            return
        _registry.fold(graph, stage=self.stage, policy=self.policy)

    def uuid(self) -> Any:
        others = []
        for other in self._chained():
            # A pass without a uuid cannot be part of a cache key; None tells Inductor to
            # bypass the cache, as it would for that pass alone.
            other_uuid = other.uuid() if isinstance(other, _compat.CustomGraphPass) else None
            if other_uuid is None:
                return None
            others.append(other_uuid)
        return (_compat.get_hash_for_files(_SOURCE_FILES), self.stage, self.policy, *others)


_lock = threading.RLock()
# The policy this context installed, to tell "never installed" from "replaced since". A
# ContextVar because Inductor's config overrides are per thread on releases that keep them
# in ContextVars (torch 2.14); on older releases the config is process-wide.
_installed_here: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "inductor_convbn_installed", default=None
)


def install(policy: str = "auto") -> None:
    """Fold conv -> batch_norm in every graph ``torch.compile`` compiles from now on.

    ``policy="auto"`` folds every pair when Inductor freezing is on (the folded weights are
    computed once, at compile time) and, without freezing, only the pairs where refolding
    the weights on every call costs less than the batch norm it removes; the report says
    why each other pair was kept. ``policy="always"`` folds every pair that can be folded
    without changing results.

    Idempotent; a second call with another policy switches to it. Passes installed before
    keep running, before ours. Where torch keeps Inductor's config per thread
    (``_compat.CONFIG_IS_THREAD_LOCAL``), this applies to the calling thread: call it in
    the thread that compiles.
    """
    _registry.check_choice("policy", policy, _registry.POLICIES)
    with _lock:
        for stage, field in _HOOKS.items():
            current = getattr(_compat.inductor_config, field)
            if isinstance(current, ConvBnFoldPass):
                if current.policy == policy:
                    continue
                current = current.previous
            setattr(
                _compat.inductor_config, field, ConvBnFoldPass(current, stage=stage, policy=policy)
            )
        _installed_here.set(policy)


def uninstall() -> None:
    """Put back the passes that were there before ``install()``.

    Does nothing when not installed. Raises ``RuntimeError``, changing nothing, when
    another library replaced one of our passes since, rather than dropping its pass.
    """
    with _lock:
        current = {field: getattr(_compat.inductor_config, field) for field in _HOOKS.values()}
        replaced = [f for f, p in current.items() if not isinstance(p, ConvBnFoldPass)]
        if replaced and _installed_here.get() is not None:
            raise RuntimeError(
                f"inductor_convbn: torch._inductor.config.{replaced[0]} was replaced after "
                f"install() (it is now {current[replaced[0]]!r}); not touching it"
            )
        for field, fold_pass in current.items():
            if isinstance(fold_pass, ConvBnFoldPass):
                setattr(_compat.inductor_config, field, fold_pass.previous)
        _installed_here.set(None)


def is_installed() -> bool:
    """Whether the fold passes are Inductor's current custom passes."""
    return all(
        isinstance(getattr(_compat.inductor_config, field), ConvBnFoldPass)
        for field in _HOOKS.values()
    )


def installed_policy() -> str | None:
    """The policy of the installed passes, None when not installed."""
    current = _compat.inductor_config.post_grad_custom_post_pass
    return current.policy if isinstance(current, ConvBnFoldPass) and is_installed() else None


@contextlib.contextmanager
def installed(policy: str = "auto") -> Iterator[None]:
    """``install(policy)`` for the duration of a ``with`` block; restores the previous state."""
    with _lock:
        previous_policy = installed_policy()
        install(policy)
    try:
        yield
    finally:
        with _lock:
            if previous_policy is None:
                uninstall()
            else:
                install(previous_policy)
