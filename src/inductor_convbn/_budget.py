"""What a fused training layer costs and saves, and which pairs to fuse within a time budget.

A fused conv + BN saves one activation, the conv output, until backward, and pays one
convolution more in backward to recompute it. Both come from the conv's shapes on the
example inputs: the bytes of its output, and its FLOPs. Pairs differ a lot in the ratio: a
stem or a 1x1 conv that widens the channels (ResNet50's ``conv3``) saves a large output for
few FLOPs; a 3x3 conv on many channels saves a small output for many.

The budget is a fraction of the training step's time, estimated as a fraction of its FLOPs:
a step's FLOPs are three times those of the forward (backward computes the gradients of the
inputs and of the weights, each as many FLOPs as the forward), counted by
``torch.utils.flop_counter`` in the run that found the pairs. Where convolutions are not what
bounds the step (small convs in half precision, bound by memory or kernel launches), the
measured overhead differs from the estimate: docs/training.md shows both.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

__all__ = ["PairCost", "choose_within_budget", "conv_cost", "step_flops"]

# Backward computes, for each conv and matmul, the input's and the weight's gradient: each as
# many FLOPs as the forward.
STEP_FLOPS_PER_FORWARD_FLOP = 3


@dataclasses.dataclass(frozen=True)
class PairCost:
    """One pair's fused layer: bytes it keeps out of memory until backward, FLOPs it adds."""

    saved_bytes: int  # the conv output, at the example inputs' dtype and batch
    recompute_flops: int  # the conv, once more, in backward

    @property
    def bytes_per_flop(self) -> float:
        return self.saved_bytes / max(self.recompute_flops, 1)


def conv_cost(weight_shape: Sequence[int], output_shape: Sequence[int], itemsize: int) -> PairCost:
    """A conv's output bytes and FLOPs, from its weight (``out, in / groups, *kernel``) and
    output (``batch, out, *spatial``) shapes: two FLOPs, a multiply and an add, per weight
    element per output element of its channel."""
    outputs = math.prod(output_shape)
    per_output = math.prod(weight_shape[1:])
    return PairCost(saved_bytes=outputs * itemsize, recompute_flops=2 * outputs * per_output)


def step_flops(forward_flops: int) -> int:
    """The FLOPs of a training step (forward and backward) whose forward has ``forward_flops``."""
    return STEP_FLOPS_PER_FORWARD_FLOP * forward_flops


def choose_within_budget(
    costs: Sequence[PairCost], step: int, max_overhead: float
) -> tuple[set[int], float]:
    """Which pairs to fuse (indices into ``costs``) so that their recomputation adds at most
    ``max_overhead`` of a ``step``'s FLOPs, and the fraction they add.

    Greedy by bytes saved per FLOP recomputed, best first (ties: in the order given); a pair
    that does not fit is passed over and smaller ones after it may still fit.
    """
    if step <= 0:
        raise ValueError("the training step has no FLOPs to set the budget against")
    order = sorted(range(len(costs)), key=lambda i: -costs[i].bytes_per_flop)
    chosen: set[int] = set()
    spent = 0
    for i in order:
        if (spent + costs[i].recompute_flops) / step <= max_overhead:
            chosen.add(i)
            spent += costs[i].recompute_flops
    return chosen, spent / step
