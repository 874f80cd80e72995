"""Finding conv -> BatchNorm pairs by running the model once, for models ``torch.fx`` cannot
trace whole.

``_modules`` finds pairs in a symbolic trace of the whole forward; Python control flow
anywhere in it (ultralytics' YOLO, timm's ``Conv2dSame``) fails the whole model. Here the
model runs for real on example inputs, and the dataflow of that run is recorded: every module
call (global module hooks) and every torch function with the tensors it read and made (a
``TorchFunctionMode``). Pairs are found in that record by what ran, not by class:

- a layer module (``nn.Conv*``, ``nn.Linear`` or a subclass) whose output is its own
  convolution of its own weight and bias: folding changes those two tensors only, so a
  subclass that pads in its forward (``Conv2dSame``) keeps doing so;
- whose output is read by one function only: a ``batch_norm`` of that module's BN, a module
  whose forward calls ``batch_norm`` on its input with its own running statistics, weight
  and bias, and after that only calls its own child modules in a chain (timm's
  ``BatchNormAct2d`` calls ``drop`` and ``act``): the fold keeps those children
  (``AfterNorm``);
- or ``* scale + shift``, one value per channel computed from the model's tensors alone, the
  whole forward of a module: a frozen BatchNorm (torchvision's ``FrozenBatchNorm2d``).

Reading a tensor's shape, dtype or device is not a use: a fold does not change those.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.overrides import TorchFunctionMode
from torch.utils.flop_counter import FlopCounterMode

from . import _pairs
from ._modules import FuseError

__all__ = ["AfterNorm", "Run", "RunPair", "apply_checked", "record_pairs"]

Undo = Callable[[], None]  # what undoes one change to the model

# A function of constants alone is a constant unless it draws random numbers.
_RANDOM_WORDS = ("rand", "bernoulli", "dropout", "normal", "uniform", "multinomial", "poisson")
_MULS = frozenset({torch.mul, torch.Tensor.mul, torch.Tensor.__mul__, torch.Tensor.__rmul__})
_ADDS = frozenset({torch.add, torch.Tensor.add, torch.Tensor.__add__, torch.Tensor.__radd__})


def _reads_data(func: Any) -> bool:
    name = getattr(func, "__name__", "")
    if name == "__get__":  # a property of the tensor
        return (
            getattr(getattr(func, "__self__", None), "__name__", "")
            not in _pairs.METADATA_ATTRIBUTES
        )
    return name not in _pairs.METADATA_METHODS


@dataclasses.dataclass(eq=False)
class _Call:
    """One call of a module, and what ran directly in its forward (not in its children)."""

    module: nn.Module
    parent: _Call | None
    args: tuple[Any, ...]
    output: Any = None
    steps: list[_Call | _Event] = dataclasses.field(default_factory=list)


@dataclasses.dataclass(eq=False)
class _Event:
    """One torch function call that read tensor data."""

    func: Any
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    result: Any
    call: _Call | None  # the module whose forward called it


def _tensors(tree: Any) -> list[torch.Tensor]:
    """The tensors in ``tree``: nested tuples, lists and dicts (a model's outputs, a call's
    arguments). Written out rather than torch's private pytree: this runs on every torch
    function call of the recorded run, and keeps the module free of private imports."""
    if isinstance(tree, torch.Tensor):
        return [tree]
    if isinstance(tree, (tuple, list)):
        return [t for item in tree for t in _tensors(item)]
    if isinstance(tree, dict):
        return [t for item in tree.values() for t in _tensors(item)]
    return []


class _Recorder(TorchFunctionMode):
    """Records module calls and torch function calls of one run."""

    def __init__(self, constants: set[int]) -> None:
        super().__init__()
        self.stack: list[_Call] = []
        self.calls: list[_Call] = []
        self.produced_by: dict[int, _Event] = {}
        self.uses: dict[int, list[_Event]] = defaultdict(list)
        self.constants = constants  # ids of tensors computed from the model's tensors alone
        # Every tensor seen stays alive until the record is read, so that ids stay unique.
        self.alive: list[Any] = []

    def __torch_function__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None
    ) -> Any:
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        if not _reads_data(func):
            return result
        call = self.stack[-1] if self.stack else None
        event = _Event(func, args, kwargs, result, call)
        inputs, outputs = _tensors((args, kwargs)), _tensors(result)
        for t in inputs:
            self.uses[id(t)].append(event)
        for t in outputs:
            self.produced_by.setdefault(id(t), event)
        name = getattr(func, "__name__", "")
        if (
            inputs
            and all(id(t) in self.constants for t in inputs)
            and not any(word in name for word in _RANDOM_WORDS)
        ):
            self.constants.update(id(t) for t in outputs)
        self.alive.append((inputs, outputs))
        if call is not None:
            call.steps.append(event)
        return result

    def pre_hook(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        call = _Call(module, self.stack[-1] if self.stack else None, args)
        if call.parent is not None:
            call.parent.steps.append(call)
        self.stack.append(call)
        self.calls.append(call)

    def hook(self, module: nn.Module, args: Any, output: Any) -> None:
        call = self.stack.pop()
        call.output = output
        self.alive.append(output)


@dataclasses.dataclass(eq=False)
class RunPair:
    """A layer module and the BN (or frozen BN) module after it, found in one run."""

    conv: str
    bn_name: str
    kind: _pairs.LayerKind
    layer_module: nn.Module
    bn_module: nn.Module | None  # the module the fold replaces; None: not one module
    output_rank: int
    # A BN: the batch_norm call's arguments.
    running_mean: torch.Tensor | None = None
    running_var: torch.Tensor | None = None
    weight: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    eps: Any = None
    training: Any = None
    momentum: Any = None
    # A frozen BN: its per-channel scale and shift, computed in the run.
    scale: torch.Tensor | None = None
    shift: torch.Tensor | None = None
    # The BN's child modules its forward calls after batch_norm, in order.
    after: tuple[str, ...] = ()
    reason: str = ""  # why changing the pair's modules would change the model
    # The layer's output in the run: what keeping it for backward costs.
    output_shape: tuple[int, ...] = ()
    output_itemsize: int = 0

    @property
    def frozen(self) -> bool:
        return self.scale is not None

    def report(self, status: str, reason: str) -> _pairs.PairReport:
        return _pairs.PairReport(self.conv, self.bn_name, self.kind.name, status, reason)

    def fold_reason(self) -> str:
        """Why folding the BN into the layer for inference would change results."""
        if self.reason or self.frozen:
            return self.reason
        return _pairs.reason_not_to_fold(
            self.kind,
            has_running_stats=self.running_mean is not None and self.running_var is not None,
            training=self.training,
            other_users=False,
        )

    def replacement(self) -> nn.Module:
        """What takes the BN module's place once its normalisation is folded away."""
        assert self.bn_module is not None
        return AfterNorm(self.bn_module, self.after) if self.after else nn.Identity()


class AfterNorm(nn.Module):
    """What a BN module computes after its normalisation, once that is folded away: its
    child modules (timm's ``BatchNormAct2d``: ``drop``, ``act``), under their own names so
    that the state_dict keeps its keys, called in the order the BN's forward called them."""

    def __init__(self, bn: nn.Module, order: tuple[str, ...]) -> None:
        super().__init__()
        for name in dict.fromkeys(order):
            self.add_module(name, getattr(bn, name))
        self.order = order

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for name in self.order:
            x = getattr(self, name)(x)
        return x

    def extra_repr(self) -> str:
        return "the BN's normalisation, folded into the conv before it"


@dataclasses.dataclass
class Run:
    """The pairs of one recorded run, and what the run computed, to check a change against."""

    pairs: list[RunPair]
    inputs: tuple[Any, ...]
    outputs: list[torch.Tensor]
    buffers: dict[int, tuple[torch.Tensor, torch.Tensor]]  # id -> (buffer, value after)
    # Of the run, as torch.utils.flop_counter counts them; None where not asked for.
    forward_flops: int | None
    # The same run in float64 (``measure_precision``): what the outputs and buffers should
    # be, against which the recorded ones have their own rounding error.
    exact: tuple[list[torch.Tensor], dict[int, torch.Tensor]] | None = None

    def reproduced_by(self, model: nn.Module) -> bool:
        """Whether ``model`` computes what the recorded run did (outputs and buffers, from
        the same state and random numbers); the model's state is restored after."""
        try:
            with _restored(model):
                outputs = _tensors(model(*self.inputs))
                after = {id(b): b.detach().clone() for b in model.buffers()}
        except Exception:  # a change that breaks the model computes nothing the run did
            return False
        if len(outputs) != len(self.outputs):
            return False
        pairs = list(zip(outputs, self.outputs, strict=True)) + [
            (after[key], value) for key, (_, value) in self.buffers.items() if key in after
        ]
        if self.exact is None:
            return all(_close(a, b) for a, b in pairs)
        exact_outputs, exact_buffers = self.exact
        exact = list(exact_outputs) + [
            exact_buffers[key] for key in self.buffers if key in after and key in exact_buffers
        ]
        if len(exact) != len(pairs):
            return False
        return all(_close(a, b, e) for (a, b), e in zip(pairs, exact, strict=True))

    def measure_precision(self, model: nn.Module) -> None:
        """Run a float64 copy of the unchanged ``model`` on the inputs, so that a change is
        judged against the float32 model's own rounding error: in a deep model with random
        weights that can be a large part of the output (timm's ``efficientnetv2_rw_t``: the
        float32 output 23% off the float64 one), and a correct fold moves it as much."""
        try:
            exact_model = copy.deepcopy(model).to(torch.float64)
            inputs = tuple(
                x.to(torch.float64) if isinstance(x, torch.Tensor) and x.is_floating_point() else x
                for x in self.inputs
            )
            with _restored(exact_model):
                outputs = [t.detach().clone() for t in _tensors(exact_model(*inputs))]
                buffers = {
                    id(b): e.detach().clone()
                    for b, e in zip(model.buffers(), exact_model.buffers(), strict=True)
                }
        except Exception:  # no float64 run: changes are judged by the strict check alone
            return
        self.exact = (outputs, buffers)


def _close(actual: torch.Tensor, expected: torch.Tensor, exact: torch.Tensor | None = None) -> bool:
    """Whether ``actual`` is ``expected`` up to rounding: within 1e-3 of its size (float32),
    or, given the ``exact`` (float64) value, at most twice as far from it as ``expected``."""
    if actual.shape != expected.shape or actual.dtype != expected.dtype:
        return False
    if not expected.is_floating_point():
        return bool(torch.equal(actual, expected))
    finite = torch.isfinite(expected)
    if not torch.equal(finite, torch.isfinite(actual)):
        return False
    if not expected.numel():
        return True
    # A wrong fold changes outputs by their own size; rounding, by a few ulps per layer.
    tolerance = 1e-3 if torch.finfo(expected.dtype).bits >= 32 else 5e-2
    actual, expected = actual[finite].double(), expected[finite].double()
    scale = max(expected.abs().max().item(), torch.finfo(torch.float32).tiny)
    if exact is not None and exact.shape == finite.shape:
        exact = exact[finite].double()
        own_error = (expected - exact).abs().max().item()
        return (actual - exact).abs().max().item() <= 2 * own_error + tolerance * scale
    return (actual - expected).abs().max().item() <= tolerance * scale


def apply_checked(
    model: nn.Module, run: Run, pairs: list[RunPair], apply: Callable[[RunPair], Undo]
) -> list[RunPair]:
    """Apply the change of each of ``pairs`` to ``model``, then check the model against the
    run; returns the pairs whose change was undone because the model no longer computed
    what the run did (judged, after a first failure, against a float64 run)."""
    undos = [apply(p) for p in pairs]
    if not undos or run.reproduced_by(model):
        return []
    for undo in reversed(undos):
        undo()
    if run.exact is None:
        run.measure_precision(model)
        undos = [apply(p) for p in pairs]
        if run.reproduced_by(model):
            return []
        for undo in reversed(undos):
            undo()
    # Some change breaks the model: keep, one by one, those that do not.
    undone = []
    for pair in pairs:
        undo = apply(pair)
        if not run.reproduced_by(model):
            undo()
            undone.append(pair)
    return undone


@contextlib.contextmanager
def _restored(model: nn.Module) -> Iterator[None]:
    """Run ``model`` without lasting effect: its buffers and the random state come back."""
    saved = [(b, b.detach().clone()) for b in model.buffers()]
    devices = sorted({t.device.index or 0 for t, _ in saved if t.is_cuda})
    try:
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            yield
    finally:
        with torch.no_grad():
            for buffer, value in saved:
                buffer.copy_(value)


def record_pairs(
    model: nn.Module, example_inputs: tuple[Any, ...], *, caller: str, count_flops: bool = False
) -> Run:
    """Run ``model`` once on ``example_inputs`` (no lasting change to its state) and find its
    pairs, counting the run's FLOPs if ``count_flops``. ``FuseError`` when the model does
    not run on them."""
    constants = {id(t) for t in (*model.parameters(), *model.buffers())}
    recorder = _Recorder(constants)
    with _restored(model):
        handles = [
            nn.modules.module.register_module_forward_pre_hook(recorder.pre_hook),
            nn.modules.module.register_module_forward_hook(recorder.hook),
        ]
        try:
            counter = FlopCounterMode(display=False) if count_flops else None
            with recorder, counter or contextlib.nullcontext():
                output = model(*example_inputs)
        except Exception as e:
            raise FuseError(
                f"the model did not run on the example inputs: {type(e).__name__}: {e}\n"
                f"{caller} changed nothing.",
            ) from e
        finally:
            for handle in handles:
                handle.remove()
        buffers = {id(b): (b, b.detach().clone()) for b in model.buffers()}
    outputs = _tensors(output)
    pairs = _find(model, recorder, {id(t) for t in outputs})
    return Run(
        pairs,
        tuple(example_inputs),
        [t.detach().clone() for t in outputs],
        buffers,
        None if counter is None else counter.get_total_flops(),
    )


def _find(model: nn.Module, rec: _Recorder, output_ids: set[int]) -> list[RunPair]:
    names: dict[nn.Module, str] = {}
    aliases: Counter[nn.Module] = Counter()
    for name, module in model.named_modules(remove_duplicate=False):
        names.setdefault(module, name)
        aliases[module] += 1
    calls = Counter(c.module for c in rec.calls)
    owners = Counter(
        id(t)
        for _, t in (
            *model.named_parameters(remove_duplicate=False),
            *model.named_buffers(remove_duplicate=False),
        )
    )
    takers: dict[int, list[_Call]] = defaultdict(list)  # tensor id -> calls taking it
    for c in rec.calls:
        for t in _tensors(c.args):
            takers[id(t)].append(c)
    pairs = []
    for call in rec.calls:
        layer = call.module
        kind = next((k for k in _pairs.LAYER_KINDS if isinstance(layer, k.module)), None)
        y = call.output
        if kind is None or layer not in names or not isinstance(y, torch.Tensor):
            continue
        uses = rec.uses[id(y)]
        norms = [e for e in uses if e.func in _pairs.BATCH_NORM_FUNCTIONS]
        if norms:
            pair = _bn_pair(names, kind, call, y, norms[0])
            if pair is None:
                continue
            if len(uses) > 1 or id(y) in output_ids or _escapes(takers[id(y)], norms[0].call):
                pair.reason = pair.reason or _pairs.OTHER_USERS
        elif (
            len(uses) == 1 and id(y) not in output_ids and not _escapes(takers[id(y)], uses[0].call)
        ):
            pair = _affine_pair(names, kind, call, y, uses[0], rec)
            if pair is None:
                continue
        else:
            continue
        pair.reason = pair.reason or _shared_reason(pair, call, rec, calls, aliases, owners)
        pair.output_shape, pair.output_itemsize = tuple(y.shape), y.element_size()
        pairs.append(pair)
    return pairs


def _escapes(takers: list[_Call], consumer: _Call | None) -> bool:
    """Whether a module other than ``consumer`` and the modules around it takes the tensor
    as an argument: it could keep it (a feature list read after forward) unseen by the
    record of torch functions."""
    around = set()
    while consumer is not None:
        around.add(id(consumer))
        consumer = consumer.parent
    return any(id(c) not in around for c in takers)


def _bn_pair(
    names: dict[nn.Module, str], kind: _pairs.LayerKind, call: _Call, y: torch.Tensor, norm: _Event
) -> RunPair | None:
    arguments = _pairs.bind_batch_norm(norm.func, norm.args, norm.kwargs)
    if arguments["input"] is not y:
        return None
    bn_call = norm.call
    bn = bn_call.module if bn_call is not None else None
    pair = RunPair(
        names[call.module], "", kind, call.module, bn, y.dim(),
        **{key: arguments[key] for key in ("running_mean", "running_var", "weight", "bias")},
        eps=arguments["eps"], training=arguments["training"], momentum=arguments["momentum"],
    )  # fmt: skip
    if bn_call is None or bn is None or bn not in names or len(bn_call.args) != 1:
        pair.bn_module = None
        pair.bn_name = (names.get(bn) if bn is not None else None) or "<root>"
        pair.reason = _pairs.BN_IN_FORWARD
        return pair
    pair.bn_name = names[bn]
    if bn_call.args[0] is not y:
        pair.reason = _pairs.BN_IN_FORWARD
        return pair
    if any(arguments[key] is not getattr(bn, key, None) for key in _STAT_KEYS):
        pair.reason = _pairs.BN_NOT_OWN_TENSORS
        return pair
    steps = bn_call.steps
    at = steps.index(norm)
    children = {m: n for n, m in bn.named_children()}
    after: list[str] = []
    current = norm.result
    for step in steps[at + 1 :]:
        if not (
            isinstance(step, _Call)
            and step.module in children
            and len(step.args) == 1
            and step.args[0] is current
            and isinstance(step.output, torch.Tensor)
        ):
            pair.reason = _pairs.AFTER_NOT_CHILDREN
            return pair
        after.append(children[step.module])
        current = step.output
    if bn_call.output is not current or any(isinstance(s, _Call) for s in steps[:at]):
        pair.reason = _pairs.AFTER_NOT_CHILDREN
        return pair
    pair.after = tuple(after)
    return pair


_STAT_KEYS = ("running_mean", "running_var", "weight", "bias")


def _affine_pair(
    names: dict[nn.Module, str],
    kind: _pairs.LayerKind,
    call: _Call,
    y: torch.Tensor,
    mul: _Event,
    rec: _Recorder,
) -> RunPair | None:
    """The frozen BN pair whose ``* scale`` is ``mul``, or None when it is none."""

    def operand(event: _Event, value: torch.Tensor, functions: frozenset[Any]) -> Any:
        if event.func not in functions or event.kwargs or len(event.args) != 2:
            return None
        a, b = event.args
        if (a is value) == (b is value):
            return None
        other = b if a is value else a
        if not (
            isinstance(other, torch.Tensor)
            and id(other) in rec.constants
            and other.dtype == y.dtype
            and _pairs.is_per_channel(other.shape, y.dim(), y.shape[1])
        ):
            return None
        return other

    if y.dim() != kind.batched_rank:
        return None
    scale = operand(mul, y, _MULS)
    module_call = mul.call
    if scale is None or module_call is None or not isinstance(mul.result, torch.Tensor):
        return None
    out, shift = mul.result, None
    adds = rec.uses[id(mul.result)]
    if len(adds) == 1 and adds[0].call is module_call:
        shift = operand(adds[0], mul.result, _ADDS)
        if shift is not None:
            out = adds[0].result
    if module_call.output is not out or module_call.args != (y,) or out.shape != y.shape:
        return None
    module = module_call.module
    pair = RunPair(
        names[call.module], names.get(module, "<root>"), kind, call.module, module, y.dim(),
        scale=scale.detach().clone(), shift=None if shift is None else shift.detach().clone(),
    )  # fmt: skip
    if module not in names or names[module] == "":
        pair.reason = _pairs.IS_ROOT
    return pair


def _shared_reason(
    pair: RunPair,
    call: _Call,
    rec: _Recorder,
    calls: Counter[nn.Module],
    aliases: Counter[nn.Module],
    owners: Counter[int],
) -> str:
    """Why changing the pair's modules would change the model, for every kind of pair."""
    layer, bn = pair.layer_module, pair.bn_module
    if pair.output_rank != pair.kind.batched_rank:
        return _pairs.rank_reason(pair.kind, pair.output_rank)
    if calls[layer] > 1:
        return _pairs.CONV_REUSED
    if bn is not None and calls[bn] > 1:
        return _pairs.BN_REUSED
    if bn is not None and aliases[bn] > 1:
        return _pairs.MODULE_ALIASED
    if any(m._forward_hooks or m._forward_pre_hooks for m in (layer, bn) if m is not None):
        return _pairs.HAS_HOOKS
    if parametrize.is_parametrized(layer):
        return _pairs.PARAMETRIZED
    conv = rec.produced_by.get(id(call.output))
    try:
        bound = _pairs.bind_layer(pair.kind, conv.args, conv.kwargs) if conv else {}
    except ValueError:
        bound = {}
    if (
        conv is None
        or conv.call is not call
        or _pairs.layer_kind_of_function(conv.func) is None
        or bound.get("weight") is not layer.weight
        or bound.get("bias") is not layer.bias
    ):
        return _pairs.NOT_OWN_CONV
    if not pair.frozen:
        if not isinstance(pair.eps, (int, float)):
            return _pairs.EPS_NOT_CONSTANT
        features = None if pair.running_mean is None else pair.running_mean.numel()
        features = getattr(bn, "num_features", features)
        channels = getattr(layer, "out_features" if pair.kind.name == "linear" else "out_channels")
        if features is not None and features != channels:
            return _pairs.CHANNELS_DIFFER.format(
                features=features, kind=pair.kind.name, channels=channels
            )
    tensors = [
        layer.weight,
        layer.bias,
        pair.running_mean,
        pair.running_var,
        pair.weight,
        pair.bias,
    ]
    if any(
        len(rec.uses[id(t)]) != 1 or owners[id(t)] > 1
        for t in tensors
        if isinstance(t, torch.Tensor)
    ):
        return _pairs.TENSORS_READ
    return ""


def set_module(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent), name, module)
