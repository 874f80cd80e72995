"""The model zoo: torchvision's models compiled with the plugin match eager, and every
conv -> BN pair is folded or skipped with its reason.

Every model runs through ``verify(policy="always")`` (every safe pair folded, per call), in
eval under ``no_grad``, TF32 off, at the smallest input it accepts, with random BN statistics.
The pair count is ``verify``'s, read from dynamo's graph without the pattern matcher; the FX
fuser counts the same pairs from the module tree on its own, and its fused model must match
eager too.

    pytest tests/test_zoo.py                                  # the CI subset (three models)
    pytest -m slow tests/test_zoo.py --zoo-table docs/zoo.md  # every model; writes the table
    nox -s zoo                                                # the same, the slow sweep

The slow sweep takes hours on two CPU cores: run it before each release.
"""

from __future__ import annotations

import dataclasses
import functools
import platform
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

import inductor_convbn
from inductor_convbn import _compat, _pairs, _report, fx
from inductor_convbn.testing import randomize_batch_norm, randomize_zero_weights, torchvision_model

torchvision = pytest.importorskip("torchvision")

pytestmark = [
    # GoogLeNet and Inception v3 built without weights warn that their init will change.
    pytest.mark.filterwarnings("ignore:The default weight initialization:FutureWarning"),
]

# Why a pair of a well-formed eval model may be left unfolded; anything else fails the sweep.
EXPECTED_SKIPS = {_pairs.NO_RUNNING_STATS, _pairs.OTHER_USERS, _pairs.BN_TRAINING}
# Input sizes to try, smallest first: the model runs at the first one eager accepts.
IMAGE_SIZES = (32, 64, 75, 96, 128, 160, 224, 300)  # 300: the SSD300 backbone


@dataclasses.dataclass(frozen=True)
class ZooModel:
    name: str
    build: Callable[[], nn.Module]
    shapes: tuple[tuple[int, ...], ...]  # candidate input shapes, smallest first


def _images(channels: int = 3) -> tuple[tuple[int, ...], ...]:
    return tuple((1, channels, s, s) for s in IMAGE_SIZES)


def _classification(name: str) -> ZooModel:
    return ZooModel(name, functools.partial(torchvision_model, name), _images())


def _prepared(model: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    return randomize_zero_weights(randomize_batch_norm(model)).eval()


def _backbone(builder: Callable[..., nn.Module], **kwargs: object) -> nn.Module:
    torch.manual_seed(0)
    # Without pretrained weights the detection builders use nn.BatchNorm2d, not the
    # FrozenBatchNorm2d (no batch_norm call at all) of their pretrained configuration.
    model = builder(weights=None, weights_backbone=None, **kwargs)
    return _prepared(model.backbone)


def _video(builder: Callable[..., nn.Module]) -> nn.Module:
    torch.manual_seed(0)
    return _prepared(builder(weights=None))


def _zoo() -> list[ZooModel]:
    seg = torchvision.models.segmentation
    det = torchvision.models.detection
    video = torchvision.models.video
    models = [_classification(n) for n in torchvision.models.list_models(torchvision.models)]
    backbones = {
        # Dilated ResNet (replace_stride_with_dilation), returning a dict of feature maps.
        "deeplabv3_resnet50.backbone": functools.partial(_backbone, seg.deeplabv3_resnet50),
        # Dilated MobileNetV3, eps=1e-3.
        "lraspp_mobilenet_v3_large.backbone": functools.partial(
            _backbone, seg.lraspp_mobilenet_v3_large
        ),
        # ResNet50 body + FPN (convs without BN after the body).
        "fasterrcnn_resnet50_fpn.backbone": functools.partial(
            _backbone, det.fasterrcnn_resnet50_fpn
        ),
        # The v2 FPN has a BN after each FPN conv.
        "fasterrcnn_resnet50_fpn_v2.backbone": functools.partial(
            _backbone, det.fasterrcnn_resnet50_fpn_v2
        ),
        "fasterrcnn_mobilenet_v3_large_fpn.backbone": functools.partial(
            _backbone, det.fasterrcnn_mobilenet_v3_large_fpn
        ),
        # MobileNetV3 with BN eps=1e-3, momentum=0.03, plus extra depthwise blocks.
        "ssdlite320_mobilenet_v3_large.backbone": functools.partial(
            _backbone, det.ssdlite320_mobilenet_v3_large
        ),
        # VGG16 without BN.
        "ssd300_vgg16.backbone": functools.partial(_backbone, det.ssd300_vgg16),
    }
    models += [ZooModel(n, b, _images()) for n, b in backbones.items()]
    # The CI subset's MobileNetV3: its first five blocks, a quarter of the compile time.
    models.append(
        ZooModel(
            "mobilenet_v3_small.features[:5]",
            lambda: torchvision_model("mobilenet_v3_small").features[:5],
            _images(),
        )
    )
    # S3D's last pooling has a fixed (2, 7, 7) kernel: 16 frames of 224 x 224 at the least.
    clips = (*((1, 3, t, s, s) for t in (4, 8, 16) for s in (32, 64, 112)), (1, 3, 16, 224, 224))
    for builder in (video.r3d_18, video.mc3_18, video.r2plus1d_18, video.s3d):
        # Conv3d -> BatchNorm3d; S3D's separable convs with eps=1e-3.
        models.append(ZooModel(builder.__name__, functools.partial(_video, builder), clips))
    # Larger variants of families above, last: a sweep stopped early has covered every family.
    models.sort(key=lambda m: m.name in LARGE_VARIANTS)
    return models


LARGE_VARIANTS = {
    *("convnext_base", "convnext_large", "densenet161", "densenet169", "densenet201"),
    *(f"efficientnet_b{i}" for i in range(3, 8)),
    *("efficientnet_v2_m", "efficientnet_v2_l", "resnet101", "resnet152"),
    *("regnet_x_8gf", "regnet_x_16gf", "regnet_x_32gf", "regnet_y_8gf", "regnet_y_16gf"),
    *("regnet_y_32gf", "regnet_y_128gf", "resnext101_32x8d", "resnext101_64x4d"),
    *("swin_b", "swin_v2_b", "vgg19", "vgg19_bn", "vit_l_16", "vit_l_32", "vit_h_14"),
    *("wide_resnet101_2",),
}


ZOO = {m.name: m for m in _zoo()}
# The CI subset: BN eps=1e-3, depthwise convs (3x3 and 5x5, strided) and squeeze-excitation;
# a model with no BN.
FAST = ("mobilenet_v3_small.features[:5]", "squeezenet1_1")


def smallest_input(
    model: nn.Module, shapes: tuple[tuple[int, ...], ...]
) -> tuple[torch.Tensor, float]:
    """A random input of the first shape the eager model accepts, and the largest magnitude
    of the model's output on it."""
    errors = []
    for shape in shapes:
        x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
        try:
            with torch.no_grad():
                out = model(x)
        except (RuntimeError, ValueError, AssertionError, IndexError) as e:
            errors.append(f"{shape}: {type(e).__name__}: {e}")
            continue
        leaves = [t for t in _compat.tree_leaves(out) if isinstance(t, torch.Tensor)]
        return x, max(float(t.abs().max()) for t in leaves)
    raise AssertionError("no input shape accepted:\n" + "\n".join(errors))


# The heading of docs/zoo.md's GPU section (bench/zoo_gpu.py), which this sweep keeps.
GPU_SECTION = "## On a GPU"
COLUMNS = ("model", "input", "pairs", "folded", "skipped", "fx", "output", "error", "seconds")


@dataclasses.dataclass
class ZooRow:
    """One model's line of the table, as text: rows of an earlier run are read back."""

    model: str
    input: str = ""
    pairs: str = ""
    folded: str = ""
    skipped: str = ""
    fx: str = ""
    output: str = ""  # the largest magnitude of the eager output
    error: str = ""  # the largest difference between compiled and eager
    seconds: str = ""
    result: str = "not run"


def _bn_modules(model: nn.Module) -> int:
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def check_model(entry: ZooModel, row: ZooRow) -> None:
    """Verify one zoo model, filling ``row`` as it goes."""
    model = entry.build()
    x, magnitude = smallest_input(model, entry.shapes)
    row.input, row.output = "x".join(map(str, x.shape)), f"{magnitude:.2g}"
    assert magnitude > 0, "the output is all zeros: comparing it checks nothing"
    # Randomly initialised deep models (Inception v3) reach outputs of 1e8, where float32
    # eager is itself 1e2 off exact: the absolute tolerance is in units of the output.
    rtol, atol = _report.DEFAULT_TOLERANCES[torch.float32]
    atol *= max(1.0, magnitude)
    start = time.perf_counter()
    report = inductor_convbn.verify(model, x, policy="always", rtol=rtol, atol=atol, freezing=False)
    row.seconds = f"{time.perf_counter() - start:.0f}"
    row.pairs, row.folded = str(report.pairs), str(report.folded)
    row.error = f"{report.max_abs_error:.2g}"
    row.skipped = ", ".join(f"{n}: {r}" for r, n in Counter(r for _, r in report.skipped).items())

    assert report.outputs_match, report
    assert not report.missed, report
    # Every pair is folded, or skipped for a reason a correct fold would have to respect;
    # the plugin's own count is exactly the pairs the independent count found eligible.
    not_eligible = [p for p in report.pair_reports if p.reason in EXPECTED_SKIPS]
    assert report.folded == report.pairs - len(not_eligible), report
    assert all(p.status == _pairs.FOLDED for p in report.pair_reports if p not in not_eligible)
    if _bn_modules(model) == 0:
        assert report.pairs == 0, report

    # A second, independent count: the FX fuser's, from the module tree.
    try:
        fused = fx.fuse(model, x)
    except fx.FuseError as e:
        row.fx = f"not traceable by torch.fx ({e.module or 'forward'})"
    else:
        fuse_report = fx.fuse_report(fused)
        row.fx = f"{fuse_report.folded}/{fuse_report.pairs}"
        assert fuse_report.pairs == report.pairs, (fuse_report, report)
        assert fuse_report.folded == report.folded, (fuse_report, report)
        with torch.no_grad():
            torch.testing.assert_close(fused(x), model(x), rtol=rtol, atol=atol)


@pytest.fixture
def zoo_row(request: pytest.FixtureRequest):
    """The table row of this test's model, written to ``--zoo-table`` after each model."""
    row = ZooRow(model=request.node.callspec.params["name"])
    yield row
    path = request.config.getoption("--zoo-table")
    if path:
        ROWS[row.model] = row
        write_table(Path(path), list(ROWS.values()))


ROWS: dict[str, ZooRow] = {}


def _run(name: str, row: ZooRow) -> None:
    try:
        check_model(ZOO[name], row)
    except BaseException as e:
        first_line = (str(e).strip().splitlines() or [""])[0]
        row.result = f"FAILED: {type(e).__name__}: {first_line[:150]}"
        raise
    row.result = "ok"


@pytest.mark.parametrize("name", FAST)
def test_zoo_subset(name, zoo_row):
    _run(name, zoo_row)


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in ZOO if n not in FAST])
def test_zoo(name, zoo_row):
    _run(name, zoo_row)


def read_table(path: Path) -> dict[str, ZooRow]:
    """The rows of a table this module wrote, by model: a rerun of some models keeps the rest."""
    rows: dict[str, ZooRow] = {}
    if not path.exists():
        return rows
    for line in path.read_text().splitlines():
        cells = [c.strip().replace("\\|", "|") for c in line.strip().strip("|").split(" | ")]
        if line.startswith("| ") and len(cells) == len(COLUMNS) + 1 and cells[0] in ZOO:
            rows[cells[0]] = ZooRow(*cells)
    return rows


def write_table(path: Path, rows: list[ZooRow]) -> None:
    """The sweep's results as a Markdown page, over the rows already there; zoo models not
    run yet are listed last."""
    kept_sections = ""
    if path.exists():  # sections written by other sweeps (the GPU's) stay as they are
        text = path.read_text()
        kept_sections = text[text.index(GPU_SECTION) :] if GPU_SECTION in text else ""
    merged = {**read_table(path), **{r.model: r for r in rows}}
    merged = {name: r for name, r in merged.items() if r.result != "not run"}
    done = list(merged.values())
    table = done + [ZooRow(name) for name in ZOO if name not in merged]
    ok = [r for r in done if r.result == "ok"]
    pairs = sum(int(r.pairs) for r in ok)
    folded = sum(int(r.folded) for r in ok)
    skipped = Counter(r.result.split(":")[0] for r in done if r.result != "ok")
    lines = [
        "# The model zoo",
        "",
        "<!-- Generated by `pytest -m slow tests/test_zoo.py --zoo-table docs/zoo.md` -->",
        "",
        f"{len(ok)} of {len(table)} models checked and matching eager with the plugin installed"
        f' (`verify(model, x, policy="always")`, float32, eval, `no_grad`, TF32 off):'
        f" {folded} of {pairs} conv -> BN pairs folded, {pairs - folded} skipped with a reason"
        + "".join(f"; {n} {what.lower()}" for what, n in sorted(skipped.items()))
        + f". torch {torch.__version__}, torchvision {torchvision.__version__},"
        f" {platform.machine()} CPU, {time.strftime('%Y-%m-%d')}.",
        "",
        "Each model has random weights and random BN statistics"
        " (`inductor_convbn.testing.randomize_batch_norm`; a weight torchvision starts at"
        " zero, as ViT's head, gets random values too, so that no output is all zeros) and"
        " runs at batch 1 on the"
        " smallest input eager accepts. *pairs* are counted in dynamo's graph, without the"
        " pattern matcher; *fx* is what `inductor_convbn.fx.fuse` folded of the pairs it"
        " found on its own, in the module tree (its fused model is checked against eager"
        " too). *output* is the largest magnitude of the eager output and *error* the largest"
        " difference of the compiled one; the tolerance is rtol 1e-4 and atol 1e-4 times"
        " the output's magnitude when that is above 1. *seconds* is `verify`'s wall time"
        " (eager, compile, compiled run) on two CPU cores shared with other work.",
        "",
        "| " + " | ".join(COLUMNS) + " | result |",
        "| " + " | ".join("---" for _ in range(len(COLUMNS) + 1)) + " |",
    ]
    for r in table:
        cells = [getattr(r, c) for c in COLUMNS] + [r.result]
        lines.append("| " + " | ".join(c.replace("|", "\\|") or "-" for c in cells) + " |")
    path.write_text("\n".join(lines) + "\n" + ("\n" + kept_sections if kept_sections else ""))


def test_zero_weights_get_random_values():
    # torchvision's ViT starts with a head of zeros: its output would be 0 for any input.
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    with torch.no_grad():
        model[1].weight.zero_()
        model[1].bias.zero_()
    kept = model[0].weight.clone()
    randomize_zero_weights(model)
    assert model[1].weight.any()
    assert not model[1].bias.any()  # a zero bias changes nothing the comparison needs
    torch.testing.assert_close(model[0].weight, kept, rtol=0, atol=0)


def test_table_keeps_the_gpu_section(tmp_path):
    page = tmp_path / "zoo.md"
    write_table(page, [ZooRow("squeezenet1_1", pairs="0", folded="0", result="ok")])
    page.write_text(page.read_text() + f"\n{GPU_SECTION}\n\n| model | x |\n| --- | --- |\n")
    write_table(page, [ZooRow("alexnet", pairs="0", folded="0", result="ok")])
    text = page.read_text()
    assert text.count(GPU_SECTION) == 1 and text.endswith("| model | x |\n| --- | --- |\n")
    assert set(read_table(page)) >= {"squeezenet1_1", "alexnet"}
