"""install / uninstall / installed, chaining another library's pass, and the cache key."""

import subprocess
import sys
import threading

import pytest
import torch
from torch import nn

import inductor_convbn
from conftest import DEVICES  # noqa: F401
from inductor_convbn import ConvBnFoldPass, _compat
from inductor_convbn.testing import randomize_batch_norm


class RecordingPass(_compat.CustomGraphPass):
    def __init__(self, uuid="other-library-v1"):
        self.calls = 0
        self._uuid = uuid

    def __call__(self, graph):
        self.calls += 1

    def uuid(self):
        return self._uuid


def _compile_small():
    model = randomize_batch_norm(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))).eval()
    with torch.no_grad():
        torch.compile(model)(torch.randn(1, 3, 8, 8))


HOOKS = ("joint_custom_post_pass", "post_grad_custom_post_pass")


def _hooked():
    return [getattr(_compat.inductor_config, field) for field in HOOKS]


def test_install_is_idempotent_and_uninstall_restores_none():
    inductor_convbn.install()
    first = _hooked()
    inductor_convbn.install()
    assert _hooked() == first
    assert [(p.stage, p.policy, p.previous) for p in first] == [
        ("joint", "auto", None),
        ("post_grad", "auto", None),
    ]
    assert inductor_convbn.is_installed()
    inductor_convbn.uninstall()
    assert _hooked() == [None, None]
    assert not inductor_convbn.is_installed()
    inductor_convbn.uninstall()  # a second uninstall is a no-op


def test_install_with_another_policy_switches_and_keeps_the_chain():
    other = RecordingPass()
    _compat.inductor_config.joint_custom_post_pass = other
    inductor_convbn.install()
    inductor_convbn.install("always")
    joint, post_grad = _hooked()
    assert joint.policy == post_grad.policy == "always"
    assert joint.previous is other and post_grad.previous is None
    with inductor_convbn.installed("auto"):
        assert _hooked()[1].policy == "auto"
    assert _hooked()[1].policy == "always"
    inductor_convbn.uninstall()
    assert _hooked() == [other, None]


def test_bad_policy_or_stage_is_a_value_error():
    with pytest.raises(ValueError, match="policy must be one of"):
        inductor_convbn.install("never")
    with pytest.raises(ValueError, match="stage must be one of"):
        ConvBnFoldPass(stage="pre_grad")
    assert _hooked() == [None, None]


@pytest.mark.parametrize("field", HOOKS)
def test_pass_installed_before_still_runs_and_is_restored(field):
    other = RecordingPass()
    setattr(_compat.inductor_config, field, other)
    inductor_convbn.install("always")
    _compile_small()
    assert other.calls == 1
    assert _compat.counters["inductor"]["inductor_convbn_folded"] == 1
    inductor_convbn.uninstall()
    assert getattr(_compat.inductor_config, field) is other


def test_uuid_covers_the_chained_pass():
    ours = ConvBnFoldPass().uuid()
    assert ours is not None
    assert ConvBnFoldPass(policy="always").uuid() != ours
    assert ConvBnFoldPass(stage="joint").uuid() != ours
    chained = ConvBnFoldPass(RecordingPass("a")).uuid()
    assert chained != ours and chained != ConvBnFoldPass(RecordingPass("b")).uuid()
    # A bare function has no uuid: the cache must be bypassed, as it would be without us.
    assert ConvBnFoldPass(lambda graph: None).uuid() is None
    # torch >= 2.14 accepts a list of passes; each one's uuid is part of ours.
    assert ConvBnFoldPass([RecordingPass("a"), RecordingPass("b")]).uuid() is not None


def test_installed_context_manager_restores_state():
    with inductor_convbn.installed():
        assert inductor_convbn.is_installed()
    assert not inductor_convbn.is_installed()
    inductor_convbn.install()
    with inductor_convbn.installed():
        pass
    assert inductor_convbn.is_installed()


@pytest.mark.parametrize("field", HOOKS)
def test_uninstall_refuses_to_drop_a_pass_installed_after_us(field):
    inductor_convbn.install()
    before = _hooked()
    later = RecordingPass()
    setattr(_compat.inductor_config, field, later)
    with pytest.raises(RuntimeError, match="replaced after install"):
        inductor_convbn.uninstall()
    # Nothing changed: neither the other library's pass nor ours in the other field.
    assert _hooked() == [later if f == field else p for f, p in zip(HOOKS, before, strict=True)]


def test_install_from_many_threads_installs_one_pass_each():
    results = []

    def install_twice():
        inductor_convbn.install()
        inductor_convbn.install()
        results.append(_compat.inductor_config.post_grad_custom_post_pass)

    threads = [threading.Thread(target=install_twice) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 8
    for installed in results:
        assert isinstance(installed, ConvBnFoldPass)
    if _compat.CONFIG_IS_THREAD_LOCAL:
        # Each thread chained onto its own (empty) config, never onto another's pass.
        assert all(p.previous is None for p in results)
        assert not inductor_convbn.is_installed()
    else:
        assert len({id(p) for p in results}) == 1 and results[0].previous is None


def test_plugin_does_not_bypass_fx_graph_cache():
    inductor_convbn.install()
    _compile_small()
    assert _compat.counters["inductor"]["fxgraph_cache_bypass"] == 0
    assert (
        _compat.counters["inductor"]["fxgraph_cache_miss"]
        + _compat.counters["inductor"]["fxgraph_cache_hit"]
        == 1
    )


def test_import_traces_nothing_and_leaves_cuda_alone():
    code = (
        "import torch, inductor_convbn\n"
        "from inductor_convbn import _registry\n"
        "assert _registry._register.cache_info().currsize == 0\n"
        "assert not torch.cuda.is_initialized()\n"
        "inductor_convbn.install()\n"
        "assert _registry._register.cache_info().currsize == 0\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "ok"
