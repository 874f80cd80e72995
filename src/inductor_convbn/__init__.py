"""Fold eval-mode BatchNorm into the convolution before it, inside ``torch.compile``.

Call ``install()`` before compiling; ``verify()`` shows what was folded. Without
compiling, ``inductor_convbn.fx.fuse()`` folds at module level through ``torch.fx``.
"""

from importlib.metadata import PackageNotFoundError, version

from . import fx
from ._fold import fold_conv_bn_weights
from ._pass import ConvBnFoldPass, install, installed, is_installed, uninstall
from ._report import FoldReport, PairReport, verify

try:
    __version__ = version("inductor_convbn")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0+unknown"

__all__ = [
    "ConvBnFoldPass",
    "FoldReport",
    "PairReport",
    "__version__",
    "fold_conv_bn_weights",
    "fx",
    "install",
    "installed",
    "is_installed",
    "uninstall",
    "verify",
]
