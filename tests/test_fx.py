"""The FX fuser: folds what eager computes the same way, skips the rest with a reason,
and leaves the model it was given alone.

Each case compares the fused GraphModule with the eager model (TF32 off, from conftest).
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import inductor_convbn
from inductor_convbn import _pairs, fx
from inductor_convbn._pairs import BN_TRAINING, LINEAR_NOT_2D, NO_RUNNING_STATS, OTHER_USERS
from inductor_convbn._report import DEFAULT_TOLERANCES
from inductor_convbn.testing import randomize_batch_norm, torchvision_model

CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
TCONV = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
BN_FUNCTIONS = (F.batch_norm, torch.batch_norm)


def conv_bn(rank=2, transposed=False, bias=True, affine=True, eps=1e-5, groups=1, dtype=None):
    torch.manual_seed(0)
    conv_cls = (TCONV if transposed else CONV)[rank]
    extra = dict(output_padding=1) if transposed else {}
    conv = conv_cls(4, 6, 3, stride=2, padding=1, groups=groups, bias=bias, **extra)
    bn = BN[rank](6, affine=affine, eps=eps)
    model = randomize_batch_norm(nn.Sequential(conv, bn, nn.ReLU())).eval()
    return model if dtype is None else model.to(dtype)


def _input(rank=2, batch=2, size=7, channels=4, **kw):
    generator = torch.Generator().manual_seed(1)
    return torch.randn(batch, channels, *[size] * rank, generator=generator, **kw)


def _bn_nodes(gm):
    """Batch norms left in the graph: BN module calls and functional calls."""
    for node in gm.graph.nodes:
        if node.op == "call_module" and isinstance(
            gm.get_submodule(node.target), nn.modules.batchnorm._BatchNorm
        ):
            yield node
        elif node.op == "call_function" and node.target in BN_FUNCTIONS:
            yield node


def _conv_bn_left(gm):
    """BN nodes fed directly by a conv or linear module: pairs left unfolded."""
    layers = (*CONV.values(), *TCONV.values(), nn.Linear)
    left = []
    for node in _bn_nodes(gm):
        source = node.args[0]
        if source.op == "call_module" and type(gm.get_submodule(source.target)) in layers:
            left.append(source.target)
    return left


def assert_matches_eager(fused, model, *inputs, dtype=torch.float32):
    rtol, atol = DEFAULT_TOLERANCES[dtype]
    with torch.no_grad():
        torch.testing.assert_close(fused(*inputs), model(*inputs), rtol=rtol, atol=atol)


@pytest.mark.parametrize("rank", [1, 2, 3])
@pytest.mark.parametrize("transposed", [False, True], ids=["conv", "transposed"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("affine", [False, True], ids=["noaffine", "affine"])
@pytest.mark.parametrize("groups", [1, 2], ids=["g1", "g2"])
def test_folds_every_conv_kind(rank, transposed, bias, affine, groups):
    model = conv_bn(rank, transposed, bias, affine, eps=1e-3, groups=groups)
    fused = fx.fuse(model)
    report = fx.fuse_report(fused)
    assert (report.pairs, report.folded, report.skipped) == (1, 1, [])
    kind = ("conv_transpose" if transposed else "conv") + f"{rank}d"
    assert report.pair_reports[0] == inductor_convbn.PairReport("0", "1", kind, "folded")
    assert not list(_bn_nodes(fused)) and not hasattr(fused, "1")
    assert fused.get_submodule("0").bias is not None
    assert_matches_eager(fused, model, _input(rank))


def test_sync_batch_norm_in_eval_is_folded():
    model = nn.Sequential(nn.Conv2d(4, 6, 3), nn.SyncBatchNorm(6, eps=1e-3))
    model = randomize_batch_norm(model).eval()
    fused = fx.fuse(model)
    assert fx.fuse_report(fused).folded == 1 and not list(_bn_nodes(fused))
    assert_matches_eager(fused, model, _input())


@pytest.mark.parametrize("eps", [1e-5, 0.1])
def test_eps_is_the_bns_own(eps):
    model = conv_bn(eps=eps)
    assert_matches_eager(fx.fuse(model), model, _input())


@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("affine", [False, True], ids=["noaffine", "affine"])
def test_folds_linear_then_batchnorm1d(bias, affine):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6, bias=bias), nn.BatchNorm1d(6, affine=affine))
    model = randomize_batch_norm(model).eval()
    x = torch.randn(3, 5)
    for fused in (fx.fuse(model), fx.fuse(model, x)):
        assert fx.fuse_report(fused).folded == 1 and not list(_bn_nodes(fused))
        assert_matches_eager(fused, model, x)


def test_linear_without_example_inputs_is_folded_with_a_note():
    model = randomize_batch_norm(nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6))).eval()
    (pair,) = fx.fuse_report(fx.fuse(model)).pair_reports
    assert pair.status == "folded" and pair.reason == _pairs.LINEAR_ASSUMED_2D
    (pair,) = fx.fuse_report(fx.fuse(model, torch.randn(3, 5))).pair_reports
    assert pair.status == "folded" and pair.reason == ""


def test_example_inputs_catch_a_linear_whose_output_is_not_2d():
    # Linear maps the last dim; BatchNorm1d on (N, 6, 6) normalises dim 1. The sizes agree,
    # so only the rank tells that folding would scale the wrong dim.
    model = randomize_batch_norm(nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6))).eval()
    x = torch.randn(2, 6, 5)
    fused = fx.fuse(model, x)
    assert fx.fuse_report(fused).skipped == [("0", LINEAR_NOT_2D)]
    assert_matches_eager(fused, model, x)


def test_example_inputs_catch_an_unbatched_conv():
    # Conv1d on (C, L) gives (6, 6); BatchNorm1d takes that as (N, C) and normalises L.
    model = randomize_batch_norm(nn.Sequential(nn.Conv1d(4, 6, 1), nn.BatchNorm1d(6))).eval()
    x = torch.randn(4, 6)
    fused = fx.fuse(model, x)
    assert fx.fuse_report(fused).skipped == [("0", _pairs.CONV_NOT_BATCHED)]
    assert_matches_eager(fused, model, x)


def test_example_inputs_do_not_change_training_bn_state():
    # One eval pair to check, so the example inputs run; the training BN would update its
    # running statistics and num_batches_tracked if they ran on real tensors.
    model = nn.Sequential(*conv_bn(), nn.Conv2d(6, 6, 1), nn.BatchNorm2d(6))
    model = randomize_batch_norm(model).eval()
    model[4].train()
    before = copy.deepcopy(model.state_dict())
    fused = fx.fuse(model, _input())
    assert fx.fuse_report(fused).skipped == [("3", BN_TRAINING)]
    kept = {k: v for k, v in fused.state_dict().items() if k.startswith(("3.", "4."))}
    assert len(kept) == 7  # conv weight and bias; BN weight, bias, running stats, count
    for key, value in kept.items():
        assert torch.equal(value, before[key]), key


class ItemScaled(nn.Sequential):
    def __init__(self):
        super().__init__(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))

    def forward(self, x):
        return super().forward(x) * x.sum().item()  # data-dependent: no fake value for it


def test_example_inputs_that_cannot_run_on_fake_tensors_raise_and_change_nothing():
    model = randomize_batch_norm(ItemScaled()).eval()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(fx.FuseError, match="did not run through the traced model"):
        fx.fuse(model, _input())
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert fx.fuse_report(fx.fuse(model)).folded == 1  # without inputs: no rank check


def test_feature_count_mismatch_is_skipped():
    # Unbatched Conv1d output (6, 5): BatchNorm1d(5) runs in eager, but on the wrong dim.
    model = randomize_batch_norm(nn.Sequential(nn.Conv1d(4, 6, 1), nn.BatchNorm1d(5))).eval()
    fused = fx.fuse(model)
    assert fx.fuse_report(fused).skipped == [("0", "BN has 5 features, the conv1d has 6")]
    assert_matches_eager(fused, model, torch.randn(4, 5))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("transposed", [False, True], ids=["conv", "transposed"])
def test_half_precision_keeps_dtype_and_matches_eager(dtype, transposed):
    model = conv_bn(transposed=transposed, groups=2, dtype=dtype)
    fused = fx.fuse(model)
    conv = fused.get_submodule("0")
    assert conv.weight.dtype == conv.bias.dtype == dtype
    assert_matches_eager(fused, model, _input(dtype=dtype), dtype=dtype)


@pytest.mark.parametrize("transposed", [False, True], ids=["conv", "transposed"])
@pytest.mark.parametrize("rank", [2, 3])
def test_channels_last_weights_stay_channels_last(rank, transposed):
    memory_format = torch.channels_last if rank == 2 else torch.channels_last_3d
    model = conv_bn(rank, transposed, groups=2).to(memory_format=memory_format)
    fused = fx.fuse(model)
    weight = fused.get_submodule("0").weight
    assert weight.is_contiguous(memory_format=memory_format)
    assert weight.stride() == model[0].weight.stride()
    x = _input(rank).contiguous(memory_format=memory_format)
    assert_matches_eager(fused, model, x)


@pytest.mark.parametrize("requires_grad", [False, True])
def test_folded_parameters_keep_requires_grad(requires_grad):
    model = conv_bn(bias=False).requires_grad_(requires_grad)
    conv = fx.fuse(model).get_submodule("0")
    assert isinstance(conv.weight, nn.Parameter) and isinstance(conv.bias, nn.Parameter)
    assert conv.weight.requires_grad is conv.bias.requires_grad is requires_grad


def test_input_model_is_not_modified():
    model = conv_bn(bias=False)
    before = copy.deepcopy(model.state_dict())
    modules = list(model.modules())
    fused = fx.fuse(model)
    assert list(model.modules()) == modules and model[0].bias is None
    assert model.state_dict().keys() == before.keys()
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert fused.get_submodule("0") is not model[0]
    assert fused.get_submodule("0").weight.data_ptr() != model[0].weight.data_ptr()


class Nested(nn.Module):
    """Pairs inside Sequentials and wrapper modules, and a BN before a conv (not a pair)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(4, 8, 3, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.block = nn.ModuleDict(
            {"pre": nn.BatchNorm2d(8), "conv": nn.Conv2d(8, 8, 1), "post": nn.BatchNorm2d(8)}
        )

    def forward(self, x):
        x = self.stem(x)
        return x + self.block["post"](self.block["conv"](self.block["pre"](x)))


def test_pairs_inside_wrappers_are_folded_and_named_by_module_path():
    model = randomize_batch_norm(Nested()).eval()
    fused = fx.fuse(model)
    report = fx.fuse_report(fused)
    assert [(p.conv, p.bn, p.status) for p in report.pair_reports] == [
        ("stem.0", "stem.1", "folded"),
        ("block.conv", "block.post", "folded"),
    ]
    assert [n.target for n in _bn_nodes(fused)] == ["block.pre"]  # BN before a conv stays
    assert_matches_eager(fused, model, _input())


class Reused(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.conv(x)) + self.conv(x)


class MultiUser(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y


class Hooked(nn.Sequential):
    def __init__(self):
        super().__init__(nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4))
        self[0].register_forward_hook(lambda module, args, output: output * 2)


@pytest.mark.parametrize(
    "make, training, expected",
    [
        (Reused, False, [("conv", _pairs.CONV_REUSED)]),
        (MultiUser, False, [("conv", OTHER_USERS)]),
        (Hooked, False, [("0", _pairs.HAS_HOOKS)]),
        (lambda: nn.Sequential(nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4)), True, [("0", BN_TRAINING)]),
        (
            lambda: nn.Sequential(nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4, track_running_stats=False)),
            False,
            [("0", NO_RUNNING_STATS)],
        ),
    ],
    ids=["reused-conv", "multi-user", "hooks", "training", "no-running-stats"],
)
def test_unsafe_pairs_are_left_alone_and_reported(make, training, expected):
    torch.manual_seed(0)
    model = randomize_batch_norm(make()).train(training)
    fused = fx.fuse(model)
    report = fx.fuse_report(fused)
    assert report.skipped == expected and report.folded == 0
    assert all(p.status == "skipped" for p in report.pair_reports)
    assert len(list(_bn_nodes(fused))) == 1
    # In training mode each model normalises with batch statistics and updates its own.
    assert_matches_eager(fused, model, _input())


class SharedBn(nn.Module):
    """One BN module after two convs: both pairs fold, and the BN goes only at the end."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(4, 4, 3, padding=1)
        self.b = nn.Conv2d(4, 4, 1)
        self.bn = nn.BatchNorm2d(4)
        self.other = nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))

    def forward(self, x):
        return self.bn(self.a(x)) * self.bn(self.b(x)) + self.other[1](self.other[0](x))


def test_bn_shared_by_two_convs_folds_both():
    model = randomize_batch_norm(SharedBn()).eval()
    fused = fx.fuse(model)
    report = fx.fuse_report(fused)
    assert [(p.conv, p.bn) for p in report.pair_reports] == [
        ("a", "bn"),
        ("b", "bn"),
        ("other.0", "other.1"),
    ]
    assert report.folded == 3 and not list(_bn_nodes(fused))
    assert not hasattr(fused, "bn")
    assert_matches_eager(fused, model, _input())


def test_bn_shared_with_a_skipped_pair_stays():
    model = SharedBn()
    model.b.register_forward_hook(lambda module, args, output: output + 1)
    model = randomize_batch_norm(model).eval()
    fused = fx.fuse(model)
    assert fx.fuse_report(fused).skipped == [("b", _pairs.HAS_HOOKS)]
    assert [n.target for n in _bn_nodes(fused)] == ["bn"]
    assert_matches_eager(fused, model, _input())


class Functional(nn.Module):
    """Batch norms written with the functional API over the model's own tensors."""

    def __init__(self, fn=F.batch_norm, training=False, computed_stats=False):
        super().__init__()
        self.fn, self.bn_training, self.computed_stats = fn, training, computed_stats
        self.conv = nn.Conv2d(4, 6, 3)
        self.stats = nn.Module()  # a holder, not a BN module
        self.stats.register_buffer("mean", torch.rand(6) - 0.5)
        self.stats.register_buffer("var", torch.rand(6) + 0.5)
        self.scale = nn.Parameter(torch.rand(6) + 0.5)
        self.shift = nn.Parameter(torch.rand(6) - 0.5)

    def forward(self, x):
        y = self.conv(x)
        # fx records buffer arithmetic as a constant; arithmetic on a parameter is a node.
        mean = self.stats.mean + 0 * self.scale if self.computed_stats else self.stats.mean
        if self.fn is F.batch_norm:
            return F.batch_norm(
                y, mean, self.stats.var, self.scale, self.shift, self.bn_training, 0.1, 1e-3
            )
        return torch.batch_norm(
            y, self.scale, self.shift, mean, self.stats.var, self.bn_training, 0.1, 1e-3, False
        )


@pytest.mark.parametrize("fn", BN_FUNCTIONS, ids=["F.batch_norm", "torch.batch_norm"])
def test_functional_batch_norm_over_model_buffers_is_folded(fn):
    torch.manual_seed(0)
    model = Functional(fn).eval()
    fused = fx.fuse(model)
    report = fx.fuse_report(fused)
    assert [(p.conv, p.bn, p.status) for p in report.pair_reports] == [("conv", "stats", "folded")]
    assert not list(_bn_nodes(fused)) and not hasattr(fused, "stats")
    assert_matches_eager(fused, model, _input())


@pytest.mark.parametrize(
    "kwargs, reason",
    [(dict(training=True), BN_TRAINING), (dict(computed_stats=True), _pairs.STATS_NOT_ATTRIBUTES)],
    ids=["training", "computed-stats"],
)
def test_functional_batch_norm_that_cannot_fold_is_reported(kwargs, reason):
    torch.manual_seed(0)
    model = Functional(**kwargs).eval()
    fused = fx.fuse(model)
    assert fx.fuse_report(fused).skipped == [("conv", reason)]
    assert_matches_eager(fused, model, _input())


class DataDependent(nn.Module):
    def forward(self, x):
        return x if x.sum() > 0 else -x


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))
        self.head = nn.Sequential(nn.ReLU(), DataDependent())

    def forward(self, x):
        return self.head(self.features(x))


def test_untraceable_model_raises_naming_the_module_and_changes_nothing():
    model = randomize_batch_norm(Untraceable()).eval()
    before = copy.deepcopy(model.state_dict())
    modules = dict(model.named_modules())
    with pytest.raises(fx.FuseError, match=r"'head\.1' \(DataDependent\)") as info:
        fx.fuse(model)
    assert info.value.module == "head.1"
    assert isinstance(info.value.__cause__, torch.fx.proxy.TraceError)
    assert dict(model.named_modules()) == modules
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_untraceable_forward_of_the_model_itself_is_named():
    with pytest.raises(fx.FuseError, match="forward of DataDependent") as info:
        fx.fuse(DataDependent())
    assert info.value.module == ""


def test_report_reads_as_a_table_and_survives_deepcopy():
    fused = fx.fuse(randomize_batch_norm(Reused()).eval())
    text = str(fx.fuse_report(copy.deepcopy(fused)))
    assert text.startswith("inductor_convbn.fx: folded 0 of 1 conv->bn pairs")
    assert "conv  bn  conv2d  skipped: conv module is called more than once" in text


def test_report_of_a_module_fuse_did_not_make_is_an_error():
    with pytest.raises(ValueError, match="not made by"):
        fx.fuse_report(torch.fx.symbolic_trace(conv_bn()))
    with pytest.raises(TypeError, match="nn.Module"):
        fx.fuse(lambda x: x)


def test_public_api():
    assert inductor_convbn.fx is fx and "fx" in inductor_convbn.__all__
    assert inductor_convbn.fx.fuse is fx.fuse


# Cheap models with residual, depthwise, squeeze-excite and stochastic-depth blocks; the
# slow sweep runs the rest.
FAST_TORCHVISION = ["resnet18", "mobilenet_v3_small", "efficientnet_b0"]


def _torchvision_names():
    try:
        import torchvision
    except ImportError:  # the sweep then has no cases; the fast subset skips
        return []
    return torchvision.models.list_models(module=torchvision.models)


def _check_torchvision(name):
    torchvision = pytest.importorskip("torchvision")
    model = torchvision_model(name)
    min_size = torchvision.models.get_model_weights(name).DEFAULT.meta.get("min_size", (1, 1))
    fixed = {"vit": 224, "swin_v2": 256, "swin": 224, "maxvit": 224}
    size = next((s for p, s in fixed.items() if name.startswith(p)), max(min_size[0], 64))
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    fused = fx.fuse(model, x)
    report = fx.fuse_report(fused)
    assert all(reason == OTHER_USERS for _, reason in report.skipped), report
    assert sorted(_conv_bn_left(fused)) == sorted(conv for conv, _ in report.skipped), report
    with torch.no_grad():
        actual, expected = fused(x), model(x)
    # Random weights let activations grow with depth (1e8 in inception_v3): compare relative
    # to the output's scale.
    scale = max(float(expected.abs().max()), 1.0)
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4 * scale)
    return report, float((actual - expected).abs().max()) / scale


@pytest.mark.filterwarnings("ignore:The default weight initialization:FutureWarning")
@pytest.mark.parametrize("name", FAST_TORCHVISION)
def test_torchvision_models_fold_every_pair(name):
    report, _ = _check_torchvision(name)
    assert report.folded == report.pairs > 0 and not report.skipped


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:The default weight initialization:FutureWarning")
@pytest.mark.parametrize("name", _torchvision_names())
def test_every_torchvision_classification_model(name):
    _check_torchvision(name)


class PlainConvSubclass(nn.Conv3d):
    """Like torchvision's video Conv3DSimple: a static method, the forward of Conv3d."""

    @staticmethod
    def stride_of_block():
        return 1, 2, 2


class ScaledConv(nn.Conv2d):
    def forward(self, x):
        return super().forward(x) * 2.0


def test_folds_a_conv_subclass_that_computes_as_its_base():
    torch.manual_seed(0)
    model = randomize_batch_norm(
        nn.Sequential(PlainConvSubclass(4, 6, 3, padding=1), nn.BatchNorm3d(6))
    ).eval()
    fused = fx.fuse(model)
    assert fx.fuse_report(fused).folded == 1 and not _conv_bn_left(fused)
    assert_matches_eager(fused, model, _input(3))


def test_leaves_a_conv_subclass_with_a_forward_of_its_own():
    torch.manual_seed(0)
    model = randomize_batch_norm(nn.Sequential(ScaledConv(4, 6, 3), nn.BatchNorm2d(6))).eval()
    fused = fx.fuse(model)
    assert fx.fuse_report(fused).pairs == 0
    assert_matches_eager(fused, model, _input(2))


@pytest.mark.parametrize("parametrization", ["weight_norm", "spectral_norm", "custom"])
def test_a_parametrized_conv_weight_is_folded_through_its_parametrization(parametrization):
    """The weight is computed in forward; its value goes into the folded weight (this
    raised KeyError: attribute 'weight' already exists)."""

    class Doubled(nn.Module):
        def forward(self, weight):
            return 2 * weight

    from torch.nn.utils import parametrizations, parametrize

    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3)
    if parametrization == "custom":
        parametrize.register_parametrization(conv, "weight", Doubled())
    else:
        conv = getattr(parametrizations, parametrization)(conv)
    model = randomize_batch_norm(nn.Sequential(conv, nn.BatchNorm2d(4), nn.ReLU())).eval()
    x = torch.randn(2, 3, 8, 8)
    fused = fx.fuse(model, x)
    report = fx.fuse_report(fused)
    assert report.folded == report.pairs == 1, report
    assert not parametrize.is_parametrized(fused.get_submodule("0"))
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model(x))


class CheckedBatchNorm(nn.BatchNorm2d):
    """A BN subclass reading its input's metadata, then normalising and activating, as
    timm's BatchNormAct2d does: the metadata read is no other user of the conv output."""

    def __init__(self, channels):
        super().__init__(channels)
        self.act = nn.ReLU()

    def forward(self, x):
        torch._assert(x.ndim == 4, "expected 4-D input")
        torch._assert(x.size(1) == self.num_features, "expected num_features channels")
        x = F.batch_norm(
            x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps
        )
        return self.act(x)


def test_metadata_reads_of_the_conv_output_are_no_other_users():
    torch.manual_seed(0)
    model = randomize_batch_norm(nn.Sequential(nn.Conv2d(4, 6, 3), CheckedBatchNorm(6))).eval()
    fused = fx.fuse(model)
    report = fx.fuse_report(fused)
    assert report.folded == report.pairs == 1, report
    assert_matches_eager(fused, model, _input(2))
