"""The one interface every attention module implements, and the q/k/v projection shared by
the variants whose heads are plain key/value heads (MHA, MQA, GQA, MKA, FastMKA)."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._validate import attention_takes
from ..layers import apply_linear
from ..memory.cache import LayerCache, LayerSpec, PagedKVCache
from ..reference import state_dtype
from .backends import get_ops
from .rope import rope_tables, rotate

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

    The cache is paged (SPEC §7.1): :meth:`cache_spec` says what a layer keeps per token,
    per page and per sequence; :meth:`new_cache` makes a one-layer cache of it (a model makes
    one :class:`~mka.memory.PagedKVCache` for all its layers). :meth:`cache_bytes_per_token`
    is what a token adds per sequence (keys and values); :meth:`cache_state_bytes` the
    per-sequence part beside the pages (EMA states; with recall or summaries also their
    signatures or summaries for ``max_tokens``; 0 for most).
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
        # The projections' kernels in inference whatever the backend: a model that runs its
        # other layers on them (GPT) sets it, so its backends differ in attention alone.
        self.native_linears = False
        # nanoGPT's two: on the attention weights (inside the ops, SPEC §3.5) and the output
        self.attn_dropout = float(dropout)
        self.resid_dropout = nn.Dropout(dropout)

    def _attn_p(self) -> float:
        """The attention weights' dropout of a forward (``dropout_p``): in training only."""
        return self.attn_dropout if self.training else 0.0

    @property
    def ops(self):
        """The op namespace of :attr:`backend`. Looked up, not stored: a Python module as an
        attribute would make the module impossible to deepcopy, pickle or ``torch.save``."""
        return get_ops(self.backend)

    def cache_spec(self) -> LayerSpec:
        raise NotImplementedError

    def new_cache(self, batch_size: int, device: Optional[torch.device] = None,
                  dtype: torch.dtype = torch.float32, *, max_tokens: int = 2048,
                  page_size: int = 16) -> LayerCache:
        """An empty paged cache of ``batch_size`` sequences of up to ``max_tokens`` tokens."""
        return PagedKVCache([self.cache_spec()], batch_size, max_tokens=max_tokens,
                            page_size=page_size, device=device, dtype=dtype).lone_layer()

    def cache_bytes_per_token(self, dtype: torch.dtype = torch.bfloat16) -> int:
        return self.cache_spec().bytes_per_token(dtype)

    def cache_state_bytes(self, dtype: torch.dtype = torch.bfloat16, max_tokens: int = 0) -> int:
        return self.cache_spec().state_bytes(dtype, max_tokens)

    def _check_input(self, x: Tensor, cache: Optional[LayerCache], memory: Memory) -> None:
        if x.dim() != 3 or x.shape[-1] != self.n_embd:
            raise ValueError(f"x: expected hidden states (B, T, {self.n_embd}), "
                             f"got {tuple(x.shape)}")
        if memory is not None and not self.accepts_memory:
            raise ValueError(f"memory: {type(self).__name__} has no level-3 memory "
                             "(MKA and FastMKA with levels=3 take it)")
        if cache is not None and not isinstance(cache, LayerCache):
            raise ValueError("cache: expected a layer of a PagedKVCache (new_cache(), or "
                             f"GPT.new_caches()[i]), got {type(cache).__name__}")
        if cache is not None and cache.spec != self.cache_spec():
            raise ValueError(f"cache: made for {cache.spec}, this module caches "
                             f"{self.cache_spec()} (a cache belongs to one attention module)")


class QKVAttention(CausalSelfAttention):
    """A fused q/k/v projection to ``H`` query heads and ``G`` key/value heads of width
    ``d = D / H``, and the output projection back to ``D``.

    ``rope``: None, or the base of a rotary position embedding applied to every query and key
    at its position (the cache's length before it, in cached steps) — the model then needs no
    position table. ``key_shift``: each key also reads the previous token,
    ``k_t = W_k (x_t + s * x_{t-1})`` with a learned per-channel ``s`` (a token shift, as in
    RWKV, or a short convolution of width 2): one attention layer can then match a query
    against the token *before* each key — the induction step of associative recall, which
    otherwise takes a second layer. A cache keeps the last token's ``x`` per sequence.
    Keys are cached as attended to (rotated, shifted): level 2's EMA and recall's chunk
    signatures read them so."""

    def __init__(self, n_embd: int, n_head: int, n_kv_head: Optional[int] = None, *,
                 bias: bool = True, dropout: float = 0.0, backend: str = "mka",
                 window: Optional[int] = None, rope: Optional[float] = None,
                 key_shift: bool = False):
        super().__init__(n_embd, n_head, bias=bias, dropout=dropout, backend=backend,
                         window=window)
        n_kv_head = n_head if n_kv_head is None else n_kv_head
        _positive_int(n_kv_head, "n_kv_head")
        if n_head % n_kv_head != 0:
            raise ValueError(f"n_kv_head: must divide n_head = {n_head}, got {n_kv_head}")
        if rope is not None:
            if isinstance(rope, bool) or not isinstance(rope, (int, float)) or not rope > 1:
                raise ValueError(f"rope: the rotary base must be a number > 1 (or None), "
                                 f"got {rope!r}")
            if self.head_dim % 2:
                raise ValueError(f"rope: rotates pairs of dims, needs an even head dim, "
                                 f"got {self.head_dim}")
        if not isinstance(key_shift, bool):
            raise ValueError(f"key_shift: expected True or False, got {key_shift!r}")
        self.n_kv_head, self.rope = n_kv_head, None if rope is None else float(rope)
        d = self.head_dim
        self.qkv = nn.Linear(n_embd, (n_head + 2 * n_kv_head) * d, bias=bias)
        self.proj = nn.Linear(n_head * d, n_embd, bias=bias)
        # s of the key shift: 0.5 at the start, so keys read both tokens from the first step
        self.shift_mix = nn.Parameter(torch.full((n_embd,), 0.5)) if key_shift else None

    def _linear(self, layer: nn.Linear, x: Tensor) -> Tensor:
        """``layer(x)``; in inference on the native backend (or with :attr:`native_linears`),
        :func:`mka.layers.apply_linear` (the same product through kernels that stream the
        weight at decode sizes; hooked or wrapped layers are called as they are)."""
        native = self.backend == "mka" or self.native_linears
        if native and not self.training and not torch.is_grad_enabled():
            return apply_linear(layer, x)
        return layer(x)

    def _split(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``q: (B, T, H, d)``, ``k, v: (B, T, G, d)``: views of one matmul's output."""
        B, T, _ = x.shape
        H, G, d = self.n_head, self.n_kv_head, self.head_dim
        q, k, v = self._linear(self.qkv, x).split((H * d, G * d, G * d), dim=-1)
        return q.view(B, T, H, d), k.view(B, T, G, d), v.view(B, T, G, d)

    def _project(self, x: Tensor,
                 cache: Optional[LayerCache] = None) -> tuple[Tensor, Tensor, Tensor]:
        """:meth:`_split`, with the key shift added and ``q, k`` rotated at their positions
        (from 0, or after the cached tokens) where the module has them."""
        q, k, v = self._split(x)
        if self.shift_mix is not None:
            k = k + self._shifted_keys(x, k, cache)
        if self.rope is None:
            return q, k, v
        tables = rope_tables(0 if cache is None else cache.positions, q.shape[1],
                             self.head_dim, self.rope, q.device, state_dtype(q.dtype))
        return rotate(q, *tables), rotate(k, *tables), v

    def _shifted_keys(self, x: Tensor, k: Tensor, cache: Optional[LayerCache]) -> Tensor:
        """``W_k (s * x_{t-1})`` as ``(B, T, G, d)``; ``x_{-1}`` is zeros, or a cache's last
        token, which this step's last token replaces once the cache grants the step."""
        B, T, D = x.shape
        if T == 0:
            return torch.zeros_like(k)
        if cache is None:
            prev = x.new_zeros(B, 1, D)
        else:
            prev = cache.states["shift"][:, None].to(x.dtype)
            cache.pending["shift"] = x[:, -1]  # kept by cache.step: a refused step moves nothing
        before = torch.cat((prev, x[:, :-1]), 1)
        H, G, d = self.n_head, self.n_kv_head, self.head_dim
        w_k = self.qkv.weight[H * d:(H + G) * d]
        shifted = F.linear(self.shift_mix.to(x.dtype) * before, w_k)
        return shifted.view(B, T, G, d)

    def project_memory(self, h: Tensor) -> tuple[Tensor, Tensor]:
        """Level-3 memory from hidden states ``h: (B, M, D)`` (e.g. recalled chunks of older
        context): this layer's key/value projections, ``(mem_k, mem_v): (B, M, G, d)``. Memory
        has no order: its keys are neither rotated nor shifted."""
        _, k, v = self._split(h)
        return k, v

    def _output(self, y: Tensor) -> Tensor:
        B, T = y.shape[:2]
        return self.resid_dropout(self._linear(self.proj, y.reshape(B, T, self.n_head * self.head_dim)))

    def cache_spec(self) -> LayerSpec:
        """Keys and values of every key/value head."""
        return LayerSpec(self.n_kv_head, self.head_dim, self.head_dim, shift_dim=self._shift_dim)

    @property
    def _shift_dim(self) -> int:
        """The width of the last token's ``x`` a cache keeps for the key shift (0: none)."""
        return self.n_embd if self.shift_mix is not None else 0

    def _attention_takes(self, q: Tensor) -> bool:
        """Whether this backend's attention ops take ``q`` (the native ones: not every head
        dim the paged ops take)."""
        return self.backend == "torch" or attention_takes(q)

    def _into_empty(self, q: Tensor, cache: LayerCache) -> bool:
        """Whether these queries are a prompt into an empty cache, which attends over its own
        keys with the attention op: they are all the keys, and the decode kernel, which
        serves a few query rows per read of the keys, would read them again for every 16 rows
        of a long prompt."""
        return not cache.static and not any(cache.written) and self._attention_takes(q)

    def _attend_cached(self, q: Tensor, k: Tensor, v: Tensor, cache: LayerCache) -> Tensor:
        """Writes the new ``k, v`` into the cache's pages and attends over them (over its own
        ``k, v`` with the attention op where :meth:`_into_empty`)."""
        cache.check("k", k)
        empty = self._into_empty(q, cache)
        step = cache.step(k.shape[1])
        self.ops.paged_write(k, v, cache.k_pages, cache.v_pages, step.block_table,
                             step.cache_seqlens)
        if empty:
            return self.ops.attention(q, k, v, causal=True, window=self.window)
        return self._attend_pages(q, cache, step)

    def _attend_pages(self, q: Tensor, cache: LayerCache, step) -> Tensor:
        """Causal attention of ``q`` over the cache's pages at ``step`` (what
        ``cache.step`` returned), within the module's window."""
        return self.ops.paged_attention(q, cache.k_pages, cache.v_pages, step.block_table,
                                        step.seqlens, causal=True, window=self.window)
