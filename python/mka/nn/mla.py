"""Multi-head latent attention (MLA) as in DeepSeek-V2/V3."""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._validate import CPU_MAX_HEAD_DIM, CUDA_HEAD_DIMS
from ..memory.cache import LayerCache, LayerSpec
from .base import CausalSelfAttention, Memory, _positive_int
from .rope import apply_rope

PATHS = ("naive", "absorb")
RMS_EPS = 1e-6


class MultiHeadLatentAttention(CausalSelfAttention):
    """Keys and values come from a shared low-rank latent ``c_kv = RMSNorm(x W_dkv)``
    (``kv_lora_rank`` wide); per head, ``k = [c_kv W_uk ; RoPE(x W_kr)]`` — the RoPE part
    (``qk_rope_head_dim``) is one key shared by all heads (decoupled RoPE) — and
    ``v = c_kv W_uv``. Queries: ``q = [q_nope ; RoPE(q_pe)]`` from ``x W_q``, or from a
    latent ``RMSNorm(x W_dq)`` of width ``q_lora_rank`` when it is > 0.

    ``path="naive"`` expands the latent into per-head keys/values and caches those
    (``H (qk_nope + qk_rope + v)`` numbers per token). ``path="absorb"`` caches only
    ``[c_kv ; k_rope]`` (``kv_lora_rank + qk_rope`` per token): ``W_uk`` is absorbed into
    the query (``q_nope W_uk`` scores directly against ``c_kv``) and ``W_uv`` is applied
    to the attention output, so attention is MQA over the latent. Same outputs.

    Defaults, from the head width ``d = n_embd / n_head``: ``qk_nope = v = d``,
    ``qk_rope = d / 2`` rounded down to even (DeepSeek's proportions), ``q_lora_rank = 0`` and
    ``kv_lora_rank = 2 d - qk_rope`` (1.5 d): the cached latent is ``2 d`` wide, MQA's
    KV-cache budget, and the absorb path attends at head dim ``2 d`` — 128 for ``d = 64``,
    a size the CUDA kernels have. The latent projections have no bias (the absorption needs
    ``W_uk``, ``W_uv`` linear); the output projection follows ``bias``.
    """

    def __init__(self, n_embd: int, n_head: int, n_kv_head: Optional[int] = None, *,
                 q_lora_rank: int = 0, kv_lora_rank: Optional[int] = None,
                 qk_nope_head_dim: Optional[int] = None, qk_rope_head_dim: Optional[int] = None,
                 v_head_dim: Optional[int] = None, rope_theta: float = 10000.0,
                 path: str = "absorb", bias: bool = True, dropout: float = 0.0,
                 backend: str = "mka", window: Optional[int] = None):
        super().__init__(n_embd, n_head, bias=bias, dropout=dropout, backend=backend,
                         window=window)
        if n_kv_head not in (None, n_head):
            raise ValueError(f"n_kv_head: MLA shares one latent across heads, leave it None "
                             f"(or n_head = {n_head}), got {n_kv_head}")
        d = self.head_dim
        self.q_lora_rank = q_lora_rank
        self.nope = d if qk_nope_head_dim is None else qk_nope_head_dim
        self.rope = 2 * max(1, d // 4) if qk_rope_head_dim is None else qk_rope_head_dim  # even
        self.kv_lora_rank = max(1, 2 * d - self.rope) if kv_lora_rank is None else kv_lora_rank
        self.v_dim = d if v_head_dim is None else v_head_dim
        self.rope_theta, self.path = float(rope_theta), path
        self._check_options()
        H, r = n_head, self.kv_lora_rank
        if q_lora_rank > 0:
            self.q_down = nn.Linear(n_embd, q_lora_rank, bias=False)
            self.q_norm = nn.RMSNorm(q_lora_rank, eps=RMS_EPS)
            self.q_up = nn.Linear(q_lora_rank, H * (self.nope + self.rope), bias=False)
        else:
            self.q_proj = nn.Linear(n_embd, H * (self.nope + self.rope), bias=False)
        self.kv_down = nn.Linear(n_embd, r + self.rope, bias=False)
        self.kv_norm = nn.RMSNorm(r, eps=RMS_EPS)
        self.kv_up = nn.Linear(r, H * (self.nope + self.v_dim), bias=False)
        self.proj = nn.Linear(H * self.v_dim, n_embd, bias=bias)
        self.scale = 1.0 / math.sqrt(self.nope + self.rope)

    def _check_options(self) -> None:
        if not isinstance(self.q_lora_rank, int) or self.q_lora_rank < 0:
            raise ValueError(f"q_lora_rank: must be 0 (no query latent) or a positive integer, "
                             f"got {self.q_lora_rank!r}")
        _positive_int(self.kv_lora_rank, "kv_lora_rank")
        _positive_int(self.nope, "qk_nope_head_dim")
        _positive_int(self.v_dim, "v_head_dim")
        _positive_int(self.rope, "qk_rope_head_dim")
        if self.rope % 2:
            raise ValueError(f"qk_rope_head_dim: RoPE rotates pairs, must be even, got {self.rope}")
        if self.path not in PATHS:
            raise ValueError(f"path: expected one of {PATHS}, got {self.path!r}")
        width = self._attention_width()
        if self.backend == "mka" and width > CPU_MAX_HEAD_DIM:
            names = ("kv_lora_rank + qk_rope_head_dim" if self.path == "absorb" else
                     "max(qk_nope_head_dim + qk_rope_head_dim, v_head_dim)")
            raise ValueError(f"kv_lora_rank: the {self.path} path attends with head dim {names} "
                             f"= {width}, above the mka kernels' {CPU_MAX_HEAD_DIM}; use smaller "
                             "dims or backend='torch'")

    def _attention_width(self) -> int:
        if self.path == "absorb":
            return self.kv_lora_rank + self.rope
        return max(self.nope + self.rope, self.v_dim)

    # ------------------------------------------------------------------ projections

    def _query(self, x: Tensor, start) -> tuple[Tensor, Tensor]:
        """``q_nope: (B, T, H, qk_nope)``, ``q_pe: (B, T, H, qk_rope)`` (rotated)."""
        B, T, _ = x.shape
        q = (self.q_up(_rms_norm(self.q_norm, self.q_down(x))) if self.q_lora_rank > 0
             else self.q_proj(x))
        q_nope, q_pe = q.view(B, T, self.n_head, self.nope + self.rope).split(
            (self.nope, self.rope), -1)
        return q_nope, apply_rope(q_pe, start, self.rope_theta)

    def _latent(self, x: Tensor, start) -> Tensor:
        """``[c_kv ; k_pe]: (B, T, kv_lora_rank + qk_rope)`` — what the absorb path caches."""
        c, k_pe = self.kv_down(x).split((self.kv_lora_rank, self.rope), -1)
        k_pe = apply_rope(k_pe[:, :, None, :], start, self.rope_theta)[:, :, 0]
        return torch.cat((_rms_norm(self.kv_norm, c), k_pe), -1)

    def _up_weights(self) -> tuple[Tensor, Tensor]:
        """Per-head ``W_uk: (H, qk_nope, r)`` and ``W_uv: (H, v, r)`` of ``kv_up``."""
        w = self.kv_up.weight.view(self.n_head, self.nope + self.v_dim, self.kv_lora_rank)
        return w[:, :self.nope], w[:, self.nope:]

    # ------------------------------------------------------------------ attention

    def forward(self, x: Tensor, cache: Optional[LayerCache] = None,
                memory: Memory = None) -> Tensor:
        self._check_input(x, cache, memory)
        start = 0 if cache is None else cache.positions  # per sequence: they may differ
        q_nope, q_pe = self._query(x, start)
        latent = self._latent(x, start)
        if self.path == "naive":
            y = self._naive(q_nope, q_pe, latent, cache)
        else:
            y = self._absorb(q_nope, q_pe, latent, cache)
        B, T = x.shape[:2]
        return self.resid_dropout(self.proj(y.reshape(B, T, self.n_head * self.v_dim)))

    def _naive(self, q_nope: Tensor, q_pe: Tensor, latent: Tensor,
               cache: Optional[LayerCache]) -> Tensor:
        B, T, H = q_nope.shape[:3]
        c, k_pe = latent.split((self.kv_lora_rank, self.rope), -1)
        k_nope, v = self.kv_up(c).view(B, T, H, self.nope + self.v_dim).split(
            (self.nope, self.v_dim), -1)
        k = torch.cat((k_nope, k_pe[:, :, None, :].expand(B, T, H, self.rope)), -1)
        q = torch.cat((q_nope, q_pe), -1)
        if cache is not None:
            return self._attend_cached(q, k, v, cache)
        return self._attend(q, k, v)

    def _absorb(self, q_nope: Tensor, q_pe: Tensor, latent: Tensor,
                cache: Optional[LayerCache]) -> Tensor:
        w_uk, w_uv = self._up_weights()
        q = torch.cat((torch.einsum("bthn,hnr->bthr", q_nope, w_uk), q_pe), -1)
        kv = latent[:, :, None, :]  # one key/value head: MQA over the latent
        # the values are c_kv, the latent's first r columns; the RoPE columns ride along
        # (no padded copy for the kernels) and their output is dropped
        if cache is not None:
            o = self._attend_cached(q, kv, None, cache)[..., :self.kv_lora_rank]
        else:
            o = self._attend(q, kv, kv)[..., :self.kv_lora_rank]
        return torch.einsum("bthr,hvr->bthv", o, w_uv)

    def _attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Causal attention with the MLA scale; ``v`` may be narrower than ``q``/``k``.
        The mka kernels take one head dim for q, k, v (64 or 128 on CUDA): zero-padding adds
        nothing to the scores and only zero output columns, which are cut off."""
        dv = v.shape[-1]
        if self.backend == "mka":
            width = _kernel_head_dim(max(q.shape[-1], dv), q.device)
            q, k, v = (t if t.shape[-1] == width else F.pad(t, (0, width - t.shape[-1]))
                       for t in (q, k, v))
        out = self.ops.attention(q, k, v, causal=True, scale=self.scale, window=self.window,
                                 dropout_p=self._attn_p())
        return out[..., :dv]

    def _attend_cached(self, q: Tensor, k: Tensor, v: Optional[Tensor],
                       cache: LayerCache) -> Tensor:
        """Writes the new keys/values (``v = None``: the values are the keys, the absorbed
        path's latent) into the cache's pages and attends over them with the MLA scale."""
        cache.check("k", k)
        step = cache.step(k.shape[1])
        self.ops.paged_write(k, v, cache.k_pages, cache.v_pages, step.block_table,
                             step.cache_seqlens)
        return self.ops.paged_attention(q, cache.k_pages, cache.v_pages, step.block_table,
                                        step.seqlens, causal=True, scale=self.scale,
                                        window=self.window)

    def cache_spec(self) -> LayerSpec:
        """absorb: the latent ``[c_kv ; k_pe]`` as one key head whose values are itself;
        naive: per-head keys ``qk_nope + qk_rope`` and values ``v_head_dim`` wide."""
        if self.path == "absorb":
            return LayerSpec(1, self.kv_lora_rank + self.rope)
        return LayerSpec(self.n_head, self.nope + self.rope, self.v_dim)


def _rms_norm(norm: nn.RMSNorm, x: Tensor) -> Tensor:
    """RMSNorm with float32 (or wider) statistics for any input dtype, result in x's dtype
    (under autocast x is half while the weight stays float32)."""
    wide = torch.promote_types(x.dtype, torch.float32)
    return F.rms_norm(x.to(wide), norm.normalized_shape, norm.weight.to(wide), norm.eps).to(x.dtype)


def _kernel_head_dim(width: int, device: torch.device) -> int:
    """The head dim the kernels run ``width`` at: itself on CPU, the next supported on CUDA."""
    if device.type != "cuda":
        return width
    fits = [d for d in CUDA_HEAD_DIMS if d >= width]
    if not fits:
        raise ValueError(f"kv_lora_rank: MLA attends at head dim {width} here, above the mka "
                         f"CUDA kernels' {max(CUDA_HEAD_DIMS)}; use smaller ranks/dims or "
                         "backend='torch'")
    return fits[0]
