"""How the verifier gives each pair its status, and how the report reads."""

import torch
from torch import nn

import inductor_convbn
from inductor_convbn._decide import Decision
from inductor_convbn._pairs import NOT_MATCHED
from inductor_convbn._pairs import module_name as _module_name
from inductor_convbn._report import FoldReport, _attribute

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
