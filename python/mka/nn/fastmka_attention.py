"""FastMKA attention: keys/values fused across memory levels, then one attention."""

from __future__ import annotations

from typing import Optional

from torch import Tensor

from ..memory.cache import LayerCache, LayerSpec
from .base import Memory
from .routed import RoutedAttention


class FastMKAAttention(RoutedAttention):
    """``k_fused_t = lam_t0 k_t + lam_t1 EMA(k)_t (+ lam_t2 k3_t)`` (and the same for ``v``)
    with ``lam = softmax(MLP(q))`` (key-side routing), then causal attention over the fused
    keys — ``mka::fastmka`` of SPEC §3. ``n_kv_head < n_head`` gives GQA heads.

    Level 3 per position: each key recalls from the level-3 memory (learned slots plus any
    recalled ``memory = (mem_k, mem_v)`` passed in) by its own content,
    ``k3_t = softmax(k_t mem_k^T / sqrt(d)) mem_k`` and ``v3_t = softmax(...) mem_v`` — an
    attention read with the key as the query. It depends on token ``t`` and the memory
    only, so fusion stays causal and decode computes it for the new tokens alone.

    Cache: the fused ``k, v`` in pages (GQA's bytes per token) and the running EMA states
    ``k, v``. Fused key ``t`` depends on tokens ``<= t`` only, so decode fuses the new tokens
    from the carried state as it writes them (``paged_write_fused``) and attends over the
    pages: exactly one full pass, and as many kernels as MHA's step.
    """

    def forward(self, x: Tensor, cache: Optional[LayerCache] = None,
                memory: Memory = None) -> Tensor:
        self._check_input(x, cache, memory)
        self._check_recall(cache, memory)
        q, k, v = self._project(x, cache)
        lam = self.router(q)
        k3, v3 = self._level3(k, v, memory)
        if cache is None:  # the fused op: fused keys never written to memory
            y, _, _ = self.ops.fastmka(q, k, v, lam, self.beta, k3, v3, causal=True,
                                       window=self.window, dropout_p=self._attn_p())
            return self._output(y)
        cache.check("k", k)
        if self._into_empty(q, cache):  # the prompt attends over its own fused keys
            kf, vf, k_state, v_state = self.ops.route_fuse(k, v, lam, self.beta, k3, v3,
                                                           cache.states["k"], cache.states["v"])
            y = self._attend_cached(q, kf, vf, cache)
            cache.update_states(k=k_state, v=v_state)
            return self._output(y)
        # Decoding: fusion, write and the states' update in one op (one kernel natively, as
        # MHA's write is one), then the paged attention MHA runs.
        step = cache.step(k.shape[1])
        self.ops.paged_write_fused(k, v, lam, self.beta, cache.k_pages, cache.v_pages,
                                   step.block_table, step.cache_seqlens, cache.states["k"],
                                   cache.states["v"], k3, v3)
        return self._output(self._attend_pages(q, cache, step))

    def _level3(self, k: Tensor, v: Tensor,
                recalled: Memory) -> tuple[Optional[Tensor], Optional[Tensor]]:
        if self.recall is not None:  # each key reads the chunks its block recalls
            return self.recall(k, k, k, self.window), self.recall(k, k, v, self.window)
        mem_k, mem_v = self._memory(k, recalled)
        if mem_k is None:
            return None, None
        if mem_k.shape[1] == 0:
            raise ValueError("memory: FastMKA with levels=3 reads level-3 memory for every key; "
                             "give memory_slots > 0 or pass recalled memory")
        k3 = self.ops.attention(k, mem_k, mem_k, causal=False)
        v3 = self.ops.attention(k, mem_k, mem_v, causal=False)
        return k3, v3

    def cache_spec(self) -> LayerSpec:
        return LayerSpec(self.n_kv_head, self.head_dim, self.head_dim, states=("k", "v"),
                         shift_dim=self._shift_dim)
