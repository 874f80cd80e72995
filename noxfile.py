"""nox sessions: the test suite against each supported torch release."""

import nox

nox.options.default_venv_backend = "venv"
nox.options.sessions = ["tests"]

# torch -> matching torchvision. The default session's pin is the release CI installs.
TORCH_VERSIONS = {"2.14.1": "0.29.1"}


@nox.session(python="3.11")
@nox.parametrize("torch_version", list(TORCH_VERSIONS))
def tests(session: nox.Session, torch_version: str) -> None:
    session.install(f"torch=={torch_version}", f"torchvision=={TORCH_VERSIONS[torch_version]}")
    session.install("-e", ".[test]")
    session.run("pytest", *session.posargs)
