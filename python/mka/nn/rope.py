"""Rotary position embedding (rotate-half form): MLA's decoupled RoPE dims, and the whole
heads of the q/k/v variants when a model uses RoPE instead of a position table."""

from __future__ import annotations

from typing import Sequence, Union

import torch
from torch import Tensor

from ..reference import state_dtype

Start = Union[int, Sequence[int], Tensor]


def rope_tables(start: Start, T: int, r: int, theta: float, device: torch.device,
                dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """``cos, sin: (1 or B, T, 1, r)`` for positions ``start .. start + T - 1``; ``start`` is
    one int, one per sequence (a batch whose sequences hold different lengths), or a device
    tensor of them (a captured decode step: no host value is read)."""
    if not isinstance(start, (int, Tensor)) and len(set(start)) == 1:
        start = start[0]  # one offset: no host-to-device copy
    inv_freq = theta ** (-torch.arange(0, r, 2, device=device, dtype=dtype) / r)
    pos = torch.arange(T, device=device, dtype=dtype)
    if isinstance(start, int):
        pos = (pos + start)[None]
    else:
        pos = torch.as_tensor(start).to(device=device, dtype=dtype).reshape(-1, 1) + pos
    ang = pos[..., None] * inv_freq  # (1 or B, T, r / 2)
    ang = torch.cat((ang, ang), -1)[:, :, None, :]
    return ang.cos(), ang.sin()


def rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """``x: (B, T, heads, r)`` rotated by the tables of :func:`rope_tables` (in their dtype)."""
    xf = x.to(cos.dtype)
    x1, x2 = xf.chunk(2, -1)
    return (xf * cos + torch.cat((-x2, x1), -1) * sin).to(x.dtype)


def apply_rope(x: Tensor, start: Start, theta: float = 10000.0) -> Tensor:
    """Rotates ``x: (B, T, heads, r)`` (``r`` even) for positions ``start .. start + T - 1``.
    Angles are computed in float32 (float64 for float64 inputs)."""
    return rotate(x, *rope_tables(start, x.shape[1], x.shape[-1], theta, x.device,
                                  state_dtype(x.dtype)))
