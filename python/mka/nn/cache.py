"""The per-layer KV cache that every attention module reads and extends during decoding."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


class KVCache:
    """One layer's decode state for a batch of sequences.

    ``tokens`` holds tensors with one row per cached token along dim 1 (keys, values, or a
    latent), exactly the tensors attention reads; they grow by concatenation, so what is
    held is what is used (and autograd can flow through a cache if one ever needs it).
    ``states`` holds fixed-size per-sequence tensors (EMA states) that do not grow.
    ``length`` is the number of tokens seen, i.e. the position of the next token.
    """

    def __init__(self, batch_size: int, device: Optional[torch.device] = None,
                 dtype: torch.dtype = torch.float32):
        if batch_size < 1:
            raise ValueError(f"batch_size: must be at least 1, got {batch_size}")
        self.batch_size = batch_size
        # "cuda" -> "cuda:0": the device tensors made on it will report
        self.device = torch.empty(0, device=device).device
        self.dtype = dtype
        self.length = 0
        self.tokens: dict[str, Tensor] = {}
        self.states: dict[str, Tensor] = {}

    def append(self, **new: Tensor) -> tuple[Tensor, ...]:
        """Appends ``(B, T, ...)`` tensors of T new tokens; returns the full cached tensors."""
        counts = {t.shape[1] for t in new.values()}
        if len(counts) != 1:
            raise ValueError(f"cache: appended tensors disagree on the token count: "
                             f"{ {n: tuple(t.shape) for n, t in new.items()} }")
        if self.tokens and set(new) != set(self.tokens):
            raise ValueError(f"cache: holds {sorted(self.tokens)}, got {sorted(new)} "
                             "(a cache belongs to one attention module)")
        for name, t in new.items():
            self._check(name, t)
            old = self.tokens.get(name)
            self.tokens[name] = t if old is None else torch.cat((old, t), dim=1)
        self.length += counts.pop()
        return tuple(self.tokens[name] for name in new)

    def _check(self, name: str, t: Tensor) -> None:
        if t.shape[0] != self.batch_size:
            raise ValueError(f"cache: {name} has batch {t.shape[0]}, the cache was made for "
                             f"batch_size {self.batch_size}")
        if t.dtype != self.dtype or t.device != self.device:
            raise ValueError(f"cache: {name} is {t.dtype} on {t.device}, the cache was made "
                             f"for {self.dtype} on {self.device}")

    def nbytes(self) -> int:
        """Bytes of every tensor the cache holds (token rows and fixed states)."""
        held = list(self.tokens.values()) + list(self.states.values())
        return sum(t.numel() * t.element_size() for t in held)

    def __repr__(self) -> str:
        shapes = {n: tuple(t.shape) for n, t in {**self.tokens, **self.states}.items()}
        return f"KVCache(length={self.length}, {shapes})"
