"""The public API under misuse: clear errors, and Inductor's config left as it was.

test_pass.py has install/uninstall and one install per thread, test_plugin.py verify()
without a module or an input, test_fx.py fuse() of a non-module, test_cli.py --device cuda
without CUDA.
"""

import threading

import pytest
import torch
from torch import nn

import inductor_convbn
from inductor_convbn import ConvBnFoldPass, _compat, _decide, fx
from inductor_convbn.testing import randomize_batch_norm

HOOKS = ("joint_custom_post_pass", "post_grad_custom_post_pass")


def _hooked():
    return [getattr(_compat.inductor_config, field) for field in HOOKS]


def _model():
    torch.manual_seed(0)
    return randomize_batch_norm(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))).eval()


def _x():
    return torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda: inductor_convbn.install(policy=3), TypeError, "policy must be a str"),
        (lambda: inductor_convbn.install(None), TypeError, "got NoneType None"),
        (lambda: inductor_convbn.installed(["auto"]).__enter__(), TypeError, "must be a str"),
        (lambda: ConvBnFoldPass(stage=1), TypeError, "stage must be a str"),
        (lambda: inductor_convbn.verify("resnet18"), TypeError, "torchvision_model"),
        (lambda: inductor_convbn.verify(_model(), _x(), policy=1), TypeError, "policy"),
        (lambda: inductor_convbn.verify(_model(), _x(), freezing="no"), TypeError, "bool"),
        (lambda: fx.fuse("resnet18"), TypeError, "nn.Module"),
        (lambda: fx.fuse_report(_model()), ValueError, "not made by"),
    ],
    ids=[
        "install-int", "install-none", "installed-list", "pass-stage", "verify-str",
        "verify-policy", "verify-freezing", "fuse-str", "fuse-report-of-a-plain-model",
    ],
)  # fmt: skip
def test_wrong_arguments_are_clear_errors_that_change_nothing(call, error, match):
    before = _hooked()
    with pytest.raises(error, match=match):
        call()
    assert _hooked() == before
    assert not inductor_convbn.is_installed()


class FailingPass(_compat.CustomGraphPass):
    """Stands in for a compile that fails inside Inductor."""

    def __call__(self, graph):
        raise RuntimeError("this graph cannot be compiled")

    def uuid(self):
        return "failing"


def test_a_failed_compile_propagates_and_leaves_the_config_as_it_was():
    failing = FailingPass()
    _compat.inductor_config.post_grad_custom_post_pass = failing
    with pytest.raises(Exception, match="this graph cannot be compiled"):
        inductor_convbn.verify(_model(), _x(), freezing=False)
    assert _hooked() == [None, failing]
    with pytest.raises(Exception, match="this graph cannot be compiled"):
        with inductor_convbn.installed("always"), torch.no_grad():
            torch.compile(_model())(_x())
    assert _hooked() == [None, failing]


class RaisesInForward(nn.Module):
    def forward(self, x):
        raise ValueError("bad input for this model")


def test_a_model_that_raises_propagates_its_own_error():
    with pytest.raises(ValueError, match="bad input for this model"):
        inductor_convbn.verify(RaisesInForward(), _x(), freezing=False)
    assert _hooked() == [None, None]


def _in_threads(work, args):
    """``work(arg)`` in one thread per arg, started together; the results, in order."""
    barrier = threading.Barrier(len(args))
    results, errors = [None] * len(args), []

    def run(i, arg):
        try:
            barrier.wait()
            results[i] = work(arg)
        except BaseException as e:  # reported below, not lost in the thread
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i, arg)) for i, arg in enumerate(args)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    return results


@pytest.mark.skipif(
    not _compat.CONFIG_IS_THREAD_LOCAL, reason="Inductor's config is process-wide before 2.14"
)
def test_threads_that_install_and_compile_at_once_fold_only_their_own_graphs():
    # Inductor's config is per thread here: a thread's install() applies to its compiles.
    installs = [True, False, True, False]

    def work(install):
        model, x = _model(), _x()
        if install:
            inductor_convbn.install("always")
        with torch.no_grad():
            matches = torch.allclose(torch.compile(model)(x), model(x), atol=1e-5)
        if install:
            assert inductor_convbn.is_installed()
            inductor_convbn.uninstall()
        assert _hooked() == [None, None]
        return matches

    assert _in_threads(work, installs) == [True] * len(installs)
    assert _compat.counters["inductor"][_decide.COUNTER_FOLDED] == sum(installs)
    assert _hooked() == [None, None] and not inductor_convbn.is_installed()


def test_verify_from_several_threads_counts_each_its_own_folds():
    # Two pairs in one model, one in the other: each report must count its own.
    one = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
    two = nn.Sequential(*one, nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)).eval()
    models = [randomize_batch_norm(m) for m in (one, two)]
    reports = _in_threads(
        lambda m: inductor_convbn.verify(m, _x(), policy="always", freezing=False), models
    )
    assert [(r.pairs, r.folded, r.outputs_match) for r in reports] == [(1, 1, True), (2, 2, True)]
