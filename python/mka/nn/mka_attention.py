"""Full MKA attention: one attention per memory level, mixed per query by the router."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..memory.cache import LayerCache, LayerSpec
from ..memory.recall import recall_decode, update_chunk_signs, update_chunk_signs_at
from ..memory.summary import attend_summaries, summary_attention, summary_counts
from . import torch_ops
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

    ``ema_stride = s > 1``: level 2 attends to the EMA keys/values at every ``s``-th position
    (the chunk ends) and the query's own, not at every position (SPEC §7.3). The cache then
    keeps those summaries instead of page checkpoints, and with a ``window`` and recall as
    level 3 nothing reads pages outside the window but recall: older pages may live in host
    memory (``PagedKVCache(..., host=HostTier(...))``).
    """

    recall_decodes = True  # the cache holds raw keys: recall reads them from the pages

    def __init__(self, n_embd: int, n_head: int, n_kv_head: Optional[int] = None, *,
                 ema_stride: int = 1, **kwargs):
        super().__init__(n_embd, n_head, n_kv_head, **kwargs)
        if not isinstance(ema_stride, int) or isinstance(ema_stride, bool) or ema_stride < 1:
            raise ValueError(f"ema_stride: must be a positive integer, got {ema_stride!r}")
        self.ema_stride = ema_stride

    def forward(self, x: Tensor, cache: Optional[LayerCache] = None,
                memory: Memory = None) -> Tensor:
        self._check_input(x, cache, memory)
        self._check_recall(cache, memory)
        if (cache is not None and cache.static and (self.ema_stride > 1 or self.recall is not None)
                and x.shape[1] != 1):  # their states kept by masked one-token writes
            raise ValueError(f"cache: a static cache of a layer with summaries or recall takes "
                             f"steps of one token, got {x.shape[1]}")
        q, k, v = self._project(x, cache)
        lam = self.router(q)
        if self.ema_stride > 1:
            return self._output(self._forward_summaries(q, k, v, lam, cache, memory))
        if self.recall is not None and cache is None:  # levels 1, 2 by the op, 3 by recall
            y, _, _ = self.ops.mka(q, k, v, lam[..., :2], self.beta, causal=True,
                                   window=self.window, dropout_p=self._attn_p())
            o3 = self.recall(q, k, v, self.window)
            return self._output(y + lam[..., 2, None, None].to(y.dtype) * o3)
        mem_k, mem_v = self._memory(k, memory)
        if cache is None:
            y, _, _ = self.ops.mka(q, k, v, lam, self.beta, mem_k, mem_v, causal=True,
                                   window=self.window, dropout_p=self._attn_p())
            return self._output(y)
        cache.check("k", k)
        before = cache.lengths
        y = None
        if not cache.static and not any(before) and self._attention_takes(q):
            # A prompt into an empty cache: its own k, v (the EMA from the cache's states)
            # are all the keys; the op runs it, where the decode kernel would read the keys
            # again for every few query rows of a long prompt.
            y, _, _ = self.ops.mka(q, k, v, lam[..., :2], self.beta, k_state=cache.states["k"],
                                   v_state=cache.states["v"], causal=True, window=self.window)
        step = cache.step(k.shape[1])
        pages = (cache.k_pages, cache.v_pages, step.block_table, step.cache_seqlens)
        k_state, v_state = self.ops.paged_write_ema(
            k, v, *pages, self.beta, cache.k_page_states, cache.v_page_states,
            cache.states["k"], cache.states["v"])
        cache.update_states(k=k_state, v=v_state)
        if y is None:
            y = self.ops.paged_mka_attention(q, cache.k_pages, cache.v_pages,
                                             cache.k_page_states, cache.v_page_states,
                                             step.block_table, step.seqlens, lam, self.beta,
                                             causal=True, window=self.window)
        if mem_k is not None and mem_k.shape[1] > 0:  # level 3: every query reads the memory
            o3 = self.ops.attention(q, mem_k, mem_v, causal=False)
            y = y + lam[..., 2, None, None].to(y.dtype) * o3
        if self.recall is not None:  # level 3: the chunks each new query recalls
            o3 = self._recall_cached(q, cache, step, before)()
            y = y + lam[..., 2, None, None].to(y.dtype) * o3
        return self._output(y)

    def _forward_summaries(self, q: Tensor, k: Tensor, v: Tensor, lam: Tensor,
                           cache: Optional[LayerCache], memory: Memory) -> Tensor:
        """Levels 1 (the op's attention), 2 over EMA summaries, 3 (recall or slots)."""
        w = lambda level, like: lam[..., level, None, None].to(like.dtype)  # noqa: E731
        mem_k, mem_v = (None, None) if self.recall is not None else self._memory(k, memory)
        if cache is None:
            ek, _ = torch_ops.ema(k, self.beta)
            ev, _ = torch_ops.ema(v, self.beta)
            o1 = self.ops.attention(q, k, v, causal=True, window=self.window,
                                    dropout_p=self._attn_p())
            y = w(0, o1) * o1 + w(1, o1) * summary_attention(q, ek, ev, self.ema_stride)
            if self.recall is not None:
                y = y + w(2, y) * self.recall(q, k, v, self.window)
        else:
            cache.check("k", k)
            before = cache.lengths
            ek, ks = torch_ops.ema(k, self.beta, cache.states["k"])
            ev, vs = torch_ops.ema(v, self.beta, cache.states["v"])
            step = cache.step(k.shape[1])
            self.ops.paged_write(k, v, cache.k_pages, cache.v_pages, step.block_table,
                                 step.cache_seqlens)
            cache.update_states(k=ks, v=vs)
            one = k.shape[1] == 1
            if one:  # the row's own term in its chunk's slot: level 2 is one paged attention
                slots = cache.write_summary_slot(ek, ev, step.cache_seqlens)
            else:
                cache.write_summaries(ek, ev, before)
                pos = torch.tensor(before)[:, None] + torch.arange(k.shape[1])[None, :]
            o3 = self._recall_cached(q, cache, step, before) if self.recall is not None else None
            o1 = self._attend_pages(q, cache, step)
            sk, sv = cache.states["summary_k"], cache.states["summary_v"]
            if one:
                o2 = self.ops.paged_attention(q, sk, sv, cache.summary_table(), slots,
                                              causal=False)
            else:
                o2 = attend_summaries(q, sk, sv, summary_counts(pos, self.ema_stride), ek, ev)
            y = w(0, o1) * o1 + w(1, o1) * o2
            if o3 is not None:  # chosen before levels 1 and 2 ran: their time hides the fetch
                y = y + w(2, y) * o3()
        if mem_k is not None and mem_k.shape[1] > 0:
            y = y + w(2, y) * self.ops.attention(q, mem_k, mem_v, causal=False)
        return y

    def _recall_cached(self, q: Tensor, cache: LayerCache, step, before: list[int]):
        """Starts level 3 of a cached step — the new rows' chunks chosen — and returns the
        function that finishes it: their tokens read from the pages or, where the cache
        spills to host memory, from its DRAM tier, and attended to."""
        r = self.recall
        signs, exact = cache.states["chunk_signs"], cache.states.get("chunk_keys")
        if cache.static:  # the step's positions on the device (a CUDA graph holds the step)
            before = step.cache_seqlens
            update_chunk_signs_at(signs, cache.k_pages, step.block_table, before, r.chunk,
                                  r.planes, exact, r.score)
        else:
            update_chunk_signs(signs, cache.k_pages, step.block_table, before, cache.lengths,
                               r.chunk, r.planes, exact, r.score)
        if cache.host is not None:
            plan = cache.host.select(cache, q, before, top=r.top, planes=r.planes,
                                     window=self.window, score=r.score)
            return lambda: cache.host.recall(cache, q, plan)
        return lambda: recall_decode(q, cache.k_pages, cache.v_pages, step.block_table, signs,
                                     before, chunk=r.chunk, top=r.top, planes=r.planes,
                                     window=self.window, exact=exact, score=r.score)

    def cache_spec(self) -> LayerSpec:
        stride = self.ema_stride if self.ema_stride > 1 else 0
        return LayerSpec(self.n_kv_head, self.head_dim, self.head_dim, page_states=not stride,
                         states=("k", "v"),
                         recall_chunk=self.recall.chunk if self.recall is not None else 0,
                         recall_bits=self.recall.planes.shape[0] if self.recall is not None else 0,
                         recall_score=self.recall.score if self.recall is not None else "hash",
                         summary_stride=stride, window=self.window, shift_dim=self._shift_dim)
