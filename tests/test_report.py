"""How the verifier gives each pair its status, and how the report reads."""

import dataclasses

import torch
from torch import nn

import inductor_convbn
from inductor_convbn import _compat, _decide, _pairs, _registry
from inductor_convbn._decide import Decision
from inductor_convbn._fold import fold_conv_bn_weights
from inductor_convbn._pairs import NOT_MATCHED
from inductor_convbn._pairs import module_name as _module_name
from inductor_convbn._report import PLAIN_COMPILE_MARGIN, FoldReport, PairReport, _attribute
from inductor_convbn.testing import randomize_batch_norm

PAIRS = [
    ("conv1", "bn1", "conv2d", ""),
    ("layer1.0.conv1", "layer1.0.bn1", "conv2d", ""),
    ("head", "head_bn", "linear", "BN is in training mode"),
]


def test_pairs_recorded_by_the_pass_are_folded_by_name():
    decisions = [Decision("layer1.0.conv1", False, "too costly"), Decision("conv1", True, "once")]
    reports = _attribute(PAIRS, decisions, folded=1, kept=1)
    assert [(r.conv, r.status, r.reason) for r in reports] == [
        ("conv1", "folded", "once"),
        ("layer1.0.conv1", "kept", "too costly"),
        ("head", "skipped", "BN is in training mode"),
    ]


def test_folds_from_the_fx_graph_cache_are_attributed_by_count():
    reports = _attribute(PAIRS, [], folded=1, kept=1)
    assert [(r.status, r.reason) for r in reports[:2]] == [
        ("folded", "from the FX graph cache"),
        ("kept", "by policy, from the FX graph cache"),
    ]


def test_an_eligible_pair_without_a_fold_is_reported_as_missed():
    reports = _attribute(PAIRS, [Decision("conv1", True)], folded=1, kept=0)
    report = FoldReport(reports, folded=1, max_abs_error=0.0, outputs_match=True, rtol=0, atol=0)
    assert report.missed == ["layer1.0.conv1"] and reports[1].reason == NOT_MATCHED
    assert report.pairs == 3
    assert report.skipped == [("layer1.0.conv1", NOT_MATCHED), ("head", "BN is in training mode")]
    assert "folded 1 of 3 conv->bn pairs" in str(report)


def test_module_names_drop_the_variable_dynamo_started_from():
    names = {"", "conv1", "layer1", "layer1.0", "layer1.0.conv1"}
    assert _module_name("model.layer1.0.conv1", names) == "layer1.0.conv1"
    assert _module_name("conv1", names) == "conv1"
    assert _module_name("elsewhere.op", names) == "elsewhere.op"


def test_many_verify_calls_in_one_process_each_compile():
    """Every variant compiles in a frame of its own: on torch < 2.14 the variants shared one
    frame, and from the ninth verify() on dynamo ran the model eagerly (0 pairs, 0 error)."""
    for i in range(10):
        torch.manual_seed(i)
        model = nn.Sequential(nn.Linear(8, 4 + i % 3), nn.BatchNorm1d(4 + i % 3)).eval()
        report = inductor_convbn.verify(model, torch.randn(3, 8), freezing=True)
        assert report.pairs == report.folded == 1, (i, report)


def test_a_graph_dynamo_discards_is_not_counted():
    """With dynamic shapes dynamo first traces the BN's eps and momentum as symbolic floats,
    then discards that graph and traces again: its pairs were listed twice."""
    from inductor_convbn.testing import randomize_batch_norm

    model = randomize_batch_norm(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))).eval()
    report = inductor_convbn.verify(model, torch.randn(2, 3, 8, 8), dynamic=True, policy="always")
    assert len(report.pair_reports) == report.pairs == report.folded == 1, report
    assert report.outputs_match and not report.missed, report


def _large_output_model(depth: int = 8) -> nn.Module:
    """Conv -> BN -> ReLU blocks whose BNs each scale by about 3: outputs of order 1e4, where
    float32 rounding alone puts plain torch.compile outside verify()'s default tolerances."""
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Conv2d(3, 16, 3, padding=1)]
    for _ in range(depth):
        conv = nn.Conv2d(16, 16, 3, padding=1)
        conv.weight.data *= 3
        layers += [conv, nn.BatchNorm2d(16), nn.ReLU()]
    model = nn.Sequential(*layers, nn.Conv2d(16, 4, 1))
    randomize_batch_norm(model)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_var.mul_(0.1)
    return model.eval()


def test_a_correct_fold_on_a_large_output_is_judged_against_plain_compile():
    model, x = _large_output_model(), torch.randn(2, 3, 16, 16)
    report = inductor_convbn.verify(model, x)
    assert report.folded == report.pairs == 8, report
    # Plain torch.compile is itself outside the tolerances: the plugin is judged by it.
    assert report.plain_compile_error is not None and report.plain_compile_error > report.atol
    assert not report.within_tolerance and report.outputs_match, report
    assert report.max_abs_error <= PLAIN_COMPILE_MARGIN * report.plain_compile_error
    assert "as plain torch.compile is" in str(report).splitlines()[0]


def test_a_wrong_fold_is_flagged_whatever_plain_compile_gets(monkeypatch):
    def off_by_a_percent(*args, **kwargs):
        weight, bias = fold_conv_bn_weights(*args, **kwargs)
        return weight, bias * 1.01 + 0.01

    monkeypatch.setattr(_registry, "fold_conv_bn_weights", off_by_a_percent)
    for model, x in [
        (_large_output_model(), torch.randn(2, 3, 16, 16)),
        (nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)).eval(), torch.randn(2, 3, 8, 8)),
    ]:
        torch._dynamo.reset()
        report = inductor_convbn.verify(model, x, plain=True)
        assert report.folded == report.pairs >= 1, report
        assert report.plain_compile_error is not None and not report.outputs_match, report
        assert "OUTSIDE" in str(report).splitlines()[0]


def test_plain_compile_is_compiled_only_when_needed_unless_asked():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)).eval()
    x = torch.randn(2, 3, 8, 8)
    assert inductor_convbn.verify(model, x).plain_compile_error is None
    assert inductor_convbn.verify(model, x, plain=False).plain_compile_error is None
    torch._dynamo.reset()
    plain = inductor_convbn.verify(model, x, plain=True).plain_compile_error
    assert plain is not None and plain < 1e-4


def test_plain_compile_runs_without_the_plugin_installed_globally():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)).eval()
    x = torch.randn(2, 3, 8, 8)
    with inductor_convbn.installed():
        before = _compat.counters["inductor"][_decide.COUNTER_FOLDED]
        report = inductor_convbn.verify(model, x, plain=True)
        after = _compat.counters["inductor"][_decide.COUNTER_FOLDED]
        assert inductor_convbn.is_installed()
    # The plugin's variant folds its one pair; the plain variant folds none.
    assert report.folded == 1 and after - before == 1, report


def test_verify_compiles_with_freezing_by_default_like_the_command_line():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU()).eval()
    x = torch.randn(2, 3, 8, 8)
    report = inductor_convbn.verify(model, x)
    assert report.freezing and report.folded == 1, report
    assert not inductor_convbn.verify(model, x, grad=True).freezing


def test_kept_pairs_say_how_to_fold_them_in_the_first_line():
    decisions = [Decision("conv1", False, "too costly")]
    reports = _attribute(PAIRS[:1], decisions, folded=0, kept=1)
    report = FoldReport(reports, folded=0, max_abs_error=0.0, outputs_match=True, rtol=0, atol=0)
    first = str(report).splitlines()[0]
    assert "1 kept by policy=auto" in first and "freezing" in first and "always" in first
    assert "kept" not in str(dataclasses.replace(report, pair_reports=[])).splitlines()[0]


def test_a_frozen_bn_this_torch_gives_no_shapes_for_is_not_said_to_fold_with_always():
    kept = PairReport("0", "1", "conv2d", _pairs.KEPT, _pairs.AFFINE_NO_SHAPES)
    report = FoldReport([kept], folded=0, max_abs_error=0.0, outputs_match=True, rtol=0, atol=0)
    first = str(dataclasses.replace(report, freezing=True)).splitlines()[0]
    assert "1 left to Inductor's binary folding" in first and "always" not in first, first


def test_every_recorded_fold_gets_a_row_and_folded_never_exceeds_pairs():
    decisions = [Decision("conv1", True, "once"), Decision("elsewhere.linear", True, "once")]
    reports = _attribute(PAIRS[:1], decisions, folded=3, kept=0)
    report = FoldReport(reports, folded=3, max_abs_error=0.0, outputs_match=True, rtol=0, atol=0)
    assert [(r.conv, r.status) for r in reports] == [
        ("conv1", "folded"),
        ("elsewhere.linear", "folded"),
        ("?", "folded"),  # a third fold, replayed from the cache without a record
    ]
    assert report.folded <= report.pairs == 3


class _LinearNorm(nn.Module):
    """timm's LeViT block: the BN normalises the linear output with its leading dims merged."""

    def __init__(self, features_in: int, features: int, *, by_view: bool = False) -> None:
        super().__init__()
        self.linear = nn.Linear(features_in, features, bias=by_view)
        self.bn = nn.BatchNorm1d(features)
        self.by_view = by_view

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.linear(x)
        if self.by_view:
            b, n, c = y.shape
            return self.bn(y.reshape(b * n, c)).view(b, n, c)
        return self.bn(y.flatten(0, 1)).reshape_as(y)


class _FeaturesMerged(nn.Module):
    """A BN over (tokens x features): the views move the features, no pair."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(6, 4)
        self.bn = nn.BatchNorm1d(5 * 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.linear(x).flatten(1, 2))


def test_linear_then_leading_dims_merged_then_batch_norm_1d_is_a_pair():
    model = nn.Sequential(_LinearNorm(6, 8), _LinearNorm(8, 6, by_view=True))
    model = randomize_batch_norm(model).eval()
    x = torch.randn(2, 5, 6)
    for kwargs in ({}, {"freezing": False, "policy": "always"}, {"grad": True}):
        torch._dynamo.reset()
        report = inductor_convbn.verify(model, x, **kwargs)
        assert report.pairs == report.folded == 2 and report.outputs_match, (kwargs, report)
        assert [r.conv for r in report.pair_reports] == ["0.linear", "1.linear"], report


def test_views_that_move_the_features_make_no_pair():
    model = randomize_batch_norm(_FeaturesMerged()).eval()
    report = inductor_convbn.verify(model, torch.randn(3, 5, 6))
    assert report.pairs == report.folded == 0 and report.outputs_match, report
