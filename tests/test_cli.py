"""``inductor-convbn`` / ``python -m inductor_convbn``: the report, bench, the exit status,
one-line errors, startup without torch, the timing line, progress, model names, --save, --plot."""

import io
import json
import logging
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from torch import nn

from inductor_convbn import __main__ as cli
from inductor_convbn import _compat, _decide, _harness, _pairs, _report, fx
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

class Raises(nn.Module):
    def forward(self, x):
        raise ValueError("this model needs a mask")

class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.bn(self.conv(x))
        return y if y.sum() > 0 else -y
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
    # Progress goes to stderr: a line before each step, the seconds it took after.
    assert "checking: resnet18 (cpu, float32, input 1x3x64x64, freezing, policy auto)" in (
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
    assert len(result["plain_rounds_s"]) == len(result["plugin_rounds_s"]) == 2
    assert isinstance(result["noisy"], bool)
    assert "timing: plain torch.compile against torch.compile + plugin" in captured.err


def test_missed_pair_exits_one(monkeypatch, small_model, capsys):
    def verify(model, *inputs, policy, freezing):
        pair = _report.PairReport("0", "1", "conv2d", _pairs.SKIPPED, _pairs.NOT_MATCHED)
        return _report.FoldReport([pair], 0, 0.0, True, 1e-4, 1e-4, policy=policy)

    monkeypatch.setattr(_report, "verify", verify)
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
    assert len(out.stderr) < 300  # not every name torchvision has


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
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("inductor-convbn: error: RuntimeError: Given groups=1")
    assert "on a float32 input of shape 1,5,8,8 on cpu; another input: --input-shape" in err


def test_a_model_that_raises_shows_its_own_error_first(small_model, capsys):
    assert cli.main([f"{small_model}:Raises", "--input-shape", "1,3,8,8", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    line = 1 + SMALL_MODEL.splitlines().index('        raise ValueError("this model needs a mask")')
    assert err.startswith(
        "inductor-convbn: error: ValueError: this model needs a mask "
        f"(raised at small_model.py:{line} by small_model:Raises in eager"
    )


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
        (["--save", "/no/such/folder/m.pt"], "there is no folder /no/such/folder"),
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
    # One figure: the ratio is the quotient of the two medians shown beside it.
    assert t["ratio"] == t["plugin_s"] / t["plain_s"]
    assert t["ratio_min"] <= t["ratio"] <= t["ratio_max"]
    assert len(t["plain_rounds_s"]) == len(t["plugin_rounds_s"]) == 3
    assert _compat.counters["inductor"][_decide.COUNTER_FOLDED] == 1  # the plugin variant only


# --- Startup: no torch before the arguments are parsed -------------------------------------

STARTUP_PROBE = """
import sys
from inductor_convbn.__main__ import main

for argv in (
    ["--help"], ["report", "--help"], ["--version"], [],
    ["m", "--batch-size", "0"], ["bench", "m", "--rounds", "0"], ["m", "--device", "tpu"],
    ["m", "--input-shape", "1,x"], ["bench", "m", "--plot", "/no/such/folder/p.png"],
):
    try:
        main(argv)
    except SystemExit:
        pass
print("torch imported:", "torch" in sys.modules)
"""


def test_help_version_and_usage_errors_do_not_import_torch():
    out = subprocess.run(
        [sys.executable, "-c", STARTUP_PROBE], capture_output=True, text=True, check=True
    )
    assert out.stdout.splitlines()[-1] == "torch imported: False"
    assert f"inductor-convbn {cli.__version__}\n" in out.stdout


def _seconds(*args):
    start = time.perf_counter()
    subprocess.run([sys.executable, *args], capture_output=True, check=True)
    return time.perf_counter() - start


def test_help_answers_at_once():
    # The deterministic check is the one above; this one is loose, scaled by the bare
    # interpreter's startup on this machine now (importing torch takes a second or more).
    bare = _seconds("-c", "pass")
    assert _seconds("-m", "inductor_convbn", "--help") < max(1.0, 5 * bare)


def test_policies_are_the_plugins():
    assert cli._POLICIES == _decide.POLICIES


# --- The timing line ---------------------------------------------------------------------

TIMING = {
    "plain_s": 3.799e-3,
    "plugin_s": 2.964e-3,
    "ratio": 2.964 / 3.799,
    "ratio_min": 0.71,
    "ratio_max": 0.83,
    "plain_rounds_s": [3.8e-3, 3.7e-3, 3.9e-3],
    "plugin_rounds_s": [2.9e-3, 3.0e-3, 2.8e-3],
}


@pytest.fixture
def stub_timing(monkeypatch):
    """compare_compiled returns the timing the test sets, without compiling."""
    timing = dict(TIMING)
    monkeypatch.setattr(_harness, "compare_compiled", lambda *args, **kwargs: dict(timing))
    return timing


def test_timing_line_is_one_consistent_figure(small_model, stub_timing, capsys):
    args = ["bench", f"{small_model}:instance", "--input-shape", "1,3,8,8", "--device", "cpu"]
    assert cli.main(args) == 0
    captured = capsys.readouterr()
    assert captured.out == (
        "per call, median of 3 rounds: torch.compile 3.799 ms, with the plugin 2.964 ms; "
        "plugin / plain 0.78 (lower is faster; rounds 0.71-0.83)\n"
    )
    assert "warning" not in captured.err


def test_rounds_that_disagree_get_a_warning(small_model, stub_timing, capsys):
    stub_timing.update(ratio_min=0.07, ratio_max=19.05)
    args = ["bench", f"{small_model}:instance", "--input-shape", "1,3,8,8", "--device", "cpu"]
    assert cli.main([*args, "--json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["noisy"] is True
    assert "warning: the rounds' ratios range from 0.07 to 19.05, too widely" in captured.err


# --- Progress on a terminal --------------------------------------------------------------


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_fits_the_terminal_names_the_phase_and_keeps_logs_apart(monkeypatch):
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    monkeypatch.setenv("COLUMNS", "40")
    monkeypatch.setattr(cli, "_TICK_S", 0.01)
    log = logging.getLogger("inductor_convbn.test_cli")
    handler = logging.StreamHandler(terminal)  # a handler made before the line stood in
    log.addHandler(handler)
    try:
        with cli._progress("checking", "a model with a long description " * 4):
            time.sleep(0.05)
            _harness._announce("compiling")
            time.sleep(0.05)
            # Python's warning printer writes to sys.stderr as it is when the warning comes.
            print("UserWarning: torch says something", file=sys.stderr)
            log.warning("torch logs something")
            _harness._announce(None)
            time.sleep(0.05)
    finally:
        log.removeHandler(handler)
    assert sys.stderr is terminal
    text = terminal.getvalue()
    *drawn, last = text.split("\r")
    # Each redraw fits in 39 columns and never ends a line ...
    redraws = [d.removesuffix("\x1b[K") for d in drawn if d.removesuffix("\x1b[K")]
    lines = [r for r in redraws if "\n" not in r]
    assert lines and all(len(r) <= 39 for r in lines)
    assert {r.split(" ")[0] for r in lines} == {"checking", "compiling"}
    # ... and what others write comes after a cleared line, on lines of its own.
    assert "\r\x1b[KUserWarning: torch says something\n" in text
    assert "\r\x1b[Ktorch logs something\n" in text or "\ntorch logs something\n" in text
    assert last.startswith("\x1b[Kchecking: a model with") and last.endswith(" s\n")


# --- Model names -------------------------------------------------------------------------


def test_every_torchvision_family_is_known():
    known = cli.torchvision_models()
    assert known["resnet18"] == "classification"
    assert known["r3d_18"] == "video"
    assert known["fcn_resnet50"] == "segmentation"
    assert known["fasterrcnn_mobilenet_v3_large_fpn"] == "detection"


def test_a_typo_gets_the_closest_names(capsys):
    assert cli.main(["resnt18", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(
        "inductor-convbn: error: unknown torchvision model 'resnt18'; did you mean "
    )
    assert "resnet18" in err and "resnet34, " not in err
    assert len(err.splitlines()) == 1


class Detector(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))


@pytest.mark.parametrize(
    "name, kwargs, backbone",
    [
        ("fasterrcnn_mobilenet_v3_large_fpn", {"weights_backbone": None}, True),
        ("deeplabv3_resnet50.backbone", {"weights_backbone": None}, True),
        ("fcn_resnet50", {"weights_backbone": None}, False),
        ("r3d_18", {}, False),
    ],
)
def test_torchvision_models_build_without_downloads(monkeypatch, capsys, name, kwargs, backbone):
    torchvision = pytest.importorskip("torchvision")
    calls = []

    def get_model(name, **kwargs):
        calls.append((name, kwargs))
        return Detector()

    monkeypatch.setattr(torchvision.models, "get_model", get_model)
    model = cli.load_model(name)
    assert calls == [(name.removesuffix(".backbone"), {"weights": None, **kwargs})]
    assert isinstance(model, nn.Sequential) is backbone and not model.training
    assert ("is a detection model: using" in capsys.readouterr().err) is (name.startswith("faster"))


def test_a_part_only_segmentation_and_detection_models_have(capsys):
    assert cli.main(["resnet18.backbone", "--device", "cpu"]) == 2
    assert "resnet18 is a classification model" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize(
    "name, shape",
    [
        ("r3d_18", (1, 3, 8, 112, 112)),
        ("fcn_resnet50", (1, 3, 224, 224)),
        ("fasterrcnn_mobilenet_v3_large_fpn", (1, 3, 224, 224)),
    ],
)
def test_models_the_issue_named_load_and_run(name, shape):
    model = cli.load_model(name)
    args = cli._parse([name, "--device", "cpu"])
    assert cli._default_shape(args, model) == shape
    with torch.no_grad():
        model(torch.randn(shape))


def test_the_first_conv_decides_the_default_input():
    args = cli._parse(["m", "--device", "cpu", "--image-size", "16"])
    assert cli._default_shape(args, nn.Sequential(nn.Conv3d(2, 4, 3))) == (1, 2, 8, 16, 16)
    assert cli._default_shape(args, nn.Sequential(nn.Conv2d(1, 4, 3))) == (1, 1, 16, 16)
    assert cli._default_shape(args, nn.Sequential(nn.Linear(3, 4))) == (1, 3, 16, 16)


# --- --save and --plot --------------------------------------------------------------------


def test_save_writes_a_state_dict_that_loads_into_a_fused_model(small_model, tmp_path, capsys):
    path = tmp_path / "folded.pt"
    args = [f"{small_model}:instance", "--input-shape", "1,3,8,8", "--device", "cpu"]
    assert cli.main([*args, "--no-timing", "--save", str(path)]) == 0
    assert f"saved to {path}" in capsys.readouterr().err
    import small_model as module

    x = torch.randn(2, 3, 8, 8)
    fresh = fx.fuse(module.build().eval(), x)  # other random weights and statistics
    with torch.no_grad():
        expected = module.instance(x)
        assert not torch.allclose(fresh(x), expected)
        fresh.load_state_dict(torch.load(path))
        torch.testing.assert_close(fresh(x), expected)


def test_save_of_a_model_fx_cannot_trace_says_so(small_model, tmp_path, capsys):
    args = [f"{small_model}:Branchy", "--input-shape", "1,3,8,8", "--device", "cpu"]
    assert cli.main([*args, "--save", str(tmp_path / "m.pt")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(
        "inductor-convbn: error: --save folds at module level, through torch.fx: torch.fx "
        "cannot trace the forward of Branchy: TraceError:"
    )
    assert not (tmp_path / "m.pt").exists()


def test_plot_without_matplotlib_names_the_extra(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["bench", "resnet18", "--plot", "rounds.png"])
    assert exit_info.value.code == 2
    assert "--plot needs matplotlib, not installed here: pip install 'inductor_convbn[plot]'" in (
        capsys.readouterr().err
    )


def test_plot_draws_the_rounds(small_model, stub_timing, tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "rounds.png"
    args = ["bench", f"{small_model}:instance", "--input-shape", "1,3,8,8", "--device", "cpu"]
    assert cli.main([*args, "--plot", str(path)]) == 0
    assert path.read_bytes().startswith(b"\x89PNG")


def test_export_builds_a_package_with_every_pair_folded_once(small_model, tmp_path, capsys):
    pytest.importorskip("torch._inductor.package")
    path = tmp_path / "model.pt2"
    args = ["export", f"{small_model}:build", "--input-shape", "2,3,8,8", "--device", "cpu"]
    assert cli.main([*args, "-o", str(path), "--dynamic-batch", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert (result["pairs"], result["folded"], result["outputs_match"]) == (2, 2, True)
    assert {r["reason"] for r in result["pair_reports"]} == {
        "once, when the package is built (AOTInductor)"
    }
    import torch

    package = torch._inductor.aoti_load_package(str(path))
    assert package(torch.randn(5, 3, 8, 8)).shape[0] == 5  # the batch is dynamic
