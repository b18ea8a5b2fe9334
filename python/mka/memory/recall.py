"""Level 3 by recall (SPEC §7.2): older context kept in chunks, each keyed by a SimHash
signature, and each query attending to the few chunks whose signatures match its own.

Chunks are ``C`` consecutive tokens of a sequence; a chunk's signature per key/value head is
the sign pattern of its **mean key** against fixed random hyperplanes (``tables`` groups of
``bits``). The mean key is the chunk's centroid: a query's dot product with it is the mean of
its scores over the chunk, so matching signs (angular similarity, which SimHash estimates)
rank chunks by their average attention logit — cheap to keep (one vector per chunk and head,
updated as tokens arrive) and exact for a chunk of near-identical keys. A query's signature
is that of its mean over the query heads of the kv head (GQA: one selection per token and
key/value head, shared by its query heads). Selection is per query token, never per block
of queries: a block's later rows would otherwise steer its earlier rows' recall, which is
a look at the future in training and impossible in decoding. ``score="mean"`` ranks by the
exact dot product of the mean query with the mean key instead (the chunk's mean logit, which
the signatures estimate): a cache then keeps the mean keys too, ``d`` numbers a chunk and head,
beside the signatures its host store files. ``score="bound"`` ranks by Quest's bound of the
chunk's largest logit, ``sum_d max(q_d min_d, q_d max_d)`` over the chunk's per-channel
minimum and maximum keys, averaged over the kv head's query heads: ``q+ . max + q- . min``, a
dot product of ``2d`` numbers a side (the mean over heads of ``q+`` and of ``q-``), so the
same selection serves it; a cache keeps the max and min keys, ``2d`` numbers a chunk and head.
``score="corners"`` keeps the same ``2d`` numbers and ranks by the log of a query head's mean
``exp(scale q.k)`` over the ``2^d`` corners of the chunk's key box (each channel at its min or
its max), ``sum_d log((exp(scale q_d min_d) + exp(scale q_d max_d)) / 2)``, summed over the kv
head's query heads as masses (log-sum-exp): Quest's bound is the largest corner; this counts
how many corners score high, so a chunk whose bound comes from one wide channel ranks below
one whose channels agree (an estimate of the chunk's attention mass, not a bound; it tends to
Quest's ranking where ``scale q_d (max_d - min_d)`` is large and to the box's centre where it
is small).

Query row ``i`` (key position ``p = i + Tk - Tq``, bottom-right) may recall chunk ``c`` iff the
chunk lies wholly before its L1 window: ``(c + 1) C <= p - W + 1`` (``W`` the window; without
one, ``W = 1``: wholly in the past). The top ``R`` eligible chunks by signature agreement are
recalled (ties: the later chunk), fewer where fewer are eligible, none in the first chunks.
``O3`` is the attention of the row to its recalled tokens. Selection is discrete and carries no
gradient; ``O3`` is differentiable in ``q, k, v``.

``O3`` runs the native kernels on the CPU and CUDA (:mod:`.recall_ops`: the chosen chunks
read in place; decoding steps of a few rows gather their chunks from the pages first);
elsewhere, and for long cached steps over pages on CUDA, the composite form below (PyTorch,
blocks of queries at a time so the gathered keys stay small).
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from ..reference import state_dtype
from . import recall_ops
from .summary import to_device

QUERY_BLOCK = 64  # query rows whose recalled keys are gathered at once


def simhash_planes(head_dim: int, tables: int = 4, bits: int = 16, seed: int = 0,
                   device=None) -> Tensor:
    """Random Gaussian hyperplanes ``(tables * bits, head_dim)``, float32, fixed by ``seed``."""
    for value, name in ((head_dim, "head_dim"), (tables, "tables"), (bits, "bits")):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: must be a positive integer, got {value!r}")
    g = torch.Generator().manual_seed(seed)
    return torch.randn(tables * bits, head_dim, generator=g).to(device)


def signatures(x: Tensor, planes: Tensor) -> Tensor:
    """Sign patterns ``±1`` of ``x: (..., d)`` against ``planes: (P, d)``: ``(..., P)``, in
    float32 (float64 for float64 inputs)."""
    dt = torch.float64 if x.dtype == torch.float64 else torch.float32
    with torch.autocast(x.device.type, enabled=False):  # autocast would round to bf16
        proj = x.to(dt) @ planes.t().to(x.device, dt)
    return torch.where(proj >= 0, 1.0, -1.0).to(dt)


def pack_signatures(signs: Tensor) -> Tensor:
    """``±1`` patterns ``(..., P)`` as bits, 64 to an int64 word (bit ``j`` of word ``w`` is
    sign ``64 w + j`` > 0): ``(..., ceil(P / 64))`` — the ChunkStore's layout."""
    P = signs.shape[-1]
    W = -(-P // 64)
    bits = torch.nn.functional.pad((signs > 0).to(torch.int64), (0, 64 * W - P))
    weights = torch.ones(64, dtype=torch.int64, device=signs.device).bitwise_left_shift(
        torch.arange(64, device=signs.device))
    return (bits.reshape(*signs.shape[:-1], W, 64) * weights).sum(-1)


def chunk_means(k: Tensor, chunk: int) -> Tensor:
    """Mean key of every complete chunk: ``(B, Tk // C, G, d)``."""
    return chunk_keys(k, chunk, "mean")


# Scores that keep each chunk's per-channel max and min keys (``2d`` numbers a chunk and head).
EXTREMES = ("bound", "corners")


def exact_width(score: str, d: int) -> int:
    """Numbers exact scoring keeps per chunk and kv head: 0 (``"hash"``: signatures only),
    ``d`` (``"mean"``: the mean key), ``2d`` (``"bound"``, ``"corners"``: the max then the min
    keys)."""
    return {"hash": 0, "mean": d, "bound": 2 * d, "corners": 2 * d}[score]


def exact_dtype(score: str, dtype: torch.dtype) -> torch.dtype:
    """The dtype a cache of keys in ``dtype`` keeps exact scoring's numbers in: the keys' own
    for the max and min keys (extremes of stored keys: nothing is lost), the state dtype for
    the mean key."""
    return dtype if score in EXTREMES else state_dtype(dtype)


def _summarize(blocks: Tensor, score: str) -> Tensor:
    """Chunks' keys ``blocks (..., C, G, d)`` as exact scoring keeps them (chunk axis -3):
    the mean key, or for :data:`EXTREMES` the per-channel max and min keys, ``(..., G, 2d)``."""
    if score not in EXTREMES:
        return blocks.mean(-3)
    return torch.cat((blocks.amax(-3), blocks.amin(-3)), -1)


def chunk_keys(k: Tensor, chunk: int, score: str) -> Tensor:
    """What exact scoring keeps of every complete chunk of ``k: (B, T, G, d)``: its mean key
    (``"hash"``, ``"mean"``), or its per-channel max and min keys (:data:`EXTREMES`, ``2d``)."""
    B, T, G, d = k.shape
    n = T // chunk
    return _summarize(k[:, :n * chunk].reshape(B, n, chunk, G, d), score)


def eligible(Tq: int, Tk: int, chunk: int, window: Optional[int], device=None) -> Tensor:
    """``(Tq,)``: how many of the first chunks each query row may recall."""
    return _eligible_counts(torch.arange(Tq, device=device) + (Tk - Tq), chunk, window)


SCORES = ("hash", "mean", "bound", "corners")


def check_score(score) -> None:
    if score not in SCORES:
        raise ValueError(f"recall_score: expected one of {list(SCORES)}, got {score!r}")


def representatives(x: Tensor, planes: Tensor, score: str) -> Tensor:
    """What selection compares, from mean queries or :func:`chunk_keys` ``x``: their sign
    patterns (``"hash"``) or themselves in float32/float64 (the exact scores)."""
    if score == "hash":
        return signatures(x, planes)
    return x.to(state_dtype(x.dtype))


def query_representatives(q: Tensor, planes: Tensor, score: str) -> Tensor:
    """What selection compares of query rows grouped by kv head, ``q: (B, T, G, H / G, d)``:
    their mean's representative; for ``"bound"`` the means over the group of the positive
    and negative parts, ``(B, T, G, 2d)`` (``q+ . max + q- . min`` is Quest's bound); for
    ``"corners"`` the query heads themselves, ``(B, T, G, H / G, d)``."""
    if score == "corners":
        return q.to(state_dtype(q.dtype))
    if score != "bound":
        return representatives(q.mean(3), planes, score)
    x = q.to(state_dtype(q.dtype))
    return torch.cat((x.clamp(min=0).mean(3), x.clamp(max=0).mean(3)), -1)


# Elements of the (rows, heads, chunks, d) terms the corner score makes at once, and rows per
# block where the rows' eligible chunks are known (later rows see more: a block scores only
# the chunks its last row may recall, about half of them over a causal sequence).
CORNER_ELEMENTS = 1 << 26
CORNER_ROWS = 256


def corner_scores(q: Tensor, extremes: Tensor, scale: float,
                  seen: Optional[Tensor] = None) -> Tensor:
    """``(B, T, G, nC)``: ``score="corners"`` of query heads ``q: (B, T, G, H / G, d)`` against
    chunks' max and min keys ``extremes: (B, nC, G, 2d)`` — per head ``sum_d log((exp(scale
    q_d min_d) + exp(scale q_d max_d)) / 2)`` without its constant ``-d log 2``, written as
    ``scale q.min + sum_d softplus(scale q_d (max_d - min_d))``; the group's heads summed as
    masses (log-sum-exp). Rows go in blocks of at most :data:`CORNER_ELEMENTS` terms. ``seen``:
    each row's eligible chunks, ``(T,)`` or ``(B, T)`` on the host — chunks past them are
    scored by ``scale q.min`` alone (their rank is not used)."""
    B, T, G, x, d = q.shape
    nC = extremes.shape[1]
    hi, lo = extremes[..., :d], extremes[..., d:]
    width = (hi - lo).permute(0, 2, 1, 3)[:, None, :, None]  # (B, 1, G, 1, nC, d)
    step = max(1, CORNER_ELEMENTS // max(1, B * G * x * nC * d))
    if seen is not None:
        step = min(step, CORNER_ROWS)
        seen = seen.reshape(-1, T).amax(0)
    out = q.new_empty((B, T, G, nC))
    for i in range(0, T, step):  # per block: no (rows, heads, chunks) tensor of all rows
        qi = q[:, i:i + step]
        per_head = torch.einsum("btgxd,bcgd->btgxc", qi, lo) * scale
        m = nC if seen is None else min(nC, int(seen[i:i + step].max()))
        if m:
            per_head[..., :m] += torch.nn.functional.softplus(
                qi[..., None, :] * scale * width[..., :m, :]).sum(-1)
        out[:, i:i + step] = torch.logsumexp(per_head, 3)
    return out


def select(q_sig: Tensor, k_sig: Tensor, counts: Tensor, top: int,
           width: Optional[int] = None, score: str = "hash",
           scale: Optional[float] = None) -> Tensor:
    """Indices ``(B, Tq, G, R)`` of the recalled chunks per query row and key/value head, best
    first, -1 where a row has fewer eligible chunks; ``R = min(top, max count)``. ``counts``:
    eligible chunks per row, ``(Tq,)`` or per sequence and row ``(B, Tq)``, best on the host
    (its largest entry sets R: read from a device tensor, a synchronisation). ``q_sig, k_sig``:
    signatures (±1) or exact representatives (:func:`query_representatives`,
    :func:`representatives`), scored by their dot product.
    ``width``: R given (at most the chunks scored; rows with fewer eligible chunks get -1):
    ``counts`` is then not read on the host (a static step's are on the device).
    ``score="corners"``: ``q_sig`` the query heads and ``k_sig`` the chunks' max and min keys
    (:func:`corner_scores`, at ``scale``, by default ``1 / sqrt(d)``)."""
    B, Tq, G = q_sig.shape[:3]
    nC = k_sig.shape[1]
    if width is None:
        width = min(top, int(counts.max())) if counts.numel() else 0  # host counts: no sync
    out = torch.full((B, Tq, G, width), -1, dtype=torch.long, device=q_sig.device)
    if width == 0:
        return out
    with torch.autocast(q_sig.device.type, enabled=False):  # scores in the inputs' dtype
        if score == "corners":
            d = q_sig.shape[-1]
            score = corner_scores(q_sig, k_sig, 1.0 / math.sqrt(d) if scale is None else scale,
                                  counts if counts.device.type == "cpu" else None)
        else:
            score = torch.einsum("btgp,bcgp->btgc", q_sig, k_sig)  # signs: matches - mismatches
    counts = to_device(counts, q_sig.device).expand(B, Tq)
    allowed = torch.arange(nC, device=q_sig.device) < counts[..., None]  # (B, Tq, nC)
    # Ties go to the later chunk, however many chunks are scored (a cached step scores fewer
    # than a full pass): float32 scores and the chunk index packed into one int64 key per
    # chunk, unique, so topk's choice is the order's (a full sort cost ~10x more at 1k rows
    # by 1k chunks on the CPU); float64 scores by a stable sort of the chunks in reverse order.
    if score.dtype == torch.float32:
        mono = (score + 0.0).view(torch.int32).long()  # + 0.0: -0.0 ranks as +0.0
        mono = torch.where(mono < 0, mono ^ 0x7FFFFFFF, mono)  # the floats' order as integers
        key = (mono << 32) + torch.arange(nC, device=q_sig.device)
        key = key.masked_fill(~allowed[:, :, None, :], torch.iinfo(torch.int64).min)
        best = key.topk(width, dim=-1).indices
    else:
        # an eligible chunk scored -inf still ranks above every ineligible one
        floor = torch.finfo(score.dtype).min
        key = score.clamp(min=floor).flip(-1).masked_fill(~allowed.flip(-1)[:, :, None, :],
                                                          -math.inf)
        best = nC - 1 - key.sort(dim=-1, descending=True, stable=True).indices[..., :width]
    valid = torch.arange(width, device=q_sig.device) < counts.clamp(max=width)[..., None]
    return torch.where(valid[:, :, None, :], best, out)


def gather_tokens(x: Tensor, tok: Tensor) -> Tensor:
    """Tokens ``tok: (B, n, G, m)`` (positions per row and kv head) of ``x: (B, T, G, d)``:
    ``(B, n, G, m, d)``."""
    B, n, G, m = tok.shape
    d = x.shape[-1]
    idx = tok.permute(0, 1, 3, 2).reshape(B, n * m, G)[..., None].expand(-1, -1, -1, d)
    return torch.gather(x, 1, idx).reshape(B, n, m, G, d).permute(0, 1, 3, 2, 4)


def _attend_recalled(q: Tensor, k, v, chosen: Tensor, chunk: int, scale: float,
                     fetch=gather_tokens) -> Tensor:
    """Rows ``q: (B, n, H, d)`` over their chunks ``chosen: (B, n, G, R)`` of ``k, v``, whose
    tokens ``fetch(k, positions)`` reads (contiguous tensors by default; pages in decoding)."""
    B, n, H, d = q.shape
    G, R = chosen.shape[2], chosen.shape[3]
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    tok = (chosen.clamp(min=0)[..., None] * chunk
           + torch.arange(chunk, device=q.device)).reshape(B, n, G, R * chunk)
    valid = (chosen >= 0)[..., None].expand(B, n, G, R, chunk).reshape(B, n, G, R * chunk)
    gather = lambda x: fetch(x, tok)  # noqa: E731

    qg = q.to(cdt).reshape(B, n, G, H // G, d)
    s = torch.einsum("bngxd,bngtd->bngxt", qg, gather(k).to(cdt)) * scale
    s = s.masked_fill(~valid[:, :, :, None, :], -math.inf)
    seen = valid.any(-1)[:, :, :, None, None]
    p = torch.where(seen, torch.softmax(torch.where(seen, s, 0.0), -1), 0.0)
    o = torch.einsum("bngxt,bngtd->bngxd", p, gather(v).to(cdt))
    return o.reshape(B, n, H, d).to(q.dtype)


def _attend_in_blocks(q: Tensor, k, v, chosen: Tensor, chunk: int, scale: float,
                      fetch=gather_tokens) -> Tensor:
    """:func:`_attend_recalled` over ``QUERY_BLOCK`` rows at a time (the gathered keys of a
    block stay small)."""
    return torch.cat([_attend_recalled(q[:, i:i + QUERY_BLOCK], k, v,
                                       chosen[:, i:i + QUERY_BLOCK], chunk, scale, fetch)
                      for i in range(0, q.shape[1], QUERY_BLOCK)], 1)


def recall_attention(q: Tensor, k: Tensor, v: Tensor, *, chunk: int, top: int,
                     planes: Tensor, window: Optional[int] = None,
                     scale: Optional[float] = None, score: str = "hash") -> tuple[Tensor, Tensor]:
    """``O3`` of SPEC §7.2 for ``q: (B, Tq, H, d)`` over ``k, v: (B, Tk, G, d)`` (bottom-right
    aligned, ``Tq <= Tk``): ``(O3 (B, Tq, H, d), chosen (B, Tq, G, R))``."""
    B, Tq, H, d = q.shape
    Tk, G = k.shape[1], k.shape[2]
    if chunk < 1 or top < 1:
        raise ValueError(f"chunk, top: must be >= 1, got chunk={chunk}, top={top}")
    if Tq > Tk:
        raise ValueError(f"q: {Tq} query rows against {Tk} keys (rows align with the last keys)")
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    counts = eligible(Tq, Tk, chunk, window)  # on the host: select reads its largest
    check_score(score)
    with torch.no_grad():
        q_rep = query_representatives(q.reshape(B, Tq, G, H // G, d), planes, score)
        # exact scoring: each chunk's keys in float32 (float64), as a cache keeps them
        exact = chunk_keys(k if score == "hash" else k.to(q_rep.dtype), chunk, score)
        chosen = select(q_rep, representatives(exact, planes, score), counts, top,
                        score=score, scale=scale)
    if chosen.shape[-1] == 0:
        return q.new_zeros(q.shape) + 0 * q, chosen  # no recall anywhere (keeps the graph)
    if recall_ops.native(q):  # the chunks read in place by the native kernels
        return recall_ops.recall_op(q, k, v, chosen, chunk, scale), chosen
    return _attend_in_blocks(q, k, v, chosen, chunk, scale), chosen


class Recall(torch.nn.Module):
    """A layer's recall settings and its fixed hyperplanes (a buffer: saved with the model,
    the same after a reload). ``chunk`` tokens per chunk, ``top`` chunks recalled per query,
    ``score`` how chunks are ranked (``"hash"``: signatures, ``"mean"``: exact mean logits,
    ``"bound"``: Quest's bound of the largest logit, ``"corners"``: the mean over the key box's
    corners)."""

    def __init__(self, head_dim: int, chunk: int = 64, top: int = 4, tables: int = 4,
                 bits: int = 16, seed: int = 0, score: str = "hash"):
        super().__init__()
        for value, name in ((chunk, "recall_chunk"), (top, "recall_top")):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}: must be a positive integer, got {value!r}")
        check_score(score)
        self.chunk, self.top, self.score = chunk, top, score
        self.register_buffer("planes", simhash_planes(head_dim, tables, bits, seed))

    def forward(self, q: Tensor, k: Tensor, v: Tensor, window: Optional[int]) -> Tensor:
        return recall_attention(q, k, v, chunk=self.chunk, top=self.top, planes=self.planes,
                                window=window, score=self.score)[0]

    def extra_repr(self) -> str:
        return (f"chunk={self.chunk}, top={self.top}, planes={tuple(self.planes.shape)}, "
                f"score={self.score}")


# --------------------------------------------------------------------------- decoding

class Distinct(NamedTuple):
    """The distinct chunks of a choice ``chosen (B, T, G, R)``: chunk ``index[u]`` of batch
    row ``rows[u]``, kv head ``heads[u]`` (sorted by row, head, chunk; host tensors), and
    ``lookup (B, G, width)``: which ``u`` holds chunk ``c`` of row ``b``, head ``g``."""

    rows: Tensor
    heads: Tensor
    index: Tensor
    lookup: Tensor


def distinct_chunks(chosen: Tensor, heads: int, width: int) -> Distinct:
    """:class:`Distinct` of ``chosen`` (on the host; indices below ``width``)."""
    B, width = chosen.shape[0], max(width, 1)
    b = torch.arange(B)[:, None, None, None].expand_as(chosen)
    g = torch.arange(heads)[None, None, :, None].expand_as(chosen)
    ok = chosen >= 0
    flat = torch.unique((b[ok] * heads + g[ok]) * width + chosen[ok])  # sorted (b, g, c)
    rows, hs, index = flat // (heads * width), flat // width % heads, flat % width
    lookup = torch.zeros((B, heads, width), dtype=torch.long)
    lookup[rows, hs, index] = torch.arange(flat.numel())
    return Distinct(rows, hs, index, lookup)


def attend_distinct(q: Tensor, keys: Tensor, vals: Tensor, chosen: Tensor, d: Distinct,
                    chunk: int, scale: float) -> Tensor:
    """``O3`` of ``q: (B, T, H, d)`` over its ``chosen`` chunks, whose tokens are ``keys (U,
    C, dk)``, ``vals (U, C, dv)`` in the order of ``d`` (decoding: read from pages or the
    host store). On the CPU the native op over a compact sequence per (row, head) — slot
    ``s`` holds the ``s``-th distinct chunk of that row and head; else the composite."""
    B, G, C = q.shape[0], d.lookup.shape[1], chunk
    if q.device.type == "cpu" and keys.shape[-1] == vals.shape[-1] == q.shape[-1]:
        group = d.rows * G + d.heads
        first = torch.searchsorted(group, group)  # the first u of each (row, head)
        slot = torch.arange(group.numel()) - first
        n = int(slot.max()) + 1 if slot.numel() else 1
        pos = (slot[:, None] * C + torch.arange(C)).to(q.device)  # (U, C)
        rr, hh = d.rows[:, None].to(q.device), d.heads[:, None].to(q.device)
        k = keys.new_zeros((B, n * C, G, keys.shape[-1]))
        v = vals.new_zeros((B, n * C, G, vals.shape[-1]))
        k[rr, pos, hh], v[rr, pos, hh] = keys, vals
        slots = torch.zeros_like(d.lookup)
        slots[d.rows, d.heads, d.index] = slot
        b = torch.arange(B)[:, None, None, None]
        g = torch.arange(G)[None, None, :, None]
        ch = chosen.cpu()
        remapped = torch.where(ch >= 0, slots[b, g, ch.clamp(min=0)], -1).to(q.device)
        return recall_ops.recall_op(q, k, v, remapped, C, scale)
    lookup = d.lookup.to(q.device)
    last = lookup.shape[-1] - 1

    def fetch(x: Tensor, tok: Tensor) -> Tensor:  # tok: (B, n, G, m) positions
        b = torch.arange(B, device=tok.device)[:, None, None, None]
        g = torch.arange(G, device=tok.device)[None, None, :, None]
        return x[lookup[b, g, (tok // C).clamp(max=last)], tok % C]  # (B, n, G, m, d)

    return _attend_in_blocks(q, keys, vals, chosen, C, scale, fetch)


def page_chunks(k_pages: Tensor, v_pages: Tensor, block_table: Tensor, d: Distinct,
                chunk: int, rows: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """The tokens ``(U, C, dk)``, ``(U, C, dv)`` of the distinct chunks ``d`` (those listed
    in ``rows`` of ``d``'s order if given) read from the pages through ``block_table``."""
    sel = torch.arange(d.rows.numel()) if rows is None else rows
    dev, S = k_pages.device, k_pages.shape[1]
    pos = (d.index[sel, None] * chunk + torch.arange(chunk)).to(dev)  # (n, C)
    rr, hh = d.rows[sel, None].to(dev), d.heads[sel, None].to(dev)
    pages = block_table.long()[rr, pos // S]
    return k_pages[pages, pos % S, hh], v_pages[pages, pos % S, hh]


def update_chunk_signs(signs: Tensor, k_pages: Tensor, block_table: Tensor,
                       before: list[int], after: list[int], chunk: int, planes: Tensor,
                       exact: Optional[Tensor] = None, score: str = "hash") -> None:
    """Signatures of the chunks a step completed (sequence ``b`` grew ``before[b]`` ->
    ``after[b]`` tokens), from their keys read back from the pages, into ``signs (B, max
    chunks, G, P)`` (int8 ±1), and what ``score`` keeps of them (:func:`chunk_keys`) into
    ``exact`` where given (``(B, max chunks, G, exact_width)``): each chunk's are computed
    once."""
    S = k_pages.shape[1]
    for b, (n0, n1) in enumerate(zip(before, after)):
        done = range(n0 // chunk, n1 // chunk)
        if not done:
            continue
        pos = torch.arange(done.start * chunk, done.stop * chunk, device=k_pages.device)
        keys = k_pages[block_table[b].long()[pos // S], pos % S]  # (n C, G, d)
        shape = (len(done), chunk, *keys.shape[1:])
        signs[b, done.start:done.stop] = signatures(keys.reshape(shape).mean(1),
                                                    planes).to(signs.dtype)
        if exact is not None:  # in the store's dtype (exact_dtype)
            exact[b, done.start:done.stop] = _summarize(keys.to(exact.dtype).reshape(shape),
                                                        score)


def update_chunk_signs_at(signs: Tensor, k_pages: Tensor, block_table: Tensor, start: Tensor,
                          chunk: int, planes: Tensor, exact: Optional[Tensor] = None,
                          score: str = "hash") -> None:
    """:func:`update_chunk_signs` for a one-token step of a static cache, the new token of
    sequence ``b`` at position ``start[b]`` (a device tensor: no host read, so a CUDA graph
    can hold it): every step computes the signature of the chunk the token is in and keeps it
    where the token completes that chunk."""
    B, S = start.shape[0], k_pages.shape[1]
    p = start.long()
    c = torch.div(p, chunk, rounding_mode="floor").clamp(max=signs.shape[1] - 1)
    pos = c[:, None] * chunk + torch.arange(chunk, device=p.device)  # (B, C)
    page = block_table.long().gather(1, (pos // S).clamp(max=block_table.shape[1] - 1))
    keys = k_pages[page.clamp(min=0), pos % S]  # (B, C, G, d); kept where the chunk is done
    done = ((p + 1) % chunk == 0)[:, None, None]
    b = torch.arange(B, device=p.device)
    signs[b, c] = torch.where(done, signatures(keys.mean(1), planes).to(signs.dtype), signs[b, c])
    if exact is not None:
        summary = _summarize(keys.to(exact.dtype), score)
        exact[b, c] = torch.where(done, summary, exact[b, c])


def _eligible_counts(pos: Tensor, chunk: int, window: Optional[int]) -> Tensor:
    """Chunks rows at positions ``pos`` may recall: wholly before the window, complete."""
    end = pos - (1 if window is None else window) + 1
    counts = torch.clamp(torch.div(end, chunk, rounding_mode="floor"), min=0)
    return torch.minimum(counts, (pos + 1) // chunk)


def choose_for_step(q: Tensor, signs: Tensor, before, *, chunk: int, top: int,
                    planes: Tensor, window: Optional[int],
                    exact: Optional[Tensor] = None, score: str = "hash",
                    scale: Optional[float] = None) -> tuple[Tensor, int]:
    """The chunks the new rows ``q: (B, T, H, d)`` of a cached step recall (row ``i`` of
    sequence ``b`` at position ``before[b] + i``), ranked by the chunk signatures ``signs``
    or exactly by the ``exact`` store's keys (both kept by :func:`update_chunk_signs`) as
    ``score`` says (the layer's ``recall_score``; ``"hash"`` without ``exact``):
    ``(chosen (B, T, G, R), chunks any row may see)``.
    ``before``: the host lengths (the eligible counts known on the host: no synchronisation)
    or, for a static cache, a device tensor (every stored chunk scored, R = ``top``: shapes
    that do not change from step to step)."""
    B, T, H, d = q.shape
    G = signs.shape[2]
    if isinstance(before, Tensor):
        pos = before.long()[:, None] + torch.arange(T, device=before.device)[None, :]
        counts, nC = _eligible_counts(pos, chunk, window), signs.shape[1]
        width: Optional[int] = min(top, nC)
    else:
        pos = torch.tensor(before)[:, None] + torch.arange(T)[None, :]  # (B, T)
        counts = _eligible_counts(pos, chunk, window)
        nC, width = (int(counts.max()) if counts.numel() else 0), None
    check_score(score)
    if (exact is None) != (score == "hash") or (
            exact is not None and exact.shape[-1] != exact_width(score, d)):
        raise ValueError(f"exact: a store of width {None if exact is None else exact.shape[-1]} "
                         f"does not serve recall_score={score!r} with heads of {d}")
    with torch.no_grad():
        q_rep = query_representatives(q.reshape(B, T, G, H // G, d), planes, score)
        k_rep = (signs if exact is None else exact)[:, :nC].to(q_rep.dtype)
        return select(q_rep, k_rep, counts, top, width=width, score=score, scale=scale), nC


# New rows per sequence up to which a cached step gathers each row's chosen chunks from the
# pages by itself (decoding, speculative verification): no host read of the choice, so no
# synchronisation and a step a CUDA graph can hold. Longer steps (prefill) read each distinct
# chunk once instead (:func:`distinct_chunks`), their rows sharing many.
DIRECT_ROWS = 16


# Bytes of chunk tokens a cached step gathers at once for its rows (B T R C G (dk + dv)): past
# it, rows go in blocks (a wide batch verifying 16 tokens would otherwise gather gigabytes).
GATHER_BYTES = 1 << 28


def _attend_chosen_pages(q: Tensor, k_pages: Tensor, v_pages: Tensor, block_table: Tensor,
                         chosen: Tensor, chunk: int, scale: float) -> Tensor:
    """``O3`` of ``q: (B, T, H, d)`` over ``chosen (B, T, G, R)`` read from the pages: every
    row's chunks gathered, on the device, into a key sequence of its own (R chunks, -1 slots
    read chunk 0 and are not attended), then the recall op over rows as a batch — in blocks
    of rows whose gathered tokens stay within ``GATHER_BYTES`` (a number of blocks the shapes
    set: no host read)."""
    B, T, H, d = q.shape
    G, R = chosen.shape[2], chosen.shape[3]
    S, dev = k_pages.shape[1], q.device
    per_row = R * chunk * G * (k_pages.shape[-1] + v_pages.shape[-1]) * k_pages.element_size()
    step = max(1, GATHER_BYTES // per_row)
    rows, picks = q.reshape(B * T, 1, H, d), chosen.reshape(B * T, G, R)
    seq = torch.arange(B, device=dev)
    seq = seq.repeat_interleave(T) if T > 1 else seq  # each row's sequence
    g, offset = torch.arange(G, device=dev), torch.arange(chunk, device=dev)[:, None]
    out = []
    for i in range(0, B * T, step):
        pick = picks[i:i + step]
        n = pick.shape[0]
        pos = pick.permute(0, 2, 1).clamp(min=0).long()[:, :, None, :] * chunk + offset  # n R C G
        page = block_table.long()[seq[i:i + step, None, None, None], pos // S]
        k = k_pages[page, pos % S, g].reshape(n, R * chunk, G, k_pages.shape[-1])
        v = v_pages[page, pos % S, g].reshape(n, R * chunk, G, v_pages.shape[-1])
        local = torch.where(pick >= 0, torch.arange(R, device=dev), -1).reshape(n, 1, G, R)
        out.append(recall_ops.recall_op(rows[i:i + step], k, v, local, chunk, scale))
    return (out[0] if len(out) == 1 else torch.cat(out)).reshape(B, T, H, d)


def recall_decode(q: Tensor, k_pages: Tensor, v_pages: Tensor, block_table: Tensor,
                  signs: Tensor, before, *, chunk: int, top: int, planes: Tensor,
                  window: Optional[int] = None, scale: Optional[float] = None,
                  exact: Optional[Tensor] = None, score: str = "hash") -> Tensor:
    """``O3`` of the new query rows ``q: (B, T, H, d)`` of a cached step, their chunks
    (:func:`choose_for_step`) read from the pages — the same selection and result as
    :func:`recall_attention` over the whole sequence."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    chosen, nC = choose_for_step(q, signs, before, chunk=chunk, top=top, planes=planes,
                                 window=window, exact=exact, score=score, scale=scale)
    if chosen.shape[-1] == 0:
        return q.new_zeros(q.shape)
    if q.shape[1] <= DIRECT_ROWS and recall_ops.native(q):
        return _attend_chosen_pages(q, k_pages, v_pages, block_table, chosen, chunk, scale)
    chunks = distinct_chunks(chosen.cpu(), k_pages.shape[2], nC)
    keys, vals = page_chunks(k_pages, v_pages, block_table, chunks, chunk)
    return attend_distinct(q, keys, vals, chosen, chunks, chunk, scale)
