"""Rotary position embedding (rotate-half form), for MLA's decoupled RoPE dims."""

from __future__ import annotations

from typing import Sequence, Union

import torch
from torch import Tensor


def apply_rope(x: Tensor, start: Union[int, Sequence[int]], theta: float = 10000.0) -> Tensor:
    """Rotates ``x: (B, T, heads, r)`` (``r`` even) for positions ``start .. start + T - 1``;
    ``start`` is one int, or one per sequence (a batch whose sequences hold different
    lengths). Angles are computed in float32 (float64 for float64 inputs)."""
    T, r = x.shape[1], x.shape[-1]
    fdt = torch.float64 if x.dtype == torch.float64 else torch.float32
    inv_freq = theta ** (-torch.arange(0, r, 2, device=x.device, dtype=fdt) / r)
    offsets = torch.as_tensor(start, dtype=fdt).to(x.device).reshape(-1, 1)  # (1 or B, 1)
    pos = offsets + torch.arange(T, device=x.device, dtype=fdt)
    ang = pos[..., None] * inv_freq  # (1 or B, T, r / 2)
    cos = torch.cat((ang.cos(), ang.cos()), -1)[:, :, None, :]
    sin = torch.cat((ang.sin(), ang.sin()), -1)[:, :, None, :]
    xf = x.to(fdt)
    x1, x2 = xf.chunk(2, -1)
    return (xf * cos + torch.cat((-x2, x1), -1) * sin).to(x.dtype)
