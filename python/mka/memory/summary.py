"""Level 2 over EMA summaries (SPEC §7.3): MKA's level 2 with ``ema_stride = s > 1``.

With ``s = 1`` (the default) level 2 attends to the EMA keys/values of every earlier token,
so a decode step needs every cached token — level 2 alone pins the whole KV cache in HBM.
With ``s > 1`` a query at position ``p`` attends to the EMA keys/values at the **chunk ends**
``j = s - 1, 2s - 1, ... < p`` and at its own position ``p``: the EMA at a chunk's end
summarises the chunk (and, decayed, everything before it), one vector per ``s`` tokens.
Decoding then keeps ``(B, ceil(T / s), G, d)`` summaries and the running states for level 2,
and level 1 (a window) and level 3 (recalled chunks) decide which tokens must be resident —
the DRAM tier (:mod:`mka.memory.host_tier`) moves the rest to host memory.

One function computes the attention for both forms: :func:`attend_summaries` over summaries
``sk, sv`` of which row ``i`` sees its first ``counts[b, i]``, plus the row's own EMA key and
value. :func:`summary_attention` is the full-sequence form (training, prefill); decoding calls
:func:`attend_summaries` with the cache's summaries.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor


def to_device(t: Tensor, device: torch.device) -> Tensor:
    """``t`` on ``device``; a host tensor bound for a GPU goes through pinned memory without
    blocking (from pageable memory the copy would synchronise with the GPU)."""
    if t.device == device:
        return t
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def summary_counts(positions: Tensor, stride: int) -> Tensor:
    """How many summaries a row at ``positions`` sees: the chunk ends ``j < p``,
    ``floor(p / s)``."""
    return torch.div(positions, stride, rounding_mode="floor")


def attend_summaries(q: Tensor, sk: Tensor, sv: Tensor, counts: Tensor, ek_self: Tensor,
                     ev_self: Tensor, scale: Optional[float] = None) -> Tensor:
    """``q: (B, T, H, d)`` over ``sk, sv: (B, n, G, d)`` (row ``i`` of sequence ``b`` sees the
    first ``counts[b, i]``) and the row's own ``ek_self, ev_self: (B, T, G, d)``; one softmax
    over both. Computed in float32 (float64 for float64 inputs), returned in ``q.dtype``."""
    B, T, H, d = q.shape
    G = sk.shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    qg = q.to(cdt).reshape(B, T, G, H // G, d)
    s_sum = torch.einsum("btgxd,bngd->btgxn", qg, sk.to(cdt)) * scale
    seen = torch.arange(sk.shape[1], device=q.device) < to_device(counts, q.device)[..., None]
    s_sum = s_sum.masked_fill(~seen[:, :, None, None, :], -math.inf)
    s_self = torch.einsum("btgxd,btgd->btgx", qg, ek_self.to(cdt)) * scale
    p = torch.softmax(torch.cat((s_sum, s_self[..., None]), -1), -1)  # the self term: never empty
    o = (torch.einsum("btgxn,bngd->btgxd", p[..., :-1], sv.to(cdt))
         + p[..., -1:] * ev_self.to(cdt)[:, :, :, None, :])
    return o.reshape(B, T, H, d).to(q.dtype)


def summary_attention(q: Tensor, ek: Tensor, ev: Tensor, stride: int,
                      scale: Optional[float] = None) -> Tensor:
    """Level 2 of ``q: (B, Tq, H, d)`` over the EMA keys/values ``ek, ev: (B, Tk, G, d)`` of
    every position (rows bottom-right aligned, ``Tq <= Tk``), reading the chunk ends and the
    row's own position only."""
    Tq, Tk = q.shape[1], ek.shape[1]
    if not isinstance(stride, int) or isinstance(stride, bool) or stride < 1:
        raise ValueError(f"ema_stride: must be a positive integer, got {stride!r}")
    if Tq > Tk:
        raise ValueError(f"q: {Tq} query rows against {Tk} keys (rows align with the last keys)")
    positions = torch.arange(Tk - Tq, Tk, device=q.device)
    counts = summary_counts(positions, stride).expand(q.shape[0], Tq)
    return attend_summaries(q, ek[:, stride - 1::stride], ev[:, stride - 1::stride], counts,
                            ek[:, Tk - Tq:], ev[:, Tk - Tq:], scale)
