"""The Inductor pass, and the verbs that put it in and take it out of Inductor's config."""

from __future__ import annotations

import contextlib
import contextvars
import os
import threading
from collections.abc import Callable, Iterator
from typing import Any

import torch

from . import _compat, _registry

__all__ = ["ConvBnFoldPass", "install", "installed", "is_installed", "uninstall"]

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
# The files whose content decides what the pass does; their hash is the pass's cache key.
_SOURCE_FILES = tuple(
    os.path.join(_PACKAGE_DIR, name)
    for name in ("_compat.py", "_fold.py", "_registry.py", "_pass.py")
)


class ConvBnFoldPass(_compat.CustomGraphPass):
    """Runs the pass that was installed before it (if any), then folds conv -> batch_norm.

    Being a ``CustomGraphPass`` with a ``uuid()`` keeps Inductor's FX graph cache on: a
    bare function as ``post_grad_custom_post_pass`` makes every compile bypass the cache.
    """

    def __init__(self, previous: Any = None) -> None:
        self.previous = previous

    def _chained(self) -> tuple[Callable[[torch.fx.Graph], None], ...]:
        if self.previous is None:
            return ()
        if isinstance(self.previous, (list, tuple)):  # torch >= 2.14 accepts a list
            return tuple(self.previous)
        return (self.previous,)

    def __call__(self, graph: torch.fx.Graph) -> None:
        for other in self._chained():
            other(graph)
        _registry.fold(graph)

    def uuid(self) -> Any:
        others = []
        for other in self._chained():
            # A pass without a uuid cannot be part of a cache key; None tells Inductor to
            # bypass the cache, as it would for that pass alone.
            other_uuid = other.uuid() if isinstance(other, _compat.CustomGraphPass) else None
            if other_uuid is None:
                return None
            others.append(other_uuid)
        return (_compat.get_hash_for_files(_SOURCE_FILES), *others)


_lock = threading.RLock()
# What this context installed, to tell "never installed" from "replaced since". A ContextVar
# because Inductor's config overrides are per thread on releases that keep them in
# ContextVars (torch 2.14); on older releases the config is process-wide.
_installed_here: contextvars.ContextVar[ConvBnFoldPass | None] = contextvars.ContextVar(
    "inductor_convbn_installed", default=None
)


def install() -> None:
    """Fold conv -> batch_norm in every graph ``torch.compile`` compiles from now on.

    Idempotent. A post-grad pass installed before keeps running, before ours. Where
    torch keeps Inductor's config per thread (``_compat.CONFIG_IS_THREAD_LOCAL``), this
    applies to the calling thread: call it in the thread that compiles.
    """
    with _lock:
        current = _compat.inductor_config.post_grad_custom_post_pass
        if isinstance(current, ConvBnFoldPass):
            return
        fold_pass = ConvBnFoldPass(current)
        _compat.inductor_config.post_grad_custom_post_pass = fold_pass
        _installed_here.set(fold_pass)


def uninstall() -> None:
    """Put back the post-grad pass that was there before :func:`install`.

    Does nothing when not installed. Raises ``RuntimeError`` when another library replaced
    the pass since, rather than dropping that library's pass.
    """
    with _lock:
        current = _compat.inductor_config.post_grad_custom_post_pass
        if isinstance(current, ConvBnFoldPass):
            _compat.inductor_config.post_grad_custom_post_pass = current.previous
        elif _installed_here.get() is not None:
            raise RuntimeError(
                "inductor_convbn: torch._inductor.config.post_grad_custom_post_pass was "
                f"replaced after install() (it is now {current!r}); not touching it"
            )
        _installed_here.set(None)


def is_installed() -> bool:
    """Whether the fold pass is the current ``post_grad_custom_post_pass``."""
    return isinstance(_compat.inductor_config.post_grad_custom_post_pass, ConvBnFoldPass)


@contextlib.contextmanager
def installed() -> Iterator[None]:
    """``install()`` for the duration of a ``with`` block; restores the previous state."""
    with _lock:
        was_installed = is_installed()
        install()
    try:
        yield
    finally:
        if not was_installed:
            uninstall()
