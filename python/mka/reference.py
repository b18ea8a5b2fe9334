"""The formulas of SPEC.md in plain PyTorch: slow, float64-capable, differentiable.

These are the ground truth of every kernel test, and usable by anyone who wants to check
a result. Layout is (batch, tokens, heads, head_dim) throughout.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor


def visible(Tq: int, Tk: int, causal: bool, window: Optional[int], device=None) -> Tensor:
    """Bool (Tq, Tk): may query row i see key j? Bottom-right causal alignment."""
    i = torch.arange(Tq, device=device)[:, None] + (Tk - Tq)
    j = torch.arange(Tk, device=device)[None, :]
    vis = torch.ones(Tq, Tk, dtype=torch.bool, device=device)
    if causal:
        vis &= j <= i
    if window is not None:
        vis &= i - j < window  # not j > i - window: i - window overflows int64 for huge windows
    return vis


_MASK32 = 0xFFFFFFFF


def _mulhilo(a: int, b: Tensor) -> tuple[Tensor, Tensor]:
    """High and low 32 bits of ``a * b`` (``a`` a 32-bit constant, ``b`` uint32 values in
    int64), without leaving int64: ``a`` in 16-bit halves."""
    t1 = b * (a & 0xFFFF)
    t2 = b * (a >> 16)
    mid = t1 + ((t2 & 0xFFFF) << 16)
    return (t2 >> 16) + (mid >> 32), mid & _MASK32


def philox4x32_10(counter: tuple[Tensor, Tensor, Tensor, Tensor], seed: int) -> Tensor:
    """Philox4x32-10 of the four counter words (uint32 values in int64 tensors of one shape)
    and the 64-bit key ``seed``: ``(..., 4)`` words — ``mka/dropout.h`` in PyTorch."""
    c0, c1, c2, c3 = counter
    k0, k1 = seed & _MASK32, (seed >> 32) & _MASK32
    for _ in range(10):
        hi0, lo0 = _mulhilo(0xD2511F53, c0)
        hi1, lo1 = _mulhilo(0xCD9E8D57, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + 0x9E3779B9) & _MASK32, (k1 + 0xBB67AE85) & _MASK32
    return torch.stack((c0, c1, c2, c3), -1)


def dropout_mask(seed: int, p: float, B: int, H: int, Tq: int, Tk: int, level: int = 0,
                 device=None) -> Tensor:
    """SPEC §3.5: the ``(B, H, Tq, Tk)`` multipliers of attention dropout — ``1 / (1 - p)``
    where weight ``(b, h, i, j)`` is kept, else 0 — of a call with ``seed`` (memory ``level``
    for mka). Word ``j % 4`` of Philox4x32-10 with key ``seed`` and counter ``(j // 4, i,
    b H + h, level)`` keeps it iff below ``round((1 - p) 2^32)``."""
    groups = -(-Tk // 4)
    shape = (B * H, Tq, groups)
    c0 = torch.arange(groups, device=device).expand(shape)
    c1 = torch.arange(Tq, device=device)[:, None].expand(shape)
    c2 = torch.arange(B * H, device=device)[:, None, None].expand(shape)
    words = philox4x32_10((c0, c1, c2, torch.full(shape, level, device=device)), int(seed))
    words = words.reshape(B, H, Tq, 4 * groups)[..., :Tk]
    threshold = min(math.floor((1.0 - p) * 2.0 ** 32 + 0.5), _MASK32)
    keep = torch.tensor(1.0 / (1.0 - p), dtype=torch.float64, device=device)
    return torch.where(words < threshold, keep, 0.0)


def attention(q: Tensor, k: Tensor, v: Tensor, causal: bool = True,
              scale: Optional[float] = None, window: Optional[int] = None,
              dropout_p: float = 0.0, seed: Optional[int] = None, level: int = 0) -> Tensor:
    """With ``dropout_p``: the weights times :func:`dropout_mask` after the softmax (SPEC
    §3.5; the softmax itself, and so the logsumexp, is unchanged)."""
    B, Tq, H, d = q.shape
    Tk, G = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    k = k.repeat_interleave(H // G, dim=2)
    v = v.repeat_interleave(H // G, dim=2)
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    vis = visible(Tq, Tk, causal, window, q.device)
    p = torch.softmax(s.masked_fill(~vis, float("-inf")), dim=-1)
    p = torch.where(vis.any(-1, keepdim=True), p, torch.zeros_like(p))  # no key: zeros
    if dropout_p:
        p = p * dropout_mask(seed, dropout_p, B, H, Tq, Tk, level, q.device).to(p.dtype)
    return torch.einsum("bhqk,bkhd->bqhd", p, v)


def state_dtype(dtype: torch.dtype) -> torch.dtype:
    """EMA states and softmax statistics: float32, or float64 for float64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def ema(z: Tensor, beta: float, state: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """s_t = beta s_{t-1} + (1 - beta) z_t along dim 1; returns (EMA(z), final state)."""
    s = z.new_zeros(z.shape[0], *z.shape[2:]) if state is None else state.to(z.dtype)
    out = []
    for t in range(z.shape[1]):
        s = beta * s + (1.0 - beta) * z[:, t]
        out.append(s)
    y = torch.stack(out, dim=1) if out else torch.zeros_like(z)
    return y, s.to(state_dtype(z.dtype))


def _weight(lam: Tensor, level: int, like: Tensor) -> Tensor:
    return lam[..., level, None, None].to(like.dtype)


def route_fuse(k: Tensor, v: Tensor, lam: Tensor, beta: float, k3: Optional[Tensor] = None,
               v3: Optional[Tensor] = None, k_state: Optional[Tensor] = None,
               v_state: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    ek, ks = ema(k, beta, k_state)
    ev, vs = ema(v, beta, v_state)
    kf = _weight(lam, 0, k) * k + _weight(lam, 1, k) * ek
    vf = _weight(lam, 0, v) * v + _weight(lam, 1, v) * ev
    if lam.shape[-1] == 3:
        kf = kf + _weight(lam, 2, k) * k3
        vf = vf + _weight(lam, 2, v) * v3
    return kf, vf, ks, vs


def fastmka(q: Tensor, k: Tensor, v: Tensor, lam: Tensor, beta: float,
            k3: Optional[Tensor] = None, v3: Optional[Tensor] = None,
            k_state: Optional[Tensor] = None, v_state: Optional[Tensor] = None,
            causal: bool = True, scale: Optional[float] = None,
            window: Optional[int] = None, dropout_p: float = 0.0,
            seed: Optional[int] = None) -> tuple[Tensor, Tensor, Tensor]:
    kf, vf, ks, vs = route_fuse(k, v, lam, beta, k3, v3, k_state, v_state)
    return attention(q, kf, vf, causal, scale, window, dropout_p, seed), ks, vs


def mka(q: Tensor, k: Tensor, v: Tensor, lam: Tensor, beta: float,
        mem_k: Optional[Tensor] = None, mem_v: Optional[Tensor] = None,
        k_state: Optional[Tensor] = None, v_state: Optional[Tensor] = None,
        causal: bool = True, scale: Optional[float] = None,
        window: Optional[int] = None, dropout_p: float = 0.0,
        seed: Optional[int] = None) -> tuple[Tensor, Tensor, Tensor]:
    """With ``dropout_p``: each level's weights with the mask of its level (0, 1, 2)."""
    o1 = attention(q, k, v, causal, scale, window, dropout_p, seed, 0)
    ek, ks = ema(k, beta, k_state)
    ev, vs = ema(v, beta, v_state)
    o2 = attention(q, ek, ev, causal, scale, None, dropout_p, seed, 1)
    out = _weight(lam, 0, q) * o1 + _weight(lam, 1, q) * o2
    if lam.shape[-1] == 3:
        o3 = attention(q, mem_k, mem_v, False, scale, None, dropout_p, seed, 2)
        out = out + _weight(lam, 2, q) * o3
    return out, ks, vs


def gather_pages(pages: Tensor, table_row: Tensor, n: int) -> Tensor:
    """Tokens ``[0, n)`` of one sequence's pages ``(P, S, G, d)`` through its block-table row:
    ``(n, G, d)`` (SPEC §7.1)."""
    S = pages.shape[1]
    return torch.stack([pages[int(table_row[j // S]), j % S] for j in range(n)]) if n else \
        pages.new_zeros((0, *pages.shape[2:]))


def paged_attention(q: Tensor, k_pages: Tensor, v_pages: Tensor, block_table: Tensor,
                    seqlens: Tensor, causal: bool = True, scale: Optional[float] = None,
                    window: Optional[int] = None, lam: Optional[Tensor] = None,
                    beta: float = 0.0, k_page_states: Optional[Tensor] = None,
                    v_page_states: Optional[Tensor] = None) -> Tensor:
    """Attention of each sequence's queries over its pages, one sequence at a time; with
    page states and ``lam``, MKA's levels 1 and 2, the EMA of each page run token by token
    from the state checkpointed before the page's first token."""
    outs = []
    for b in range(q.shape[0]):
        n = int(seqlens[b])
        k = gather_pages(k_pages, block_table[b], n)[None]
        v = gather_pages(v_pages, block_table[b], n)[None]
        o1 = attention(q[b:b + 1], k, v, causal, scale, window)
        if lam is None:
            outs.append(o1)
            continue
        ek, ev = (_page_ema(x, states, block_table[b], k_pages.shape[1], beta)
                  for x, states in ((k, k_page_states), (v, v_page_states)))
        o2 = attention(q[b:b + 1], ek, ev, causal, scale)
        outs.append(_weight(lam[b:b + 1], 0, q) * o1 + _weight(lam[b:b + 1], 1, q) * o2)
    return torch.cat(outs) if outs else q.new_zeros((0, *q.shape[1:3], v_pages.shape[-1]))


def page_checkpoints(k_pages: Tensor, v_pages: Tensor, block_table: Tensor, seqlens: Tensor,
                     beta: float, k_start: Tensor, v_start: Tensor) -> tuple[Tensor, Tensor]:
    """What ``paged_write_ema`` leaves in the page checkpoints (SPEC §7.1): for every page of
    sequence ``b`` the EMA state before its first token, carried from ``k_start[b],
    v_start[b]: (G, d)`` over the tokens before it; ``(P, G, d)`` each, zeros for pages no
    sequence holds."""
    P, S = k_pages.shape[:2]
    out = [k_pages.new_zeros((P, *k_pages.shape[2:])), v_pages.new_zeros((P, *v_pages.shape[2:]))]
    for b in range(block_table.shape[0]):
        n = int(seqlens[b])
        for states, pages, start in zip(out, (k_pages, v_pages), (k_start, v_start)):
            s = start[b][None].to(states.dtype)
            for j0 in range(0, n, S):
                page = int(block_table[b, j0 // S])
                states[page] = s[0]
                s = ema(pages[page][None, :min(S, n - j0)].to(states.dtype), beta, s)[1]
    return out[0], out[1]


def _page_ema(x: Tensor, states: Tensor, table_row: Tensor, page_size: int,
              beta: float) -> Tensor:
    """EMA of one sequence's tokens ``x: (1, n, G, d)``, each page from its checkpoint."""
    parts = []
    for j0 in range(0, x.shape[1], page_size):
        start = states[int(table_row[j0 // page_size])][None]
        parts.append(ema(x[:, j0:j0 + page_size], beta, start)[0])
    return torch.cat(parts, 1) if parts else x



def recall_attention(q: Tensor, k: Tensor, v: Tensor, *, chunk: int, top: int,
                     planes: Tensor, window: Optional[int] = None,
                     scale: Optional[float] = None, score: str = "hash") -> tuple[Tensor, Tensor]:
    """Level 3 by recall (SPEC §7.2), one query row and key/value head at a time: mean keys
    of whole chunks, the row's mean query over the kv head's query heads, their sign patterns
    against ``planes`` (``score="mean"``: the vectors themselves, scored exactly;
    ``score="bound"``: Quest's bound of each query head's largest logit over the chunk from
    its per-channel min and max keys, averaged over the group; ``score="corners"``: per query
    head the log of the mean of ``exp(scale q.k)`` over the corners of the chunk's min/max key
    box, the group's heads summed as masses), the chunks
    wholly before the row's window ranked by matching signs, dot product or bound (ties: the later
    chunk), the top ``R`` recalled, attention over their tokens. Returns ``(O3, chosen)`` as
    the op."""
    B, Tq, H, d = q.shape
    Tk, G = k.shape[1], k.shape[2]
    grp, nC = H // G, Tk // chunk
    if score == "mean":
        rep = lambda x: x.double()  # noqa: E731
    elif score in ("bound", "corners"):  # from each chunk's per-channel max and min keys
        rep = None
    else:
        rep = lambda x: torch.where(x.double() @ planes.double().t() >= 0, 1.0, -1.0)  # noqa: E731
    counts = []
    for i in range(Tq):
        end = i + (Tk - Tq) - (1 if window is None else window) + 1
        counts.append(max(0, min(end // chunk, nC)))
    width = min(top, max(counts, default=0))
    chosen = torch.full((B, Tq, G, width), -1, dtype=torch.long)
    rows = []
    for b in range(B):
        per_row = []
        for i in range(Tq):
            heads = []
            for g in range(G):
                qh = q[b, i, g * grp:(g + 1) * grp]
                if score == "corners":
                    def logit(c, qh=qh.double()):
                        kc = k[b, c * chunk:(c + 1) * chunk, g].double()
                        s = (1.0 / math.sqrt(d) if scale is None else scale) * qh
                        corner = torch.logaddexp(s * kc.amax(0), s * kc.amin(0)) - math.log(2)
                        return float(torch.logsumexp(corner.sum(-1), 0))
                elif rep is None:
                    def logit(c, qh=qh.double()):
                        kc = k[b, c * chunk:(c + 1) * chunk, g].double()
                        hi, lo = kc.amax(0), kc.amin(0)
                        return float(torch.maximum(qh * hi, qh * lo).sum(-1).mean())
                else:
                    def logit(c, qs=rep(qh.mean(0))):
                        return float(qs @ rep(k[b, c * chunk:(c + 1) * chunk, g].mean(0)))
                ranked = sorted(range(counts[i]), key=lambda c: (-logit(c), -c))
                pick = ranked[:top]
                chosen[b, i, g, :len(pick)] = torch.tensor(pick, dtype=torch.long)
                qq = q[b:b + 1, i:i + 1, g * grp:(g + 1) * grp]
                if not pick:
                    heads.append(torch.zeros_like(qq))
                    continue
                tok = torch.cat([torch.arange(c * chunk, (c + 1) * chunk) for c in pick])
                heads.append(attention(qq, k[b:b + 1, tok, g:g + 1], v[b:b + 1, tok, g:g + 1],
                                       False, scale))
            per_row.append(torch.cat(heads, 2))
        rows.append(torch.cat(per_row, 1))
    return torch.cat(rows, 0), chosen


def summary_attention(q: Tensor, ek: Tensor, ev: Tensor, stride: int,
                      scale: Optional[float] = None) -> Tensor:
    """MKA's level 2 with ``ema_stride = stride`` (SPEC §7.3): row ``i`` (position ``p``,
    bottom-right) attends to the EMA keys/values at the positions ``j <= p`` that end a chunk
    of ``stride`` tokens (``j % stride == stride - 1``) or are ``p`` itself."""
    Tq, Tk = q.shape[1], ek.shape[1]
    p = torch.arange(Tq, device=q.device)[:, None] + (Tk - Tq)
    j = torch.arange(Tk, device=q.device)[None, :]
    vis = (j <= p) & ((j % stride == stride - 1) | (j == p))
    B, _, H, d = q.shape
    G = ek.shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    s = torch.einsum("bqhd,bkhd->bhqk", q, ek.repeat_interleave(H // G, 2)) * scale
    w = torch.softmax(s.masked_fill(~vis, float("-inf")), -1)
    return torch.einsum("bhqk,bkhd->bqhd", w, ev.repeat_interleave(H // G, 2))
