"""Full MKA attention: one attention per memory level, mixed per query by the router."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .base import Memory
from .cache import KVCache
from .routed import RoutedAttention


class MKAAttention(RoutedAttention):
    """``out_t = lam_t0 O1_t + lam_t1 O2_t (+ lam_t2 O3_t)`` with ``lam = softmax(MLP(q))``
    (query-side routing) — ``mka::mka`` of SPEC §3. Level 1 attends to the raw keys/values
    (optionally within ``window``), level 2 to their EMA, level 3 to the long-term memory's slots
    plus any recalled ``memory = (mem_k, mem_v): (B, M, G, d)`` passed in.

    Cache: the raw ``k, v`` of every past token — the same bytes per token as GQA — plus
    EMA states. Level 2's keys are not cached: the op recomputes ``EMA(k)`` over the keys it
    is given, starting from the state it is given. So decode passes the *whole* cached
    ``k, v`` together with ``k_start, v_start``, the state before the cache's first token
    (zeros for a fresh sequence), and the EMA of the past comes out exactly as in one full
    pass. ``k_end, v_end`` carry the running state after the last token (what the op
    returns): the state a continuation or a trimmed cache would start from.
    """

    def forward(self, x: Tensor, cache: Optional[KVCache] = None,
                memory: Memory = None) -> Tensor:
        self._check_input(x, cache, memory)
        q, k, v = self._project(x)
        lam = self.router(q)
        mem_k, mem_v = self._memory(k, memory)
        k_state = v_state = None
        if cache is not None:
            k, v = cache.append(k=k, v=v)
            k_state, v_state = cache.states["k_start"], cache.states["v_start"]
        y, k_end, v_end = self.ops.mka(q, k, v, lam, self.beta, mem_k, mem_v, k_state, v_state,
                                       causal=True, window=self.window)
        if cache is not None:
            cache.states.update(k_end=k_end, v_end=v_end)
        return self._output(y)

    def new_cache(self, batch_size: int, device: Optional[torch.device] = None,
                  dtype: torch.dtype = torch.float32) -> KVCache:
        cache = KVCache(batch_size, device, dtype)
        for name in ("k_start", "v_start", "k_end", "v_end"):
            cache.states[name] = self._zero_states(batch_size, cache.device, dtype)
        return cache

    def cache_state_bytes(self, dtype: torch.dtype = torch.bfloat16) -> int:
        return 4 * self._state_bytes(dtype)
