"""``python -m inductor_convbn``: the report, the exit status, one-line errors."""

import subprocess
import sys

import pytest
import torch
from torch import nn

from inductor_convbn import __main__ as cli
from inductor_convbn import _compat, _timing
from inductor_convbn.testing import randomize_batch_norm


def test_reports_resnet18_and_exits_zero(capsys):
    assert cli.main(["resnet18", "--no-timing", "--image-size", "64"]) == 0
    out = capsys.readouterr().out
    assert "(policy=auto, freezing): folded 20 of 20 conv->bn pairs" in out
    assert "layer4.1.conv2" in out
    assert "s tracing patterns" in out


def test_pairs_kept_by_policy_exit_zero(capsys):
    # On CPU the reason is the fused ReLU; on CUDA every pair is kept for another reason.
    args = ["resnet18", "--no-timing", "--image-size", "64", "--no-freezing", "--device", "cpu"]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert "folded 0 of 20 conv->bn pairs" in out
    assert "kept: the BN runs inside the next pointwise kernel (relu)" in out


def test_unknown_model_is_a_one_line_error():
    out = subprocess.run(
        [sys.executable, "-m", "inductor_convbn", "no_such_model", "--no-timing"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert out.returncode == 2
    assert "unknown torchvision model 'no_such_model'" in out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA error")
def test_cuda_requested_without_cuda_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["resnet18", "--device", "cuda"])
    assert exit_info.value.code == 2
    assert "CUDA is not available" in capsys.readouterr().err


def test_bad_batch_size_is_a_usage_error(capsys):
    with pytest.raises(SystemExit):
        cli.main(["resnet18", "--batch-size", "0"])
    assert "must be positive" in capsys.readouterr().err


def test_compare_compiled_times_both_variants_and_folds():
    model = randomize_batch_norm(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))).eval()
    t = _timing.compare_compiled(model, torch.randn(1, 3, 8, 8), policy="always", rounds=3, calls=2)
    assert t["plain_s"] > 0 and t["plugin_s"] > 0
    assert t["ratio_min"] <= t["ratio"] <= t["ratio_max"]
    assert _compat.counters["inductor"]["inductor_convbn_folded"] == 1  # the plugin variant only
