"""The ops of SPEC §3 in plain PyTorch, fast enough to train with: SDPA for attention and a
chunked matrix form of the EMA. Same names, signatures and results as ``mka.ops``.

This is the ``backend="torch"`` of every attention module: the baseline users trust, and
the path that still runs where a native kernel is missing. Unlike ``mka.reference`` (the
slow ground truth) nothing here loops over tokens.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..memory import torch_paged
from ..reference import state_dtype, visible

_OptT = Optional[Tensor]

# Tokens per EMA chunk: the within-chunk decay matrix is EMA_CHUNK x EMA_CHUNK.
EMA_CHUNK = 64


def attention(q: Tensor, k: Tensor, v: Tensor, causal: bool = True,
              scale: Optional[float] = None, window: Optional[int] = None,
              dropout_p: float = 0.0) -> Tensor:
    """SDPA in BTHD layout with the SPEC's bottom-right causal mask, window and GQA.
    ``v`` may have a different head dim from ``q``/``k`` (SDPA allows it). ``dropout_p``:
    SDPA's own dropout of the weights (its generator and mask, not SPEC §3.5's)."""
    B, Tq, H, _ = q.shape
    Tk, G = k.shape[1], k.shape[2]
    if Tk == 0:  # no visible key: zeros (SPEC §1), where SDPA would give NaN
        return q.new_zeros((B, Tq, H, v.shape[-1]))
    mask, is_causal = None, False
    if causal and window is None and Tq == Tk:
        is_causal = True  # top-left and bottom-right alignment coincide
    elif causal and window is None and Tq == 1:
        pass  # one query at the end of the keys: it sees them all
    elif causal or window is not None:
        mask = visible(Tq, Tk, causal, window, q.device)  # SDPA's is_causal is top-left
    empty_rows = None
    if mask is not None and Tq > Tk:  # only then can a row see no key at all
        # Such a row attends to every key and its output is zeroed after: a row of only
        # -inf scores has NaN gradients in some versions of SDPA.
        empty_rows = ~mask.any(-1, keepdim=True)
        mask = mask | empty_rows
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         attn_mask=mask, is_causal=is_causal, scale=scale,
                                         dropout_p=dropout_p, enable_gqa=G != H).transpose(1, 2)
    if empty_rows is not None:
        out = out.masked_fill(empty_rows.view(1, Tq, 1, 1), 0.0)
    return out


def ema(z: Tensor, beta: float, state: _OptT = None,
        chunk: int = EMA_CHUNK) -> tuple[Tensor, Tensor]:
    """``s_t = beta s_{t-1} + (1 - beta) z_t`` along dim 1 of ``z: (B, T, G, d)``, starting
    from ``state`` (zeros if None). Returns ``(EMA(z), final state)``; the final state is in
    ``state_dtype``, and so is the arithmetic (float32 for half inputs).

    Within a chunk of C tokens the EMA is a (C, C) lower-triangular decay matrix; the state
    entering each chunk is another decay matrix over the chunks' local end states, so the
    whole scan is two matmuls and no loop over tokens or chunks."""
    B, T, G, d = z.shape
    sdt = state_dtype(z.dtype)
    s0 = z.new_zeros((B, G, d), dtype=sdt) if state is None else state.to(sdt)
    if T == 0:
        return z.clone(), s0.clone()
    if T == 1:  # a decode step: the recurrence itself, the same roundings as the chunked form
        y = z[:, 0].to(sdt) * (1.0 - beta) + s0 * beta  # (its ~20 small launches for one token)
        return y[:, None].to(z.dtype), y
    C = min(chunk, T)
    n = math.ceil(T / C)
    x = F.pad(z.to(sdt), (0, 0, 0, 0, 0, n * C - T)).view(B, n, C, G, d)
    # Decay powers in float64, then rounded once: beta^k from a float32 beta would be off
    # by k ulps (1e-4 relative at k = 4096 for beta near 1).
    powers = lambda k: (beta ** k).to(sdt)  # noqa: E731
    t = torch.arange(C, device=z.device, dtype=torch.float64)
    lag = t[:, None] - t[None, :]
    decay = torch.where(lag >= 0, (1.0 - beta) * powers(lag.clamp(min=0)), 0.0)
    local = torch.einsum("ij,bnjgd->bnigd", decay, x)  # EMA of each chunk from a zero state
    m = torch.arange(n, device=z.device, dtype=torch.float64)
    gap = m[:, None] - m[None, :]
    # state entering chunk c: sum over earlier chunks e of beta^(C(c-1-e)) * local end of e
    carry_w = torch.where(gap >= 1, powers(C * (gap - 1).clamp(min=0)), 0.0)
    carry = (torch.einsum("ce,begd->bcgd", carry_w, local[:, :, C - 1])
             + powers(C * m)[None, :, None, None] * s0[:, None])
    y = local + powers(t + 1)[None, None, :, None, None] * carry[:, :, None]
    y = y.reshape(B, n * C, G, d)[:, :T]
    return y.to(z.dtype), y[:, T - 1]


def _weight(lam: Tensor, level: int, like: Tensor) -> Tensor:
    return lam[..., level, None, None].to(like.dtype)


def route_fuse(k: Tensor, v: Tensor, lam: Tensor, beta: float, k3: _OptT = None,
               v3: _OptT = None, k_state: _OptT = None,
               v_state: _OptT = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Key-side routing: ``(k_fused, v_fused, k_state_out, v_state_out)``."""
    ek, ks = ema(k, beta, k_state)
    ev, vs = ema(v, beta, v_state)
    kf = _weight(lam, 0, k) * k + _weight(lam, 1, k) * ek
    vf = _weight(lam, 0, v) * v + _weight(lam, 1, v) * ev
    if lam.shape[-1] == 3:
        kf = kf + _weight(lam, 2, k) * k3
        vf = vf + _weight(lam, 2, v) * v3
    return kf, vf, ks, vs


def fastmka(q: Tensor, k: Tensor, v: Tensor, lam: Tensor, beta: float, k3: _OptT = None,
            v3: _OptT = None, k_state: _OptT = None, v_state: _OptT = None,
            causal: bool = True, scale: Optional[float] = None,
            window: Optional[int] = None, dropout_p: float = 0.0) -> tuple[Tensor, Tensor, Tensor]:
    """Route fusion then one attention: ``(out, k_state_out, v_state_out)``."""
    kf, vf, ks, vs = route_fuse(k, v, lam, beta, k3, v3, k_state, v_state)
    return attention(q, kf, vf, causal, scale, window, dropout_p), ks, vs


def mka(q: Tensor, k: Tensor, v: Tensor, lam: Tensor, beta: float, mem_k: _OptT = None,
        mem_v: _OptT = None, k_state: _OptT = None, v_state: _OptT = None,
        causal: bool = True, scale: Optional[float] = None,
        window: Optional[int] = None, dropout_p: float = 0.0) -> tuple[Tensor, Tensor, Tensor]:
    """One attention per level mixed by query-side ``lam``: ``(out, k_state_out, v_state_out)``."""
    ek, ks = ema(k, beta, k_state)
    ev, vs = ema(v, beta, v_state)
    out = (_weight(lam, 0, q) * attention(q, k, v, causal, scale, window, dropout_p)
           + _weight(lam, 1, q) * attention(q, ek, ev, causal, scale, None, dropout_p))
    if lam.shape[-1] == 3 and mem_k.shape[1] > 0:  # M = 0 recalled tokens: O3 = 0
        out = out + _weight(lam, 2, q) * attention(q, mem_k, mem_v, False, scale, None, dropout_p)
    return out, ks, vs


# ----------------------------------------------------------------- pages (SPEC §7.1)

def paged_write(k: Tensor, v: _OptT, k_pages: Tensor, v_pages: _OptT, block_table: Tensor,
                cache_seqlens: Tensor) -> None:
    if v_pages is None:
        v, v_pages = k, k_pages
    torch_paged.paged_write(k, v, k_pages, v_pages, block_table, cache_seqlens)


def paged_write_ema(k: Tensor, v: Tensor, k_pages: Tensor, v_pages: Tensor, block_table: Tensor,
                    cache_seqlens: Tensor, beta: float, k_page_states: Tensor,
                    v_page_states: Tensor, k_state: _OptT = None,
                    v_state: _OptT = None) -> tuple[Tensor, Tensor]:
    return torch_paged.paged_write_ema(k, v, k_pages, v_pages, block_table, cache_seqlens, beta,
                                       k_page_states, v_page_states, k_state, v_state)


paged_write_fused = torch_paged.paged_write_fused


def paged_attention(q: Tensor, k_pages: Tensor, v_pages: _OptT, block_table: Tensor,
                    seqlens: Tensor, causal: bool = True, scale: Optional[float] = None,
                    window: Optional[int] = None) -> Tensor:
    return torch_paged.paged_attention(q, k_pages, k_pages if v_pages is None else v_pages,
                                       block_table, seqlens, causal, scale, window)


paged_mka_attention = torch_paged.paged_mka_attention
