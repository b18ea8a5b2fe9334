"""What MKA and FastMKA share: the router over 2 or 3 memory levels, the EMA decay ``beta``
of level 2, and the level-3 (long-term) memory."""

from __future__ import annotations

from typing import Optional

from torch import Tensor

from .base import Memory, QKVAttention
from ..memory.recall import Recall
from .long_term_memory import LongTermMemory
from .router import Router


class RoutedAttention(QKVAttention):
    """Options: ``levels`` 2 (local + session EMA) or 3 (+ long-term memory), ``beta`` the
    EMA decay in [0, 1), ``router_hidden`` the router MLP's width, ``memory_slots`` the
    learned level-3 slots per key/value head (used when ``levels == 3``). ``recall_chunk``
    > 0 makes level 3 recall instead (SPEC §7.2): chunks of ``recall_chunk`` earlier tokens
    keyed by SimHash (``recall_tables`` x ``recall_bits`` hyperplanes), the ``recall_top``
    best-matching ones per query, outside the L1 ``window``; ``recall_score="mean"`` ranks the
    chunks by the exact dot product with their mean keys instead of the signatures, ``"bound"``
    by Quest's bound from their per-channel max and min keys, ``"corners"`` by the mean of
    ``exp(scale q.k)`` over the corners of that min/max box."""

    accepts_memory = True
    recall_decodes = False  # whether cached decoding supports recall as level 3

    def __init__(self, n_embd: int, n_head: int, n_kv_head: Optional[int] = None, *,
                 levels: int = 2, beta: float = 0.9, router_hidden: int = 64,
                 memory_slots: int = 16, recall_chunk: int = 0, recall_top: int = 4,
                 recall_tables: int = 4, recall_bits: int = 16, recall_score: str = "hash",
                 bias: bool = True, dropout: float = 0.0, backend: str = "mka",
                 window: Optional[int] = None, rope: Optional[float] = None,
                 key_shift: bool = False):
        super().__init__(n_embd, n_head, n_kv_head, bias=bias, dropout=dropout,
                         backend=backend, window=window, rope=rope, key_shift=key_shift)
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0.0 <= beta < 1.0:
            raise ValueError(f"beta: the EMA decay must be a float in [0, 1), got {beta!r}")
        self.levels, self.beta = levels, float(beta)
        self.router = Router(n_head * self.head_dim, levels, router_hidden, bias)
        if recall_chunk and levels != 3:
            raise ValueError(f"recall_chunk: recall is level 3; set levels=3, got levels={levels}")
        self.recall = (Recall(self.head_dim, recall_chunk, recall_top, recall_tables, recall_bits,
                              score=recall_score) if recall_chunk else None)
        self.long_term = (LongTermMemory(memory_slots, self.n_kv_head, self.head_dim)
                          if levels == 3 and self.recall is None else None)

    def _check_recall(self, cache, memory: Memory) -> None:
        if self.recall is None:
            return
        if memory is not None:
            raise ValueError("memory: this module recalls its level 3 from its own context "
                             "(recall_chunk > 0); it takes no memory argument")
        if cache is not None and not self.recall_decodes:
            raise ValueError(f"cache: {type(self).__name__} has no cached decoding with recall "
                             "as level 3 (its cache holds fused keys, recall reads raw ones); "
                             "run full forwards")

    def _memory(self, like: Tensor, recalled: Memory) -> tuple[Optional[Tensor], Optional[Tensor]]:
        """Level-3 ``(mem_k, mem_v): (B, M, G, d)`` in the dtype of the keys ``like`` (the
        slots are parameters: float32 under autocast), or ``(None, None)`` with two levels."""
        if self.long_term is None:
            if recalled is not None:
                raise ValueError("memory: this module has levels=2, no level-3 memory to pass")
            return None, None
        mem_k, mem_v = self.long_term(like.shape[0], recalled)
        return mem_k.to(like.dtype), mem_v.to(like.dtype)
