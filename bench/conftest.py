"""Options for the benchmark suite: ``pytest bench/ [--device cuda] [--smoke]``."""

import os
import sys
import tempfile

os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="inductor_convbn-bench-"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

# A dozen compiled copies of one model run in one process; dynamo counts their cache
# entries against the recompile limit, past which it runs them eagerly without a word.
_LIMIT = (
    "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
)
setattr(torch._dynamo.config, _LIMIT, 64)  # recompile_limit: torch >= 2.7


def pytest_addoption(parser):
    group = parser.getgroup("inductor_convbn benchmarks")
    group.addoption("--device", default="cpu", help="cpu or cuda")
    group.addoption(
        "--smoke",
        action="store_true",
        help="a small, fast run (64x64 images, few variants and rounds): checks the suite works",
    )
    group.addoption("--rounds", type=int, default=None, help="interleaved rounds per config")
