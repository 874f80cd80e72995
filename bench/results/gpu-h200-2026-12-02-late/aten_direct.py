"""Is the fused path launch-bound because of this package's Python kernel?

The ops ``inductor_convbn::conv_relu`` / ``conv_add_relu`` run on CUDA through a Python
function that calls ``torch.cudnn_convolution_relu`` / ``_add_relu``: one more trip through
the dispatcher and the interpreter per call. This script measures, on the GPU:

1. ``micro``: the host (launch) and device cost per call of one conv four ways: conv +
   relu_ (what Inductor runs), ``torch.cudnn_convolution_relu``, this package's op, and
   ``aten.cudnn_convolution_relu.default``, for ResNet18 conv shapes (``_cudnn._cost``).
2. ``model``: ResNet18 under freezing, the plugin with fusion off, always (this package's
   ops) and always with the aten ops themselves in the graph (a Meta kernel registered for
   them, the rewrite patched here), interleaved. The patched rewrite adds "aten" to the
   pass's cache key, so that no cache serves it the other's graph.

    python aten_direct.py micro
    python aten_direct.py model --dtype bfloat16 --channels-last --batch-size 32 --json F
"""

import argparse
import contextlib
import copy
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT / "bench"))

import cudnn_fusion  # noqa: E402
from inductor_convbn import _compat, _cudnn, _decide, _harness, _pairs, _report  # noqa: E402
from inductor_convbn.testing import torchvision_model  # noqa: E402
from variants import prepare, results, time_interleaved  # noqa: E402

aten = torch.ops.aten
RELU = aten.cudnn_convolution_relu.default
ADD_RELU = aten.cudnn_convolution_add_relu.default


def _register_meta() -> str:
    """A Meta kernel for the two aten ops where they have none (the fake of ours)."""
    have = torch._C._dispatch_has_kernel_for_dispatch_key(RELU.name(), "Meta")
    if have:
        return "aten ops have a Meta kernel"
    lib = torch.library.Library("aten", "IMPL")
    lib.impl(
        "cudnn_convolution_relu",
        lambda x, w, b, s, p, d, g: _cudnn._fake(x, w, None, b, s, p, d, g),
        "Meta",
    )
    lib.impl(
        "cudnn_convolution_add_relu",
        lambda x, w, z, alpha, b, s, p, d, g: _cudnn._fake(x, w, z, b, s, p, d, g),
        "Meta",
    )
    _register_meta.lib = lib  # type: ignore[attr-defined]
    return "registered Meta kernels for the aten ops"


def _replace_aten(graph: torch.fx.Graph, c) -> None:  # type: ignore[no-untyped-def]
    x, w = c.conv.args[0], _cudnn._weight_in_layout(graph, c)
    rest = _cudnn._conv_args(c.conv)
    with graph.inserting_before(c.relu):
        if c.z is None:
            new = graph.call_function(RELU, (x, w, *rest))
            ours = (x, w, *rest)
        else:
            new = graph.call_function(ADD_RELU, (x, w, c.z, 1.0, *rest))
            ours = (x, w, c.z, *rest)
    vals = [_cudnn._val(a) if isinstance(a, torch.fx.Node) else a for a in ours]
    with _compat.fake_mode_of(_cudnn._val(x)):
        new.meta["val"] = _cudnn.CONV_RELU(*vals) if c.z is None else _cudnn.CONV_ADD_RELU(*vals)
    c.relu.replace_all_uses_with(new)
    _decide.record_fusion(_pairs.describe_node(c.conv), "aten")


@contextlib.contextmanager
def aten_rewrite():
    saved = _cudnn._replace, _cudnn.cache_key
    _cudnn._replace = _replace_aten
    _cudnn.cache_key = lambda: (*saved[1](), "aten")
    try:
        yield
    finally:
        _cudnn._replace, _cudnn.cache_key = saved


def _micro_one(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, s: int) -> list[str]:
    args = ([s, s], [1, 1], [1, 1], 1)
    ways = {
        "conv+relu_": lambda: torch.convolution(
            x, w, b, [s, s], [1, 1], [1, 1], False, [0, 0], 1
        ).relu_(),
        "torch.cudnn_convolution_relu": lambda: torch.cudnn_convolution_relu(x, w, b, *args),
        "ours": lambda: _cudnn.CONV_RELU(x, w, b, *args),
        "aten overload": lambda: RELU(x, w, b, *args),
    }
    line = []
    for name, fn in ways.items():
        cost = _cudnn._cost(fn, "cuda", rounds=7, calls=30)
        line.append(f"{name} host {cost.host * 1e6:.1f} dev {cost.device * 1e6:.1f}")
    return line


def micro() -> None:
    shapes = [  # (N, C, H, K, stride): ResNet18's 3x3 convs
        (32, 64, 56, 64, 1),
        (32, 128, 28, 128, 1),
        (32, 256, 14, 256, 1),
        (32, 512, 7, 512, 1),
        (1, 64, 56, 64, 1),
    ]
    print(_register_meta())
    for dtype, fmt in (
        (torch.bfloat16, torch.channels_last),
        (torch.float32, torch.contiguous_format),
    ):
        for n, c, h, k, s in shapes:
            x = torch.randn(n, c, h, h, device="cuda", dtype=dtype).to(memory_format=fmt)
            w = torch.randn(k, c, 3, 3, device="cuda", dtype=dtype).to(memory_format=fmt)
            b = torch.randn(k, device="cuda", dtype=dtype)
            line = _micro_one(x, w, b, s)
            print(f"{str(dtype)[6:]} {n}x{c}x{h}x{h}->{k}: " + " | ".join(line), flush=True)


def model(argv: list[str]) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--model", default="resnet18")
    p.add_argument("--rounds", type=int, default=25)
    p.add_argument("--calls", type=int, default=10)
    p.add_argument("--lock")
    p.add_argument("--barrier")
    p.add_argument("--json", type=Path)
    p.add_argument("--code", type=Path, help="write the aten variant's generated code here")
    args = p.parse_args(argv)
    print(_register_meta())
    dtype = getattr(torch, args.dtype)
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    net = torchvision_model(args.model).cuda().to(dtype).to(memory_format=fmt)
    x = torch.randn(args.batch_size, 3, 224, 224, device="cuda", dtype=dtype)
    x = x.to(memory_format=fmt)
    freezing = {"freezing": True}

    def compiled(**kw):  # type: ignore[no-untyped-def]
        return lambda: _harness.compile_variant(copy.deepcopy(net), config=freezing, **kw)

    def aten_variant():  # type: ignore[no-untyped-def]
        fn = _harness.compile_variant(copy.deepcopy(net), cudnn_fusion="always", config=freezing)
        with aten_rewrite():
            _, code = _compat.run_and_get_code(fn, x)
        src = "\n".join(code)
        counts = {
            k: src.count(k)
            for k in (
                "cudnn_convolution",
                "extern_kernels.convolution",
                "triton_",
                "clone(",
                ".copy_(",
                "as_strided",
            )
        }
        print(f"aten variant code: {counts}", flush=True)
        if args.code:
            args.code.write_text(src)
        return fn

    factories = {
        "compile": lambda: _harness.compile_variant(copy.deepcopy(net), plugin=False),
        "freezing": compiled(plugin=False),
        "freezing+plugin": compiled(cudnn_fusion="off"),
        "freezing+plugin (cudnn always)": compiled(cudnn_fusion="always"),
        "freezing+plugin (aten always)": aten_variant,
    }
    rtol, atol = _report.DEFAULT_TOLERANCES[dtype]
    with torch.no_grad(), _harness.tf32_off():
        expected = net(x)
        variants, dropped = prepare(factories, x, expected, rtol=rtol, atol=atol)
        # A recompile while timing would put a compile inside one round: fail instead.
        torch._dynamo.config.error_on_recompile = True
        cudnn_fusion.wait_for(args.barrier, str(args.json.stem if args.json else id(args)))
        with cudnn_fusion.locked(args.lock):
            per_call = time_interleaved(variants, x, rounds=args.rounds, calls=args.calls)
    result = {
        "config": {k: str(v) for k, v in vars(args).items()},
        "torch": torch.__version__,
        **results(variants, per_call, dropped),
    }
    line = " ".join(
        f"{n}={s['ratio']:.3f}[{s['ratio_min']:.2f}-{s['ratio_max']:.2f}]"
        for n, s in result["summary"].items()
    )
    tag = f"{args.model} {args.dtype}{' CL' if args.channels_last else ''} b{args.batch_size}"
    print(f"{tag}: {line} fused={result['cudnn_fused']} dropped={dropped}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    t = time.perf_counter()
    if sys.argv[1] == "micro":
        micro()
    else:
        model(sys.argv[2:])
    print(f"done in {time.perf_counter() - t:.0f} s")
