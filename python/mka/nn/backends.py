"""Where the attention modules get their ops: the native custom ops or plain PyTorch.

Both namespaces expose ``attention, route_fuse, fastmka, mka`` with the same signatures
and results (SPEC §3), so a module picks one by name and never branches on it again.
"""

from __future__ import annotations

from types import ModuleType

from .. import ops as _native_ops
from . import torch_ops

BACKENDS: dict[str, ModuleType] = {"mka": _native_ops, "torch": torch_ops}


def get_ops(backend: str) -> ModuleType:
    """The op namespace of ``backend`` ("mka": native kernels, "torch": SDPA + chunked EMA)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {sorted(BACKENDS)}, got {backend!r}")
    return BACKENDS[backend]
