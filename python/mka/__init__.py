"""MKA: Memory-Keyed Attention kernels as PyTorch custom ops.

Importing the package registers ``torch.ops.mka.{attention, route_fuse, fastmka, mka}``;
``mka.use_kernels`` / ``mka.set_kernels`` choose the CUDA kernels (:mod:`mka.kernels`);
``mka.nn`` holds the attention modules, ``mka.models`` the GPT-style model.
"""

from . import _C, models, nn, reference
from .kernels import KernelOptions, current_kernels, set_kernels, use_kernels
from .ops import attention, fastmka, mka, route_fuse

__version__ = "0.1.0"
__all__ = ["attention", "route_fuse", "fastmka", "mka", "KernelOptions", "current_kernels",
           "set_kernels", "use_kernels", "reference", "nn", "models", "_C"]
