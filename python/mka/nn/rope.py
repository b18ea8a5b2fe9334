"""Rotary position embedding (rotate-half form), for MLA's decoupled RoPE dims."""

from __future__ import annotations

import torch
from torch import Tensor


def apply_rope(x: Tensor, start: int, theta: float = 10000.0) -> Tensor:
    """Rotates ``x: (B, T, heads, r)`` (``r`` even) for positions ``start .. start + T - 1``.
    Angles are computed in float32 (float64 for float64 inputs)."""
    T, r = x.shape[1], x.shape[-1]
    fdt = torch.float64 if x.dtype == torch.float64 else torch.float32
    inv_freq = theta ** (-torch.arange(0, r, 2, device=x.device, dtype=fdt) / r)
    pos = torch.arange(start, start + T, device=x.device, dtype=fdt)
    ang = torch.outer(pos, inv_freq)  # (T, r / 2)
    cos = torch.cat((ang.cos(), ang.cos()), -1)[None, :, None, :]
    sin = torch.cat((ang.sin(), ang.sin()), -1)[None, :, None, :]
    xf = x.to(fdt)
    x1, x2 = xf.chunk(2, -1)
    return (xf * cos + torch.cat((-x2, x1), -1) * sin).to(x.dtype)
