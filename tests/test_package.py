"""AOTInductor packages: every pair folded once, when the package is built."""

import zipfile

import pytest
import torch
from torch import nn

import inductor_convbn
from inductor_convbn import _compat, _harness, _pairs
from inductor_convbn.testing import randomize_batch_norm

pytest.importorskip("torch._inductor.package")


def _conv_bn_relu_convt_bn() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(),
        nn.ConvTranspose2d(8, 4, 3), nn.BatchNorm2d(4),
    )  # fmt: skip
    return randomize_batch_norm(model).eval()


def _generated_code(path) -> str:
    with zipfile.ZipFile(path) as package:
        return "".join(
            package.read(name).decode(errors="replace")
            for name in package.namelist()
            if name.endswith(".cpp")
        )


def test_a_package_folds_every_pair_once_and_keeps_no_batch_norm_arithmetic(tmp_path):
    model, x = _conv_bn_relu_convt_bn(), torch.randn(2, 3, 16, 16)
    path = tmp_path / "model.pt2"
    report = inductor_convbn.verify_package(model, x, package_path=path)
    assert report.pairs == report.folded == 2 and report.outputs_match, report
    assert {r.reason for r in report.pair_reports} == {_pairs.FOLDED_IN_PACKAGE}, report
    assert "AOTInductor package" in str(report).splitlines()[0]
    # The BN's rsqrt(var + eps) is gone from the generated C++, which a package built
    # without the plugin computes on every call.
    assert "sqrt" not in _generated_code(path)
    plain = tmp_path / "plain.pt2"
    _harness.build_package(model, (x,), str(plain), plugin=False)
    assert "sqrt" in _generated_code(plain)


def test_a_package_with_a_dynamic_batch_runs_every_batch_size(tmp_path):
    model, x = _conv_bn_relu_convt_bn(), torch.randn(2, 3, 16, 16)
    batch = torch.export.Dim("batch", min=1, max=16)
    path = tmp_path / "model.pt2"
    report = inductor_convbn.verify_package(
        model, x, dynamic_shapes=({0: batch},), package_path=path
    )
    assert report.pairs == report.folded == 2 and report.outputs_match, report
    package = _compat.aoti_package_functions()[1](str(path))
    for n in (1, 5):
        y = torch.randn(n, 3, 16, 16)
        with torch.no_grad():
            torch.testing.assert_close(package(y), model(y), rtol=1e-4, atol=1e-4)


def test_a_package_of_resnet18_folds_its_20_pairs_once():
    from inductor_convbn.testing import torchvision_model

    model = torchvision_model("resnet18")
    report = inductor_convbn.verify_package(model, torch.randn(1, 3, 64, 64))
    assert report.pairs == report.folded == 20 and report.outputs_match, report
    assert not report.missed and not report.kept


def test_a_package_keeps_an_unsafe_pair_unfolded():
    model = _conv_bn_relu_convt_bn()
    model[1].running_var[0] = float("nan")
    report = inductor_convbn.verify_package(model, torch.randn(2, 3, 16, 16))
    statuses = [r.status for r in report.pair_reports]
    assert statuses == ["skipped", "folded"] and report.outputs_match, report
    assert report.pair_reports[0].reason == _pairs.STATS_NOT_FINITE


def _batch_norm_nodes(graph: torch.fx.Graph) -> list[str]:
    return [str(n.target) for n in graph.nodes if "batch_norm" in str(n.target)]


def test_the_module_level_fold_exports_with_no_batch_norm_left():
    """For other runtimes (ONNX, ExecuTorch): fold at module level, then export."""
    from inductor_convbn import fx
    from inductor_convbn.testing import torchvision_model

    model, x = torchvision_model("resnet18"), torch.randn(1, 3, 64, 64)
    assert len(_batch_norm_nodes(torch.export.export(model, (x,)).graph)) == 20
    fused = fx.fuse(model, x)
    exported = torch.export.export(fused, (x,))
    assert _batch_norm_nodes(exported.graph) == []
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(x), model(x), rtol=1e-4, atol=1e-4)


def test_the_module_level_fold_exports_to_onnx_with_no_batch_normalization(tmp_path):
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    from inductor_convbn import fx

    model, x = _conv_bn_relu_convt_bn(), torch.randn(2, 3, 16, 16)
    path = tmp_path / "model.onnx"
    torch.onnx.export(fx.fuse(model, x), (x,), str(path), dynamo=True)
    ops = {node.op_type for node in onnx.load(str(path)).graph.node}
    assert "BatchNormalization" not in ops and {"Conv", "ConvTranspose"} <= ops, ops
