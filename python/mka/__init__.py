"""MKA: Memory-Keyed Attention kernels as PyTorch custom ops.

Importing the package registers ``torch.ops.mka.{attention, route_fuse, fastmka, mka}``;
``mka.nn`` holds the attention modules, ``mka.models`` the GPT-style model.
"""

from . import _C, models, nn, reference
from .ops import attention, fastmka, mka, route_fuse

__version__ = "0.1.0"
__all__ = ["attention", "route_fuse", "fastmka", "mka", "reference", "nn", "models", "_C"]
