"""Models with non-trivial batch-norm state, for checks, benchmarks and the command line.

A freshly built model has running_mean = 0, running_var = 1, weight = 1, bias = 0: a fold
that ignored any of them would still look right. These helpers give every BN its own values.
"""

from __future__ import annotations

import torch

__all__ = ["randomize_batch_norm", "randomize_zero_weights", "torchvision_model"]


def randomize_batch_norm(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every batch norm of ``model`` random running statistics and affine parameters.

    Returns ``model``, changed in place. The values keep activations in a sane range
    (variance 0.5-2, scale 0.5-1.5) so that deep models stay comparable with eager.
    """
    generator = torch.Generator().manual_seed(seed)

    def uniform(t: torch.Tensor, low: float, high: float) -> None:
        values = torch.rand(t.shape, generator=generator, dtype=torch.float64) * (high - low) + low
        with torch.no_grad():
            t.copy_(values)

    for module in model.modules():
        if not isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            continue
        if module.running_mean is not None and module.running_var is not None:
            uniform(module.running_mean, -0.5, 0.5)
            uniform(module.running_var, 0.5, 2.0)
        if module.affine:
            uniform(module.weight, 0.5, 1.5)
            uniform(module.bias, -0.5, 0.5)
    return model


def torchvision_model(name: str, seed: int = 0) -> torch.nn.Module:
    """A torchvision classification model with random weights and BN state, in eval mode."""
    try:
        import torchvision
    except ImportError as e:  # pragma: no cover - torchvision is in the test extra
        raise RuntimeError("torchvision is needed for named models: pip install torchvision") from e
    known = torchvision.models.list_models(module=torchvision.models)
    if name not in known:
        raise ValueError(f"unknown torchvision model {name!r}; one of: {', '.join(sorted(known))}")
    torch.manual_seed(seed)
    model = torchvision.models.get_model(name, weights=None)
    return randomize_zero_weights(randomize_batch_norm(model, seed), seed).eval()


def randomize_zero_weights(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every weight that is all zeros small random values (std 0.02).

    Some models start with a weight of zeros (torchvision's ViT heads): their output is
    then 0 for every input, and a comparison with it checks nothing. Returns ``model``,
    changed in place.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() >= 2 and param.numel() and not bool(param.any()):
                values = torch.randn(param.shape, generator=generator, dtype=torch.float64)
                param.copy_(values * 0.02)
    return model
