"""The training-side fused conv + BatchNorm and ``memory_efficient()``.

Every check runs the fused model against the plain conv + BN pair it replaces.
"""

import collections
import copy
import io
import pickle

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import inductor_convbn
from inductor_convbn import _pairs, fx, training
from inductor_convbn.testing import randomize_batch_norm

CONVS = {
    1: (nn.Conv1d, nn.BatchNorm1d),
    2: (nn.Conv2d, nn.BatchNorm2d),
    3: (nn.Conv3d, nn.BatchNorm3d),
}
SPATIAL = {1: (11,), 2: (9, 7), 3: (5, 6, 4)}


def _pair_model(rank=2, dtype=torch.float64, seed=0, conv_kwargs=None, bn_kwargs=None):
    """conv -> BN -> ReLU -> conv -> BN, with random BN state."""
    conv, bn = CONVS[rank]
    torch.manual_seed(seed)
    conv_kwargs = {"padding": 1, **(conv_kwargs or {})}
    model = nn.Sequential(
        conv(4, 6, 3, **conv_kwargs),
        bn(6, **(bn_kwargs or {})),
        nn.ReLU(),
        conv(6, 4, 1, bias=False),
        bn(4),
    ).to(dtype)
    return randomize_batch_norm(model, seed)


def _input(rank=2, dtype=torch.float64, batch=3, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 4, *SPATIAL[rank], generator=generator, dtype=dtype)


def _grads(model, x):
    x = x.detach().requires_grad_()
    out = model(x)
    weights = torch.linspace(-1, 1, out.numel(), dtype=out.dtype, device=out.device)
    loss = (out * weights.view_as(out)).sum()
    params = [p for p in model.parameters() if p.requires_grad]
    return out, torch.autograd.grad(loss, [x, *params])


def _assert_same_training(reference, fused, x, steps=3, **tolerance):
    """Outputs, gradients, parameters and running statistics agree over a few SGD steps."""
    opt_ref = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
    opt_fused = torch.optim.SGD(fused.parameters(), lr=0.1, momentum=0.9)
    for step in range(steps):
        batch = x + 0.1 * step
        for model, opt in ((reference, opt_ref), (fused, opt_fused)):
            opt.zero_grad()
            out = model(batch)
            (out * out.detach().sign()).mean().backward()
            opt.step()
        torch.testing.assert_close(fused(batch), reference(batch), **tolerance)
        torch.testing.assert_close(fused.state_dict(), reference.state_dict(), **tolerance)


# -- the autograd function ------------------------------------------------------------------


@pytest.mark.parametrize(
    "rank,stride,padding,dilation,groups,bias,affine",
    [
        (2, 1, 1, 1, 1, True, True),
        (2, 2, 0, 1, 2, False, True),
        (2, 1, 2, 2, 1, True, False),
        (1, 2, 1, 1, 1, False, True),
        (3, 1, 1, 1, 2, True, True),
    ],
)
def test_gradcheck(rank, stride, padding, dilation, groups, bias, affine):
    generator = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64, requires_grad=True)

    spatial = (5,) * rank
    x, weight = randn(3, 4, *spatial), randn(6, 4 // groups, *(3,) * rank)
    conv_bias = randn(6) if bias else None
    gamma, beta = (randn(6), randn(6)) if affine else (None, None)
    hyper = ([stride] * rank, [padding] * rank, [dilation] * rank, groups)

    def fn(x, weight, conv_bias, gamma, beta):
        stats = (None, None, 0.0)  # no running statistics
        apply = training._ConvBatchNormTrain.apply
        return apply(x, weight, conv_bias, gamma, beta, *stats, 1e-5, *hyper)[0]

    assert torch.autograd.gradcheck(fn, (x, weight, conv_bias, gamma, beta))


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_saves_one_activation_less_per_pair(compiled):
    """Activation bytes saved for backward drop by the conv output's size, for each pair."""
    reference = _pair_model(dtype=torch.float32)
    fused = inductor_convbn.memory_efficient(reference)
    x = _input(dtype=torch.float32, batch=8).requires_grad_()

    def saved(model):
        fn = torch.compile(model) if compiled else model
        storages = {}

        own = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}

        def pack(t):
            # activations only: not the model's tensors, not the per-channel statistics
            if t.dim() > 1 and t.untyped_storage().data_ptr() not in own:
                storages[t.untyped_storage().data_ptr()] = (tuple(t.shape), t.untyped_storage())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn(x)
        found[model] = [shape for shape, _ in storages.values()]
        return sum(storage.nbytes() for _, storage in storages.values())

    found = {}

    conv_outputs = []
    hooks = [
        m.register_forward_hook(
            lambda m, a, out: conv_outputs.append(out.untyped_storage().nbytes())
        )
        for m in reference
        if isinstance(m, nn.Conv2d)
    ]
    saved_reference = saved(reference)
    for h in hooks:
        h.remove()
    assert len(conv_outputs) == inductor_convbn.memory_efficient_report(fused).fused == 2
    if compiled:
        # What a compiled graph saves is the partitioner's choice. Torch 2.14 saves one
        # activation less per pair; torch 2.11 here keeps an activation-sized tensor for the
        # ReLU after the first pair (and the saving is the second pair's alone). So: less,
        # and the benchmark (bench/test_training.py) measures ResNet18.
        assert saved(fused) < saved_reference, found
    else:
        assert saved_reference - saved(fused) == sum(conv_outputs), found


# -- the module -------------------------------------------------------------------------------


@pytest.mark.parametrize("rank", [1, 2, 3])
@pytest.mark.parametrize(
    "conv_kwargs,bn_kwargs",
    [
        ({}, {}),
        ({"stride": 2, "groups": 2, "bias": False}, {"momentum": None}),
        ({"dilation": 2, "padding": 2}, {"affine": False, "eps": 1e-3}),
        ({"padding_mode": "reflect"}, {"momentum": 0.3}),
        ({"padding": "same"}, {"track_running_stats": False}),
    ],
)
def test_trains_like_the_pair(rank, conv_kwargs, bn_kwargs):
    reference = _pair_model(rank, conv_kwargs=conv_kwargs, bn_kwargs=bn_kwargs)
    fused = inductor_convbn.memory_efficient(reference)
    assert inductor_convbn.memory_efficient_report(fused).fused == 2
    _assert_same_training(reference, fused, _input(rank))
    # and in eval mode, where the BN is folded into the conv weight
    reference.eval(), fused.eval()
    out_ref, grads_ref = _grads(reference, _input(rank))
    out_fused, grads_fused = _grads(fused, _input(rank))
    torch.testing.assert_close(out_fused, out_ref)
    for g_fused, g_ref in zip(grads_fused, grads_ref, strict=True):
        torch.testing.assert_close(g_fused, g_ref)


def test_frozen_bn_fine_tuning():
    """BN layers in eval mode inside a training model: running stats stay, grads flow."""
    reference = _pair_model()
    fused = inductor_convbn.memory_efficient(reference)
    for model in (reference, fused):
        model.train()
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.eval()
    stats = copy.deepcopy({k: v for k, v in reference.state_dict().items() if "running" in k})
    # converting a model whose BN layers are already frozen keeps them frozen
    converted = inductor_convbn.memory_efficient(reference)
    assert [m.training for m in converted.modules() if isinstance(m, nn.BatchNorm2d)] == [
        False,
        False,
    ]
    assert converted[0].training
    _assert_same_training(reference, fused, _input())
    after = {k: v for k, v in fused.state_dict().items() if "running" in k}
    torch.testing.assert_close(after, stats)  # eval BNs do not update their statistics


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_float_dtypes(dtype):
    reference = _pair_model(dtype=dtype)
    fused = inductor_convbn.memory_efficient(reference)
    tolerance = (
        {"rtol": 1e-4, "atol": 1e-4} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    )
    _assert_same_training(reference, fused, _input(dtype=dtype), steps=2, **tolerance)


class _AtenOps(torch.utils._python_dispatch.TorchDispatchMode):
    """The aten ops dispatched inside it, counted (allocations and views left out)."""

    NOT_KERNELS = ("aten.empty", "aten.new_empty", "aten.detach", "aten.expand")

    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not str(func).startswith(self.NOT_KERNELS):
            self.ops[str(func).rsplit(".", 1)[0]] += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("momentum", [0.1, None])
def test_an_eager_step_runs_the_pairs_ops_and_one_conv_more(momentum):
    # Eager training steps of small convs are bound by the CPU: each op more is a kernel
    # launch more. The fused layer runs the pair's ops and the recomputed conv; with a
    # cumulative average (momentum=None) the running statistics take a few ops more.
    def step(model, x):
        x = x.detach().requires_grad_()
        with _AtenOps() as counter:
            model(x).sum().backward()
        return counter.ops

    plain = _pair_model(dtype=torch.float32, bn_kwargs={"momentum": momentum})[:2]
    fused = training.FusedConvBatchNorm2d.from_modules(*copy.deepcopy(plain))
    x = _input(dtype=torch.float32)
    plain_ops, fused_ops = step(plain, x), step(fused, x)
    assert fused_ops["aten.convolution"] == plain_ops["aten.convolution"] + 1
    if momentum is not None:
        assert fused_ops - plain_ops == {"aten.convolution": 1}
        assert plain_ops - fused_ops == {}


def test_autocast_matches_the_pair():
    reference = _pair_model(dtype=torch.float32)
    fused = inductor_convbn.memory_efficient(reference)
    x = _input(dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_ref, grads_ref = _grads(reference, x)
        out_fused, grads_fused = _grads(fused, x)
    assert out_fused.dtype == out_ref.dtype
    torch.testing.assert_close(out_fused, out_ref, rtol=2e-2, atol=2e-2)
    for g_fused, g_ref in zip(grads_fused, grads_ref, strict=True):
        assert g_fused.dtype == g_ref.dtype
        torch.testing.assert_close(g_fused, g_ref, rtol=5e-2, atol=5e-2)
    torch.testing.assert_close(fused.state_dict(), reference.state_dict(), rtol=1e-2, atol=1e-2)


def test_compiles_without_graph_breaks():
    reference = _pair_model(dtype=torch.float32, bn_kwargs={"momentum": None})
    fused = inductor_convbn.memory_efficient(reference)
    compiled = torch.compile(fused, fullgraph=True)
    x = _input(dtype=torch.float32)
    for step in range(2):
        out_ref, grads_ref = _grads(reference, x + step)
        out_fused, grads_fused = _grads(compiled, x + step)
        torch.testing.assert_close(out_fused, out_ref, rtol=1e-4, atol=1e-4)
        for g_fused, g_ref in zip(grads_fused, grads_ref, strict=True):
            torch.testing.assert_close(g_fused, g_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(fused.state_dict(), reference.state_dict())


def test_one_value_per_channel_is_an_error_in_training():
    fused = inductor_convbn.FusedConvBatchNorm2d(4, 6, 3)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        fused(torch.randn(1, 4, 3, 3))
    fused.eval()
    assert fused(torch.randn(1, 4, 3, 3)).shape == (1, 6, 1, 1)


def test_constructor_takes_the_pair_arguments():
    fused = inductor_convbn.FusedConvBatchNorm2d(
        4, 6, 3, stride=2, padding=1, groups=2, bias=False, eps=1e-3, momentum=None, affine=False
    )
    assert (fused.conv.stride, fused.conv.groups, fused.conv.bias) == ((2, 2), 2, None)
    assert (fused.bn.eps, fused.bn.momentum, fused.bn.weight) == (1e-3, None, None)
    reference = nn.Sequential(copy.deepcopy(fused.conv), copy.deepcopy(fused.bn))
    x = torch.randn(3, 4, 8, 8)
    torch.testing.assert_close(fused(x), reference(x))


def test_even_kernel_same_padding_is_refused():
    with pytest.raises(ValueError, match="even kernel"):
        inductor_convbn.FusedConvBatchNorm2d(4, 6, 2, padding="same")


def test_from_modules_and_to_modules():
    conv, bn = nn.Conv2d(4, 6, 3), nn.BatchNorm2d(6)
    fused = inductor_convbn.FusedConvBatchNorm2d.from_modules(conv, bn)
    assert fused.to_modules() == (conv, bn)
    assert fused.conv.weight is conv.weight  # shared, not copied
    pair = nn.Sequential()
    pair.add_module("conv", nn.Conv2d(4, 6, 3))
    pair.add_module("bn", randomize_batch_norm(nn.BatchNorm2d(6)))
    fused.load_state_dict(pair.state_dict())  # a checkpoint of the pair loads into it
    torch.testing.assert_close(fused.state_dict(), pair.state_dict())
    with pytest.raises(TypeError, match="takes an Conv2d and a BatchNorm2d"):
        inductor_convbn.FusedConvBatchNorm2d.from_modules(nn.Conv1d(4, 6, 3), bn)
    with pytest.raises(ValueError, match="the BN has 5 features"):
        inductor_convbn.FusedConvBatchNorm2d.from_modules(conv, nn.BatchNorm2d(5))


# -- memory_efficient() ---------------------------------------------------------------------


def test_state_dict_keeps_the_original_keys():
    torchvision = pytest.importorskip("torchvision")
    plain = randomize_batch_norm(torchvision.models.resnet18())
    converted = inductor_convbn.memory_efficient(plain)
    torch.testing.assert_close(converted.state_dict(), plain.state_dict())
    assert list(converted.state_dict()) == list(plain.state_dict())
    # checkpoints move both ways
    other = randomize_batch_norm(torchvision.models.resnet18(), seed=3)
    converted.load_state_dict(other.state_dict())
    torch.testing.assert_close(converted.state_dict(), other.state_dict())
    plain.load_state_dict(converted.state_dict())
    torch.testing.assert_close(plain.state_dict(), other.state_dict())
    # the whole converted model pickles, and a deep copy keeps the keys
    buffer = io.BytesIO()
    torch.save(converted, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert list(loaded.state_dict()) == list(plain.state_dict())
    assert list(copy.deepcopy(converted).state_dict()) == list(plain.state_dict())
    assert pickle.loads(pickle.dumps(inductor_convbn.memory_efficient_report(converted)))


def test_resnet18_every_pair_and_same_training():
    torchvision = pytest.importorskip("torchvision")
    plain = randomize_batch_norm(torchvision.models.resnet18(num_classes=10)).double()
    converted = inductor_convbn.memory_efficient(plain)
    report = inductor_convbn.memory_efficient_report(converted)
    # every BatchNorm2d of ResNet18 follows a conv
    assert (
        report.fused == report.pairs == sum(isinstance(m, nn.BatchNorm2d) for m in plain.modules())
    )
    assert type(converted) is type(plain)
    assert not any(isinstance(m, training._FusedConvBatchNormNd) for m in plain.modules())
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    _assert_same_training(plain, converted, x, steps=2)


class _Hazards(nn.Module):
    def __init__(self):
        super().__init__()
        self.reused = nn.Conv2d(4, 4, 3, padding=1)
        self.bn_a, self.bn_b = nn.BatchNorm2d(4), nn.BatchNorm2d(4)
        self.two_users = nn.Conv2d(4, 4, 1)
        self.bn_c = nn.BatchNorm2d(4)
        self.shared_bn_conv1, self.shared_bn_conv2 = nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 1)
        self.shared_bn = nn.BatchNorm2d(4)
        self.hooked = nn.Conv2d(4, 4, 1)
        self.bn_d = nn.BatchNorm2d(4)
        self.hooked.register_forward_hook(lambda m, a, out: out)
        self.deconv = nn.ConvTranspose2d(4, 4, 1)
        self.bn_e = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 4)
        self.bn1d = nn.BatchNorm1d(4)
        self.functional_conv = nn.Conv2d(4, 4, 1)
        self.good = nn.Conv2d(4, 4, 1)
        self.bn_good = nn.BatchNorm2d(4)
        self.fine = nn.Conv2d(4, 4, 1)
        self.bn_fine = nn.BatchNorm2d(4)

    def forward(self, x):
        x = self.bn_a(self.reused(x)) + self.bn_b(self.reused(x))
        y = self.two_users(x)
        x = self.bn_c(y) + y
        x = self.shared_bn(self.shared_bn_conv1(x)) + self.shared_bn(self.shared_bn_conv2(x))
        x = self.bn_d(self.hooked(x))
        x = self.bn_e(self.deconv(x))
        x = nn.functional.batch_norm(
            self.functional_conv(x), self.bn_good.running_mean, self.bn_good.running_var
        )
        x = self.bn_good(self.good(x))
        x = self.bn_fine(self.fine(x))
        return x + self.bn1d(self.fc(x.mean((2, 3)))).unsqueeze(-1).unsqueeze(-1)


def test_hazards_are_skipped_with_reasons():
    model = randomize_batch_norm(_Hazards())
    converted = inductor_convbn.memory_efficient(model)
    reasons = dict(inductor_convbn.memory_efficient_report(converted).skipped)
    assert reasons == {
        "reused": _pairs.CONV_REUSED,
        "two_users": _pairs.OTHER_USERS,
        "shared_bn_conv1": _pairs.BN_REUSED,
        "shared_bn_conv2": _pairs.BN_REUSED,
        "hooked": _pairs.HAS_HOOKS,
        "deconv": _pairs.NOT_A_CONV,
        "functional_conv": _pairs.FUNCTIONAL_BN,
        "good": _pairs.TENSORS_READ,
        "fc": _pairs.NOT_A_CONV,
    }
    assert [
        p.conv
        for p in inductor_convbn.memory_efficient_report(converted).pair_reports
        if p.status == "fused"
    ] == ["fine"]
    x = torch.randn(3, 4, 5, 5)
    _assert_same_training(model, converted, x, steps=2, rtol=1e-4, atol=1e-4)


def test_sync_batch_norm_is_fused_a_bn_of_another_rank_is_not():
    # SyncBatchNorm in a process group: tests/test_distributed.py
    model = nn.Sequential(nn.Conv2d(4, 4, 1), nn.SyncBatchNorm(4), nn.Conv1d(4, 4, 1))
    model[2] = nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm3d(4))  # BN of the wrong rank
    converted = inductor_convbn.memory_efficient(model)
    report = inductor_convbn.memory_efficient_report(converted)
    assert report.skipped == [("2.0", _pairs.BN_TYPE)]
    assert isinstance(converted[0], inductor_convbn.FusedConvBatchNorm2d)
    assert isinstance(converted[0].bn, nn.SyncBatchNorm)


def test_input_model_is_left_alone_unless_inplace():
    model = _pair_model()
    before = copy.deepcopy(model.state_dict())
    converted = inductor_convbn.memory_efficient(model)
    assert converted is not model and isinstance(model[0], nn.Conv2d)
    torch.testing.assert_close(model.state_dict(), before)
    same = inductor_convbn.memory_efficient(model, inplace=True)
    assert same is model and isinstance(model[0], inductor_convbn.FusedConvBatchNorm2d)
    # converting again finds no pairs left, and keeps the keys
    again = inductor_convbn.memory_efficient(same)
    assert inductor_convbn.memory_efficient_report(again).pairs == 0
    assert list(again.state_dict()) == list(before)


def test_bad_input():
    with pytest.raises(TypeError, match="takes an nn.Module"):
        inductor_convbn.memory_efficient("resnet18")
    with pytest.raises(ValueError, match="not converted by"):
        inductor_convbn.memory_efficient_report(nn.Conv2d(1, 1, 1))

    class Untraceable(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(1, 1, 1), nn.BatchNorm2d(1)

        def forward(self, x):
            return self.bn(self.conv(x)) if x.sum() > 0 else x

    with pytest.raises(fx.FuseError, match="memory_efficient\\(\\) changed nothing"):
        inductor_convbn.memory_efficient(Untraceable())


def _relative_errors(results, gold):
    """The largest difference of each tensor from its float64 value, over gold's largest."""
    errors = []
    for r, g in zip(results, gold, strict=True):
        r, g = r.detach().double(), g.detach()
        errors.append(float((r - g).abs().max()) / max(1.0, float(g.abs().max())))
    return errors


@pytest.mark.gpu
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_cuda(compiled):
    reference = _pair_model(dtype=torch.float32).cuda()
    fused = inductor_convbn.memory_efficient(reference)
    x = _input(dtype=torch.float32, batch=8).cuda()
    run = torch.compile(fused) if compiled else fused
    out_ref, grads_ref = _grads(reference, x)
    out_fused, grads_fused = _grads(run, x)
    tolerance = {"rtol": 1e-4, "atol": 1e-4}
    torch.testing.assert_close(out_fused, out_ref, **tolerance)
    for g_fused, g_ref in zip(grads_fused, grads_ref, strict=True):
        torch.testing.assert_close(g_fused, g_ref, **tolerance)
    torch.testing.assert_close(fused.state_dict(), reference.state_dict(), **tolerance)


@pytest.mark.gpu
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_cuda_bfloat16_autocast_is_as_accurate_as_unfused(compiled):
    # Under bf16 autocast both the unfused pair and the fused layer round (and compile
    # rounds in other places than eager), and a training BN's input gradient cancels
    # terms: each is compared with the float64 result, and the fused one may be off by no
    # more than twice the unfused one, or 2% of the largest element.
    reference = _pair_model(dtype=torch.float32).cuda()
    fused = inductor_convbn.memory_efficient(reference)
    gold_model = copy.deepcopy(reference).double()
    x = _input(dtype=torch.float32, batch=8).cuda()
    out_gold, grads_gold = _grads(gold_model, x.double())
    run = torch.compile(fused) if compiled else fused
    with torch.autocast("cuda", torch.bfloat16):
        out_ref, grads_ref = _grads(reference, x)
        out_fused, grads_fused = _grads(run, x)
    gold = [out_gold, *grads_gold]
    errors_ref = _relative_errors([out_ref, *grads_ref], gold)
    errors_fused = _relative_errors([out_fused, *grads_fused], gold)
    for err_fused, err_ref in zip(errors_fused, errors_ref, strict=True):
        assert err_fused <= max(2 * err_ref, 2e-2), (errors_fused, errors_ref)
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(fused.state_dict()[key], value, rtol=2e-2, atol=2e-2)


def _ladder():
    """Pairs of very different bytes per FLOP: a stem, a 3x3 conv, a widening 1x1 conv, a
    3x3 conv on the wide output."""
    torch.manual_seed(0)
    layers = []
    for c_in, c_out, k in ((3, 8, 3), (8, 8, 3), (8, 32, 1), (32, 32, 3)):
        layers += [nn.Conv2d(c_in, c_out, k, padding=k // 2, bias=False), nn.BatchNorm2d(c_out)]
        layers.append(nn.ReLU())
    head = (nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 5))
    return randomize_batch_norm(nn.Sequential(*layers, *head))


def _ladder_input():
    return torch.randn(4, 3, 12, 12, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("max_overhead", [0.0, 0.02, 0.1, 0.3, 1.0])
def test_max_overhead_fuses_the_most_bytes_per_flop_within_it(max_overhead):
    model, x = _ladder(), _ladder_input()
    report = inductor_convbn.memory_efficient_report(
        inductor_convbn.memory_efficient(model, x, max_overhead=max_overhead)
    )
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    assert report.step_flops == 3 * counter.get_total_flops()
    assert report.estimated_overhead <= max_overhead
    rows = {p.conv: p for p in report.pair_reports}
    fused = [report.costs[c] for c, p in rows.items() if p.status == _pairs.FUSED]
    kept = [report.costs[c] for c, p in rows.items() if p.status == _pairs.KEPT]
    assert len(fused) + len(kept) == 4
    assert all(rows[c].reason == _pairs.OVER_BUDGET for c in rows if rows[c].status == "kept")
    spent = sum(c.recompute_flops for c in fused)
    for cost in kept:  # none of them would still fit
        assert (spent + cost.recompute_flops) / report.step_flops > max_overhead
    if max_overhead >= 1.0:
        assert not kept
    if max_overhead == 0.0:
        assert not fused


def test_the_budget_chooses_the_widening_1x1_conv_first():
    model, x = _ladder(), _ladder_input()
    everything = inductor_convbn.memory_efficient_report(
        inductor_convbn.memory_efficient(model, x, max_overhead=1.0)
    )
    ratios = {conv: c.bytes_per_flop for conv, c in everything.costs.items()}
    assert max(ratios, key=ratios.get) == "6"  # Conv2d(8, 32, 1)
    assert min(ratios, key=ratios.get) == "9"  # Conv2d(32, 32, 3)
    # A budget of exactly that conv's recomputation: it is fused, and nothing else fits.
    budget = everything.costs["6"].recompute_flops / everything.step_flops
    report = inductor_convbn.memory_efficient_report(
        inductor_convbn.memory_efficient(model, x, max_overhead=budget)
    )
    assert [p.conv for p in report.pair_reports if p.status == _pairs.FUSED] == ["6"]


def test_a_budgeted_model_trains_as_the_plain_one():
    model, x = _ladder(), _ladder_input()
    model, x = model.double(), x.double()
    fused = inductor_convbn.memory_efficient(model, x, max_overhead=0.1)
    report = inductor_convbn.memory_efficient_report(fused)
    assert 0 < report.fused < report.pairs
    _assert_same_training(model, fused, x)


def test_the_report_shows_each_pairs_estimate():
    model, x = _ladder(), _ladder_input()
    report = inductor_convbn.memory_efficient_report(
        inductor_convbn.memory_efficient(model, x, max_overhead=0.1)
    )
    text = str(report)
    head, *rows = text.splitlines()
    assert "max_overhead=0.1" in head and "less at the end of forward" in head
    assert f"+{report.estimated_overhead:.1%} step FLOPs" in head
    for conv, cost in report.costs.items():
        row = next(r for r in rows if r.split()[0] == conv)
        assert f"[{cost.saved_bytes / 2**20:.1f} MiB, +" in row
    assert report.estimated_saved_bytes == sum(
        report.costs[p.conv].saved_bytes for p in report.pair_reports if p.status == "fused"
    )


def test_without_a_budget_every_pair_is_fused_and_estimated():
    model, x = _ladder(), _ladder_input()
    report = inductor_convbn.memory_efficient_report(inductor_convbn.memory_efficient(model, x))
    assert report.fused == report.pairs == 4
    assert report.max_overhead is None and report.estimated_overhead > 0
    assert "max_overhead" not in str(report).splitlines()[0]


@pytest.mark.parametrize(
    ("value", "error", "match"),
    [
        (-0.1, ValueError, "0 or more"),
        (float("nan"), ValueError, "0 or more"),
        ("10%", TypeError, "fraction"),
        (True, TypeError, "fraction"),
    ],
)
def test_max_overhead_must_be_a_fraction(value, error, match):
    model, x = _ladder(), _ladder_input()
    with pytest.raises(error, match=match):
        inductor_convbn.memory_efficient(model, x, max_overhead=value)


def test_max_overhead_needs_example_inputs():
    model = _ladder()
    with pytest.raises(ValueError, match="needs example inputs"):
        inductor_convbn.memory_efficient(model, max_overhead=0.1)
