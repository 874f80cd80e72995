"""The cost estimates behind ``memory_efficient(..., max_overhead=...)`` and the choice."""

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from inductor_convbn import _budget


@pytest.mark.parametrize(
    "conv",
    [
        nn.Conv1d(4, 6, 3),
        nn.Conv2d(3, 8, 7, stride=2, padding=3),
        nn.Conv2d(8, 8, 3, padding=1, groups=4, bias=False),
        nn.Conv2d(8, 16, 1),
        nn.Conv3d(2, 4, (1, 3, 3), dilation=(1, 2, 2)),
    ],
    ids=["1d", "stem", "grouped", "1x1", "3d-dilated"],
)
def test_conv_cost_is_what_torch_counts(conv):
    x = torch.randn(3, conv.in_channels, *(9,) * (conv.weight.dim() - 2))
    with FlopCounterMode(display=False) as counter:
        y = conv(x)
    cost = _budget.conv_cost(conv.weight.shape, y.shape, y.element_size())
    assert cost.recompute_flops == counter.get_total_flops()
    assert cost.saved_bytes == y.numel() * 4


def _costs(*pairs):
    return [_budget.PairCost(saved_bytes=b, recompute_flops=f) for b, f in pairs]


def test_the_choice_takes_most_bytes_per_flop_first_within_the_budget():
    costs = _costs((100, 10), (100, 50), (300, 10), (10, 40))  # 10, 2, 30, 0.25 bytes/FLOP
    assert _budget.choose_within_budget(costs, step=100, max_overhead=0.2) == ({0, 2}, 0.2)
    assert _budget.choose_within_budget(costs, step=100, max_overhead=0.1) == ({2}, 0.1)
    assert _budget.choose_within_budget(costs, step=100, max_overhead=0.0) == (set(), 0.0)
    assert _budget.choose_within_budget(costs, step=100, max_overhead=1.1)[0] == {0, 1, 2, 3}


def test_a_pair_that_does_not_fit_is_passed_over_for_one_that_does():
    costs = _costs((1000, 60), (10, 20), (500, 50))  # best first: 0, then 2 (no room), then 1
    chosen, spent = _budget.choose_within_budget(costs, step=100, max_overhead=0.8)
    assert chosen == {0, 1} and spent == pytest.approx(0.8)


def test_no_budget_without_step_flops():
    with pytest.raises(ValueError, match="no FLOPs"):
        _budget.choose_within_budget(_costs((1, 1)), step=0, max_overhead=0.1)


def test_a_step_is_three_forwards():
    # Backward computes each conv's input and weight gradients: two forwards' FLOPs.
    conv = nn.Conv2d(4, 8, 3)
    x = torch.randn(2, 4, 8, 8, requires_grad=True)
    with FlopCounterMode(display=False) as forward:
        conv(x)
    with FlopCounterMode(display=False) as step:
        conv(x).sum().backward()
    assert _budget.step_flops(forward.get_total_flops()) == step.get_total_flops()
