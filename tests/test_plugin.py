"""The plugin folds every eligible conv -> BN pair under torch.compile, and nothing else.

Each case compiles through ``verify()``, which counts pairs in dynamo's graph (independent of
the pattern matcher), reads the plugin's own counter, and compares with eager (TF32 off).
These tests check the fold itself, so they fold every safe pair (``policy="always"``), per
call or, under freezing, once; test_policy.py checks which pairs ``"auto"`` folds.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import inductor_convbn
from conftest import DEVICES
from inductor_convbn import _compat, _decide, _pairs
from inductor_convbn.testing import randomize_batch_norm

CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
TCONV = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}

# Hyper-parameters no default-traced pattern would match, and the defaults.
HYPER = {
    "defaults": dict(kernel_size=1),
    "strided": dict(kernel_size=3, stride=2, padding=1),
    "dilated-grouped": dict(kernel_size=3, stride=(1, 2, 1), padding=2, dilation=2, groups=2),
}


def _hyper(name, rank, transposed):
    kw = dict(HYPER[name])
    for key in ("stride", "padding", "dilation"):
        if isinstance(kw.get(key), tuple):
            kw[key] = kw[key][:rank]
    if transposed and name != "defaults":
        kw["output_padding"] = 1
    return kw


def conv_bn(rank, transposed=False, bias=True, affine=True, eps=1e-5, hyper="strided", bn_cls=None):
    torch.manual_seed(0)
    conv_cls = (TCONV if transposed else CONV)[rank]
    conv = conv_cls(4, 6, bias=bias, **_hyper(hyper, rank, transposed))
    bn = (bn_cls or BN[rank])(6, affine=affine, eps=eps)
    return randomize_batch_norm(nn.Sequential(conv, bn, nn.ReLU())).eval()


def _input(rank, batch=2, size=9, **kw):
    return torch.randn(batch, 4, *[size] * rank, generator=torch.Generator().manual_seed(1), **kw)


def fold_and_verify(model, *inputs, **kwargs):
    return inductor_convbn.verify(
        model, *inputs, **{"policy": "always", "freezing": False, **kwargs}
    )


def assert_folds(report, pairs, folded=None):
    folded = pairs if folded is None else folded
    assert report.outputs_match, report
    assert report.pairs == pairs, report
    assert report.folded == folded, report
    assert not report.missed, report


@pytest.mark.parametrize("rank", [1, 2, 3])
@pytest.mark.parametrize("transposed", [False, True], ids=["conv", "transposed"])
@pytest.mark.parametrize("hyper", list(HYPER))
@pytest.mark.parametrize(
    ("bias", "affine"), [(False, True), (True, False)], ids=["nobias-affine", "bias-noaffine"]
)
def test_folds_every_conv_kind(rank, transposed, hyper, bias, affine):
    model = conv_bn(rank, transposed, bias, affine, hyper=hyper)
    assert_folds(fold_and_verify(model, _input(rank)), 1)


@pytest.mark.parametrize("rank", [1, 2, 3])
@pytest.mark.parametrize("transposed", [False, True], ids=["conv", "transposed"])
@pytest.mark.parametrize("policy", ["auto", "always"])
def test_folds_every_conv_kind_once_under_freezing(rank, transposed, policy):
    # Freezing makes the folded weights constants; both policies fold every pair then.
    model = conv_bn(rank, transposed, bias=False, hyper="dilated-grouped")
    report = inductor_convbn.verify(model, _input(rank), policy=policy, freezing=True)
    assert_folds(report, 1)
    assert report.pair_reports[0].reason == _pairs.FOLDED_ONCE


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_folds_half_precision_under_freezing(device, dtype):
    model = conv_bn(2).to(device, dtype)
    report = inductor_convbn.verify(model, _input(2).to(device, dtype), freezing=True)
    assert_folds(report, 1)
    assert report.pair_reports[0].reason == _pairs.FOLDED_ONCE


@pytest.mark.parametrize("eps", [1e-3, 1e-5, 0.1])
def test_folds_any_eps_and_momentum(eps):
    model = conv_bn(2, eps=eps)
    model[1].momentum = None
    assert_folds(fold_and_verify(model, _input(2)), 1)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("affine", [False, True])
def test_folds_linear_then_batchnorm1d(bias, affine):
    torch.manual_seed(0)
    model = randomize_batch_norm(
        nn.Sequential(nn.Linear(5, 6, bias=bias), nn.BatchNorm1d(6, affine=affine))
    ).eval()
    assert_folds(fold_and_verify(model, torch.randn(3, 5)), 1)


def test_skips_linear_whose_output_features_are_not_bn_channels():
    # Linear acts on the last dim of (N, C, L); BatchNorm1d(C) normalises dim 1.
    torch.manual_seed(0)
    model = randomize_batch_norm(nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(4))).eval()
    report = fold_and_verify(model, torch.randn(3, 4, 5))
    assert report.outputs_match and report.pairs == 1 and report.folded == 0, report
    assert report.skipped == [
        ("0", "linear output is not 2-D: BN normalises dim 1, not the output features")
    ]


def test_folds_functional_batch_norm():
    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 6, 3, padding=1)
            self.register_buffer("mean", torch.linspace(-0.5, 0.5, 6))
            self.register_buffer("var", torch.linspace(0.5, 2.0, 6))

        def forward(self, x):
            return F.batch_norm(self.conv(x), self.mean, self.var, eps=1e-3)

    assert_folds(fold_and_verify(Functional().eval(), _input(2)), 1)


def test_folds_sync_batch_norm_in_eval():
    model = conv_bn(2, bn_cls=nn.SyncBatchNorm)
    assert_folds(fold_and_verify(model, _input(2)), 1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rank", [1, 2])
def test_folds_half_precision(device, dtype, rank):
    model = conv_bn(rank).to(device, dtype)
    report = fold_and_verify(model, _input(rank).to(device, dtype))
    if dtype == torch.bfloat16:
        assert_folds(report, 1)
    else:
        # Folded per call, a float16 weight could overflow; test_numerics.py shows one.
        assert_folds(report, 1, folded=0)
        assert report.skipped == [("0", _pairs.FLOAT16_PER_CALL)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    ("dtype", "freezing"), [(torch.bfloat16, False), (torch.float16, True)], ids=["bf16", "fp16"]
)
def test_folds_half_conv_with_float32_batch_norm(device, dtype, freezing):
    model = conv_bn(2).to(device)
    model[0].to(dtype)
    x = _input(2).to(device, dtype)
    assert_folds(fold_and_verify(model, x, freezing=freezing), 1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    ("rank", "memory_format"), [(2, torch.channels_last), (3, torch.channels_last_3d)]
)
def test_folds_channels_last(device, rank, memory_format):
    model = conv_bn(rank).to(device, memory_format=memory_format)
    x = _input(rank).to(device, memory_format=memory_format)
    assert_folds(fold_and_verify(model, x), 1)


def test_folds_with_dynamic_batch_size():
    model = conv_bn(2)
    with inductor_convbn.installed("always"), torch.no_grad():
        compiled = torch.compile(model, dynamic=True)
        for batch in (2, 5):
            x = _input(2, batch=batch)
            torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-4)
    assert _compat.counters["inductor"][_decide.COUNTER_FOLDED] == 1
    assert _compat.counters["stats"]["unique_graphs"] == 1


def test_compiled_model_follows_parameter_updates():
    # Without freezing the fold is computed from the live parameters on every call.
    model = conv_bn(2)
    x = _input(2)
    with inductor_convbn.installed("always"), torch.no_grad():
        compiled = torch.compile(model)
        compiled(x)
        model[1].running_var.mul_(4.0)
        model[1].weight.add_(1.0)
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-4)
    assert _compat.counters["inductor"][_decide.COUNTER_FOLDED] == 1


class TwoUsers(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y


def test_skips_conv_output_with_other_users():
    report = fold_and_verify(randomize_batch_norm(TwoUsers()).eval(), _input(2))
    assert report.outputs_match and report.pairs == 1 and report.folded == 0
    assert report.skipped == [("conv", "conv output has other users")]


def test_skips_training_mode_batch_norm():
    model = conv_bn(2)
    model[1].train()
    report = fold_and_verify(model, _input(2))
    assert report.outputs_match and report.pairs == 1 and report.folded == 0
    assert report.skipped == [("0", "BN is in training mode")]


def test_skips_batch_norm_without_running_stats():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 6, 3), nn.BatchNorm2d(6, track_running_stats=False)).eval()
    report = fold_and_verify(model, _input(2))
    assert report.outputs_match and report.pairs == 1 and report.folded == 0
    assert report.skipped == [("0", "BN has no running statistics (track_running_stats=False)")]


def test_mixed_model_folds_only_the_eligible_pairs():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(4, 6, 3, padding=1), nn.BatchNorm2d(6),
        nn.Conv2d(6, 6, 3, groups=3), nn.BatchNorm2d(6, track_running_stats=False),
        nn.ConvTranspose2d(6, 4, 2, stride=2), nn.BatchNorm2d(4, eps=1e-3),
    )  # fmt: skip
    report = fold_and_verify(randomize_batch_norm(model).eval(), _input(2))
    assert_folds(report, pairs=3, folded=2)
    assert [p.status for p in report.pair_reports] == ["folded", "skipped", "folded"]


def test_report_names_pairs_and_renders():
    # Without the FX graph cache: an earlier test's compile of this graph would be reused,
    # and the report would then name the fold "from the FX graph cache".
    with _compat.inductor_config.patch(fx_graph_cache=False):
        report = fold_and_verify(conv_bn(2), _input(2))
    assert [(p.conv, p.bn, p.kind, p.status, p.reason) for p in report.pair_reports] == [
        ("0", "1", "conv2d", "folded", _pairs.FOLDED_PER_CALL)
    ]
    text = str(report)
    assert "folded 1 of 1 conv->bn pairs" in text and "conv2d" in text


def test_graph_that_needs_gradients_is_folded_differentiably():
    # Without no_grad the grad stage folds before autograd; gradients match eager's.
    model = conv_bn(2)
    reference = copy.deepcopy(model)
    x = _input(2)
    with inductor_convbn.installed("always"):
        out = torch.compile(model)(x)
    torch.testing.assert_close(out, reference(x), rtol=1e-4, atol=1e-4)
    out.sum().backward()
    reference(x).sum().backward()
    for p, p_ref in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-4, atol=1e-4)
    assert _compat.counters["inductor"][_decide.COUNTER_FOLDED] == 1


def test_nothing_folded_without_install():
    model = conv_bn(2)
    with torch.no_grad():
        torch.compile(model)(_input(2))
    assert _compat.counters["inductor"][_decide.COUNTER_FOLDED] == 0


def test_verify_leaves_model_and_config_untouched():
    model = conv_bn(2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    inductor_convbn.verify(model, _input(2), freezing=False)
    assert not inductor_convbn.is_installed()
    assert _compat.inductor_config.post_grad_custom_post_pass is None
    assert _compat.inductor_config.joint_custom_post_pass is None
    assert _compat.inductor_config.pre_grad_custom_pass is None
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_verify_rejects_bad_input():
    with pytest.raises(TypeError, match="nn.Module"):
        inductor_convbn.verify(lambda x: x, torch.randn(1))
    with pytest.raises(TypeError, match="example input"):
        inductor_convbn.verify(conv_bn(2))
    with pytest.raises(ValueError, match="policy must be one of"):
        inductor_convbn.verify(conv_bn(2), _input(2), policy="sometimes")


@pytest.fixture
def pre_214_pointless_convert(monkeypatch):
    """Inductor's joint-graph ``pointless_convert`` as torch releases before 2.14 have it:
    ``convert(convert(x, bf16), float32)`` becomes ``convert(x, float32)`` with no check that
    the intermediate is narrower, which removes a half-precision BN's final downcast before
    an op that computes in float32 (SiLU, Hardswish)."""
    from torch._inductor.fx_passes import joint_graph

    def old_pointless_convert(match, arg, dtype1, dtype2):
        graph = match.graph
        node = match.output_node()
        allowed = torch.float16, torch.bfloat16, torch.float32, torch.float64
        if dtype1 in allowed and dtype2 in allowed:
            repl = graph.call_function(torch.ops.prims.convert_element_type.default, (arg, dtype2))
            repl.meta.update(node.meta)
            node.replace_all_uses_with(repl)
            match.erase_nodes()

    entries = [
        e
        for es in joint_graph.patterns.patterns.values()
        for e in es
        if getattr(getattr(e, "handler", None), "__name__", "") == "pointless_convert"
    ]
    assert entries, "torch has no pointless_convert pattern to patch"
    for e in entries:
        monkeypatch.setattr(e, "handler", old_pointless_convert)


@pytest.mark.parametrize("activation", [nn.Hardswish, nn.SiLU])
@pytest.mark.parametrize(
    "dtype,freezing",
    [(torch.bfloat16, True), (torch.bfloat16, False), (torch.float16, True)],
)
def test_half_precision_bn_before_a_float32_activation_folds(
    pre_214_pointless_convert, activation, dtype, freezing
):
    """torch 2.11 on an H200: mobilenet_v3_large in bf16 folded 26 of 46 pairs, the misses
    being the BNs before Hardswish or SiLU, whose final downcast Inductor had removed."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), activation())
    model = randomize_batch_norm(model).eval().to(dtype, memory_format=torch.channels_last)
    x = torch.randn(2, 16, 8, 8, dtype=dtype).to(memory_format=torch.channels_last)
    report = inductor_convbn.verify(model, x, freezing=freezing, policy="always")
    assert report.outputs_match, report
    assert report.folded == report.pairs == 1, report


@pytest.mark.parametrize(
    "case", ["weight_norm", "weight_norm-transposed", "spectral_norm", "autocast-bfloat16"]
)
def test_a_weight_computed_in_forward_is_folded_once_under_freezing(case):
    """weight_norm and other parametrizations, and CPU autocast, compute the conv weight in
    forward from frozen parameters: freezing makes it a constant, and so the whole fold."""
    from torch.nn.utils import parametrizations

    torch.manual_seed(0)
    conv = nn.ConvTranspose2d(3, 4, 3) if "transposed" in case else nn.Conv2d(3, 4, 3)
    if case != "autocast-bfloat16":
        conv = getattr(parametrizations, case.split("-")[0])(conv)
    model = randomize_batch_norm(nn.Sequential(conv, nn.BatchNorm2d(4), nn.ReLU())).eval()
    x = torch.randn(2, 3, 8, 8)
    autocast = torch.autocast("cpu", torch.bfloat16, enabled=case == "autocast-bfloat16")
    with autocast:
        report = inductor_convbn.verify(model, x, freezing=True)
    assert report.folded == report.pairs == 1 and report.outputs_match, report
    assert report.pair_reports[0].reason == _pairs.FOLDED_ONCE


class _UnfuseAddmm(_compat.CustomGraphPass):
    """``addmm(bias, a, b)`` as ``mm(a, b) + bias``: what Inductor's post-grad passes do on
    CUDA when pointwise ops follow (``should_prefer_unfused_addmm``)."""

    def __call__(self, graph):
        aten = torch.ops.aten
        for node in list(graph.find_nodes(op="call_function", target=aten.addmm.default)):
            bias, a, b = node.args
            with graph.inserting_before(node):
                mm = graph.call_function(aten.mm.default, (a, b))
                add = graph.call_function(aten.add.Tensor, (mm, bias))
            mm.meta, add.meta = dict(node.meta), dict(node.meta)
            node.replace_all_uses_with(add)
            graph.erase_node(node)

    def uuid(self):
        return b"unfuse-addmm"


@pytest.mark.parametrize("batch", [1, 2])
def test_a_pair_is_folded_before_inductors_post_grad_passes_rewrite_it(batch):
    """On CUDA, Linear -> BatchNorm1d was never folded per call: Inductor's post-grad passes
    unfuse the linear's addmm before the per-call stage runs. The early stage folds first.
    Simulated on CPU by a pass that unfuses it the same way before the per-call stage."""
    torch.manual_seed(0)
    model = randomize_batch_norm(nn.Sequential(nn.Linear(64, 10), nn.BatchNorm1d(10))).eval()
    _compat.inductor_config.post_grad_custom_post_pass = _UnfuseAddmm()
    report = inductor_convbn.verify(model, torch.randn(batch, 64), policy="always", freezing=False)
    assert report.folded == report.pairs == 1 and report.outputs_match, report


@pytest.mark.gpu
@pytest.mark.parametrize("batch", [1, 2])
def test_linear_then_batchnorm1d_folds_per_call_on_cuda(batch):
    """The unfused addmm on a real GPU. Shape padding off: where Inductor's pad_mm pads the
    matmul (it decides by timing both), the padded form is not matched yet (an open gap)."""
    torch.manual_seed(0)
    model = randomize_batch_norm(nn.Sequential(nn.Linear(64, 10), nn.BatchNorm1d(10)))
    model = model.cuda().eval()
    x = torch.randn(batch, 64).cuda()
    with _compat.inductor_config.patch(shape_padding=False):
        report = inductor_convbn.verify(model, x, policy="always", freezing=False)
    assert report.folded == report.pairs == 1 and report.outputs_match, report
