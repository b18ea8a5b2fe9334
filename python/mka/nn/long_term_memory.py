"""Level-3 (long-term, L3) memory of MKA and FastMKA, in key/value space.

The memory a layer attends to is its learned persistent slots (trained with the model,
like the persistent memory vectors of Sukhbaatar et al. 2019) followed by any recalled
tokens the caller passes in — e.g. older chunks of context fetched by hash recall and
projected with :meth:`QKVAttention.project_memory`.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn


class LongTermMemory(nn.Module):
    """Level 3: ``slots`` learned key/value pairs per key/value head, ``(slots, G, d)`` each,
    followed by the recalled tokens passed to :meth:`forward`."""

    def __init__(self, slots: int, n_kv_head: int, head_dim: int):
        super().__init__()
        if not isinstance(slots, int) or slots < 0:
            raise ValueError(f"memory_slots: must be a non-negative integer, got {slots!r}")
        self.k = nn.Parameter(torch.randn(slots, n_kv_head, head_dim) * 0.02)
        self.v = nn.Parameter(torch.randn(slots, n_kv_head, head_dim) * 0.02)

    def forward(self, batch_size: int,
                recalled: Optional[tuple[Tensor, Tensor]] = None) -> tuple[Tensor, Tensor]:
        """``(mem_k, mem_v): (B, slots + M, G, d)`` — the slots, then the recalled tokens."""
        mem_k = self.k.expand(batch_size, *self.k.shape)
        mem_v = self.v.expand(batch_size, *self.v.shape)
        if recalled is None:
            return mem_k, mem_v
        rk, rv = recalled
        shape = (batch_size, "M", *self.k.shape[1:])
        for t, name in ((rk, "memory[0] (keys)"), (rv, "memory[1] (values)")):
            if t.dim() != 4 or t.shape[0] != batch_size or t.shape[2:] != self.k.shape[1:]:
                raise ValueError(f"{name}: expected (B, M, G, d) = {shape}, got {tuple(t.shape)}")
        if rk.shape != rv.shape:
            raise ValueError(f"memory: keys {tuple(rk.shape)} and values {tuple(rv.shape)} differ")
        return torch.cat((mem_k.to(rk.dtype), rk), 1), torch.cat((mem_v.to(rv.dtype), rv), 1)
