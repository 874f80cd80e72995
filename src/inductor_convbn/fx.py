"""``fuse()``: fold eval BatchNorm into the conv module before it, without ``torch.compile``.

For eager inference, export pipelines and quantization prep: trace the model with
``torch.fx``, replace each conv (or linear) module whose only user is an eval BatchNorm by a
folded copy, drop the BatchNorm, and return the ``torch.fx.GraphModule``::

    from inductor_convbn import fx

    fused = fx.fuse(model.eval())       # `model` itself is left as it is
    print(fx.fuse_report(fused))        # each conv -> bn pair: folded, or skipped and why

The weights come from ``inductor_convbn.fold_conv_bn_weights``, the formula the compiled
plugin uses too.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any, cast

import torch
from torch import nn
from torch.nn.utils import parametrize

from . import _compat, _dataflow, _pairs
from ._fold import fold_conv_affine_weights, fold_conv_bn_weights
from ._modules import (
    AffinePair,
    FuseError,
    ModulePair,
    find_affine_pairs,
    find_module_pairs,
    trace,
)

__all__ = ["FuseError", "FuseReport", "fold_modules", "fuse", "fuse_report"]

_REPORT_KEY = "inductor_convbn.fuse_report"


@dataclasses.dataclass
class FuseReport(_pairs.PairTable):
    """What ``fuse()`` found: every conv -> batch_norm pair, and why any was not folded.

    Pairs are named by the model's own module names (``layer1.0.conv1``); a functional
    ``batch_norm`` is named by the module that holds its running mean.
    """

    title = "inductor_convbn.fx"

    @property
    def folded(self) -> int:
        return self._done_count()


def fuse(model: nn.Module, *example_inputs: Any) -> torch.fx.GraphModule:
    """Trace a copy of ``model`` with ``torch.fx`` and fold each eval BatchNorm into its conv.

    A pair is a ``Conv1d/2d/3d``, ``ConvTranspose1d/2d/3d`` or ``Linear`` module whose output
    goes only to a ``BatchNorm1d/2d/3d`` (or ``SyncBatchNorm``) module, or to
    ``F.batch_norm`` / ``torch.batch_norm`` reading attributes of the model. Each folded pair
    becomes one new layer module holding the folded weight and bias (a layer without bias gets
    one), in the layer's dtype, device, memory format and ``requires_grad``; BatchNorm modules
    no longer called are removed.

    Left alone, each with its reason in the report: BN in training mode or without running
    statistics, a conv whose output has other users, a conv module called more than once, a
    conv or BN with forward hooks, mismatched channel counts.

    ``example_inputs`` are optional. When given, they run through the traced model once on
    fake tensors (no compute, no state change) to check that each layer output has the rank
    the fold assumes: batched for a conv, 2-D for a linear (BN normalises dim 1). Without
    them, a conv input is assumed batched, and a linear -> BN pair is folded with a note.

    Returns the ``GraphModule``; ``fuse_report()`` gives what was folded. ``model`` is not
    modified. Raises ``FuseError``, naming the module, when ``torch.fx`` cannot trace it.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fuse() takes an nn.Module, got {type(model).__name__}")
    gm = trace(
        copy.deepcopy(model),
        caller="fuse()",
        alternative=(
            "fold without tracing: fx.fold_modules(model, *example_inputs), or "
            "torch.compile with inductor_convbn.install()"
        ),
    )
    pairs = find_module_pairs(gm)
    for pair in pairs:
        pair.reason = pair.fold_reason()
    if example_inputs:
        _check_ranks(gm, pairs, example_inputs)
    else:
        for p in pairs:
            if p.kind.name == "linear" and not p.reason:
                p.note = _pairs.LINEAR_ASSUMED_2D

    order = {node: i for i, node in enumerate(gm.graph.nodes)}
    reports = []
    for pair in pairs:
        if pair.reason:
            reports.append((order[pair.layer], pair.report(_pairs.SKIPPED, pair.reason)))
            continue
        _fold(gm, pair)
        reports.append((order[pair.layer], pair.report(_pairs.FOLDED, pair.note)))
    for affine in find_affine_pairs(gm):  # frozen BNs
        reason = affine.fold_reason()
        if not reason:
            _fold_affine(gm, affine)
        status = _pairs.SKIPPED if reason else _pairs.FOLDED
        reports.append((order[affine.layer], affine.report(status, reason)))
    reports.sort(key=lambda r: r[0])
    gm.graph.eliminate_dead_code()  # a frozen BN's scale and shift computations
    gm.delete_all_unused_submodules()
    gm.graph.lint()
    gm.recompile()
    gm.meta[_REPORT_KEY] = FuseReport([r for _, r in reports])
    return gm


def fuse_report(fused: nn.Module) -> FuseReport:
    """The report of the ``fuse()`` or ``fold_modules()`` call that made ``fused`` (kept by
    ``copy.deepcopy``)."""
    report = getattr(fused, "meta", {}).get(_REPORT_KEY)
    if report is None:
        report = getattr(fused, "__dict__", {}).get(_REPORT_KEY)
    if not isinstance(report, FuseReport):
        raise ValueError(
            "this module was not made by inductor_convbn.fx.fuse() or fx.fold_modules()"
        )
    return report


def fold_modules(model: nn.Module, *example_inputs: Any, inplace: bool = False) -> nn.Module:
    """Fold each eval BatchNorm into the conv before it, module by module, without tracing.

    For models ``torch.fx`` cannot trace whole (Python control flow in forward: ultralytics'
    YOLO, timm's ``Conv2dSame``), or to keep the model's own class: the model runs once on
    ``example_inputs`` and the dataflow of that run gives the pairs (no lasting change to
    its state). Each folded conv (or linear) gets the folded weight and bias in place, and
    the BN module's place goes to an ``nn.Identity``, or, for a BN module that calls child
    modules after its normalisation (timm's ``BatchNormAct2d``: drop, activation), to an
    ``AfterNorm`` calling those children. A frozen BN (``x * scale + shift`` per channel,
    torchvision's ``FrozenBatchNorm2d``) is folded too.

    Left alone, with the reason in the report (``fuse_report(result)``): what ``fuse()``
    leaves alone, and a layer whose forward does more than convolve with its own weight
    and bias at the end, a BN module doing more than normalise and call its children, a
    ``batch_norm`` inside a larger forward. Before returning, the folded model runs on the
    example inputs; a fold that changes the outputs is undone and reported.

    Returns the model (a deep copy unless ``inplace``), of its own class, for eager runs
    and ``torch.export``. Raises ``FuseError`` when the model does not run on the inputs.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fold_modules() takes an nn.Module, got {type(model).__name__}")
    if not example_inputs:
        raise TypeError("fold_modules() needs example inputs to run the model on")
    target = model if inplace else copy.deepcopy(model)
    run = _dataflow.record_pairs(target, example_inputs, caller="fold_modules()")
    reasons = {id(pair): pair.fold_reason() for pair in run.pairs}
    eligible = [p for p in run.pairs if not reasons[id(p)]]
    for pair in _dataflow.apply_checked(target, run, eligible, lambda p: _fold_in_place(target, p)):
        reasons[id(pair)] = _pairs.CHANGED_OUTPUTS
    report = FuseReport(
        [
            p.report(_pairs.SKIPPED if reasons[id(p)] else _pairs.FOLDED, reasons[id(p)])
            for p in run.pairs
        ]
    )
    target.__dict__[_REPORT_KEY] = report
    return target


def _fold_in_place(model: nn.Module, pair: _dataflow.RunPair) -> _dataflow.Undo:
    """Give the layer the folded weight and bias and the BN module's place its replacement;
    returns what undoes it."""
    layer = pair.layer_module
    old_weight = cast(torch.Tensor, layer.weight)
    old_bias = cast("torch.Tensor | None", layer.bias)
    groups = getattr(layer, "groups", 1)
    with torch.no_grad():
        if pair.scale is not None:
            weight, bias = fold_conv_affine_weights(
                old_weight, old_bias, pair.scale, pair.shift,
                transposed=pair.kind.transposed, groups=groups,
            )  # fmt: skip
        else:
            assert pair.running_mean is not None and pair.running_var is not None
            weight, bias = fold_conv_bn_weights(
                old_weight, old_bias, pair.running_mean, pair.running_var, float(pair.eps),
                pair.weight, pair.bias, transposed=pair.kind.transposed, groups=groups,
            )  # fmt: skip
        # empty_like keeps the weight's strides: channels_last stays channels_last.
        weight = torch.empty_like(old_weight).copy_(weight)
    grad = old_weight.requires_grad
    layer.weight = nn.Parameter(weight, requires_grad=grad)
    layer.bias = nn.Parameter(
        bias, requires_grad=grad if old_bias is None else old_bias.requires_grad
    )
    bn = pair.bn_module
    assert bn is not None
    _dataflow.set_module(model, pair.bn_name, pair.replacement())

    def undo() -> None:
        layer.weight = old_weight
        setattr(layer, "bias", old_bias)  # noqa: B010 (None, for a layer that had no bias)
        _dataflow.set_module(model, pair.bn_name, bn)

    return undo


def _check_ranks(gm: torch.fx.GraphModule, pairs: list[ModulePair], example_inputs: Any) -> None:
    """Skip pairs whose layer output does not have the rank the fold assumes.

    BN normalises dim 1. That is a conv's channel dim only when the conv input is batched,
    and a linear's feature dim only when its output is 2-D.
    """
    eligible = [p for p in pairs if not p.reason]
    if not eligible:
        return
    ranks: dict[str, int] = {}
    handles = [
        gm.get_submodule(p.conv).register_forward_hook(
            lambda module, args, output, conv=p.conv: ranks.__setitem__(conv, output.dim())
        )
        for p in eligible
    ]
    fake_mode = _compat.FakeTensorMode(allow_non_fake_inputs=True)
    try:
        # Fake parameters and buffers: a BN in training mode updates only the fakes.
        with fake_mode, torch.no_grad():
            state: dict[str, torch.Tensor] = {
                name: fake_mode.from_tensor(t)
                for name, t in [
                    *gm.named_parameters(remove_duplicate=False),
                    *gm.named_buffers(remove_duplicate=False),
                ]
            }
            inputs = tuple(
                fake_mode.from_tensor(a) if isinstance(a, torch.Tensor) else a
                for a in example_inputs
            )
            torch.func.functional_call(gm, state, inputs)
    except Exception as e:
        raise FuseError(
            f"the example inputs did not run through the traced model on fake tensors: "
            f"{type(e).__name__}: {e}\nfuse() changed nothing; call it without example inputs."
        ) from e
    finally:
        for handle in handles:
            handle.remove()
    for p in eligible:
        # A layer that did not run has no rank: it is not what the fold assumes either.
        p.reason = _pairs.rank_reason(p.kind, ranks.get(p.conv, -1))


def _fold(gm: torch.fx.GraphModule, pair: ModulePair) -> None:
    """Put a folded copy of the layer in its place and route the BN's users to it."""
    layer = pair.layer_module
    layer_weight = cast(torch.Tensor, layer.weight)
    layer_bias = cast("torch.Tensor | None", layer.bias)
    assert pair.running_mean is not None and pair.running_var is not None
    with torch.no_grad():
        weight, bias = fold_conv_bn_weights(
            layer_weight,
            layer_bias,
            pair.running_mean,
            pair.running_var,
            float(pair.eps),
            pair.weight,
            pair.bias,
            transposed=pair.kind.transposed,
            groups=getattr(layer, "groups", 1),
        )
    _replace_layer(gm, pair.conv, layer, weight, bias)

    # A functional batch_norm's get_attr nodes; BN modules no longer called go at the end.
    attr_nodes = [a for a in pair.bn.all_input_nodes if a.op == "get_attr"]
    pair.bn.replace_all_uses_with(pair.layer)
    gm.graph.erase_node(pair.bn)
    for attr in attr_nodes:
        if not attr.users:
            gm.graph.erase_node(attr)


def _fold_affine(gm: torch.fx.GraphModule, pair: AffinePair) -> None:
    """Fold a frozen BN's ``* scale + shift`` into the layer before it."""
    layer = pair.layer_module
    layer_weight = cast(torch.Tensor, layer.weight)
    with torch.no_grad():
        weight, bias = fold_conv_affine_weights(
            layer_weight,
            cast("torch.Tensor | None", layer.bias),
            pair.scale,
            pair.shift,
            transposed=pair.kind.transposed,
            groups=getattr(layer, "groups", 1),
        )
    _replace_layer(gm, pair.conv, layer, weight, bias)
    pair.nodes[0].replace_all_uses_with(pair.layer)
    for node in pair.nodes:
        gm.graph.erase_node(node)


def _replace_layer(
    gm: torch.fx.GraphModule,
    path: str,
    layer: nn.Module,
    weight: torch.Tensor,
    bias: torch.Tensor,
) -> None:
    """Put a copy of ``layer`` with this weight and bias at ``path``."""
    layer_weight = cast(torch.Tensor, layer.weight)
    layer_bias = cast("torch.Tensor | None", layer.bias)
    with torch.no_grad():
        # empty_like keeps the weight's strides: channels_last stays channels_last.
        weight = torch.empty_like(layer_weight).copy_(weight)
    grad = layer_weight.requires_grad
    folded = _unparametrized_copy(layer)
    folded.weight = nn.Parameter(weight, requires_grad=grad)
    folded.bias = nn.Parameter(
        bias, requires_grad=grad if layer_bias is None else layer_bias.requires_grad
    )
    parent, _, name = path.rpartition(".")
    setattr(gm.get_submodule(parent), name, folded)


def _unparametrized_copy(layer: nn.Module) -> nn.Module:
    """A copy of ``layer`` for the folded weight and bias to go into.

    A parametrized weight (weight_norm, spectral_norm, any ``torch.nn.utils.parametrize``
    parametrization) is computed in forward; its value is what was folded, so the copy is of
    the layer's own class without the parametrizations. (Not ``remove_parametrizations`` on a
    deepcopy: the copy shares the parametrized class with the model, and removing the
    parametrization deletes the weight property from that class, the model's too.)
    """
    if not parametrize.is_parametrized(layer):
        return copy.deepcopy(layer)
    cls: type[nn.Module] = type(layer).__bases__[0]  # parametrize subclasses it, once
    folded = cls.__new__(cls)
    state = {k: v for k, v in layer.__dict__.items() if k != "_modules"}
    folded.__dict__.update(copy.deepcopy(state))
    folded._modules = {
        k: copy.deepcopy(m) for k, m in layer._modules.items() if k != "parametrizations"
    }
    return folded
