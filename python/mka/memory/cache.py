"""The paged KV cache of one model (SPEC §7.1): a native :class:`PageTable` shared by all
layers, and each layer's preallocated page tensors and EMA states.

A decode or prefill step of ``T`` tokens goes layer by layer: each layer calls
:meth:`LayerCache.step` (the first one reserves the pages, copying any shared page —
copy-on-write — in every layer's storage), writes its new keys/values with ``paged_write``
and attends with ``paged_attention`` through the step's block table. Nothing grows by
concatenation and nothing is held beyond the tensors listed by :meth:`PagedKVCache.nbytes`.
"""

from __future__ import annotations

import contextlib
import math
import weakref
from dataclasses import dataclass
from typing import Iterator, NamedTuple, Optional, Sequence, Union

import torch
from torch import Tensor

from .._C import PageTable
from ..reference import state_dtype
from .recall import exact_dtype, exact_width
from .host_tier import HostTier, LayerHost, check_host
from .torch_paged import mark_pool_made, mark_static, per_step


@dataclass(frozen=True)
class LayerSpec:
    """What one attention layer caches. Per token: keys ``(kv_heads, key_dim)`` and values
    ``(kv_heads, value_dim)`` (``value_dim = 0``: the values are the keys — MLA's latent).
    Per page, with ``page_states``: MKA's EMA checkpoints of k and v. Per sequence: the
    running EMA states named in ``states``, ``(kv_heads, key_dim)`` each, and with
    ``recall_chunk`` the SimHash signatures of its whole chunks (level 3 by recall, SPEC §7.2),
    with ``summary_stride`` the EMA keys/values at every chunk end (level 2 over summaries,
    SPEC §7.3). ``window``: the L1 window of a layer whose pages are read only within it and by
    recall — what lets the DRAM tier move older pages to host memory (:mod:`.host_tier`).
    ``shift_dim``: the width of the last token's hidden state kept per sequence (the key shift
    of :class:`~mka.nn.base.QKVAttention`), in the state dtype."""

    kv_heads: int
    key_dim: int
    value_dim: int = 0
    page_states: bool = False
    states: tuple[str, ...] = ()
    recall_chunk: int = 0  # > 0: the signature of every whole chunk of this many tokens
    recall_bits: int = 0   # signs per signature
    recall_score: str = "hash"  # "mean" / "bound", "corners": the chunks' mean / max and min keys too
    summary_stride: int = 0  # > 0: the EMA keys/values at positions s - 1, 2s - 1, ...
    window: Optional[int] = None
    shift_dim: int = 0

    @property
    def spillable(self) -> bool:
        """Whether only the last ``window`` tokens and recalled chunks are read from the
        pages: level 1 windowed, level 2 over summaries, level 3 by recall."""
        return (self.recall_chunk > 0 and self.summary_stride > 0 and self.window is not None
                and not self.page_states)

    def bytes_per_token(self, dtype: torch.dtype) -> int:
        return self.kv_heads * (self.key_dim + self.value_dim) * dtype.itemsize

    def bytes_per_page(self, page_size: int, dtype: torch.dtype) -> int:
        pages = page_size * self.bytes_per_token(dtype)
        if self.page_states:
            pages += 2 * self.kv_heads * self.key_dim * state_dtype(dtype).itemsize
        return pages

    def state_bytes(self, dtype: torch.dtype, max_tokens: int = 0) -> int:
        """Per-sequence bytes beside the pages: the running states, and for a sequence of up
        to ``max_tokens`` tokens the chunk signatures (int8, one per bit) and summaries."""
        G, d = self.kv_heads, self.key_dim
        n = (len(self.states) * G * d + self.shift_dim) * state_dtype(dtype).itemsize
        if self.recall_chunk:
            chunks = math.ceil(max_tokens / self.recall_chunk)
            n += chunks * G * self.recall_bits
            n += (chunks * G * exact_width(self.recall_score, d)
                  * exact_dtype(self.recall_score, dtype).itemsize)
        if self.summary_stride:
            n += 2 * math.ceil(max_tokens / self.summary_stride) * G * d * dtype.itemsize
        return n


class PageStep(NamedTuple):
    """Where a step's tokens go: ``block_table (B, W)``, ``cache_seqlens (B,)`` (tokens
    before the step) and ``seqlens (B,)`` (after it), int32 on the cache's device, and
    ``max_seqlen``, a bound on ``seqlens`` known on the host (no synchronisation)."""

    block_table: Tensor
    cache_seqlens: Tensor
    seqlens: Tensor
    max_seqlen: int


class PagedKVCache:
    """Paged KV cache of ``batch_size`` sequences for the layers ``specs``.

    ``max_tokens`` bounds a sequence (the block table's width is ``ceil(max_tokens /
    page_size)``); ``num_pages`` defaults to every sequence at ``max_tokens`` and may be
    smaller (pages are taken as sequences grow) or larger (room for :meth:`reorder`'s
    copies). Indexing gives the layers' caches: ``cache[i]`` is what layer ``i`` reads.

    ``host``: the DRAM tier (:class:`~mka.memory.host_tier.HostTier`): every layer must be
    :attr:`LayerSpec.spillable`; chunks level 1 is done with move to host memory at the start
    of each step and their pages return to the pool, so ``num_pages`` (default: room for the
    window, two chunks and a step of ``host.step_tokens`` per sequence) bounds device memory,
    not ``max_tokens``. Steps are then at most ``host.step_tokens`` tokens."""

    def __init__(self, specs: Sequence[LayerSpec], batch_size: int, *, max_tokens: int,
                 page_size: int = 16, num_pages: Optional[int] = None,
                 device: Optional[torch.device] = None, dtype: torch.dtype = torch.float32,
                 host: Optional[HostTier] = None):
        for value, name in ((batch_size, "batch_size"), (max_tokens, "max_tokens"),
                            (page_size, "page_size")):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}: must be a positive integer, got {value!r}")
        width = math.ceil(max_tokens / page_size)
        if host is not None:
            check_host(specs, page_size, host)
            if num_pages is None:
                num_pages = batch_size * max(
                    math.ceil((s.window + 2 * s.recall_chunk + host.step_tokens) / page_size) + 1
                    for s in specs)
        num_pages = batch_size * width if num_pages is None else num_pages
        self.table = PageTable(num_pages, page_size, width)
        self.device = torch.empty(0, device=device).device  # "cuda" -> "cuda:0"
        self.dtype, self.page_size, self.max_tokens = dtype, page_size, max_tokens
        self.seqs = [self.table.add_sequence() for _ in range(batch_size)]
        self.layers = [LayerCache(self, i, spec) for i, spec in enumerate(specs)]
        self.host = host
        if host is not None:
            share = host.budget_bytes // len(self.layers)
            for layer in self.layers:
                layer.host = LayerHost(layer, host, share)
        self._block_table: Optional[Tensor] = None
        self._lengths: dict[tuple, tuple[Tensor, Tensor]] = {}
        self.static = False
        self._capacity = 0  # static mode: tokens reserved per sequence

    # ------------------------------------------------------------------ layers

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, i):
        return self.layers[i]

    def lone_layer(self) -> "LayerCache":
        """The layer of a one-layer cache, holding the cache itself: a module's own cache is
        that layer alone (a layer refers to its cache weakly otherwise). The cache then refers
        to the layer weakly, so dropping the layer frees both at once (no cycle)."""
        if len(self.layers) != 1:
            raise ValueError(f"lone_layer: the cache has {len(self.layers)} layers, not 1")
        layer = self.layers[0]
        if isinstance(layer, weakref.ProxyType):  # a second call would hand out the proxy
            raise ValueError("lone_layer: the cache's layer was taken already")
        layer.owner = self
        self.layers = [weakref.proxy(layer)]
        return layer

    def __iter__(self):
        return iter(self.layers)

    @property
    def batch_size(self) -> int:
        return len(self.seqs)

    # ------------------------------------------------------------------ pages

    def _reserve(self, tokens: list[int]) -> None:
        """Room for ``tokens[b]`` tokens in sequence ``b`` (a no-op for layers after the
        first in a step); shared pages about to be written are copied in every layer. The
        rows of the device block table whose pages changed are refreshed, the others kept:
        a decode step moves a few entries, not the whole table."""
        S = self.page_size
        if self.host is not None and any(n > self.table.length(s) for n, s in zip(tokens, self.seqs)):
            self._spill(tokens)  # a new step (the first layer's call): the last one is done
        held = [-(-self.table.length(s) // S) for s in self.seqs]
        copies = self.table.reserve(self.seqs, tokens)
        if copies:
            src = torch.tensor([c[0] for c in copies], device=self.device)
            dst = torch.tensor([c[1] for c in copies], device=self.device)
            for layer in self.layers:
                for t in layer.page_tensors():
                    t[dst] = t[src]
        if self._block_table is None:
            return
        # a copy replaced a page of some row (which: not reported): all rows then
        rows = (range(self.batch_size) if copies else
                [b for b, s in enumerate(self.seqs) if -(-self.table.length(s) // S) != held[b]])
        if rows:
            fresh = torch.empty((len(rows), self.table.max_pages_per_seq), dtype=torch.int32)
            self.table.fill_block_table([self.seqs[b] for b in rows], fresh)
            index = torch.tensor(list(rows), device=self.device)
            self._block_table.index_copy_(0, index, fresh.to(self.device))

    def _spill(self, tokens: list[int]) -> None:
        """Before a step to ``tokens`` per sequence: every layer's chunks that level 1 is done
        with go to its store, then the pages all layers spilled return to the pool (their
        block-table entries become -1; no op reads them: levels 1 and 3 read the window and
        the store)."""
        grow = max(n - self.table.length(s) for n, s in zip(tokens, self.seqs))
        if grow > self.host.step_tokens:
            raise ValueError(f"T: a step of {grow} tokens, beyond the host tier's step_tokens "
                             f"= {self.host.step_tokens} (prefill long prompts in pieces)")
        changed = False
        for b, seq in enumerate(self.seqs):
            n = self.table.length(seq)
            row = self.table.pages(seq)
            for layer in self.layers:
                layer.host.spill(layer, b, seq, n, row)
            front = min(layer.host.spilled_tokens(seq) for layer in self.layers)
            if front // self.page_size > self.table.released(seq):
                self.table.release_front(seq, front)
                changed = True
        if changed and self._block_table is not None:
            table = torch.empty((self.batch_size, self.table.max_pages_per_seq), dtype=torch.int32)
            self.table.fill_block_table(self.seqs, table)
            self._block_table.copy_(table.to(self.device))

    def host_bytes(self) -> int:
        """Bytes the DRAM tier holds (every layer's stored chunks)."""
        return sum(layer.host.store.bytes_used for layer in self.layers) if self.host else 0

    def block_table(self) -> Tensor:
        """``(B, W)`` int32 on the cache's device: made once, its rows refreshed in place as
        their sequences take pages (the tensor stays the same)."""
        if self._block_table is None:
            table = torch.empty((self.batch_size, self.table.max_pages_per_seq), dtype=torch.int32)
            self.table.fill_block_table(self.seqs, table)
            self._block_table = table.to(self.device)
            mark_pool_made(self._block_table)
        return self._block_table

    def _step_lengths(self, before: tuple[int, ...],
                      after: tuple[int, ...]) -> tuple[Tensor, Tensor]:
        """``cache_seqlens`` and ``seqlens`` tensors of a step, made once for all layers."""
        key = (before, after)
        if key not in self._lengths:
            both = torch.tensor([before, after], dtype=torch.int32)
            if self.device.type == "cuda":  # pinned: the copy does not wait for the GPU
                both = both.pin_memory().to(self.device, non_blocking=True)
            else:
                both = both.to(self.device)
            self._lengths = {key: (both[0], both[1])}
            mark_pool_made(*self._lengths[key])
        return self._lengths[key]

    # ------------------------------------------------------------------ static steps

    def make_static(self, tokens: int) -> None:
        """Decoding up to ``tokens`` tokens per sequence with no host work in the cache: every
        page is reserved now (the block table stops changing) and a step's lengths live in
        device tensors that move in place — what a CUDA graph of a step needs from the cache
        (the paged ops must then run without host checks too). The model drives a static
        cache: it calls :meth:`advance` after all layers (``GPT.forward`` does); the modules'
        steps only read the lengths."""
        if self.host is not None:
            raise ValueError("make_static: the DRAM tier reads and writes host memory every "
                             "step; a static cache keeps every page on the device")
        if tokens > self.max_tokens or tokens < max(self.layers[0].written, default=0):
            raise ValueError(f"tokens: must be between the longest sequence "
                             f"({max(self.layers[0].written)}) and max_tokens "
                             f"({self.max_tokens}), got {tokens}")
        self._reserve([tokens] * self.batch_size)
        before = torch.tensor(self.layers[0].written, dtype=torch.int32)
        self._static_before = before.to(self.device, copy=True)
        self._static_after = before.to(self.device, copy=True)
        mark_pool_made(self._static_before, self._static_after)
        mark_static(self._static_before, self._static_after)
        self.block_table()
        self.static, self._capacity = True, tokens

    @contextlib.contextmanager
    def host_counts_kept(self) -> Iterator[None]:
        """A block whose changes to the layers' host lengths are undone at its end: a CUDA
        graph capture runs a step's host side without its device side, and each replay then
        advances the lengths (:meth:`advance` with ``host_only``)."""
        written = [list(layer.written) for layer in self.layers]
        try:
            yield
        finally:
            for layer, w in zip(self.layers, written):
                layer.written = w

    def advance(self, T: int, *, host_only: bool = False) -> None:
        """A static step of ``T`` tokens is done: the lengths move, on the device (in place:
        part of a captured step) and on the host (``host_only``: after a graph replay, whose
        device part already ran)."""
        if not self.static:
            raise ValueError("advance: only a static cache (make_static) is advanced by hand")
        if not host_only:
            self._static_before.add_(T)
        for layer in self.layers:
            layer.written = [n + T for n in layer.written]

    def truncate(self, lengths: Sequence[int]) -> None:
        """Sequence ``b`` keeps its first ``lengths[b]`` tokens in every layer (speculative
        decoding's rejected tail, a crop); emptied pages go back to the pool. Running EMA
        states are the caller's to rebuild (they summarise the dropped tokens too)."""
        lengths = [int(n) for n in lengths]
        if len(lengths) != self.batch_size:
            raise ValueError(f"lengths: expected one per sequence ({self.batch_size}), "
                             f"got {len(lengths)}")
        if self.static:
            raise ValueError("truncate: a static cache keeps its pages (make a new cache)")
        if any(layer.spec.shift_dim for layer in self.layers):
            raise ValueError("truncate: a layer with the key shift keeps the last token's hidden "
                             "state, which the cache cannot rebuild for a shorter sequence "
                             "(prefill the kept tokens into a new cache)")
        for b, (seq, n) in enumerate(zip(self.seqs, lengths)):  # all checked, then changed
            kept = max((layer.host.spilled_tokens(seq) for layer in self.layers), default=0) \
                if self.host else 0
            if not kept <= n <= self.table.length(seq):
                held = f" ({kept} of them in host memory)" if kept else ""
                raise ValueError(f"lengths: sequence {b} holds {self.table.length(seq)} "
                                 f"tokens{held}, cannot keep {n}")
        for seq, n in zip(self.seqs, lengths):
            self.table.truncate(seq, n)
        for layer in self.layers:
            layer.written = list(lengths)
        self._block_table, self._lengths = None, {}

    def reorder(self, rows: Sequence[int]) -> None:
        """Row ``j`` of the batch continues sequence ``rows[j]`` (beam search, parallel
        sampling): repeated rows fork (their pages are shared until written: copy-on-write),
        rows no longer listed are freed."""
        rows = [int(r) for r in rows]
        if not rows or any(not 0 <= r < self.batch_size for r in rows):
            raise ValueError(f"rows: expected indices into the batch of {self.batch_size}, got {rows}")
        if self.static:
            raise ValueError("reorder: a static cache keeps its rows (make a new cache)")
        if self.host is not None:
            raise ValueError("reorder: a cache with a host tier keeps its rows (its spilled "
                             "chunks belong to one sequence each)")
        if getattr(self, "_view_of", None) is not None:
            raise ValueError("reorder: this is select()'s view of some rows; reorder the cache "
                             "it came from")
        seqs, used = [], set()
        for r in rows:
            seqs.append(self.seqs[r] if r not in used else self.table.fork(self.seqs[r]))
            used.add(r)
        for r, s in enumerate(self.seqs):
            if r not in used:
                self.table.free(s)
        self.seqs = seqs
        index = torch.tensor(rows, device=self.device)
        for layer in self.layers:
            layer._reorder(rows, index)
        self._block_table, self._lengths = None, {}

    @contextlib.contextmanager
    def select(self, rows: Sequence[int]) -> Iterator["PagedKVCache"]:
        """A cache of the listed rows only, sharing this one's pages and table: a forward on
        it extends just those sequences (prefill of prompts of different lengths, one at a
        time). Their lengths and EMA states come back into this cache when the block ends."""
        rows = [int(r) for r in rows]
        if self.static:
            raise ValueError("select: a static cache keeps its rows (prefill before make_static)")
        if not rows or len(set(rows)) != len(rows) or any(not 0 <= r < self.batch_size for r in rows):
            raise ValueError(f"rows: expected distinct indices into the batch of "
                             f"{self.batch_size}, got {rows}")
        sub = object.__new__(PagedKVCache)
        sub.__dict__.update(self.__dict__)
        sub.seqs = [self.seqs[r] for r in rows]
        sub._block_table, sub._lengths, sub._view_of = None, {}, self
        sub.layers = [layer._rows(sub, rows) for layer in self.layers]
        try:
            yield sub
        finally:  # pages the rows took stay theirs; table rows are rebuilt either way
            self._block_table, self._lengths = None, {}
        # Only a block that ran to its end hands lengths and states back: a failed forward
        # leaves the rows as they were.
        index = torch.tensor(rows, device=self.device)
        for layer, part in zip(self.layers, sub.layers):
            for i, r in enumerate(rows):
                layer.written[r] = part.written[i]
            for name, s in part.states.items():
                layer.states[name][index] = s

    # ------------------------------------------------------------------ accounting

    def nbytes(self) -> int:
        """Bytes of every tensor the cache holds (page pools, page checkpoints, states)."""
        return sum(layer.nbytes() for layer in self.layers)

    def used_bytes(self) -> int:
        """Bytes of the pages sequences hold (a page shared by several counted once) plus
        the states."""
        pages = {p for s in self.seqs for p in self.table.pages(s) if p >= 0}
        return sum(len(pages) * layer.spec.bytes_per_page(self.page_size, self.dtype)
                   + sum(s.numel() * s.element_size() for s in layer.states.values())
                   for layer in self.layers)

    def __repr__(self) -> str:
        return (f"PagedKVCache(layers={len(self)}, batch={self.batch_size}, "
                f"page_size={self.page_size}, pages={self.table.num_pages}, "
                f"free={self.table.num_free_pages}, {self.dtype}, {self.device})")


class LayerCache:
    """One layer's view of a :class:`PagedKVCache`: its page tensors ``k_pages (P, S, G,
    dk)``, ``v_pages (P, S, G, dv)`` (None when the values are the keys), MKA's
    ``k_page_states, v_page_states (P, G, d)``, the running ``states`` ``(B, G, d)``, and the
    tokens it has written per sequence."""

    def __init__(self, parent: PagedKVCache, index: int, spec: LayerSpec):
        # A weak reference: the cache holds its layers, and a strong one back would make a
        # cycle, so a dropped cache (its whole page pool) waited for a garbage collection.
        self.parent, self.index, self.spec = weakref.proxy(parent), index, spec
        self.owner: Optional[PagedKVCache] = None  # set by lone_layer only
        P, S, dev, dt = parent.table.num_pages, parent.page_size, parent.device, parent.dtype
        G, dk, dv = spec.kv_heads, spec.key_dim, spec.value_dim
        sdt = state_dtype(dt)
        if dv == dk:  # one tensor: the torch backend writes and reads both in one op each
            kv = torch.zeros((2, P, S, G, dk), device=dev, dtype=dt)
            self.k_pages, self.v_pages = kv[0], kv[1]  # not unbind's views: written in place
        else:
            self.k_pages = torch.zeros((P, S, G, dk), device=dev, dtype=dt)
            self.v_pages = torch.zeros((P, S, G, dv), device=dev, dtype=dt) if dv else None
        self.k_page_states = self.v_page_states = None
        if spec.page_states:
            self.k_page_states = torch.zeros((P, G, dk), device=dev, dtype=sdt)
            self.v_page_states = torch.zeros((P, G, dk), device=dev, dtype=sdt)
        self.states = {n: torch.zeros((parent.batch_size, G, dk), device=dev, dtype=sdt)
                       for n in spec.states}
        if spec.shift_dim:
            self.states["shift"] = torch.zeros((parent.batch_size, spec.shift_dim), device=dev,
                                               dtype=sdt)
        if spec.recall_chunk:  # one sign per bit: computed once, when a chunk completes
            chunks = math.ceil(parent.max_tokens / spec.recall_chunk)
            self.states["chunk_signs"] = torch.zeros(
                (parent.batch_size, chunks, G, spec.recall_bits), device=dev, dtype=torch.int8)
            width = exact_width(spec.recall_score, dk)
            if width:  # exact scoring: the mean key (state dtype), or the max and min keys
                self.states["chunk_keys"] = torch.zeros(
                    (parent.batch_size, chunks, G, width), device=dev,
                    dtype=exact_dtype(spec.recall_score, dt))
        if spec.summary_stride:  # in the cache's dtype, as a full forward computes them
            n = math.ceil(parent.max_tokens / spec.summary_stride)
            for name in ("summary_k", "summary_v"):
                self.states[name] = torch.zeros((parent.batch_size, n, G, dk), device=dev, dtype=dt)
        self.written = [0] * parent.batch_size
        self.host: Optional[LayerHost] = None  # the DRAM tier's store, set by the parent
        self.pending: dict[str, Tensor] = {}  # states of the next step, kept when it is granted

    @property
    def batch_size(self) -> int:
        return self.parent.batch_size

    @property
    def device(self) -> torch.device:
        return self.parent.device

    @property
    def dtype(self) -> torch.dtype:
        return self.parent.dtype

    @property
    def length(self) -> int:
        """Tokens cached, the same for every sequence of the batch (else an error: use
        :attr:`lengths`)."""
        if len(set(self.written)) > 1:
            raise ValueError(f"cache: sequences hold different lengths {self.written}; "
                             "read cache.lengths")
        return self.written[0]

    @property
    def lengths(self) -> list[int]:
        return list(self.written)

    @property
    def static(self) -> bool:
        return self.parent.static

    @property
    def positions(self):
        """Where the next tokens go, per sequence: the host lengths, or on a static cache
        the device tensor (a captured step must not read host values)."""
        return self.parent._static_before if self.parent.static else self.lengths

    def update_states(self, **states: Tensor) -> None:
        """New running EMA states, written into the held tensors (a captured step keeps
        reading the same memory)."""
        for name, value in states.items():
            self.states[name].copy_(value)

    def write_summaries(self, ek: Tensor, ev: Tensor, before: Sequence[int]) -> None:
        """Keeps the EMA keys/values ``ek, ev: (B, T, G, d)`` of a step's tokens (sequence
        ``b``'s start at position ``before[b]``) at the chunk ends among them."""
        s = self.spec.summary_stride
        for b, n0 in enumerate(before):
            first = (n0 + 1 + s - 1) // s * s - 1 - n0  # the first chunk end at or after n0
            rows = torch.tensor(range(first, ek.shape[1], s), dtype=torch.long)
            if rows.numel():
                index = (n0 + rows) // s
                self.states["summary_k"][b, index] = ek[b, rows].to(self.dtype)
                self.states["summary_v"][b, index] = ev[b, rows].to(self.dtype)

    def write_summary_slot(self, ek: Tensor, ev: Tensor, start: Tensor) -> Tensor:
        """A one-token step's EMA key/value (sequence ``b``'s token at position ``start[b]``, a
        device tensor: no host read) into the slot of the chunk it is in, ``floor(p / s)``,
        every step: the slot holds the row's own term until the chunk ends, and then its
        summary. Returns the slots each row attends to, ``floor(p / s) + 1`` (int32)."""
        sk, sv = self.states["summary_k"], self.states["summary_v"]
        s, n = self.spec.summary_stride, sk.shape[1]

        def make():  # shared by the step's layers (the same lengths)
            p = start.long()
            index = torch.div(p, s, rounding_mode="floor").clamp(max=n - 1)
            slots = (index + 1).to(torch.int32)
            mark_pool_made(slots)  # valid by construction: the torch backend reads no lengths
            if self.static:
                mark_static(slots)
            return index + n * torch.arange(p.shape[0], device=p.device), slots

        flat, slots = per_step((start,), ("summary_slot", s, n), make)
        sk.view(-1, *sk.shape[2:]).index_copy_(0, flat, ek[:, 0].to(sk.dtype))
        sv.view(-1, *sv.shape[2:]).index_copy_(0, flat, ev[:, 0].to(sv.dtype))
        return slots

    def summary_table(self) -> Tensor:
        """``(B, 1)`` int32: sequence ``b``'s summaries as page ``b`` of ``summary_k``,
        ``summary_v`` viewed as pages — one paged attention reads them."""
        table = getattr(self, "_summary_table", None)
        if table is None or table.shape[0] != self.batch_size:
            table = torch.arange(self.batch_size, device=self.device, dtype=torch.int32)[:, None]
            mark_pool_made(table)
            self._summary_table = table
        return table

    def page_tensors(self) -> list[Tensor]:
        return [t for t in (self.k_pages, self.v_pages, self.k_page_states, self.v_page_states)
                if t is not None]

    def check(self, name: str, t: Tensor) -> None:
        """New tokens ``t: (B, T, ...)`` fit this cache: its batch, dtype and device."""
        if t.shape[0] != self.batch_size:
            raise ValueError(f"cache: {name} has batch {t.shape[0]}, the cache was made for "
                             f"batch_size {self.batch_size}")
        if t.dtype != self.dtype or t.device != self.device:
            raise ValueError(f"cache: {name} is {t.dtype} on {t.device}, the cache was made "
                             f"for {self.dtype} on {self.device}")

    def step(self, T: Union[int, Sequence[int]]) -> PageStep:
        """Reserves ``T`` more tokens per sequence (or ``T[b]`` for sequence ``b``: a call
        whose sequences grow by different amounts) and returns where they go. States a module
        left in :attr:`pending` for this step (the key shift's last hidden state) are written
        then: a step refused here leaves every state as it was."""
        granted = self._grant(T)
        if self.pending:
            self.update_states(**self.pending)
            self.pending = {}
        return granted

    def _grant(self, T: Union[int, Sequence[int]]) -> PageStep:
        if self.parent.static:
            if not isinstance(T, int):
                raise ValueError("T: a static cache grows every sequence by the same count")
            return self._static_step(T)
        before = tuple(self.written)
        if isinstance(T, int) and T >= 0:
            after = tuple(n + T for n in before)
        else:
            grow = [T] * len(before) if isinstance(T, int) else [int(n) for n in T]
            if len(grow) != len(before) or min(grow, default=0) < 0:
                raise ValueError(f"T: expected a count >= 0 per sequence ({len(before)}), "
                                 f"got {T!r}")
            after = tuple(n + g for n, g in zip(before, grow))
        if max(after, default=0) > self.parent.max_tokens:
            raise ValueError(f"cache: a sequence would hold {max(after)} tokens, beyond the "
                             f"cache's max_tokens = {self.parent.max_tokens}")
        # The step's first layer reserves the pages; the others find its lengths (every
        # other change of the table drops them) and skip the page table's host work.
        lengths = self.parent._lengths.get((before, after))
        if lengths is None:
            self.parent._reserve(list(after))
            lengths = self.parent._step_lengths(before, after)
        self.written = list(after)
        return PageStep(self.parent.block_table(), *lengths, max(after, default=0))

    def _static_step(self, T: int) -> PageStep:
        p = self.parent
        if max(self.written) + T > p._capacity:
            raise ValueError(f"cache: a sequence would hold {max(self.written) + T} tokens, "
                             f"beyond the {p._capacity} made static")
        if self.index == 0:  # one device update per model step, shared by the layers
            torch.add(p._static_before, T, out=p._static_after)
        return PageStep(p._block_table, p._static_before, p._static_after, p._capacity)

    def _rows(self, parent: PagedKVCache, rows: list[int]) -> "LayerCache":
        """This layer's view for :meth:`PagedKVCache.select`: the same page tensors, the
        rows' lengths and a copy of their states."""
        part = object.__new__(LayerCache)
        part.__dict__.update(self.__dict__)
        part.parent = weakref.proxy(parent)
        part.written = [self.written[r] for r in rows]
        part.pending = {}
        index = torch.tensor(rows, device=parent.device)
        part.states = {n: s[index] for n, s in self.states.items()}
        return part

    def _reorder(self, rows: list[int], index: Tensor) -> None:
        self.written = [self.written[r] for r in rows]
        self.states = {n: s[index] for n, s in self.states.items()}

    def nbytes(self) -> int:
        held = self.page_tensors() + list(self.states.values())
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in held}
        return sum(storages.values())  # k_pages, v_pages: two views of one tensor

    def __repr__(self) -> str:
        return (f"LayerCache(layer={self.index}, lengths={self.written}, "
                f"k_pages={tuple(self.k_pages.shape)}, states={sorted(self.states)})")
