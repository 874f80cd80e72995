"""Print the post-grad graph of a conv -> BatchNorm model before and after the plugin's pass.

    PYTHONPATH=src python docs/gen_graphs.py

The output is pasted into docs/how-it-works.md. Three graphs of ``Conv2d(3, 8, 3, bias=False)
-> BatchNorm2d(8)`` on CPU, fp32, under ``torch.no_grad()``:

1. the post-grad graph Inductor hands its custom passes, without freezing;
2. the same graph after the plugin's per-call stage folded the pair;
3. with freezing, without the plugin: on CPU, Inductor's own freezing passes fold a plain
   Conv2d -> BatchNorm2d pair as well (it is there for comparison);
4. with freezing and the plugin: the freezing stage folded the pair and Inductor's freezing
   turned the folded weight and bias into constants.
"""

from __future__ import annotations

import contextlib
import re
from typing import Any

import torch
from torch import nn

import inductor_convbn
from inductor_convbn import _compat
from inductor_convbn.testing import randomize_batch_norm


class _Recorder:
    """A post-grad pass that runs ``inner`` (if any) and keeps the graph's code after it."""

    def __init__(self, inner: Any = None) -> None:
        self.inner = inner
        self.code = ""

    def __call__(self, graph: torch.fx.Graph) -> None:
        if self.inner is not None:
            self.inner(graph)
        self.code = _readable(graph)


def _readable(graph: torch.fx.Graph) -> str:
    code = graph.python_code("self").src
    code = re.sub(r";\s+(\w+ = )+None", "", code)  # the generated code's `x = y = None` frees
    return "\n".join(line for line in code.strip().splitlines() if line.strip())


def _compile(freezing: bool, plugin: bool = True) -> tuple[str, str]:
    torch.manual_seed(0)
    model = randomize_batch_norm(nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8)))
    model.eval()
    _compat.dynamo_reset()
    before = _Recorder()
    with inductor_convbn.installed() if plugin else contextlib.nullcontext():
        after = _Recorder(_compat.inductor_config.post_grad_custom_post_pass)
        # Recorders have no uuid, so the FX graph cache is bypassed and the passes run.
        with (
            torch.no_grad(),
            _compat.inductor_config.patch(
                post_grad_custom_pre_pass=before,
                post_grad_custom_post_pass=after,
                freezing=freezing,
            ),
        ):
            torch.compile(model)(torch.randn(1, 3, 8, 8))
    return before.code, after.code


def main() -> None:
    plain_before, plain_after = _compile(freezing=False)
    _, frozen_plain = _compile(freezing=True, plugin=False)
    _, frozen_after = _compile(freezing=True)
    print(f"torch {torch.__version__}, inductor_convbn {inductor_convbn.__version__}\n")
    print("# 1. post-grad graph, before the pass (no freezing)\n")
    print(plain_before)
    print("\n# 2. after the per-call stage (no freezing): the fold runs on every call\n")
    print(plain_after)
    print("\n# 3. with freezing, without the plugin (on CPU, Inductor folds it too)\n")
    print(frozen_plain)
    print("\n# 4. with freezing and the plugin: folded once, at compile time\n")
    print(frozen_after)


if __name__ == "__main__":
    main()
