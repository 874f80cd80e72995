"""The "grad" stage: eval BatchNorm folded inside compiled graphs that need gradients."""

import copy

import pytest
import torch
from torch import nn

import inductor_convbn
from inductor_convbn import _compat, _decide, _pairs, _report, verify
from inductor_convbn.testing import randomize_batch_norm

CONVS = {
    "conv1d": (nn.Conv1d, nn.BatchNorm1d, (9,)),
    "conv2d": (nn.Conv2d, nn.BatchNorm2d, (7, 6)),
    "conv3d": (nn.Conv3d, nn.BatchNorm3d, (5, 4, 4)),
    "conv_transpose2d": (nn.ConvTranspose2d, nn.BatchNorm2d, (5, 6)),
}


def _model(kind, bias=True, affine=True, dtype=torch.float32):
    conv, bn, _ = CONVS[kind]
    torch.manual_seed(0)
    model = nn.Sequential(
        conv(4, 6, 3, bias=bias, groups=2),
        bn(6, affine=affine, eps=1e-3),
        nn.ReLU(),
        conv(6, 4, 1),
        bn(4),
    )
    return randomize_batch_norm(model).to(dtype).eval()


def _input(kind, dtype=torch.float32):
    shape = CONVS[kind][2]
    return torch.randn(3, 4, *shape, generator=torch.Generator().manual_seed(1), dtype=dtype)


@pytest.mark.parametrize(
    "kind,bias,affine",
    [
        ("conv1d", True, False),
        ("conv2d", True, True),
        ("conv2d", False, False),
        ("conv3d", False, True),
        ("conv_transpose2d", True, True),
    ],
)
def test_eval_model_with_grad_is_folded(kind, bias, affine):
    model = _model(kind, bias, affine)
    report = verify(model, _input(kind), grad=True)
    assert report.outputs_match, report
    assert report.max_grad_error is not None
    assert report.folded == report.pairs == 2, report
    assert {p.reason for p in report.pair_reports} == {_pairs.FOLDED_FOR_GRAD}


def test_linear_bn1d_with_grad():
    torch.manual_seed(0)
    model = randomize_batch_norm(nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6))).eval()
    report = verify(model, torch.randn(4, 5), grad=True)
    assert report.outputs_match and report.folded == report.pairs == 1, report


def test_bfloat16_with_grad():
    model = _model("conv2d", dtype=torch.bfloat16)
    report = verify(model, _input("conv2d", torch.bfloat16), grad=True)
    assert report.outputs_match and report.folded == report.pairs == 2, report


def test_float16_is_skipped_with_grad():
    # a folded float16 weight can overflow where conv and BN apart do not
    model = _model("conv2d", dtype=torch.float16)
    report = verify(model, _input("conv2d", torch.float16), grad=True)
    assert report.outputs_match and report.folded == 0, report
    assert set(dict(report.skipped).values()) == {_pairs.FLOAT16_FOR_GRAD}


def _saved_activation_bytes(fn, x):
    """Bytes of activation-shaped tensors saved for backward by one call of ``fn``."""
    saved = {}

    def pack(t):
        if t.dim() == x.dim() and t.shape[0] == x.shape[0]:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(x)
    return sum(saved.values())


def test_conv_outputs_are_no_longer_saved():
    model = _model("conv2d")
    x = _input("conv2d").requires_grad_()
    plain = _saved_activation_bytes(torch.compile(copy.deepcopy(model)), x)
    _compat.dynamo_reset()
    with inductor_convbn.installed():
        folded = _saved_activation_bytes(torch.compile(copy.deepcopy(model)), x)
    # each pair's conv output, saved for its BN's backward, is gone
    conv_outputs = []
    for m in model:
        if isinstance(m, nn.Conv2d):
            m.register_forward_hook(lambda m, a, out: conv_outputs.append(out.nbytes))
    model(x)
    assert plain - folded == sum(conv_outputs)


def test_frozen_bn_fine_tuning_trains_like_eager():
    reference = _model("conv2d").train()
    for m in reference.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eval()
    model = copy.deepcopy(reference)
    inductor_convbn.install()
    compiled = torch.compile(model)
    opts = [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for m in (reference, model)]
    x = _input("conv2d")
    for step in range(3):
        for fn, opt in zip((reference, compiled), opts, strict=True):
            opt.zero_grad()
            out = fn(x + step)
            (out * out.detach().sign()).mean().backward()
            opt.step()
    assert _compat.counters["inductor"][_decide.COUNTER_FOLDED] == 2
    torch.testing.assert_close(model.state_dict(), reference.state_dict(), rtol=1e-4, atol=1e-4)


def test_frozen_affine_still_folds_when_the_input_needs_grad():
    model = _model("conv2d")
    for p in model.parameters():
        p.requires_grad_(False)
    x = _input("conv2d").requires_grad_()
    inductor_convbn.install()
    out = torch.compile(model)(x)
    (grad,) = torch.autograd.grad(out.square().sum(), x)
    x_ref = x.detach().requires_grad_()
    (expected,) = torch.autograd.grad(model(x_ref).square().sum(), x_ref)
    torch.testing.assert_close(grad, expected, rtol=1e-4, atol=1e-4)
    assert [d.reason for d in _decide.take_decisions()] == [_pairs.FOLDED_FOR_GRAD] * 2


def test_nothing_needs_grad_leaves_it_to_the_post_grad_stage():
    model = _model("conv2d").requires_grad_(False)
    report = verify(model, _input("conv2d"), policy="always", freezing=False)
    assert report.folded == 2
    assert {p.reason for p in report.pair_reports} == {_pairs.FOLDED_PER_CALL}
    # grad mode on, but no tensor needs a gradient: an inference graph
    _compat.dynamo_reset()
    inductor_convbn.install("always")
    before = _compat.counters["inductor"][_decide.COUNTER_FOLDED]
    with torch.enable_grad():
        torch.compile(model)(_input("conv2d"))
    # counted by the post-grad stage (replayed on an FX graph cache hit), none by "grad"
    assert _compat.counters["inductor"][_decide.COUNTER_FOLDED] - before == 2
    assert _pairs.FOLDED_FOR_GRAD not in {d.reason for d in _decide.take_decisions()}


class _Hazards(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv_a, self.bn_a = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.conv_b, self.bn_b = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)
        self.conv_c, self.bn_c = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv_a(x)
        x = self.bn_a(y) + y  # conv output used twice
        x = self.bn_b(self.conv_b(x))  # BN in training mode
        return self.bn_c(self.conv_c(x)).relu_()  # in-place op after the BN


def test_hazards_with_grad():
    model = randomize_batch_norm(_Hazards()).eval()
    model.bn_b.train()
    report = verify(model, torch.randn(3, 4, 6, 6), grad=True)
    assert report.outputs_match, report
    assert dict(report.skipped) == {
        "conv_a": "conv output has other users",
        "conv_b": "BN is in training mode",
    }
    assert report.folded == 1


def test_grad_and_freezing_together_is_an_error():
    with pytest.raises(ValueError, match="grad or freezing"):
        verify(_model("conv2d"), _input("conv2d"), grad=True, freezing=True)


def test_grad_without_parameters_needing_grad_is_an_error():
    model = _model("conv2d").requires_grad_(False)
    with pytest.raises(ValueError, match="no output or no parameter requires grad"):
        verify(model, _input("conv2d"), grad=True)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["conv2d", "conv_transpose2d"])
def test_cuda(kind, dtype):
    model = _model(kind, dtype=dtype).cuda()
    report = verify(model, _input(kind, dtype).cuda(), grad=True)
    assert report.outputs_match and report.folded == report.pairs == 2, report


@pytest.mark.parametrize("channels", [6, 5])
def test_unbatched_conv_input_is_skipped_with_grad(channels):
    """An unbatched conv input makes BN normalise the length, not the channels: folding
    gave wrong numbers (channels 6) or failed to compile (5). Skipped, as fx.fuse skips it."""
    torch.manual_seed(0)
    model = randomize_batch_norm(nn.Sequential(nn.Conv1d(4, 6, 1), nn.BatchNorm1d(channels)))
    model.eval()
    x = torch.randn(4, channels)
    report = verify(model, x, grad=True)
    assert report.outputs_match, report
    assert report.folded == 0 and report.skipped == [("0", _pairs.CONV_NOT_BATCHED)], report
    inductor_convbn.install()
    torch.testing.assert_close(torch.compile(model)(x), model(x))


class _TransposedChain(nn.Module):
    """Three ConvTranspose3d -> BN3d pairs; the second conv called twice in a row, the third
    BN applied again to its own output."""

    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.ConvTranspose3d(3, 4, 3, stride=2), nn.BatchNorm3d(4)
        self.c2, self.b2 = nn.ConvTranspose3d(4, 4, 3, stride=2), nn.BatchNorm3d(4)
        self.c3, self.b3 = nn.ConvTranspose3d(4, 5, 3, stride=2), nn.BatchNorm3d(5)

    def forward(self, x):
        x = self.b1(self.c1(x))
        x = self.b2(self.c2(self.c2(x)))
        x = self.b3(self.c3(x))
        return self.b3(x) + x


def _gradients_and_step(model, x, compiled):
    model = copy.deepcopy(model)
    run = torch.compile(model) if compiled else model
    run(x).mean().backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    torch.optim.SGD(model.parameters(), lr=1e-2).step()
    with torch.no_grad():
        return grads, model(x)


def test_transposed_conv_gradients_match_float64():
    """The folded bias of a transposed conv carried its kernel's float32 bias-gradient sum
    (1e-2 of its size here) into the BN's affine gradients: 2e-2 off float64, three times
    eager's own error. Added after the conv, it is summed as eager's BN sums it."""
    torch.manual_seed(0)
    model = randomize_batch_norm(_TransposedChain()).eval()
    x = torch.rand(4, 3, 4, 4, 4)
    eager, eager_out = _gradients_and_step(model, x, compiled=False)
    exact, exact_out = _gradients_and_step(model.double(), x.double(), compiled=False)
    inductor_convbn.install()
    plugin, plugin_out = _gradients_and_step(model.float(), x, compiled=True)
    assert _compat.counters["inductor"][_decide.COUNTER_FOLDED] == 3
    for name, truth in exact.items():
        scale = truth.abs().max()
        error, eager_error = (plugin[name] - truth).abs().max(), (eager[name] - truth).abs().max()
        # The BN affine gradients: a difference of two sums (_report.GRAD_RTOL_FACTOR).
        assert error <= 1e-3 * scale + 2 * eager_error, name
    # After one SGD step the model is as close to float64's as plain compile is to eager.
    assert (plugin_out - exact_out).abs().max() <= 1e-4 * exact_out.abs().max()


def test_verify_judges_gradients_by_the_error_eager_has_too():
    torch.manual_seed(0)
    model = randomize_batch_norm(_TransposedChain()).eval()
    report = verify(model, torch.rand(4, 3, 4, 4, 4), grad=True)
    assert report.outputs_match and report.folded == report.pairs == 3, report
    assert report.eager_grad_error is not None and report.eager_grad_error > 1e-3, report
    assert "vs float64 (eager's own" in str(report)


def test_a_gradient_error_beyond_eagers_own_is_a_mismatch():
    truth = [[torch.tensor([1.0, -2.0]), None, torch.tensor([0.0])]]
    eager = [[torch.tensor([1.0, -2.01]), None, torch.tensor([1e-9])]]  # its own error
    close = [[torch.tensor([1.0, -2.02]), None, torch.tensor([1e-8])]]
    far = [[torch.tensor([1.0, -2.03]), None, torch.tensor([0.0])]]
    zero_far = [[torch.tensor([1.0, -2.01]), None, torch.tensor([1e-3])]]  # 1e-3 > 2e-2 * rtol
    missing = [[None, None, torch.tensor([0.0])]]
    judge = _report._judge_gradients
    assert judge(eager, close, truth, rtol=1e-4)[2]
    assert not judge(eager, far, truth, rtol=1e-4)[2]
    assert not judge(eager, zero_far, truth, rtol=1e-4)[2]
    assert not judge(eager, missing, truth, rtol=1e-4)[2]
    judged = judge(eager, far, None, rtol=1e-4)  # no float64: vs eager
    assert not judged.match and judged.eager_error is None
    assert judged.error == pytest.approx(0.02 / 2.01) and judged.plain_error is None


def test_a_gradient_error_plain_compile_also_gets_is_not_blamed_on_the_plugin():
    truth = [[torch.tensor([1.0, -2.0])]]
    eager = [[torch.tensor([1.0, -2.0])]]
    plugin = [[torch.tensor([1.0, float("inf")])]]  # a float16 backward that overflowed
    judge = _report._judge_gradients
    assert not judge(eager, plugin, truth, rtol=1e-2).match
    judged = judge(eager, plugin, truth, rtol=1e-2, plain=plugin)
    assert judged.match and judged.plain_error == float("inf"), judged
    assert not judge(eager, plugin, truth, rtol=1e-2, plain=eager).match


def test_verify_with_plain_reports_plain_compiles_gradient_error():
    model, x = _model("conv2d"), _input("conv2d")
    report = verify(model, x, grad=True, plain=True)
    assert report.outputs_match and report.folded == report.pairs == 2, report
    assert report.plain_grad_error is not None and report.plain_grad_error < 1e-3, report
    assert "plain torch.compile's: " in str(report).splitlines()[0], report


def test_fold_counts_survive_the_aot_autograd_cache():
    """On an AOT autograd cache hit the grad stage does not run; its folds are counted where
    Inductor's caches replay counts, and the table says they came from the cache."""
    model, x = _model("conv2d"), _input("conv2d")
    first = verify(model, x, grad=True)
    second = verify(model, x, grad=True)
    assert first.folded == second.folded == second.pairs == 2, second
    assert not second.missed and second.outputs_match, second
    assert second.fx_graph_cache_hits > 0, second  # the case under test did happen
    # torch 2.14 runs the grad stage only on an AOT autograd cache miss, 2.6 every time.
    assert {p.status for p in second.pair_reports} == {_pairs.FOLDED}, second
    assert {p.reason for p in second.pair_reports} <= {
        _pairs.FOLDED_CACHED,
        _pairs.FOLDED_FOR_GRAD,
    }, second


def test_unsafe_grad_decisions_survive_the_aot_autograd_cache():
    model, x = _model("conv2d", dtype=torch.float16), _input("conv2d", torch.float16)
    reports = [verify(model, x, grad=True) for _ in range(2)]
    for report in reports:
        assert report.folded == 0 and not report.missed and report.outputs_match, report
        assert [p.status for p in report.pair_reports] == [_pairs.SKIPPED] * 2, report
    assert reports[1].fx_graph_cache_hits > 0, reports[1]
    reasons = {p.reason for p in reports[1].pair_reports}
    assert reasons <= {_pairs.UNSAFE_CACHED, reports[0].pair_reports[0].reason}, reports[1]


class _MultiUser(nn.Module):
    """PyTorch's own efficient_conv_bn_eval test model: three foldable pairs."""

    def __init__(self, conv, bn, bias, **kwargs):
        super().__init__()
        self.conv1, self.bn1 = conv(3, 8, bias=bias, **kwargs), bn(8)
        self.conv2, self.bn2 = conv(8, 8, bias=bias, **kwargs), bn(8)
        self.conv3, self.bn3 = conv(8, 8, bias=bias, **kwargs), bn(8)

    def forward(self, x):
        x = self.bn1(self.conv1(input=x))
        x = self.bn2(input=self.conv2(self.conv2(x)))  # only the second call is a pair
        x = self.bn3(input=self.conv3(input=x))
        return self.bn3(x) + x  # the second BN call follows no conv


_LAYERS = {
    "linear": (nn.Linear, nn.BatchNorm1d, 0),
    "conv1d": (nn.Conv1d, nn.BatchNorm1d, 1),
    "conv2d": (nn.Conv2d, nn.BatchNorm2d, 2),
    "conv3d": (nn.Conv3d, nn.BatchNorm3d, 3),
    "conv_transpose1d": (nn.ConvTranspose1d, nn.BatchNorm1d, 1),
    "conv_transpose2d": (nn.ConvTranspose2d, nn.BatchNorm2d, 2),
    "conv_transpose3d": (nn.ConvTranspose3d, nn.BatchNorm3d, 3),
}


def _aten_level(model, x, front):
    """``model`` as a graph of aten calls, as PyTorch's own test and torch.export give it."""
    if front == "export":
        return torch.export.export(model, (x,)).module()
    from torch._dispatch.python import enable_python_dispatcher
    from torch.fx.experimental.proxy_tensor import make_fx

    with enable_python_dispatcher():
        return make_fx(model, pre_dispatch=True)(x)


@pytest.mark.parametrize("front", ["module", "make_fx", "export"])
@pytest.mark.parametrize("layer", list(_LAYERS))
def test_efficient_conv_bn_eval_cases_fold_and_train_like_eager(layer, front):
    """PyTorch's efficient_conv_bn_eval test, on the plugin: every pair folded (aten-level
    graphs too), the outputs before and after one SGD step as eager's."""
    conv, bn, rank = _LAYERS[layer]
    kwargs = {} if rank == 0 else {"kernel_size": 3, "stride": 2}
    torch.manual_seed(0)
    eager = randomize_batch_norm(_MultiUser(conv, bn, bias=rank != 2, **kwargs)).eval()
    x = torch.rand(4, 3, *[4 if conv.__name__.startswith("ConvT") else 40] * rank)
    plugin = copy.deepcopy(eager)
    if front != "module":
        plugin = _aten_level(plugin, x, front)
    inductor_convbn.install()
    compiled = torch.compile(plugin)
    outputs = []
    for model, run in ((eager, eager), (plugin, compiled)):
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
        first = run(x)
        first.mean().backward()
        optimizer.step()
        outputs.append((first.detach(), run(x + 0.5).detach()))
    torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-5, atol=2e-5)
    assert _compat.counters["inductor"][_decide.COUNTER_FOLDED] == 3


@pytest.mark.parametrize("front", ["make_fx", "export"])
def test_aten_level_pairs_are_reported(front):
    model, x = _model("conv2d"), _input("conv2d")
    report = verify(_aten_level(model, x, front), x, grad=True)
    assert report.pairs == report.folded == 2 and report.outputs_match, report
