"""Grouped-query attention and its two ends: MHA (one key/value head per query head) and
MQA (one key/value head for all)."""

from __future__ import annotations

from typing import Optional

from torch import Tensor

from ..memory.cache import LayerCache
from .base import Memory, QKVAttention


class GroupedQueryAttention(QKVAttention):
    """``n_head`` query heads share ``n_kv_head`` key/value heads (query head ``h`` reads
    key/value head ``h // (n_head // n_kv_head)``). The cache pages hold ``k, v`` per token."""

    def forward(self, x: Tensor, cache: Optional[LayerCache] = None,
                memory: Memory = None) -> Tensor:
        self._check_input(x, cache, memory)
        q, k, v = self._project(x, cache)
        if cache is not None:
            return self._output(self._attend_cached(q, k, v, cache))
        return self._output(self.ops.attention(q, k, v, causal=True, window=self.window,
                                               dropout_p=self._attn_p()))


class MultiHeadAttention(GroupedQueryAttention):
    """GQA with one key/value head per query head."""

    def __init__(self, n_embd: int, n_head: int, n_kv_head: Optional[int] = None, **kwargs):
        if n_kv_head not in (None, n_head):
            raise ValueError(f"n_kv_head: MHA has n_kv_head = n_head = {n_head}, got {n_kv_head} "
                             "(use attention='gqa')")
        super().__init__(n_embd, n_head, n_head, **kwargs)


class MultiQueryAttention(GroupedQueryAttention):
    """GQA with a single key/value head."""

    def __init__(self, n_embd: int, n_head: int, n_kv_head: Optional[int] = None, **kwargs):
        if n_kv_head not in (None, 1):
            raise ValueError(f"n_kv_head: MQA has n_kv_head = 1, got {n_kv_head} "
                             "(use attention='gqa')")
        super().__init__(n_embd, n_head, 1, **kwargs)
