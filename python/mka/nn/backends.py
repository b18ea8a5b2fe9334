"""Where the attention modules get their ops: the native custom ops or plain PyTorch.

Both namespaces expose ``attention, route_fuse, fastmka, mka`` (SPEC §3) and the paged ops
``paged_write, paged_write_ema, paged_write_fused, paged_attention, paged_mka_attention``
(SPEC §7.1) with the same signatures and results, so a module picks one by name and never
branches on it again.
"""

from __future__ import annotations

from types import ModuleType, SimpleNamespace

from .. import ops as _native_ops
from ..memory import ops as _paged_ops
from . import torch_ops

OP_NAMES = ("attention", "route_fuse", "fastmka", "mka", "paged_write", "paged_write_ema",
            "paged_write_fused", "paged_attention", "paged_mka_attention")

# The native ops live in two rooms (mka.ops, mka.memory.ops); one namespace holds both.
_native = SimpleNamespace(**{n: getattr(_native_ops, n, None) or getattr(_paged_ops, n)
                             for n in OP_NAMES})

BACKENDS: dict[str, ModuleType | SimpleNamespace] = {"mka": _native, "torch": torch_ops}


def get_ops(backend: str):
    """The op namespace of ``backend`` ("mka": native kernels, "torch": SDPA + chunked EMA)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {sorted(BACKENDS)}, got {backend!r}")
    return BACKENDS[backend]
