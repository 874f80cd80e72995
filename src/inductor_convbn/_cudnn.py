"""cuDNN's fused convolutions in frozen CUDA graphs: conv + bias (+ residual add) + ReLU.

A folded BatchNorm leaves a convolution with a bias. On CUDA, Inductor runs the conv as a
cuDNN call and then a pointwise kernel of its own for the bias, a residual add and the
ReLU. cuDNN can do that epilogue inside the convolution (``torch.cudnn_convolution_relu``,
``torch.cudnn_convolution_add_relu``; TorchScript's ``optimize_for_inference`` uses them),
and where it is faster the kernel disappears. Whether it is faster depends on the conv's
shape, dtype, layout and the TF32 setting, so ``fuse`` times both for each conv once, on
the device, at compile time, and rewrites only where the fused call wins.

The rewritten graph calls this module's two ops, ``inductor_convbn::conv_relu`` and
``inductor_convbn::conv_add_relu``: they have a fake implementation with the exact output
strides cuDNN gives (Inductor then inserts no layout copies around them), and they ask
Inductor for their inputs in the strides of the traced graph.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, cast

import torch

from . import _compat, _decide, _pairs

__all__ = [
    "CUDNN_FUSION",
    "DEFAULT",
    "DEVICES",
    "DTYPES",
    "cache_key",
    "fuse",
    "reference",
]

aten = torch.ops.aten

#: ``"off"`` leaves every conv to Inductor; ``"auto"`` rewrites the convs where timing
#: both on the device says the fused calls make the graph faster; ``"always"`` rewrites
#: every eligible conv (for tests and measurements).
CUDNN_FUSION = ("off", "auto", "always")
#: ``install()``'s default. On an H200 (torch 2.11) the fused calls made ResNet18 slower
#: under freezing in every configuration measured, with "auto" too (docs/benchmarks.md).
DEFAULT = "off"
#: The devices whose convs are rewritten; on others the ops have only the reference
#: implementation (the tests add "cpu" to exercise the rewrite without a GPU).
DEVICES: tuple[str, ...] = ("cuda",)
#: The dtypes cuDNN's fused calls take.
DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.float16, torch.bfloat16)
# Fuse only where the fused call is this much faster, so that timing noise never picks it
# for a conv where both are alike.
MARGIN = 0.03

_SCHEMAS = {
    "conv_relu": (
        "conv_relu(Tensor input, Tensor weight, Tensor? bias, SymInt[] stride, "
        "SymInt[] padding, SymInt[] dilation, SymInt groups) -> Tensor"
    ),
    "conv_add_relu": (
        "conv_add_relu(Tensor input, Tensor weight, Tensor z, Tensor? bias, SymInt[] stride, "
        "SymInt[] padding, SymInt[] dilation, SymInt groups) -> Tensor"
    ),
}
_LIBRARY = torch.library.Library("inductor_convbn", "DEF")
for _schema in _SCHEMAS.values():
    # Inputs in the strides of the traced graph: cuDNN picks its layout from them.
    _LIBRARY.define(_schema, tags=(_compat.FIXED_STRIDE_ORDER_TAG,))


def _strides_like_channels_last(t: torch.Tensor) -> bool:
    """c10's ``is_channels_last_strides_2d`` / ``_3d``: whether ``t``'s strides order its
    dimensions as channels-last does, ambiguous cases (size-1 dimensions) counted as not."""
    if t.layout != torch.strided or t.dim() not in (4, 5):
        return False
    sizes, strides = t.shape, t.stride()
    if strides[1] == 0:
        return False
    smallest = 0
    for d in (1, 4, 3, 2, 0) if t.dim() == 5 else (1, 3, 2, 0):
        if sizes[d] == 0 or strides[d] < smallest:
            return False
        if d == 0 and smallest == strides[1]:
            return False
        smallest = strides[d] * sizes[d] if sizes[d] > 1 else strides[d]
    return True


def memory_format(input: torch.Tensor, weight: torch.Tensor) -> torch.memory_format:
    """The layout cuDNN computes in and returns: channels-last where the input or the
    weight is channels-last by ``Tensor.suggest_memory_format()`` (ATen's
    ``cudnn_conv_suggest_memory_format``), else contiguous."""
    if _strides_like_channels_last(input) or _strides_like_channels_last(weight):
        return torch.channels_last if weight.dim() == 4 else torch.channels_last_3d
    return torch.contiguous_format


def _output_size(
    input: torch.Tensor,
    weight: torch.Tensor,
    stride: Sequence[Any],
    padding: Sequence[Any],
    dilation: Sequence[Any],
) -> list[Any]:
    spatial = [
        (size + 2 * p - d * (k - 1) - 1) // s + 1
        for size, k, s, p, d in zip(
            input.shape[2:], weight.shape[2:], stride, padding, dilation, strict=True
        )
    ]
    return [input.shape[0], weight.shape[0], *spatial]


def reference(
    input: torch.Tensor,
    weight: torch.Tensor,
    z: torch.Tensor | None,
    bias: torch.Tensor | None,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
) -> torch.Tensor:
    """What the fused ops compute, with ordinary ops, in the layout cuDNN returns."""
    out = torch.convolution(
        input, weight, bias, stride, padding, dilation, False, [0] * len(stride), groups
    )
    if z is not None:
        out = out + z
    return torch.relu(out).contiguous(memory_format=memory_format(input, weight))


def _fake(
    input: torch.Tensor,
    weight: torch.Tensor,
    z: torch.Tensor | None,
    bias: torch.Tensor | None,
    stride: Sequence[Any],
    padding: Sequence[Any],
    dilation: Sequence[Any],
    groups: Any,
) -> torch.Tensor:
    size = _output_size(input, weight, stride, padding, dilation)
    return input.new_empty(size).contiguous(memory_format=memory_format(input, weight))


def _without_z(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """``fn`` (conv_add_relu's arguments) with conv_relu's: no residual."""

    def without_z(input: Any, weight: Any, bias: Any, *hyper: Any) -> torch.Tensor:
        return fn(input, weight, None, bias, *hyper)

    return without_z


def _relu_cuda(input, weight, bias, stride, padding, dilation, groups):  # type: ignore[no-untyped-def]
    return torch.cudnn_convolution_relu(input, weight, bias, stride, padding, dilation, groups)


def _add_relu_cuda(input, weight, z, bias, stride, padding, dilation, groups):  # type: ignore[no-untyped-def]
    return torch.cudnn_convolution_add_relu(
        input, weight, z, 1.0, bias, stride, padding, dilation, groups
    )


# ``reference`` and ``_fake`` take conv_add_relu's arguments, in its order.
_LIBRARY.impl("conv_relu", _without_z(reference), "CPU")
_LIBRARY.impl("conv_add_relu", reference, "CPU")
_LIBRARY.impl("conv_relu", _without_z(_fake), "Meta")
_LIBRARY.impl("conv_add_relu", _fake, "Meta")
if torch.backends.cudnn.is_available() or torch.cuda.is_available():
    _LIBRARY.impl("conv_relu", _relu_cuda, "CUDA")
    _LIBRARY.impl("conv_add_relu", _add_relu_cuda, "CUDA")

CONV_RELU = torch.ops.inductor_convbn.conv_relu.default
CONV_ADD_RELU = torch.ops.inductor_convbn.conv_add_relu.default


# --- The rewrite ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Candidate:
    """A conv -> (add ->) relu chain that one fused op can replace."""

    relu: torch.fx.Node
    conv: torch.fx.Node
    z: torch.fx.Node | None  # the residual added before the ReLU


def _val(node: Any) -> torch.Tensor | None:
    value = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
    return value if isinstance(value, torch.Tensor) else None


def _static(t: torch.Tensor) -> bool:
    return all(isinstance(s, int) for s in (*t.shape, *t.stride()))


def _eligible_conv(node: Any) -> bool:
    """A 2d or 3d, non-transposed convolution of a supported dtype on a fused device,
    with static shapes, a constant weight (a frozen graph's) and no other user."""
    if not (isinstance(node, torch.fx.Node) and node.target is aten.convolution.default):
        return False
    if len(node.users) != 1 or bool(node.args[6]):  # transposed
        return False
    if not isinstance(node.args[1], torch.fx.Node) or node.args[1].op != "get_attr":
        return False
    out, x, w = _val(node), _val(node.args[0]), _val(node.args[1])
    if out is None or x is None or w is None:
        return False
    return (
        out.device.type in DEVICES
        and out.dtype in DTYPES
        and w.dim() in (4, 5)
        and all(_static(t) for t in (out, x, w))
        and out.numel() > 0
    )


def _candidate(relu: torch.fx.Node) -> _Candidate | None:
    if relu.target is not aten.relu.default:
        return None
    source: Any = relu.args[0]
    if _eligible_conv(source):
        return _Candidate(relu, source, None)
    if not (
        isinstance(source, torch.fx.Node)
        and source.target is aten.add.Tensor
        and len(source.users) == 1
        and len(source.args) == 2
        and source.kwargs.get("alpha", 1) == 1
    ):
        return None
    args: tuple[Any, Any] = tuple(source.args)  # type: ignore[assignment]
    for conv, z in (args, args[::-1]):
        out, residual = _val(conv), _val(z)
        if (
            _eligible_conv(conv)
            and residual is not None
            and out is not None
            and residual.shape == out.shape
            and residual.dtype == out.dtype
            and residual.device == out.device
            and _static(residual)
            # The fused call computes in its input's layout (``_input_format``); a residual
            # in another, cuDNN would convert on every call.
            and _strides_like_channels_last(residual)
            == _strides_like_channels_last(_val(conv.args[0]))  # type: ignore[arg-type]
        ):
            return _Candidate(relu, conv, z)
    return None


def _conv_args(conv: torch.fx.Node) -> tuple[Any, ...]:
    """The fused op's arguments after the input, the weight (and z): bias and hyper-parameters."""
    _, _, bias, stride, padding, dilation, _, _, groups = cast(tuple[Any, ...], conv.args)
    return bias, list(stride), list(padding), list(dilation), groups


def cache_key() -> tuple[Any, ...]:
    """What the rewrite's decisions depend on beyond the graph: part of the pass's uuid."""
    return (
        torch.backends.cudnn.allow_tf32,
        torch.backends.cudnn.benchmark,
        torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
    )


def fuse(graph: torch.fx.Graph, mode: str = "auto") -> int:
    """Replace each eligible conv (+ add) + ReLU of a frozen graph with the fused op where
    ``mode`` says so; returns how many were replaced, recording each for the verifier.

    Not in AOTInductor packages, which must load without this package's ops.
    """
    _decide.check_choice("cudnn_fusion", mode, CUDNN_FUSION)
    # An AOTInductor package is loaded where this package may not be imported: it calls
    # only torch's own kernels.
    if mode == "off" or _compat.is_backward_graph(graph) or _compat.aot_compilation():
        return 0
    candidates = [c for c in map(_candidate, graph.nodes) if c is not None]
    if mode == "auto" and candidates:
        candidates = _choose(graph, candidates)
    for candidate in candidates:
        _replace(graph, candidate)
    if candidates:
        graph.eliminate_dead_code()
    return len(candidates)


def _input_format(c: _Candidate) -> torch.memory_format:
    """The layout the fused call computes in: its input's. The weight is made to match
    (``_weight_in_layout``), so that cuDNN converts neither on any call."""
    x = _val(c.conv.args[0])
    assert x is not None
    if not _strides_like_channels_last(x):
        return torch.contiguous_format
    return torch.channels_last if x.dim() == 4 else torch.channels_last_3d


def _weight_in_layout(graph: torch.fx.Graph, c: _Candidate) -> torch.fx.Node:
    """The conv's constant weight in the input's layout: its own node where it is, else a
    new constant, converted once, here. Its meta carries the constant's real strides, or
    Inductor would copy it on every call to meet the op's fixed stride order."""
    w = c.conv.args[1]
    assert isinstance(w, torch.fx.Node)
    weight, w_val = _pairs.constant_of(graph.owning_module, w), _val(w)
    if weight is None or w_val is None:
        return w
    fmt = _input_format(c)
    if memory_format(_val(c.conv.args[0]), weight) == fmt:  # type: ignore[arg-type]
        if weight.stride() != w_val.stride():
            w.meta["val"] = w_val.new_empty_strided(weight.shape, weight.stride())
        return w
    module = graph.owning_module
    assert module is not None
    converted = weight.contiguous(memory_format=fmt)
    name = f"{w.target}_inductor_convbn_{str(fmt).rpartition('.')[2]}"
    module.register_buffer(name, converted, persistent=False)
    with graph.inserting_before(c.conv):
        node = graph.get_attr(name)
    node.meta["val"] = w_val.new_empty_strided(converted.shape, converted.stride())
    return node


def _replace(graph: torch.fx.Graph, c: _Candidate) -> None:
    x, w = c.conv.args[0], _weight_in_layout(graph, c)
    assert isinstance(x, torch.fx.Node)
    rest = _conv_args(c.conv)
    with graph.inserting_before(c.relu):
        if c.z is None:
            new = graph.call_function(CONV_RELU, (x, w, *rest))
        else:
            new = graph.call_function(CONV_ADD_RELU, (x, w, c.z, *rest))
    vals = [_val(a) if isinstance(a, torch.fx.Node) else a for a in new.args]
    with _compat.fake_mode_of(_val(x)):
        new.meta["val"] = CONV_RELU(*vals) if c.z is None else CONV_ADD_RELU(*vals)
    c.relu.replace_all_uses_with(new)
    epilogue = "bias+add+ReLU" if c.z is not None else "bias+ReLU"
    if c.conv.args[2] is None:
        epilogue = epilogue.removeprefix("bias+")
    _decide.record_fusion(_pairs.describe_node(c.conv), epilogue)


# --- The decision -------------------------------------------------------------------------

_timed: dict[tuple[Any, ...], tuple[Cost, Cost]] = {}
_timed_lock = threading.Lock()


def _signature(graph: torch.fx.Graph, c: _Candidate) -> tuple[Any, ...]:
    x, w, out = _val(c.conv.args[0]), _val(c.conv.args[1]), _val(c.conv)
    assert x is not None and w is not None and out is not None
    fmt = _input_format(c)
    w_stride = torch.empty(w.shape, device="meta", memory_format=fmt).stride()
    z = _val(c.z)
    return (
        str(out.device),
        out.dtype,
        tuple(x.shape),
        x.stride(),
        tuple(w.shape),
        w_stride,
        None if z is None else z.stride(),
        c.conv.args[2] is not None,
        *(tuple(cast(Sequence[int], a)) for a in c.conv.args[3:6]),
        c.conv.args[8],
        cache_key(),
    )


@dataclasses.dataclass(frozen=True)
class Cost:
    """Seconds per call of one way to run a conv: to launch it (host) and to run it
    (device). A graph takes about the larger of its launches and its kernels."""

    host: float
    device: float


def _costs(graph: torch.fx.Graph, c: _Candidate) -> tuple[Cost, Cost]:
    """The fused op's cost and that of the conv plus one pointwise pass over its output
    (what Inductor runs instead), timed once per signature, on random tensors."""
    key = _signature(graph, c)
    with _timed_lock:
        if key in _timed:
            return _timed[key]
    with _compat.unset_fake_temporarily(), torch.no_grad():
        costs = _time_both(key)
    with _timed_lock:
        _timed[key] = costs
    return costs


def _choose(graph: torch.fx.Graph, candidates: list[_Candidate]) -> list[_Candidate]:
    """The candidates whose fusion makes the graph faster, by their costs.

    Under CUDA graphs launches cost nothing: a conv is fused where its kernel is faster.
    Otherwise the fused call saves device time but may take longer to launch (cuDNN's
    fused path does more on the host than a conv and one Inductor kernel): starting from
    every conv unfused, each conv is fused, most device time saved first, where that lowers
    the larger of the convs' host and device totals by ``MARGIN`` of the conv's time.
    """
    costs = [_costs(graph, c) for c in candidates]
    if _compat.inductor_config.triton.cudagraphs:
        return [
            c
            for c, (f, u) in zip(candidates, costs, strict=True)
            if f.device < (1 - MARGIN) * u.device
        ]
    host = sum(u.host for _, u in costs)
    device = sum(u.device for _, u in costs)
    chosen = set()
    order = sorted(range(len(candidates)), key=lambda i: costs[i][0].device - costs[i][1].device)
    for i in order:
        fused, unfused = costs[i]
        new_host = host - unfused.host + fused.host
        new_device = device - unfused.device + fused.device
        if max(new_host, new_device) < max(host, device) - MARGIN * unfused.device:
            host, device = new_host, new_device
            chosen.add(i)
    return [c for i, c in enumerate(candidates) if i in chosen]


def _time_both(key: tuple[Any, ...]) -> tuple[Cost, Cost]:
    device, dtype, x_size, x_stride, w_size, w_stride, z_stride, has_bias = key[:8]
    stride, padding, dilation, groups = key[8:12]

    def tensor(size: Sequence[int], strides: Sequence[int]) -> torch.Tensor:
        return torch.empty_strided(size, strides, device=device, dtype=dtype).normal_()

    x, w = tensor(x_size, x_stride), tensor(w_size, w_stride)
    bias = tensor((w_size[0],), (1,)) if has_bias else None
    out_size = _output_size(x, w, stride, padding, dilation)
    z = None if z_stride is None else tensor(out_size, z_stride)
    conv_args = (stride, padding, dilation, False, [0] * len(stride), groups)

    if z is None:

        def fused() -> Any:
            return CONV_RELU(x, w, bias, stride, padding, dilation, groups)

        def unfused() -> Any:
            return torch.convolution(x, w, None, *conv_args).relu_()
    else:
        residual = z

        def fused() -> Any:
            return CONV_ADD_RELU(x, w, residual, bias, stride, padding, dilation, groups)

        def unfused() -> Any:
            return torch.convolution(x, w, None, *conv_args).add_(residual)

    return _cost(fused, device), _cost(unfused, device)


def _cost(fn: Callable[[], Any], device: str, *, rounds: int = 5, calls: int = 20) -> Cost:
    """The best of ``rounds`` timings of ``calls`` calls of ``fn``: on CUDA the host time
    to launch them, and the device time to run them, measured behind a sleeping kernel that
    holds the stream until every call is queued, so that launches leave no gaps."""
    for _ in range(3):
        fn()
    if not device.startswith("cuda"):
        best = float("inf")
        for _ in range(rounds):
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            best = min(best, (time.perf_counter() - start) / calls)
        return Cost(best, best)
    torch.cuda.synchronize(device)
    host = device_s = float("inf")
    for _ in range(rounds):
        torch.cuda.synchronize(device)
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        launched = time.perf_counter() - start
        torch.cuda.synchronize(device)
        host = min(host, launched / calls)
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        # Hold the stream for twice the launches' time (at 2 GHz or slower).
        torch.cuda._sleep(int(max(launched, 1e-4) * 2 * 2e9))
        begin.record()
        for _ in range(calls):
            fn()
        end.record()
        torch.cuda.synchronize(device)
        device_s = min(device_s, begin.elapsed_time(end) / 1e3 / calls)
    return Cost(host, device_s)
