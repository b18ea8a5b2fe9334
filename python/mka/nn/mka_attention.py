"""Full MKA attention: one attention per memory level, mixed per query by the router."""

from __future__ import annotations

from typing import Optional

from torch import Tensor

from ..memory.cache import LayerCache, LayerSpec
from ..memory.recall import recall_decode, update_chunk_signs
from .base import Memory
from .routed import RoutedAttention


class MKAAttention(RoutedAttention):
    """``out_t = lam_t0 O1_t + lam_t1 O2_t (+ lam_t2 O3_t)`` with ``lam = softmax(MLP(q))``
    (query-side routing) — ``mka::mka`` of SPEC §3. Level 1 attends to the raw keys/values
    (optionally within ``window``), level 2 to their EMA, level 3 to the long-term memory's slots
    plus any recalled ``memory = (mem_k, mem_v): (B, M, G, d)`` passed in.

    Cache: the raw ``k, v`` of every past token in pages — the same bytes per token as GQA
    — plus, per page, the EMA states of ``k`` and ``v`` before the page's first token, and the
    running states after the last token. Level 2's keys are not cached: the paged op
    rebuilds ``EMA(k), EMA(v)`` of each cached token from its page's checkpoint, so a decode
    step neither re-scans the sequence nor reads more than the pages and one state per page.
    """

    recall_decodes = True  # the cache holds raw keys: recall reads them from the pages

    def forward(self, x: Tensor, cache: Optional[LayerCache] = None,
                memory: Memory = None) -> Tensor:
        self._check_input(x, cache, memory)
        self._check_recall(cache, memory)
        q, k, v = self._project(x)
        lam = self.router(q)
        if self.recall is not None and cache is None:  # levels 1, 2 by the op, 3 by recall
            y, _, _ = self.ops.mka(q, k, v, lam[..., :2], self.beta, causal=True,
                                   window=self.window)
            o3 = self.recall(q, k, v, self.window)
            return self._output(y + lam[..., 2, None, None].to(y.dtype) * o3)
        mem_k, mem_v = self._memory(k, memory)
        if cache is None:
            y, _, _ = self.ops.mka(q, k, v, lam, self.beta, mem_k, mem_v, causal=True,
                                   window=self.window)
            return self._output(y)
        cache.check("k", k)
        before = cache.lengths
        step = cache.step(k.shape[1])
        pages = (cache.k_pages, cache.v_pages, step.block_table, step.cache_seqlens)
        k_state, v_state = self.ops.paged_write_ema(
            k, v, *pages, self.beta, cache.k_page_states, cache.v_page_states,
            cache.states["k"], cache.states["v"])
        cache.update_states(k=k_state, v=v_state)
        y = self.ops.paged_mka_attention(q, cache.k_pages, cache.v_pages, cache.k_page_states,
                                         cache.v_page_states, step.block_table, step.seqlens,
                                         lam, self.beta, causal=True, window=self.window)
        if mem_k is not None and mem_k.shape[1] > 0:  # level 3: every query reads the memory
            o3 = self.ops.attention(q, mem_k, mem_v, causal=False)
            y = y + lam[..., 2, None, None].to(y.dtype) * o3
        if self.recall is not None:  # level 3: the chunks each new query recalls
            r = self.recall
            signs = cache.states["chunk_signs"]
            update_chunk_signs(signs, cache.k_pages, step.block_table, before, cache.lengths,
                               r.chunk, r.planes)
            o3 = recall_decode(q, cache.k_pages, cache.v_pages, step.block_table, signs, before,
                               chunk=r.chunk, top=r.top, planes=r.planes, window=self.window)
            y = y + lam[..., 2, None, None].to(y.dtype) * o3
        return self._output(y)

    def cache_spec(self) -> LayerSpec:
        return LayerSpec(self.n_kv_head, self.head_dim, self.head_dim, page_states=True,
                         states=("k", "v"),
                         recall_chunk=self.recall.chunk if self.recall is not None else 0,
                         recall_bits=self.recall.planes.shape[0] if self.recall is not None else 0)
