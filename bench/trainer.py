"""A training variant for the benchmarks: a model, its forward (eager or compiled), an SGD
optimizer, a step, and what the step holds in memory on CUDA."""

from __future__ import annotations

import gc
from collections.abc import Callable
from typing import Any

import torch
from torch import nn


class Trainer:
    """One variant: a model copy, its optimizer, and a training step."""

    def __init__(self, model: nn.Module, forward: Callable[..., Any], dtype: str) -> None:
        self.model = model
        self.forward = forward
        self.autocast = dtype == "bfloat16"
        self.optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
        self.memory: dict[str, float] = {}

    def loss(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, torch.bfloat16, enabled=self.autocast):
            out = self.forward(x)
        return nn.functional.cross_entropy(out.float(), target)

    def step(self, x: torch.Tensor, target: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.loss(x, target).backward()
        self.optimizer.step()

    def measure_memory(self, x: torch.Tensor, target: torch.Tensor) -> None:
        """MiB beyond the model and optimizer state: at the end of forward, and at peak."""
        if x.device.type != "cuda":
            return
        self.optimizer.zero_grad(set_to_none=True)
        gc.collect()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        loss = self.loss(x, target)
        torch.cuda.synchronize()
        after_forward = torch.cuda.memory_allocated() - base
        loss.backward()
        self.optimizer.step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        self.memory = {"after_forward_mib": after_forward / 2**20, "peak_mib": peak / 2**20}


def gradients(trainer: Trainer, x: torch.Tensor, target: torch.Tensor) -> list[torch.Tensor]:
    trainer.optimizer.zero_grad(set_to_none=True)
    loss = trainer.loss(x, target)
    params = [p for p in trainer.model.parameters() if p.requires_grad]
    return [loss.detach(), *torch.autograd.grad(loss, params)]
