"""install / uninstall / installed, chaining another library's pass, and the cache key."""

import os
import shutil
import subprocess
import sys
import threading

import pytest
import torch
from torch import nn

import inductor_convbn
from conftest import DEVICES  # noqa: F401
from inductor_convbn import ConvBnFoldPass, _compat, _decide, _pass, _registry
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


HOOKS = tuple(_pass.HOOKS.values())  # every Inductor config field the plugin hooks into


def _hooked():
    return [getattr(_compat.inductor_config, field) for field in HOOKS]


def test_install_is_idempotent_and_uninstall_restores_none():
    inductor_convbn.install()
    first = _hooked()
    inductor_convbn.install()
    assert _hooked() == first
    assert [(p.stage, p.policy, p.previous) for p in first] == [
        ("grad", "auto", None),
        ("freezing", "auto", None),
        ("early", "auto", None),
        ("per_call", "auto", None),
    ]
    assert inductor_convbn.is_installed()
    inductor_convbn.uninstall()
    assert _hooked() == [None] * len(HOOKS)
    assert not inductor_convbn.is_installed()
    inductor_convbn.uninstall()  # a second uninstall is a no-op


@pytest.mark.parametrize("field", HOOKS)
def test_install_with_another_policy_switches_and_keeps_the_chain(field):
    other = RecordingPass()
    setattr(_compat.inductor_config, field, other)
    inductor_convbn.install()
    inductor_convbn.install("always")
    assert all(p.policy == "always" for p in _hooked())
    assert [p.previous for p in _hooked()] == [other if f == field else None for f in HOOKS]
    with inductor_convbn.installed("auto"):
        assert all(p.policy == "auto" for p in _hooked())
    assert all(p.policy == "always" for p in _hooked())
    inductor_convbn.uninstall()
    assert _hooked() == [other if f == field else None for f in HOOKS]


def test_bad_policy_or_stage_is_a_value_error():
    with pytest.raises(ValueError, match="policy must be one of"):
        inductor_convbn.install("never")
    with pytest.raises(ValueError, match="stage must be one of"):
        ConvBnFoldPass(stage="pre_grad")
    assert _hooked() == [None] * len(HOOKS)


@pytest.mark.parametrize("field", HOOKS)
def test_pass_installed_before_still_runs_and_is_restored(field):
    other = RecordingPass()
    setattr(_compat.inductor_config, field, other)
    inductor_convbn.install("always")
    _compile_small()
    assert other.calls == 1
    assert _compat.counters["inductor"][_decide.COUNTER_FOLDED] == 1
    inductor_convbn.uninstall()
    assert getattr(_compat.inductor_config, field) is other


def test_uuid_covers_the_chained_pass():
    ours = ConvBnFoldPass().uuid()
    assert ours is not None
    assert ConvBnFoldPass(policy="always").uuid() != ours
    assert ConvBnFoldPass(stage="freezing").uuid() != ours
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


def test_old_stage_names_still_work_with_a_deprecation_warning():
    with pytest.warns(DeprecationWarning, match="now called 'freezing'"):
        assert ConvBnFoldPass(stage="joint").stage == "freezing"
    with pytest.warns(DeprecationWarning, match="now called 'per_call'"):
        assert ConvBnFoldPass(stage="post_grad").stage == "per_call"


def test_saved_state_puts_every_hook_back():
    other = RecordingPass()
    with _pass.saved_state():
        inductor_convbn.install()
        setattr(_compat.inductor_config, HOOKS[0], other)
    assert _hooked() == [None] * len(HOOKS)
    assert not inductor_convbn.is_installed()
    inductor_convbn.uninstall()  # nothing installed here: a no-op, not "replaced after"


def test_uuid_changes_when_any_source_file_changes(tmp_path):
    """The cache key hashes every file of the package: a copy of it, each file changed in
    turn, gives a new uuid each time."""
    copy = tmp_path / "inductor_convbn"
    shutil.copytree(_pass.PACKAGE_DIR, copy, ignore=shutil.ignore_patterns("__pycache__"))
    files = sorted(p.name for p in copy.glob("*.py"))
    assert {"_pairs.py", "_decide.py", "_registry.py", "_report.py", "fx.py"} <= set(files)
    code = (
        "import sys, pathlib\n"
        "from inductor_convbn import ConvBnFoldPass, _compat, _pass\n"
        f"assert _pass.PACKAGE_DIR == pathlib.Path({str(copy)!r}), _pass.PACKAGE_DIR\n"
        "seen = {ConvBnFoldPass().uuid()}\n"
        "for name in sys.argv[1:]:\n"
        "    with open(_pass.PACKAGE_DIR / name, 'a') as f:\n"
        "        f.write('\\n# changed\\n')\n"
        "    _compat.get_hash_for_files.cache_clear()\n"
        "    seen.add(ConvBnFoldPass().uuid())\n"
        "print(len(seen))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    out = subprocess.run(
        [sys.executable, "-c", code, *files], capture_output=True, text=True, env=env, check=True
    )
    assert int(out.stdout) == len(files) + 1


class _RenamedPatterns(_compat.PatternMatcherPass):
    """A pattern pass that keeps its entries where a later torch might: not in
    ``.patterns``."""

    def __init__(self):
        super().__init__(pass_name="renamed")
        self._entries = self.patterns
        self.patterns = None

    def __getitem__(self, item):
        return self._entries[item]


def test_losing_the_early_checks_raises(monkeypatch):
    """Without the pattern entries the safety and policy checks could not be attached, and
    every match would fold unchecked: registering must fail loudly instead."""
    monkeypatch.setattr(_registry, "PATTERNS", _RenamedPatterns())
    template = _registry.TEMPLATES[0]
    _registry._register.cache_clear()
    try:
        with pytest.raises(RuntimeError, match="checks cannot be attached"):
            _registry._register(template, torch.float32, torch.float32, "cpu")
    finally:
        _registry._register.cache_clear()  # the real PATTERNS kept its entries


def _conv_bn_pair() -> nn.Module:
    return randomize_batch_norm(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8))).eval()


# torch 2.6 warns that it cannot serialize a custom pass when torch.compile gets options=.
@pytest.mark.filterwarnings("ignore:Skipping serialization:UserWarning")
def test_freezing_for_inductor_alone_warns_that_nothing_was_frozen():
    """``torch.compile(options={"freezing": True})`` turns freezing on after dynamo traced:
    no parameter is frozen, and the warning names the fix."""
    model, x = _conv_bn_pair(), torch.randn(2, 3, 8, 8)
    # A graph from the FX graph cache skips the passes, and their warning with them.
    no_cache = _compat.inductor_config.patch(fx_graph_cache=False)
    with inductor_convbn.installed(), torch.no_grad(), no_cache:
        with pytest.warns(inductor_convbn.FreezingWarning, match="must be on while dynamo"):
            torch.compile(model, options={"freezing": True})(x)


def test_freezing_done_right_does_not_warn():
    model, x = _conv_bn_pair(), torch.randn(2, 3, 8, 8)
    with inductor_convbn.installed(), torch.no_grad():
        with _compat.inductor_config.patch(freezing=True):
            # filterwarnings = error: a FreezingWarning here fails the test.
            torch.compile(model)(x)
        torch._dynamo.reset()
        torch.compile(model, options={"freezing": False})(x)
