"""The MKA router: ``lam_t = softmax(MLP(q_t))`` over the memory levels (SPEC §2)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import _positive_int


class Router(nn.Module):
    """Maps each token's query ``(B, T, H, d)`` to level weights ``lam: (B, T, L)``, one
    softmax row per token shared by all heads."""

    def __init__(self, query_dim: int, levels: int, hidden: int, bias: bool = True):
        super().__init__()
        if levels not in (2, 3):
            raise ValueError(f"levels: must be 2 (local + session) or 3 (+ long-term), got {levels!r}")
        _positive_int(hidden, "router_hidden")
        self.levels = levels
        self.fc = nn.Linear(query_dim, hidden, bias=bias)
        self.out = nn.Linear(hidden, levels, bias=bias)

    def forward(self, q: Tensor) -> Tensor:
        logits = self.out(F.gelu(self.fc(q.flatten(2))))
        # half inputs: a float32 softmax (the ops accept float32 lam for any input dtype)
        dtype = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
        return torch.softmax(logits, dim=-1, dtype=dtype)
