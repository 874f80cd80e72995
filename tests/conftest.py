import os
import tempfile

# A fresh Inductor cache per test session, and per pytest-xdist worker (a worker inherits
# the controller's environment): earlier runs' and other workers' compiled graphs would skip
# the pass.
if os.environ.get("PYTEST_XDIST_WORKER") or "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="inductor_convbn-tests-")

import pytest  # noqa: E402
import torch  # noqa: E402

from inductor_convbn import _compat, _decide, _harness, _pass  # noqa: E402

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def pytest_addoption(parser):
    parser.addoption(
        "--zoo-table",
        metavar="PATH",
        help="write the model-zoo results of tests/test_zoo.py to PATH as Markdown",
    )


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _clean_global_state():
    """Each test starts from no plugin, no compiled code, zeroed counters, TF32 off."""
    with _pass.saved_state(), _harness.tf32_off():
        _compat.dynamo_reset()
        _compat.counters.clear()
        _decide.take_decisions()
        _decide.take_fusions()
        try:
            yield
        finally:
            _compat.dynamo_reset()
