"""Fold eval-mode BatchNorm into the convolution before it, inside ``torch.compile``.

Call ``install()`` before compiling; ``verify()`` shows what was folded. Without
compiling, ``inductor_convbn.fx.fuse()`` folds at module level through ``torch.fx``, and
``fx.fold_modules()`` in place, from one run of the model, for models it cannot trace.
For training, ``memory_efficient()`` swaps each conv -> BatchNorm pair for a fused layer
that keeps one activation less for backward.
"""

from importlib import import_module
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from . import fx
    from ._fold import fold_conv_bn_weights
    from ._modules import FuseError
    from ._pass import ConvBnFoldPass, install, installed, is_installed, uninstall
    from ._registry import FreezingWarning
    from ._report import FoldReport, PairReport, verify, verify_package
    from .training import (
        FusedConvBatchNorm1d,
        FusedConvBatchNorm2d,
        FusedConvBatchNorm3d,
        MemoryEfficientReport,
        memory_efficient,
        memory_efficient_report,
    )

try:
    __version__ = version("inductor_convbn")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0+unknown"

# Each public name and the module it lives in, imported at its first use: importing the
# package imports no torch, so that `inductor-convbn --help` answers at once.
_LAZY = {
    "ConvBnFoldPass": "._pass",
    "FoldReport": "._report",
    "FreezingWarning": "._registry",
    "FuseError": "._modules",
    "FusedConvBatchNorm1d": ".training",
    "FusedConvBatchNorm2d": ".training",
    "FusedConvBatchNorm3d": ".training",
    "MemoryEfficientReport": ".training",
    "PairReport": "._report",
    "fold_conv_bn_weights": "._fold",
    "fx": ".fx",
    "install": "._pass",
    "installed": "._pass",
    "is_installed": "._pass",
    "memory_efficient": ".training",
    "memory_efficient_report": ".training",
    "uninstall": "._pass",
    "verify": "._report",
    "verify_package": "._report",
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module = import_module(_LAZY[name], __name__)
    value = module if name == "fx" else getattr(module, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


__all__ = [
    "ConvBnFoldPass",
    "FoldReport",
    "FreezingWarning",
    "FuseError",
    "FusedConvBatchNorm1d",
    "FusedConvBatchNorm2d",
    "FusedConvBatchNorm3d",
    "MemoryEfficientReport",
    "PairReport",
    "__version__",
    "fold_conv_bn_weights",
    "fx",
    "install",
    "installed",
    "is_installed",
    "memory_efficient",
    "memory_efficient_report",
    "uninstall",
    "verify",
    "verify_package",
]
