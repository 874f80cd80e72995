"""The README's commands and code blocks work as written."""

import re
import shlex
from pathlib import Path

import pytest

import inductor_convbn

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


def test_the_readme_shows_one_install_one_main_and_one_test_command():
    install, main, tests = _blocks("bash")
    assert install.strip() == 'pip install -e ".[test]"'
    assert shlex.split(main)[:3] == ["python", "-m", "inductor_convbn"]
    assert shlex.split(tests)[0] == "pytest"
    # CI runs the README's install and test commands.
    ci = (ROOT / ".ci" / "run").read_text()
    assert '-e ".[test' in ci and re.search(rf"^{re.escape(tests.strip())}$", ci, flags=re.M)


def test_the_readme_python_blocks_run_in_order():
    """Each ``python`` block runs after the ones before it, in one namespace, as a reader
    pasting them into one session would; their asserts are the README's claims."""
    pytest.importorskip("torchvision")
    namespace: dict = {}
    for block in _blocks("python"):
        exec(compile(block, "README.md", "exec"), namespace)
    assert not inductor_convbn.is_installed()  # the README's last step
    assert namespace["report"].folded == namespace["report"].pairs == 20
