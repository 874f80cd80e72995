"""torchvision ResNet18: all 20 conv -> BN pairs folded under freezing, each kept pair
explained without it, also through the FX graph cache."""

import json
import os
import subprocess
import sys

import pytest
import torch

import inductor_convbn
from inductor_convbn.testing import torchvision_model

pytest.importorskip("torchvision")

_SECOND_PROCESS = r"""
import json, torch, inductor_convbn
from inductor_convbn.testing import torchvision_model
report = inductor_convbn.verify(
    torchvision_model("resnet18"), torch.randn(1, 3, 64, 64), freezing=False
)
print(json.dumps({
    "pairs": report.pairs, "folded": report.folded, "kept": len(report.kept),
    "hits": report.fx_graph_cache_hits, "match": report.outputs_match, "missed": report.missed,
}))
"""


@pytest.mark.parametrize(
    ("policy", "freezing"), [("auto", True), ("always", False)], ids=["freezing", "always"]
)
def test_resnet18_folds_all_twenty_pairs(policy, freezing):
    model = torchvision_model("resnet18")
    report = inductor_convbn.verify(
        model, torch.randn(2, 3, 64, 64), policy=policy, freezing=freezing
    )
    assert report.outputs_match, report
    assert report.folded == report.pairs == 20, report
    assert all(p.status == "folded" for p in report.pair_reports)
    assert report.pair_reports[0].conv == "conv1" and report.pair_reports[0].bn == "bn1"


def test_resnet18_without_freezing_keeps_each_pair_and_says_why():
    # Every BN of ResNet18 feeds a ReLU or a residual add, in whose kernel it runs.
    report = inductor_convbn.verify(
        torchvision_model("resnet18"), torch.randn(2, 3, 64, 64), freezing=False
    )
    assert report.outputs_match and report.pairs == 20 and report.folded == 0, report
    assert len(report.kept) == 20 and not report.missed
    assert all("runs inside the next pointwise kernel" in p.reason for p in report.pair_reports)


def test_resnet18_second_process_hits_fx_graph_cache_and_still_reports_folds(tmp_path):
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(tmp_path))
    runs = []
    for _ in range(2):
        out = subprocess.run(
            [sys.executable, "-c", _SECOND_PROCESS],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    first, second = runs
    assert first["hits"] == 0 and second["hits"] >= 1
    for run in runs:
        assert run["match"] and not run["missed"]
        assert run["pairs"] == run["kept"] == 20 and run["folded"] == 0
