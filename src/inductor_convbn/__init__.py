"""Fold eval-mode BatchNorm into the convolution before it, inside ``torch.compile``.

Call ``install()`` before compiling; ``verify()`` shows what was folded. Without
compiling, ``inductor_convbn.fx.fuse()`` folds at module level through ``torch.fx``.
For training, ``memory_efficient()`` swaps each conv -> BatchNorm pair for a fused layer
that keeps one activation less for backward.
"""

from importlib.metadata import PackageNotFoundError, version

from . import fx
from ._fold import fold_conv_bn_weights
from ._modules import FuseError
from ._pass import ConvBnFoldPass, install, installed, is_installed, uninstall
from ._report import FoldReport, PairReport, verify
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

__all__ = [
    "ConvBnFoldPass",
    "FoldReport",
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
]
