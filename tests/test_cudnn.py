"""cuDNN's fused conv + bias (+ add) + ReLU in frozen graphs (``_cudnn``).

The rewrite is tested on CPU, where the fused ops run their reference implementation
(``_cudnn.DEVICES`` extended to "cpu"), with Inductor's own CPU weight prepacking off, which
would otherwise take the convs first: its config flag, and its freezing patterns, which stay
registered once any compile in the process has set them up. The ops' fake strides against
cuDNN's real ones, and the whole rewrite, on the GPU.
"""

import re

import pytest
import torch
from torch import nn

import inductor_convbn
from inductor_convbn import _compat, _cudnn, _decide, _pass
from inductor_convbn.testing import torchvision_model

FREEZING = {"freezing": True, "cpp.weight_prepack": False}


class Block(nn.Module):
    """conv-bn-relu, conv-bn + residual add + relu, then a conv-bn feeding two users."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.conv3, self.bn3 = nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8)

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        y = torch.relu(self.bn2(self.conv2(y)) + y)
        z = self.bn3(self.conv3(y))
        return torch.relu(z) + z  # z has another user: conv3 keeps Inductor's epilogue


def _random_bn(model):
    torch.manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)
    return model.eval()


@pytest.fixture
def on_cpu(monkeypatch):
    monkeypatch.setattr(_cudnn, "DEVICES", ("cuda", "cpu"))
    from torch._inductor.fx_passes import freezing_patterns

    fresh = [type(p)() for p in freezing_patterns.pass_patterns]
    monkeypatch.setattr(freezing_patterns, "pass_patterns", fresh)
    _decide.take_fusions()


def _compile_and_run(model, x, mode=None, config=FREEZING):
    options = {} if mode is None else {"cudnn_fusion": mode}
    with (
        _pass.installed(**options),
        _compat.inductor_config.patch(config),
        torch.no_grad(),
    ):
        compiled = torch.compile(model)
        out, code = _compat.run_and_get_code(compiled, x)
    return out, "\n".join(code)


@pytest.mark.parametrize("channels_last", [False, True])
def test_always_fuses_conv_relu_and_conv_add_relu(on_cpu, channels_last):
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = _random_bn(Block()).to(memory_format=fmt)
    x = torch.randn(2, 8, 10, 10).to(memory_format=fmt)
    with torch.no_grad():
        expected = model(x)
    out, code = _compile_and_run(model, x, "always")
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
    assert sorted(_decide.take_fusions()) == [("conv1", "bias+ReLU"), ("conv2", "bias+add+ReLU")]
    assert "inductor_convbn.conv_relu" in code and "inductor_convbn.conv_add_relu" in code
    assert _compat.counters["inductor"][_decide.COUNTER_CUDNN_FUSED] == 2
    assert out.stride() == expected.stride()


@pytest.mark.parametrize("mode", [None, "off"])
def test_off_the_default_fuses_nothing(on_cpu, mode):
    model, x = _random_bn(Block()), torch.randn(2, 8, 10, 10)
    _, code = _compile_and_run(model, x, mode)
    assert _decide.take_fusions() == []
    assert "inductor_convbn.conv_" not in code


def test_without_freezing_nothing_is_fused(on_cpu):
    """Only a frozen graph's convs (constant weights) are handed to cuDNN."""
    model, x = _random_bn(Block()), torch.randn(2, 8, 10, 10)
    _, code = _compile_and_run(model, x, "always", config={"cpp.weight_prepack": False})
    assert _decide.take_fusions() == []
    assert "inductor_convbn.conv_" not in code


def test_auto_keeps_what_times_slower(on_cpu, monkeypatch):
    """ "auto" rewrites only where the fused call wins the timing, decided once per conv
    signature (the two 3x3 convs of the block differ in their epilogue)."""
    timed = []

    def fake_time(key):
        timed.append(key)
        is_add = key[6] is not None  # the residual's strides
        fast, slow = _cudnn.Cost(1.0, 1.0), _cudnn.Cost(2.0, 2.0)
        return (fast, slow) if is_add else (slow, fast)

    monkeypatch.setattr(_cudnn, "_time_both", fake_time)
    monkeypatch.setattr(_cudnn, "_timed", {})
    model, x = _random_bn(Block()), torch.randn(2, 8, 10, 10)
    out, _ = _compile_and_run(model, x, "auto")
    assert _decide.take_fusions() == [("conv2", "bias+add+ReLU")]
    assert len(timed) == 2
    _compat.dynamo_reset()
    _compile_and_run(_random_bn(Block()), x, "auto", config={**FREEZING, "fx_graph_cache": False})
    assert len(timed) == 2  # decided before: not timed again


@pytest.mark.parametrize("cudagraphs", [False, True])
def test_auto_weighs_launch_time_against_kernel_time(monkeypatch, cudagraphs):
    """A fused call with a faster kernel but a slower launch is taken only where the graph
    stays bound by its kernels, or under CUDA graphs, where launches cost nothing."""
    candidates = ["a", "b", "c"]
    costs = {  # (fused, unfused) per conv, seconds: (host, device)
        "a": (_cudnn.Cost(3.0, 8.0), _cudnn.Cost(1.0, 10.0)),  # saves 2 on the device
        "b": (_cudnn.Cost(9.0, 9.0), _cudnn.Cost(1.0, 10.0)),  # saves 1, launches 8 slower
        "c": (_cudnn.Cost(1.0, 11.0), _cudnn.Cost(1.0, 10.0)),  # a slower kernel
    }
    monkeypatch.setattr(_cudnn, "_costs", lambda graph, c: costs[c])
    with _compat.inductor_config.patch({"triton.cudagraphs": cudagraphs}):
        chosen = _cudnn._choose(None, candidates)
    # Unfused: host 3, device 30. Fusing a: host 5, device 28. Then b: host 13, device
    # 27, better by 1 (> 3% of 10). Fusing c never helps.
    assert chosen == ["a", "b"]
    costs["b"] = (_cudnn.Cost(30.0, 9.0), _cudnn.Cost(1.0, 10.0))  # now launch-bound
    with _compat.inductor_config.patch({"triton.cudagraphs": cudagraphs}):
        chosen = _cudnn._choose(None, candidates)
    assert chosen == (["a", "b"] if cudagraphs else ["a"])


def test_packages_keep_torch_kernels(on_cpu, monkeypatch):
    """An AOTInductor package must load where inductor_convbn is not imported."""
    monkeypatch.setattr(_compat, "aot_compilation", lambda: True)
    model, x = _random_bn(Block()), torch.randn(2, 8, 10, 10)
    _, code = _compile_and_run(model, x, "always")
    assert _decide.take_fusions() == []
    assert "inductor_convbn.conv_" not in code


def test_transposed_convs_are_left_alone(on_cpu):
    model = nn.Sequential(nn.ConvTranspose2d(4, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    model = _random_bn(model)
    _compile_and_run(model, torch.randn(2, 4, 6, 6), "always")
    assert _decide.take_fusions() == []


def test_verify_reports_each_fused_conv(on_cpu):
    model, x = torchvision_model("resnet18"), torch.randn(1, 3, 32, 32)
    with _compat.inductor_config.patch({"cpp.weight_prepack": False}):
        report = inductor_convbn.verify(model, x, cudnn_fusion="always")
    assert report.outputs_match and report.folded == report.pairs == 20
    fused_rows = [p for p in report.pair_reports if "in cuDNN's convolution" in p.reason]
    # Every conv followed by a ReLU, directly or through the residual add (one of the two
    # convs of an add): 20 convs less the three adds' other convs.
    assert report.cudnn_fused == len(fused_rows) == 17
    assert "17 conv(s) with their epilogue in cuDNN" in str(report)


def test_option_is_part_of_the_cache_key():
    keys = {
        _pass.ConvBnFoldPass(stage="early", cudnn_fusion=mode).uuid()
        for mode in _cudnn.CUDNN_FUSION
    }
    assert len(keys) == len(_cudnn.CUDNN_FUSION)
    before = _pass.ConvBnFoldPass(stage="early").uuid()
    saved = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = not saved
    try:
        assert _pass.ConvBnFoldPass(stage="early").uuid() != before
    finally:
        torch.backends.cudnn.allow_tf32 = saved


def test_bad_option_is_refused():
    with pytest.raises(ValueError, match="cudnn_fusion must be one of"):
        inductor_convbn.install(cudnn_fusion="on")


@pytest.mark.parametrize("ndim", [4, 5])
def test_memory_format_follows_suggest_memory_format(ndim):
    """The layout rule of the fake strides is ATen's ``suggest_memory_format``, which
    max pooling on CPU exposes: its output has the input's suggested layout."""
    gen = torch.Generator().manual_seed(0)
    channels_last = torch.channels_last if ndim == 4 else torch.channels_last_3d
    checked = 0
    for _ in range(200):
        size = [int(s) for s in torch.randint(1, 4, (ndim,), generator=gen)]
        perm = [int(p) for p in torch.randperm(ndim, generator=gen)]
        base = torch.empty([2 * s for s in size]).permute(perm)
        view = base[tuple(slice(None, None, 2) for _ in range(ndim))]
        pool = nn.functional.max_pool2d if ndim == 4 else nn.functional.max_pool3d
        suggested = pool(view, 1).stride()
        as_cl = torch.empty(view.shape).contiguous(memory_format=channels_last).stride()
        as_contiguous = torch.empty(view.shape).stride()
        if as_cl == as_contiguous:
            continue  # ambiguous: both layouts have the same strides
        predicted = as_cl if _cudnn._strides_like_channels_last(view) else as_contiguous
        assert suggested == predicted, (view.shape, view.stride())
        checked += 1
    assert checked > 50


# --- On the GPU ----------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("input_cl", [False, True])
@pytest.mark.parametrize("weight_cl", [False, True])
@pytest.mark.parametrize(("kernel", "conv_stride", "cin"), [(1, 1, 16), (3, 2, 16), (3, 1, 3)])
def test_fake_strides_are_cudnn_strides(dtype, input_cl, weight_cl, kernel, conv_stride, cin):
    """The fake implementation's output has the sizes and strides cuDNN's call returns,
    and the values of the reference implementation."""
    torch.manual_seed(0)
    x = torch.randn(2, cin, 9, 9, device="cuda", dtype=dtype)
    w = torch.randn(8, cin, kernel, kernel, device="cuda", dtype=dtype)
    b = torch.randn(8, device="cuda", dtype=dtype)
    if input_cl:
        x = x.to(memory_format=torch.channels_last)
    if weight_cl:
        w = w.to(memory_format=torch.channels_last)
    hyper = ([conv_stride] * 2, [kernel // 2] * 2, [1, 1], 1)
    real = _cudnn.CONV_RELU(x, w, b, *hyper)
    z = torch.randn_like(real)
    real_add = _cudnn.CONV_ADD_RELU(x, w, z, b, *hyper)
    with _compat.FakeTensorMode() as mode:
        fx, fw, fb, fz = (mode.from_tensor(t) for t in (x, w, b, z))
        fake = _cudnn.CONV_RELU(fx, fw, fb, *hyper)
        fake_add = _cudnn.CONV_ADD_RELU(fx, fw, fz, fb, *hyper)
    tol = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 3e-3}[dtype]
    for r, f, zz in ((real, fake, None), (real_add, fake_add, z)):
        assert (r.shape, r.stride()) == (f.shape, f.stride())
        ref = _cudnn.reference(
            x.float(), w.float(), None if zz is None else zz.float(), b.float(), *hyper
        )
        torch.testing.assert_close(r.float(), ref, rtol=tol, atol=tol * 10)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_resnet18_on_gpu_fuses_with_no_layout_copies(dtype):
    fmt = torch.contiguous_format if dtype == torch.float32 else torch.channels_last
    model = torchvision_model("resnet18").cuda().to(dtype).to(memory_format=fmt)
    x = torch.randn(4, 3, 64, 64, device="cuda", dtype=dtype).to(memory_format=fmt)
    with torch.no_grad():
        expected = model(x)
    _, plain_code = _compile_and_run(model, x, "off", config={"freezing": True})
    _compat.dynamo_reset()
    out, code = _compile_and_run(model, x, "always", config={"freezing": True})
    assert len(_decide.take_fusions()) == 17
    tol = {torch.float32: 1e-3, torch.bfloat16: 5e-2, torch.float16: 1e-2}[dtype]
    torch.testing.assert_close(out, expected, rtol=tol, atol=tol)
    # The fused convs read and write in their own layout: no more copy kernels run than
    # without the fusion.
    assert len(_copy_kernels(code)) <= len(_copy_kernels(plain_code))


def _copy_kernels(code):
    """The calls of layout-copying kernels in Inductor's generated wrapper code."""
    return re.findall(r"^\s*(triton_\w*(?:clone|copy)\w*)\.run\(|aten\.copy_", code, re.M)
