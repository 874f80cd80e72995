"""The Inductor pass, and the verbs that put it in and take it out of Inductor's config."""

from __future__ import annotations

import contextlib
import contextvars
import threading
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from . import _compat, _cudnn, _decide, _pregrad, _registry

__all__ = [
    "HOOKS",
    "ConvBnFoldPass",
    "install",
    "installed",
    "is_installed",
    "removed",
    "saved_state",
    "source_hash",
    "uninstall",
]

PACKAGE_DIR = Path(__file__).resolve().parent

#: The Inductor config field each stage of the plugin hooks into.
HOOKS = {
    "grad": "pre_grad_custom_pass",  # dynamo's graph, before AOT autograd
    "freezing": "joint_custom_post_pass",  # before freezing makes parameters constants
    "early": "post_grad_custom_pre_pass",  # the graph Inductor lowers, before its own passes
    "per_call": "post_grad_custom_post_pass",  # the same graph, after them
}
# The stage names of 0.1.0, which named two stages after their hooks.
_OLD_STAGE_NAMES = {"joint": "freezing", "post_grad": "per_call"}


def source_hash(package_dir: Path = PACKAGE_DIR) -> bytes:
    """The hash of every source file of the package: what the pass does is decided by
    them all, so each is part of the pass's cache key."""
    return _compat.get_hash_for_files(tuple(str(p) for p in sorted(package_dir.rglob("*.py"))))


class ConvBnFoldPass(_compat.CustomGraphPass):
    """Runs the pass that was installed before it (if any), then folds conv -> batch_norm.

    One instance per stage (``HOOKS``): ``"grad"`` runs on dynamo's graph, before AOT
    autograd, and folds pairs that gradients flow through, differentiably (``_pregrad``);
    it folds under every policy, since there the fold also saves the memory of the conv
    output. ``"freezing"`` runs on the graph AOT autograd hands Inductor, before freezing
    turns parameters into constants, and folds only pairs whose parameters freezing will
    make constants, so their folded weights are computed once, at compile time.
    ``"early"`` runs on the graph Inductor lowers before Inductor's own post-grad passes:
    it counts the decisions the grad stage marked (``_decide.count_marks``: there Inductor's
    caches replay the counts, and no pass has replaced a marked node yet), then folds as
    ``"per_call"`` does, before those passes rewrite a pair (on CUDA a linear's ``addmm``
    becomes ``mm`` + ``add``). ``"per_call"`` runs on the same graph after them and folds
    what is left, recomputed on every call from the live parameters; ``policy``
    (``_decide.POLICIES``) says where that pays. In a frozen graph the early stage, after
    its folds, can hand each conv + bias (+ residual add) + ReLU on CUDA to cuDNN's fused
    convolution (``_cudnn.fuse``; ``cudnn_fusion`` is one of ``_cudnn.CUDNN_FUSION``).

    Being a ``CustomGraphPass`` with a ``uuid()`` keeps Inductor's FX graph cache on: a
    bare function as a custom pass makes every compile bypass the cache.
    """

    def __init__(
        self,
        previous: Any = None,
        *,
        stage: str = "per_call",
        policy: str = "auto",
        cudnn_fusion: str = _cudnn.DEFAULT,
    ):
        if isinstance(stage, str) and stage in _OLD_STAGE_NAMES:
            warnings.warn(
                f"stage {stage!r} is now called {_OLD_STAGE_NAMES[stage]!r}",
                DeprecationWarning,
                stacklevel=2,
            )
            stage = _OLD_STAGE_NAMES[stage]
        _decide.check_choice("stage", stage, _decide.STAGES)
        _decide.check_choice("policy", policy, _decide.POLICIES)
        _decide.check_choice("cudnn_fusion", cudnn_fusion, _cudnn.CUDNN_FUSION)
        self.previous = previous
        self.stage = stage
        self.policy = policy
        self.cudnn_fusion = cudnn_fusion

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
            _pregrad.fold_for_grad(graph, policy=self.policy)
        elif self.stage == "freezing":
            frozen = _compat.frozen_parameters()
            if frozen:
                _registry.fold_frozen(graph, frozen)
            elif _compat.aot_compilation() and not _compat.is_backward_graph(graph):
                _registry.fold_for_package(graph)
            elif _compat.inductor_config.freezing and not torch.is_grad_enabled():
                _registry.warn_nothing_frozen(graph)
        elif self.stage == "early":
            _decide.count_marks(graph)
            _registry.fold_per_call(graph, policy=self.policy)
            # Before Inductor's own post-grad passes, which on CPU may take conv + ReLU.
            _cudnn.fuse(graph, self.cudnn_fusion)
        else:
            _registry.fold_per_call(graph, policy=self.policy)

    def uuid(self) -> Any:
        others = []
        for other in self._chained():
            # A pass without a uuid cannot be part of a cache key; None tells Inductor to
            # bypass the cache, as it would for that pass alone.
            other_uuid = other.uuid() if isinstance(other, _compat.CustomGraphPass) else None
            if other_uuid is None:
                return None
            others.append(other_uuid)
        fusion = (self.cudnn_fusion, *_cudnn.cache_key()) if self.stage == "early" else ()
        return (source_hash(), self.stage, self.policy, *fusion, *others)


_lock = threading.RLock()
# The policy this context installed, to tell "never installed" from "replaced since". A
# ContextVar because Inductor's config overrides are per thread on releases that keep them
# in ContextVars (torch 2.14); on older releases the config is process-wide.
_installed_here: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "inductor_convbn_installed", default=None
)


def install(policy: str = "auto", *, cudnn_fusion: str = _cudnn.DEFAULT) -> None:
    """Fold conv -> batch_norm in every graph ``torch.compile`` compiles from now on.

    ``policy="auto"`` folds every pair when Inductor freezing is on (the folded weights are
    computed once, at compile time) and, without freezing, only the pairs where refolding
    the weights on every call costs less than the batch norm it removes; the report says
    why each other pair was kept. ``policy="always"`` folds every pair that can be folded
    without changing results.

    ``cudnn_fusion`` is for frozen graphs on CUDA (Inductor freezing): a folded conv whose
    bias, residual add and ReLU cuDNN can run inside the convolution is handed to cuDNN's
    fused call with ``"always"``; with ``"auto"`` where timing each conv both ways, once,
    at compile time, says the graph gets faster. The default, ``"off"``, leaves them to
    Inductor: on an H200 (torch 2.11) the fused calls were slower in every configuration
    measured (docs/benchmarks.md).

    Idempotent; a second call with other options switches to them. Passes installed before
    keep running, before ours. Where torch keeps Inductor's config per thread
    (``_compat.CONFIG_IS_THREAD_LOCAL``), this applies to the calling thread: call it in
    the thread that compiles.
    """
    _decide.check_choice("policy", policy, _decide.POLICIES)
    _decide.check_choice("cudnn_fusion", cudnn_fusion, _cudnn.CUDNN_FUSION)
    with _lock:
        for stage, field in HOOKS.items():
            current = getattr(_compat.inductor_config, field)
            if isinstance(current, ConvBnFoldPass):
                if (current.policy, current.cudnn_fusion) == (policy, cudnn_fusion):
                    continue
                current = current.previous
            new = ConvBnFoldPass(current, stage=stage, policy=policy, cudnn_fusion=cudnn_fusion)
            setattr(_compat.inductor_config, field, new)
        _compat.run_before_ddp_split(_fold_before_ddp_split)
        _installed_here.set(policy)


def _fold_before_ddp_split(gm: torch.fx.GraphModule) -> None:
    """The grad stage on the whole graph of a DistributedDataParallel module.

    Dynamo's DDPOptimizer cuts that graph where DDP's gradient buckets fill up and compiles
    each piece on its own, so the grad stage would see one piece at a time, and a cut
    between a conv and its BN (where the BN's parameters fill a bucket) would hide the pair.
    Run before the cut, it folds every pair; the pieces then hold folded layers, and the
    fold's parameters land in the bucket of the layer they are folded into. It runs only
    while the plugin's grad stage is Inductor's pre-grad pass, with its policy.
    """
    grad_pass = getattr(_compat.inductor_config, HOOKS["grad"])
    if isinstance(grad_pass, ConvBnFoldPass) and grad_pass.stage == "grad":
        if _pregrad.fold_for_grad(gm.graph, policy=grad_pass.policy):
            gm.recompile()


def uninstall() -> None:
    """Put back the passes that were there before ``install()``.

    Does nothing when not installed. Raises ``RuntimeError``, changing nothing, when
    another library replaced one of our passes since, rather than dropping its pass.
    """
    with _lock:
        current = {field: getattr(_compat.inductor_config, field) for field in HOOKS.values()}
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
        for field in HOOKS.values()
    )


def installed_options() -> tuple[str, str] | None:
    """The installed passes' ``(policy, cudnn_fusion)``, None when not installed."""
    current = getattr(_compat.inductor_config, HOOKS["per_call"])
    if isinstance(current, ConvBnFoldPass) and is_installed():
        return current.policy, current.cudnn_fusion
    return None


@contextlib.contextmanager
def installed(policy: str = "auto", *, cudnn_fusion: str = _cudnn.DEFAULT) -> Iterator[None]:
    """``install(policy, cudnn_fusion=...)`` for the duration of a ``with`` block; restores
    the previous state."""
    with _lock:
        previous = installed_options()
        install(policy, cudnn_fusion=cudnn_fusion)
    try:
        yield
    finally:
        with _lock:
            if previous is None:
                uninstall()
            else:
                install(previous[0], cudnn_fusion=previous[1])


@contextlib.contextmanager
def removed() -> Iterator[None]:
    """The plugin uninstalled for the duration of a ``with`` block (the passes it chained
    stay); the previous state comes back after it."""
    with saved_state():
        if is_installed():
            uninstall()
        yield


@contextlib.contextmanager
def saved_state() -> Iterator[None]:
    """Put every hook, and whether this context installed the plugin, back as they were
    on entry, whatever the block did: the test suite's reset between tests."""
    with _lock:
        hooks = {field: getattr(_compat.inductor_config, field) for field in HOOKS.values()}
        mark = _installed_here.get()
    try:
        yield
    finally:
        with _lock:
            for field, value in hooks.items():
                setattr(_compat.inductor_config, field, value)
            _installed_here.set(mark)
