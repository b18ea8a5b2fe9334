"""The one interface every attention module implements, and the q/k/v projection shared by
the variants whose heads are plain key/value heads (MHA, MQA, GQA, MKA, FastMKA)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from .backends import get_ops
from .cache import KVCache

Memory = Optional[tuple[Tensor, Tensor]]


def _positive_int(value, name: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name}: must be a positive integer, got {value!r}")


class CausalSelfAttention(nn.Module):
    """Causal self-attention over hidden states, with an optional KV cache.

    ``forward(x, cache=None, memory=None)`` maps ``x: (B, T, D)`` to ``(B, T, D)``. With a
    cache from :meth:`new_cache`, ``x`` holds the tokens that follow the cached ones: a whole
    prompt (prefill), a chunk of it, or one token at a time — the result is the same as one
    pass over the full sequence. ``memory`` is level-3 memory for the variants that have one
    (MKA, FastMKA with ``levels=3``); the others reject it.

    :meth:`cache_bytes_per_token` is what the cache grows by per token and sequence;
    :meth:`cache_state_bytes` is its fixed per-sequence part (EMA states; 0 for most).
    """

    accepts_memory = False

    def __init__(self, n_embd: int, n_head: int, *, bias: bool = True, dropout: float = 0.0,
                 backend: str = "mka", window: Optional[int] = None):
        super().__init__()
        _positive_int(n_embd, "n_embd")
        _positive_int(n_head, "n_head")
        if n_embd % n_head != 0:
            raise ValueError(f"n_head: must divide n_embd = {n_embd}, got {n_head}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout: must be in [0, 1), got {dropout!r}")
        if window is not None:
            _positive_int(window, "window")
        self.n_embd, self.n_head, self.head_dim = n_embd, n_head, n_embd // n_head
        get_ops(backend)  # rejects an unknown backend here, not at the first forward
        self.backend, self.window = backend, window
        self.resid_dropout = nn.Dropout(dropout)  # on the output; the attention ops have none

    @property
    def ops(self):
        """The op namespace of :attr:`backend`. Looked up, not stored: a Python module as an
        attribute would make the module impossible to deepcopy, pickle or ``torch.save``."""
        return get_ops(self.backend)

    def new_cache(self, batch_size: int, device: Optional[torch.device] = None,
                  dtype: torch.dtype = torch.float32) -> KVCache:
        return KVCache(batch_size, device, dtype)

    def cache_bytes_per_token(self, dtype: torch.dtype = torch.bfloat16) -> int:
        raise NotImplementedError

    def cache_state_bytes(self, dtype: torch.dtype = torch.bfloat16) -> int:
        return 0

    def _check_input(self, x: Tensor, cache: Optional[KVCache], memory: Memory) -> None:
        if x.dim() != 3 or x.shape[-1] != self.n_embd:
            raise ValueError(f"x: expected hidden states (B, T, {self.n_embd}), "
                             f"got {tuple(x.shape)}")
        if memory is not None and not self.accepts_memory:
            raise ValueError(f"memory: {type(self).__name__} has no level-3 memory "
                             "(MKA and FastMKA with levels=3 take it)")
        if cache is not None and not isinstance(cache, KVCache):
            raise ValueError(f"cache: expected a KVCache from new_cache(), got {type(cache).__name__}")


class QKVAttention(CausalSelfAttention):
    """A fused q/k/v projection to ``H`` query heads and ``G`` key/value heads of width
    ``d = D / H``, and the output projection back to ``D``."""

    def __init__(self, n_embd: int, n_head: int, n_kv_head: Optional[int] = None, *,
                 bias: bool = True, dropout: float = 0.0, backend: str = "mka",
                 window: Optional[int] = None):
        super().__init__(n_embd, n_head, bias=bias, dropout=dropout, backend=backend,
                         window=window)
        n_kv_head = n_head if n_kv_head is None else n_kv_head
        _positive_int(n_kv_head, "n_kv_head")
        if n_head % n_kv_head != 0:
            raise ValueError(f"n_kv_head: must divide n_head = {n_head}, got {n_kv_head}")
        self.n_kv_head = n_kv_head
        d = self.head_dim
        self.qkv = nn.Linear(n_embd, (n_head + 2 * n_kv_head) * d, bias=bias)
        self.proj = nn.Linear(n_head * d, n_embd, bias=bias)

    def _project(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``q: (B, T, H, d)``, ``k, v: (B, T, G, d)`` (views of one matmul's output)."""
        B, T, _ = x.shape
        H, G, d = self.n_head, self.n_kv_head, self.head_dim
        q, k, v = self.qkv(x).split((H * d, G * d, G * d), dim=-1)
        return q.view(B, T, H, d), k.view(B, T, G, d), v.view(B, T, G, d)

    def project_memory(self, h: Tensor) -> tuple[Tensor, Tensor]:
        """Level-3 memory from hidden states ``h: (B, M, D)`` (e.g. recalled chunks of older
        context): this layer's key/value projections, ``(mem_k, mem_v): (B, M, G, d)``."""
        _, k, v = self._project(h)
        return k, v

    def _output(self, y: Tensor) -> Tensor:
        B, T = y.shape[:2]
        return self.resid_dropout(self.proj(y.reshape(B, T, self.n_head * self.head_dim)))

    def cache_bytes_per_token(self, dtype: torch.dtype = torch.bfloat16) -> int:
        """Keys and values of every key/value head."""
        return 2 * self.n_kv_head * self.head_dim * dtype.itemsize
