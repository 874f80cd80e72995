"""nox sessions: the test suite against every supported torch release, lint, docs.

    nox                                   # the default session: the torch on this machine's disk
    nox -s "tests-3.11(torch='2.6.0')"    # one release
    nox -s tests                          # every release, one after another
    nox -s lint docs
    nox -s zoo                            # the slow sweeps (zoo, hypothesis): before a release

Each non-default release downloads its torch (about 0.8 GB) and its CUDA libraries.
Results: docs/support.md.
"""

import os

import nox
from packaging.version import Version

nox.options.default_venv_backend = "venv"

PYPROJECT = nox.project.load_toml("pyproject.toml")
PYTHON_VERSIONS = nox.project.python_versions(PYPROJECT)  # from the trove classifiers

# The latest patch of every minor torch release from pyproject.toml's lower bound to the
# newest on the registry, each with its torchvision.
TORCH_VERSIONS = {
    "2.6.0": "0.21.0",
    "2.7.1": "0.22.1",
    "2.8.0": "0.23.0",
    "2.9.1": "0.24.1",
    "2.10.0": "0.25.0",
    "2.11.0": "0.26.0",
    "2.12.1": "0.27.1",
    "2.13.0": "0.28.0",
    "2.14.1": "0.29.1",
    # No torchvision 0.30 on the registry; 0.29.2 is built on torch's stable ABI and
    # declares torch>=2.14.
    "2.15.0": "0.29.2",
}
# The release on this machine's disk: the default session, the only one CI runs.
DISK_TORCH = "2.14.1"

nox.options.sessions = [f"tests-{PYTHON_VERSIONS[-1]}(torch='{DISK_TORCH}')"]


def _pip_env(torch: str) -> dict[str, str]:
    """This machine's global pip config caps torch at the release on its disk through a
    constraint file (clearing PIP_CONSTRAINT does not lift it). A newer release installs
    with no pip config file at all."""
    return {"PIP_CONFIG_FILE": os.devnull} if Version(torch) > Version(DISK_TORCH) else {}


@nox.session(python=PYTHON_VERSIONS)
@nox.parametrize("torch", list(TORCH_VERSIONS))
def tests(session: nox.Session, torch: str) -> None:
    """The test suite, then the ResNet18 fold check, on one torch release."""
    # `===`: exactly the registry's build. `==2.13.0` also takes a local `2.13.0+cpu`
    # (this machine's find-links has one), which the registry's torchvision cannot load.
    session.install(
        f"torch==={torch}",
        f"torchvision==={TORCH_VERSIONS[torch]}",
        "-e",
        ".[test]",
        env=_pip_env(torch),
    )
    session.run(
        "python",
        "-c",
        "import torch, torchvision; print('torch', torch.__version__, "
        "'torchvision', torchvision.__version__, 'cuda', torch.cuda.is_available())",
    )
    # A cache of this session's own: no graph compiled by another torch or run is served.
    session.env["TORCHINDUCTOR_CACHE_DIR"] = os.path.abspath(
        os.path.join(session.create_tmp(), "inductor")
    )
    session.run("pytest", "-p", "no:logging", *session.posargs)
    session.run("python", "-m", "inductor_convbn", "resnet18", "--no-timing")


@nox.session(python=PYTHON_VERSIONS[-1])
def zoo(session: nox.Session) -> None:
    """The slow sweeps, before each release: every torchvision model (docs/zoo.md), and the
    property-based tests with hundreds of examples. Hours on two CPU cores."""
    session.install(
        f"torch==={DISK_TORCH}", f"torchvision==={TORCH_VERSIONS[DISK_TORCH]}", "-e", ".[test]"
    )
    session.env["TORCHINDUCTOR_CACHE_DIR"] = os.path.abspath(
        os.path.join(session.create_tmp(), "inductor")
    )
    session.run(
        "pytest", "-p", "no:logging", "-m", "slow", "tests/test_zoo.py",
        "--zoo-table", "docs/zoo.md", *session.posargs,
    )  # fmt: skip
    session.run("pytest", "-p", "no:logging", "-m", "slow", "tests/test_properties.py")


@nox.session(python=PYTHON_VERSIONS[-1])
def lint(session: nox.Session) -> None:
    """ruff (format and lint) and mypy, against the torch on this machine's disk."""
    session.install(
        f"torch=={DISK_TORCH}",
        "-e",
        ".",
        *nox.project.dependency_groups(PYPROJECT, "lint"),
    )
    session.run("ruff", "format", "--check", "src", "tests", "noxfile.py")
    session.run("ruff", "check", "src", "tests", "noxfile.py")
    session.run("mypy")


@nox.session(python=PYTHON_VERSIONS[-1])
def docs(session: nox.Session) -> None:
    """Build the documentation site with mkdocs, warnings as errors, as CI does."""
    # `docs` is an optional dependency (an extra) of the package, not a dependency group.
    session.install(*PYPROJECT["project"]["optional-dependencies"]["docs"])
    session.env["NO_MKDOCS_2_WARNING"] = "1"
    session.run("mkdocs", "build", "--strict", "--site-dir", session.create_tmp())
