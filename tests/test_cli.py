"""``inductor-convbn`` / ``python -m inductor_convbn``: the report, bench, the exit status,
one-line errors."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from inductor_convbn import __main__ as cli
from inductor_convbn import _compat, _decide, _harness, _pairs, _report
from inductor_convbn.testing import randomize_batch_norm

SMALL_MODEL = """
import torch
from torch import nn
from inductor_convbn.testing import randomize_batch_norm

def build():
    layers = [nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)]
    return randomize_batch_norm(nn.Sequential(*layers))

instance = build()
not_a_model = 3

def returns_a_number():
    return 3
"""


@pytest.fixture
def small_model(tmp_path, monkeypatch):
    """A module ``small_model`` importable from the current directory."""
    (tmp_path / "small_model.py").write_text(textwrap.dedent(SMALL_MODEL))
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "small_model"
    sys.modules.pop("small_model", None)


def test_reports_resnet18_and_exits_zero(capsys):
    assert cli.main(["resnet18", "--no-timing", "--image-size", "64", "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    assert "(policy=auto, freezing): folded 20 of 20 conv->bn pairs" in captured.out
    assert "layer4.1.conv2" in captured.out
    assert "s tracing patterns" in captured.out
    # Progress goes to stderr: a line before compiling, the seconds it took after.
    assert "compiling resnet18 (cpu, float32, input 1x3x64x64, freezing, policy auto)" in (
        captured.err
    )
    assert " s\n" in captured.err


def test_pairs_kept_by_policy_exit_zero(capsys):
    # On CPU the reason is the fused ReLU; on CUDA every pair is kept for another reason.
    args = ["resnet18", "--no-timing", "--image-size", "64", "--no-freezing", "--device", "cpu"]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert "folded 0 of 20 conv->bn pairs" in out
    assert "kept: the BN runs inside the next pointwise kernel (relu)" in out


def test_report_json_of_a_factory(small_model, capsys):
    args = ["report", f"{small_model}:build", "--input-shape", "2,3,8,8", "--no-timing"]
    assert cli.main([*args, "--json", "--device", "cpu"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["model"] == f"{small_model}:build"
    assert result["input_shape"] == [2, 3, 8, 8]
    assert (result["pairs"], result["folded"], result["kept"], result["missed"]) == (2, 2, [], [])
    assert result["freezing"] is True and result["outputs_match"] is True
    assert result["timing"] is None
    assert result["pair_reports"][0] == {
        "conv": "0",
        "bn": "1",
        "kind": "conv2d",
        "status": "folded",
        "reason": "once, at compile time (freezing)",
    }


def test_bench_json_of_an_instance(small_model, capsys):
    args = ["bench", f"{small_model}:instance", "--input-shape", "1,3,8,8", "--device", "cpu"]
    assert cli.main([*args, "--rounds", "2", "--calls", "1", "--json", "--no-freezing"]) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    assert result["freezing"] is False
    assert result["ratio_min"] <= result["ratio"] <= result["ratio_max"]
    assert "timing plain torch.compile against torch.compile + plugin" in captured.err


def test_missed_pair_exits_one(monkeypatch, small_model, capsys):
    def verify(model, *inputs, policy, freezing):
        pair = _report.PairReport("0", "1", "conv2d", _pairs.SKIPPED, _pairs.NOT_MATCHED)
        return _report.FoldReport([pair], 0, 0.0, True, 1e-4, 1e-4, policy=policy)

    monkeypatch.setattr(cli._report, "verify", verify)
    args = [f"{small_model}:build", "--input-shape", "1,3,8,8", "--no-timing", "--device", "cpu"]
    assert cli.main(args) == 1
    assert "could have been folded but were not (0)" in capsys.readouterr().err


def test_unknown_model_is_a_one_line_error():
    out = subprocess.run(
        [sys.executable, "-m", "inductor_convbn", "no_such_model", "--no-timing"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert out.returncode == 2
    assert "unknown torchvision model 'no_such_model'" in out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize(
    "attribute, message",
    [
        ("nowhere", "has no attribute 'nowhere'"),
        ("not_a_model", "is of type int, not an nn.Module or a function returning one"),
        ("returns_a_number", "returns_a_number() returned an object of type int, not an nn.Module"),
    ],
)
def test_bad_model_attribute_is_a_usage_error(small_model, capsys, attribute, message):
    assert cli.main([f"{small_model}:{attribute}", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_unimportable_module_is_a_usage_error(capsys):
    assert cli.main(["no_such_package.models:build", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        "inductor-convbn: error: cannot import 'no_such_package.models': "
        "ModuleNotFoundError: No module named 'no_such_package'"
    )


def test_input_the_model_cannot_take_is_a_usage_error(small_model, capsys):
    assert cli.main([f"{small_model}:build", "--input-shape", "1,5,8,8", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "does not run on a float32 input of shape 1,5,8,8 on cpu" in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA error")
def test_cuda_requested_without_cuda_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["resnet18", "--device", "cuda"])
    assert exit_info.value.code == 2
    assert "CUDA is not available" in capsys.readouterr().err


@pytest.mark.parametrize(
    "args, message",
    [
        (["--batch-size", "0"], "must be positive"),
        (["--input-shape", "1,3,x"], "expected comma-separated integers"),
        (["--input-shape", "1,0,8,8"], "every size must be positive"),
        (["--input-shape", "1,3,8,8", "--image-size", "8"], "drop --batch-size and --image-size"),
        (["--input-shape", "1,3,8", "--channels-last"], "needs a 4-D or 5-D input"),
        (["--device", "tpu"], "not a device"),
    ],
)
def test_bad_arguments_are_usage_errors(capsys, args, message):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["resnet18", *args])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_model_is_required(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([])
    assert exit_info.value.code == 2
    assert "name a model" in capsys.readouterr().err


def test_compare_compiled_times_both_variants_and_folds():
    model = randomize_batch_norm(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))).eval()
    t = _harness.compare_compiled(
        model, torch.randn(1, 3, 8, 8), policy="always", rounds=3, calls=2
    )
    assert t["plain_s"] > 0 and t["plugin_s"] > 0
    assert t["ratio_min"] <= t["ratio"] <= t["ratio_max"]
    assert _compat.counters["inductor"][_decide.COUNTER_FOLDED] == 1  # the plugin variant only
