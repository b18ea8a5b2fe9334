"""The paged ops of SPEC §7.1 in plain PyTorch: gather each sequence's pages, rebuild MKA's
EMA keys from the page checkpoints, then SDPA with a per-sequence mask.

The ``backend="torch"`` of the modules' paged caches, the path of pages the native kernels
do not take (half-precision pages on the CPU, CUDA pages of a build without CUDA kernels),
and the tests' second opinion on the CUDA kernels. Index values are checked on the host (a
synchronisation per call on CUDA), except for a cache's own tables and lengths, valid by
construction; on CUDA their pages are read up to the table's width and masked (no host read
of the lengths).
"""

from __future__ import annotations

import math
import weakref
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor


def check_slots(block_table: Tensor, ends: Tensor, num_pages: int, page_size: int,
                what: str, starts: Optional[Tensor] = None, begin: int = 0) -> None:
    """Every page holding tokens ``[begin, ends[b])`` of sequence ``b`` is a valid index
    (entries before may be -1: pages the DRAM tier gave back); with ``starts`` (a write of
    tokens ``[starts[b], ends[b])``, checked from ``starts[b]``) no page is written by two
    sequences."""
    ends = ends.long().cpu()
    if (ends < 0).any():
        raise ValueError(f"{what}: entries must be >= 0, got {ends.tolist()}")
    W = block_table.shape[1]
    need = (ends + page_size - 1) // page_size
    if (need > W).any():
        b = int(torch.nonzero(need > W)[0])
        raise ValueError(f"{what}: sequence {b} needs {int(ends[b])} token slots, more than its "
                         f"block table row holds ({W} pages of {page_size} tokens)")
    first = (starts.long().cpu() if starts is not None else torch.full_like(ends, begin))
    pages = torch.arange(W)[None, :]
    used = (pages < need[:, None]) & (pages >= first[:, None] // page_size)
    table = block_table.cpu()
    bad = used & ((table < 0) | (table >= num_pages))
    if bad.any():
        b, i = (int(x) for x in torch.nonzero(bad)[0])
        raise ValueError(f"block_table: entry [{b}, {i}] = {int(table[b, i])} is not a page "
                         f"index in [0, {num_pages})")
    if starts is None:
        return
    first = starts.long().cpu() // page_size
    writer: dict[int, int] = {}
    for b in range(table.shape[0]):
        for i in range(int(first[b]), int(need[b])):
            page = int(table[b, i])
            if writer.setdefault(page, b) != b:
                raise ValueError(f"block_table: page {page} is written by sequences "
                                 f"{writer[page]} and {b} (a shared page must be copied before "
                                 "a write: PageTable.reserve does)")


class _Storages:
    """A set of tensors' storages; a key leaves when its tensor dies — before its storage can
    be freed and its address reused."""

    def __init__(self) -> None:
        self.keys: set[int] = set()

    def add(self, *tensors: Tensor) -> None:
        for t in tensors:
            key = t.untyped_storage().data_ptr()
            self.keys.add(key)
            weakref.finalize(t, self.keys.discard, key)

    def __contains__(self, t) -> bool:
        """``t``: a tensor, or a storage address."""
        return (t if isinstance(t, int) else t.untyped_storage().data_ptr()) in self.keys

    def __bool__(self) -> bool:
        return bool(self.keys)


# The block tables and lengths that a PagedKVCache made from its PageTable: valid by
# construction, so calls through them skip the host checks (on the CPU, ~50 µs of a tiny
# model's ~0.7 ms decode step per call), and CUDA calls the host reads of the lengths (each
# a synchronisation, per layer and decode step).
_POOL_MADE = _Storages()
# Lengths that move inside a captured CUDA graph (a static cache's): their contents change on
# replay without a version bump, so nothing derived from them is kept between calls.
_MOVES_IN_GRAPHS = _Storages()


def mark_pool_made(*tensors: Tensor) -> None:
    """Registers tensors (block tables, step lengths) made by a cache's page table."""
    _POOL_MADE.add(*tensors)


def mark_static(*tensors: Tensor) -> None:
    """Registers lengths a static cache moves in place (also inside CUDA graphs)."""
    _MOVES_IN_GRAPHS.add(*tensors)


def _pool_made(t: Tensor) -> bool:
    return t in _POOL_MADE


# What the layers of one decode step share: every layer reads the same block table and
# lengths, so the positions of a write, the gather indices and masks and the attention mask
# are made by the first layer and reused by the others (a 12-layer step made them 12 times: a
# few dozen small launches per layer, the host's time on the GPU). Keyed by the tensors'
# identity and version counters: an in-place update or a new tensor makes new ones; a dead
# tensor's entry never matches (weak references). Not kept under torch.compile (it traces its
# own graph), while a CUDA graph is captured, or for lengths that move inside graphs.
_STEP: dict = {}


def per_step(tensors: tuple[Tensor, ...], extra: tuple, make):
    # every layer of a decode step asks a few times: the checks cost a few µs of host time
    # (CUDA cannot be capturing before it is initialised; the set of moving lengths is
    # empty unless a static cache exists)
    if (torch.compiler.is_compiling()
            or (torch.cuda.is_initialized() and torch.cuda.is_current_stream_capturing())
            or (_MOVES_IN_GRAPHS and any(t in _MOVES_IN_GRAPHS for t in tensors))):
        return make()
    key = (*[(id(t), t._version) for t in tensors], *extra)
    hit = _STEP.get(key)
    if hit is not None:
        refs, value = hit
        if all(r() is t for r, t in zip(refs, tensors)):
            return value
    value = make()
    if len(_STEP) >= 16:  # a step makes up to 6 kinds: keep about two steps, not old masks
        _STEP.clear()
    _STEP[key] = (tuple(weakref.ref(t) for t in tensors), value)
    return value


def own_tables(block_table: Tensor, lengths: Tensor) -> bool:
    """Whether a call's table and lengths are a cache's own: the native CUDA ops then skip
    the host check of a write, this module its checks (and, on CUDA, its host reads of the
    lengths)."""
    return _pool_made(block_table) and _pool_made(lengths)


def _reads_whole_table(block_table: Tensor, lengths: Tensor) -> bool:
    """CUDA calls through a cache's own table read every page of the table, masked: no host
    read of the lengths (a synchronisation). On the CPU reading them costs nothing."""
    return lengths.is_cuda and own_tables(block_table, lengths)


def pair(a: Tensor, b: Tensor) -> Optional[Tensor]:
    """``(2, *a.shape)``: ``a`` and ``b`` as one view where ``b`` is ``a`` moved by a fixed
    number of elements in the same storage, same shape and strides (keys and values of one
    projection's output, a cache's key and value pages): one op then serves both."""
    if (a.shape != b.shape or a.stride() != b.stride() or a.dtype != b.dtype
            or a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr()):
        return None
    step = b.storage_offset() - a.storage_offset()
    if step <= 0 or a.numel() == 0:
        return None
    try:  # the view must fit the storage
        return a.as_strided((2, *a.shape), (step, *a.stride()))
    except RuntimeError:
        return None


def _positions(block_table: Tensor, start: Tensor, T: int, page_size: int) -> tuple[Tensor, Tensor]:
    """(page, slot) of new tokens ``start[b] + t``, each (B, T)."""
    def make():
        pos = start.long()[:, None] + torch.arange(T, device=start.device)[None, :]
        page = torch.gather(block_table.long(), 1, pos // page_size)
        return page, pos % page_size
    return per_step((block_table, start), ("positions", T, page_size), make)


def paged_write(k: Tensor, v: Tensor, k_pages: Tensor, v_pages: Tensor, block_table: Tensor,
                cache_seqlens: Tensor) -> None:
    if k.shape[1] == 0:
        return
    if not own_tables(block_table, cache_seqlens):
        check_slots(block_table, cache_seqlens + k.shape[1], k_pages.shape[0], k_pages.shape[1],
                    "cache_seqlens", starts=cache_seqlens)
    page, slot = _positions(block_table, cache_seqlens, k.shape[1], k_pages.shape[1])
    k, v = k.detach(), v.detach()  # pages keep values, not a graph (as the native write)
    pages, new = pair(k_pages, v_pages), pair(k, v)
    if pages is not None and new is not None:
        pages[:, page, slot] = new.to(pages.dtype)
    else:
        k_pages[page, slot] = k.to(k_pages.dtype)
        v_pages[page, slot] = v.to(v_pages.dtype)


def paged_write_ema(k: Tensor, v: Tensor, k_pages: Tensor, v_pages: Tensor,
                    block_table: Tensor, cache_seqlens: Tensor, beta: float,
                    k_page_states: Tensor, v_page_states: Tensor, k_state: Optional[Tensor],
                    v_state: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """Writes k, v and the EMA checkpoints of pages whose first token is written; returns the
    running states after the new tokens."""
    from ..nn.torch_ops import ema  # the chunked EMA of the torch backend

    S, T = k_pages.shape[1], k.shape[1]
    ek, ks = ema(k, beta, k_state)
    ev, vs = ema(v, beta, v_state)
    if T == 0:
        return ks, vs
    paged_write(k, v, k_pages, v_pages, block_table, cache_seqlens)
    sdt = k_page_states.dtype
    B, G, d = k.shape[0], k.shape[2], k.shape[3]
    zeros = k.new_zeros((B, 1, G, d), dtype=sdt)
    k0 = zeros[:, 0] if k_state is None else k_state.to(sdt)
    v0 = zeros[:, 0] if v_state is None else v_state.to(sdt)
    # state before token t: the start state, then EMA of tokens < t
    before_k = torch.cat((k0[:, None], ek[:, :-1].to(sdt)), 1)
    before_v = torch.cat((v0[:, None], ev[:, :-1].to(sdt)), 1)
    page, slot = _positions(block_table, cache_seqlens, T, S)
    first = slot == 0
    k_page_states[page[first]] = before_k[first]
    v_page_states[page[first]] = before_v[first]
    return ks, vs


def paged_write_fused(k: Tensor, v: Tensor, lam: Tensor, beta: float, k_pages: Tensor,
                      v_pages: Tensor, block_table: Tensor, cache_seqlens: Tensor,
                      k_state: Tensor, v_state: Tensor, k3: Optional[Tensor] = None,
                      v3: Optional[Tensor] = None) -> None:
    """FastMKA's write: the torch backend's route_fuse of the new tokens from the held
    states, its fused rows written as :func:`paged_write` writes, the states replaced in
    place (no tokens: unchanged)."""
    from ..nn.torch_ops import route_fuse  # the torch backend's fusion (chunked EMA)

    # States overwritten in place must not share memory (the native layer checks the same).
    for t, name in ((k_state, "k_state"), (v_state, "v_state")):
        if any(st == 0 and n > 1 for st, n in zip(t.stride(), t.shape)):
            raise ValueError(f"{name}: an expanded (stride 0) view cannot be updated in place; "
                             "pass a tensor of its own")
    if k_state.data_ptr() == v_state.data_ptr():
        raise ValueError("v_state: the same memory as k_state; each needs its own (both are "
                         "updated in place)")
    if k.shape[1] == 0:
        return
    kf, vf, ks, vs = route_fuse(k.detach(), v.detach(), lam.detach(), beta,
                                None if k3 is None else k3.detach(),
                                None if v3 is None else v3.detach(), k_state, v_state)
    paged_write(kf, vf, k_pages, v_pages, block_table, cache_seqlens)
    k_state.copy_(ks)
    v_state.copy_(vs)


def _held(seqlens: Tensor, n: int) -> Tensor:
    """``(B, n, 1, 1)``: which gathered slots hold a token of their sequence."""
    return (torch.arange(n, device=seqlens.device)[None, :] < seqlens.long()[:, None])[..., None, None]


def gather(pages: Tensor, block_table: Tensor, n: int, seqlens: Tensor, first: int = 0,
           spare: int = 0) -> Tensor:
    """Tokens ``[first, n)`` of each sequence's pages (``first`` a multiple of the page size),
    ``(B, n - first + spare, G, d)``; slots past a sequence's length read as zeros (never
    written, they may hold anything — a NaN there would turn its zero attention weight into
    NaN), and so do the ``spare`` slots after slot ``n``."""
    idx, drop = _gather_index(block_table, seqlens, pages.shape[1], n, first, spare)
    return _take(pages, idx, 0).masked_fill_(drop, 0.0)[:, :n - first + spare]


def gather_pair(k_pages: Tensor, v_pages: Tensor, block_table: Tensor, n: int, seqlens: Tensor,
                first: int = 0, spare: int = 0) -> tuple[Tensor, Tensor]:
    """:func:`gather` of keys and values, in one op each where the pages are one tensor."""
    pages = pair(k_pages, v_pages)
    if pages is None:
        return (gather(k_pages, block_table, n, seqlens, first, spare),
                gather(v_pages, block_table, n, seqlens, first, spare))
    idx, drop = _gather_index(block_table, seqlens, k_pages.shape[1], n, first, spare)
    kv = _take(pages, idx, 1).masked_fill_(drop, 0.0)[:, :, :n - first + spare]
    return kv[0], kv[1]


def _take(pages: Tensor, idx: Tensor, dim: int) -> Tensor:
    """Pages ``idx: (B, W)`` of ``pages`` (pages at ``dim``, then their slots) as ``(..., B,
    W * S, ...)``: ``index_select`` of the flat indices (advanced indexing costs the CPU's host
    two to three times as much a call)."""
    out = pages.index_select(dim, idx.flatten())
    shape = pages.shape
    return out.view(*shape[:dim], *idx.shape[:1], idx.shape[1] * shape[dim + 1], *shape[dim + 2:])


def _own_pages(block_table: Tensor, seqlens: Tensor, S: int, c0: int, c1: int) -> Tensor:
    """Columns ``[c0, c1)`` of the table as int64, entries past each sequence's own pages as
    -1: they may hold anything (SPEC §7.1), an out-of-range page number included."""
    raw = block_table[:, c0:c1].long()
    col = torch.arange(c0, c0 + raw.shape[1], device=raw.device)[None, :]
    return torch.where(col * S < seqlens.long()[:, None], raw, -1)


def _gather_index(block_table: Tensor, seqlens: Tensor, S: int, n: int, first: int,
                  spare: int = 0) -> tuple[Tensor, Tensor]:
    """The pages of tokens ``[first, n + spare)`` (-1 entries, and columns past the table, as
    page 0) and which slots of those pages hold no token, ``(B, pages * S, 1, 1)`` (the fill
    runs on the whole gathered pages, contiguous): entries of -1 (pages given back) read as
    zeros too."""
    def make():
        c0, W = first // S, -(-(n + spare) // S)
        raw = _own_pages(block_table, seqlens, S, c0, -(-n // S))
        if raw.shape[1] < W - c0:  # the spare slots' pages: none of the table's
            raw = torch.cat((raw, raw.new_full((raw.shape[0], W - c0 - raw.shape[1]), -1)), 1)
        paged = (raw >= 0)[:, :, None].expand(-1, -1, S).flatten(1)[:, :, None, None]
        return raw.clamp(min=0), ~(_held(seqlens, W * S)[:, first:] & paged)
    return per_step((block_table, seqlens), ("gather", S, n, first, spare), make)


def page_ema(pages: Tensor, states: Tensor, block_table: Tensor, n: int, beta: float,
             seqlens: Tensor) -> Tensor:
    """EMA of the first ``n`` tokens of each sequence, rebuilt page by page from the page
    checkpoints: token ``o`` of a page is ``beta^(o+1) s + (1 - beta) sum_u<=o beta^(o-u) x_u``
    (slots past a sequence's length as zeros, as in :func:`gather`)."""
    S = pages.shape[1]
    W = max(1, math.ceil(n / S))
    sdt = states.dtype

    def index():  # -1 entries read as page 0: their slots are not held
        idx = _own_pages(block_table, seqlens, S, 0, W).clamp(min=0)
        return idx, _held(seqlens, W * S).reshape(-1, W, S, 1, 1)

    def coefficients():
        t = torch.arange(S, device=pages.device, dtype=torch.float64)
        lag = t[:, None] - t[None, :]
        decay = torch.where(lag >= 0, (1.0 - beta) * beta ** lag.clamp(min=0), 0.0).to(sdt)
        return decay, (beta ** (t + 1)).to(sdt)[None, None, :, None, None]

    idx, held = per_step((block_table, seqlens), ("page_ema", S, W), index)
    decay, first = per_step((), ("decay", S, float(beta), sdt, pages.device), coefficients)
    x = torch.where(held, pages[idx].to(sdt), 0.0)  # (B, W, S, G, d)
    s = states[idx]                             # (B, W, G, d)
    y = torch.einsum("ou,bwugd->bwogd", decay, x) + first * s[:, :, None]
    return y.flatten(1, 2)[:, :n].to(pages.dtype)


def _mask(Tq: int, n: int, seqlens: Tensor, causal: bool, window: Optional[int],
          first: int = 0) -> Tensor:
    """(B, Tq, n - first) bool: query i of sequence b sees key j in [first, n) (bottom-right
    per sequence)."""
    L = seqlens.long()[:, None, None]
    i = torch.arange(Tq, device=seqlens.device)[None, :, None] + (L - Tq)
    j = torch.arange(first, n, device=seqlens.device)[None, None, :]
    vis = j < L
    if causal:
        vis = vis & (j <= i)
    if window is not None:
        vis = vis & (i - j < window)
    return vis


def _attend_mask(Tq: int, n: int, seqlens: Tensor, causal: bool, window: Optional[int],
                 dtype: torch.dtype, first: int = 0,
                 spare: int = 0) -> tuple[Tensor, Optional[Tensor]]:
    """SDPA's additive mask ``(B, 1, Tq, n - first + spare)`` in ``dtype`` (0 or -inf: SDPA
    turns a boolean one into that at every call, three ops per layer) and which rows see no
    key ``(B, Tq, 1, 1)``, to be zeroed after. Rows seeing nothing cannot be left with no key
    (a softmax of nothing is NaN): without ``spare`` slots they attend to all; with them (keys
    and values of zeros, :func:`gather`) to those alone, which makes their output exactly zero
    in the attention itself — one op less per layer — and the second result is None. (A
    non-finite query there reads NaN, not zero: such a row's residual is non-finite already.)"""
    def make():
        vis = _mask(Tq, n, seqlens, causal, window, first)
        seen = vis.any(-1, keepdim=True)
        if spare:
            hidden = ~torch.cat((vis, (~seen).expand(-1, -1, spare)), -1)[:, None]
        else:
            hidden = ~(vis | ~seen)[:, None]
        mask = torch.zeros(hidden.shape, dtype=dtype, device=seqlens.device)
        return (mask.masked_fill_(hidden, float("-inf")),
                None if spare else ~seen[..., None])
    return per_step((seqlens,), ("mask", Tq, n, causal, window, first, dtype, spare), make)


def _attend(q: Tensor, k: Tensor, v: Tensor, masks: tuple[Tensor, Optional[Tensor]],
            scale: Optional[float]) -> Tensor:
    B, Tq, H, _ = q.shape
    if k.shape[1] == 0:
        return q.new_zeros((B, Tq, H, v.shape[-1]))
    mask, blind = masks
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         attn_mask=mask, scale=scale,
                                         enable_gqa=k.shape[2] != H).transpose(1, 2)
    return out if blind is None else out.masked_fill(blind, 0.0)


def paged_attention(q: Tensor, k_pages: Tensor, v_pages: Tensor, block_table: Tensor,
                    seqlens: Tensor, causal: bool = True, scale: Optional[float] = None,
                    window: Optional[int] = None) -> Tensor:
    S = k_pages.shape[1]
    if _reads_whole_table(block_table, seqlens):
        n, lo = block_table.shape[1] * S, 0
    else:
        n = int(seqlens.max()) if seqlens.numel() else 0
        # with a window, no row reads below the first row's window start in the shortest sequence
        lo = 0 if window is None or not seqlens.numel() else \
            max(0, int(seqlens.min()) - q.shape[1] - window + 1) // S * S
        if not own_tables(block_table, seqlens):
            check_slots(block_table, seqlens, k_pages.shape[0], S, "seqlens", begin=lo)
    # a page of zero slots after the keys for rows that see no key (a whole page keeps the
    # key count a multiple of the page size, as SDPA's kernels like their masks' rows aligned)
    spare = S if n > 0 else 0
    k, v = gather_pair(k_pages, v_pages, block_table, n, seqlens, lo, spare)
    return _attend(q, k, v, _attend_mask(q.shape[1], n, seqlens, causal, window, q.dtype, lo,
                                         spare), scale)


def paged_mka_attention(q: Tensor, k_pages: Tensor, v_pages: Tensor, k_page_states: Tensor,
                        v_page_states: Tensor, block_table: Tensor, seqlens: Tensor,
                        lam: Tensor, beta: float, causal: bool = True,
                        scale: Optional[float] = None, window: Optional[int] = None) -> Tensor:
    if _reads_whole_table(block_table, seqlens):
        n = block_table.shape[1] * k_pages.shape[1]
    else:
        if not own_tables(block_table, seqlens):
            check_slots(block_table, seqlens, k_pages.shape[0], k_pages.shape[1], "seqlens")
        n = int(seqlens.max()) if seqlens.numel() else 0
    k, v = gather_pair(k_pages, v_pages, block_table, n, seqlens)
    ek = page_ema(k_pages, k_page_states, block_table, n, beta, seqlens)
    ev = page_ema(v_pages, v_page_states, block_table, n, beta, seqlens)
    Tq = q.shape[1]
    o1 = _attend(q, k, v, _attend_mask(Tq, n, seqlens, causal, window, q.dtype), scale)
    o2 = _attend(q, ek, ev, _attend_mask(Tq, n, seqlens, causal, None, q.dtype), scale)
    w = lam.to(q.dtype)
    return w[..., 0, None, None] * o1 + w[..., 1, None, None] * o2

