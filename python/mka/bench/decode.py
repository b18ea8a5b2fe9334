"""Decode cases (SPEC §7.1): one new query token per sequence against a cache of T tokens.

"paged" is ``paged_attention`` over pages of 16 tokens in a shuffled block table;
"paged_mka" MKA's levels 1 and 2 over the same pages (EMA rebuilt from page checkpoints);
"paged_step" MHA's whole step (write the new token's key/value, attend); "paged_fastmka"
FastMKA's whole step (fuse the new token's key/value from the carried EMA state as it is
written, attend); "attention" ``mka.attention`` with Tq = 1 over the contiguous
cache; SDPA (flash, cuDNN on CUDA) over the same contiguous cache are the baselines, and
FlashInfer's paged decode runs where it is installed. The contiguous cache is the pages
themselves in identity order, so every implementation reads the same bytes and nothing is
stored twice. Bytes per call: the keys and values read (``2 B T G d`` elements), for GB/s.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from .cases import Case, Shape, register, sdpa

PAGE = 16
BETA = 0.9


@dataclass
class DecodeInputs:
    q: torch.Tensor           # (B, 1, H, d)
    k_pages: torch.Tensor     # (P, S, G, d), sequence b's pages are b W .. (b + 1) W - 1
    v_pages: torch.Tensor
    table: torch.Tensor       # (B, W) shuffled pages of each sequence
    seqlens: torch.Tensor     # (B,) = T
    T: int
    extra: dict = field(default_factory=dict)  # made on first use (states, lam, workspaces)

    def contiguous(self) -> tuple[torch.Tensor, torch.Tensor]:
        B, W = self.table.shape
        shape = (B, W * PAGE, *self.k_pages.shape[2:])
        return (self.k_pages.view(shape)[:, :self.T], self.v_pages.view(shape)[:, :self.T])


def kv_bytes(s: Shape, dtype: torch.dtype) -> int:
    return 2 * s.B * s.T * s.G * s.d * dtype.itemsize


def decode_inputs(s: Shape, device: str, dtype: torch.dtype) -> Optional[DecodeInputs]:
    """None where the cache would not fit in half the device's memory."""
    if device == "cuda" and kv_bytes(s, dtype) > 0.5 * torch.cuda.get_device_properties(0).total_memory:
        return None
    g = torch.Generator(device=device).manual_seed(s.T + s.B)
    W = -(-s.T // PAGE)
    k_pages = torch.randn(s.B * W, PAGE, s.G, s.d, device=device, dtype=dtype, generator=g)
    v_pages = torch.randn(s.B * W, PAGE, s.G, s.d, device=device, dtype=dtype, generator=g)
    order = torch.stack([torch.randperm(W, device=device, generator=g) for _ in range(s.B)])
    table = (order + W * torch.arange(s.B, device=device)[:, None]).int()
    q = torch.randn(s.B, 1, s.H, s.d, device=device, dtype=dtype, generator=g)
    seqlens = torch.full((s.B,), s.T, dtype=torch.int32, device=device)
    return DecodeInputs(q, k_pages, v_pages, table, seqlens, s.T)


def _step(fn, x: Optional[DecodeInputs]):
    if x is None:
        raise ValueError("the cache does not fit in half the device's memory")
    return fn(x)


DECODE = register(Case(
    "decode", "one decode step (Tq = 1) against a cache of T tokens: paged and contiguous",
    inputs=decode_inputs, passes={"step": _step},
    bytes=lambda s, dtype, pass_: kv_bytes(s, dtype),
    defaults={"cuda": dict(batches=[1, 16, 64, 256], seqs=[4096, 32768, 131072], heads=32,
                           kv_heads=[8, 32], head_dim=128, rounds=5, reps=20),
              "cpu": dict(batches=[1], seqs=[16384], heads=32, kv_heads=[8], head_dim=128,
                          rounds=5, reps=5)}))

AGAINST = ("sdpa.cudnn", "sdpa")


@DECODE.impl("paged", against=AGAINST)
def _paged(x: DecodeInputs):
    from mka.memory import paged_attention
    return lambda: paged_attention(x.q, x.k_pages, x.v_pages, x.table, x.seqlens)


@DECODE.impl("paged_mka", against=("paged",))
def _paged_mka(x: DecodeInputs):
    from mka.memory import paged_mka_attention
    if "states" not in x.extra:
        sdt = torch.float32 if x.q.dtype != torch.float64 else torch.float64
        P, _, G, d = x.k_pages.shape
        x.extra["states"] = [torch.randn(P, G, d, device=x.q.device, dtype=sdt) * 0.1
                             for _ in range(2)]
        x.extra["lam"] = torch.full((x.q.shape[0], 1, 2), 0.5, device=x.q.device, dtype=sdt)
    ks, vs = x.extra["states"]
    lam = x.extra["lam"]
    return lambda: paged_mka_attention(x.q, x.k_pages, x.v_pages, ks, vs, x.table, x.seqlens,
                                       lam, BETA)


def _new_token(x: DecodeInputs):
    """One new key/value per sequence, written over each sequence's last slot (the cache
    keeps its length: every timed call reads the same bytes), the table and lengths marked as
    a cache's own (valid by construction, as this case's are): no host check, as in a cache's
    step."""
    from mka.memory.torch_paged import mark_pool_made
    B, G, d = x.q.shape[0], x.k_pages.shape[2], x.k_pages.shape[3]
    k1, v1 = (torch.randn(B, 1, G, d, device=x.q.device, dtype=x.q.dtype) for _ in range(2))
    last = x.seqlens - 1
    mark_pool_made(x.table, last)
    return k1, v1, last


@DECODE.impl("paged_step", against=("paged",))
def _paged_step(x: DecodeInputs):
    """MHA's whole step: write the new key/value, attend over the pages."""
    from mka.memory import paged_attention, paged_write
    k1, v1, last = _new_token(x)

    def call():
        paged_write(k1, v1, x.k_pages, x.v_pages, x.table, last)
        return paged_attention(x.q, x.k_pages, x.v_pages, x.table, x.seqlens)
    return call


@DECODE.impl("paged_fastmka", against=("paged_step", "paged"))
def _paged_fastmka(x: DecodeInputs):
    """FastMKA's whole step: fuse the new key/value from the carried EMA state as it is
    written (``paged_write_fused``, one kernel), attend: as many kernels as MHA's step."""
    from mka.memory import paged_attention, paged_write_fused
    k1, v1, last = _new_token(x)
    B, G, d = k1.shape[0], k1.shape[2], k1.shape[3]
    sdt = torch.float32 if x.q.dtype != torch.float64 else torch.float64
    lam = torch.full((B, 1, 2), 0.5, device=x.q.device, dtype=x.q.dtype)
    ks, vs = (torch.zeros(B, G, d, device=x.q.device, dtype=sdt) for _ in range(2))

    def call():
        paged_write_fused(k1, v1, lam, BETA, x.k_pages, x.v_pages, x.table, last, ks, vs)
        return paged_attention(x.q, x.k_pages, x.v_pages, x.table, x.seqlens)
    return call


@DECODE.impl("attention", against=AGAINST)
def _attention(x: DecodeInputs):
    import mka
    k, v = x.contiguous()
    return lambda: mka.attention(x.q, k, v)


@DECODE.impl("sdpa", baseline=True)
def _sdpa(x: DecodeInputs):
    k, v = x.contiguous()
    return lambda: sdpa(x.q, k, v, True)


@DECODE.impl("sdpa.flash", devices=("cuda",), baseline=True)
def _sdpa_flash(x: DecodeInputs):
    from torch.nn.attention import SDPBackend
    k, v = x.contiguous()
    return lambda: sdpa(x.q, k, v, True, SDPBackend.FLASH_ATTENTION)


@DECODE.impl("sdpa.cudnn", devices=("cuda",), baseline=True)
def _sdpa_cudnn(x: DecodeInputs):
    from torch.nn.attention import SDPBackend
    k, v = x.contiguous()
    return lambda: sdpa(x.q, k, v, True, SDPBackend.CUDNN_ATTENTION)


def _flashinfer_wrapper(x: DecodeInputs, tensor_cores: bool):
    """FlashInfer's paged decode over the same NHD pages and tables, planned once outside
    the timing, with its index buffers fixed so the call can be captured in a CUDA graph."""
    import flashinfer  # optional: an error row where it is not installed
    B, W = x.table.shape
    _, S, G, d = x.k_pages.shape
    H = x.q.shape[2]
    dev = x.q.device
    workspace = torch.empty(256 * 1024 * 1024, dtype=torch.uint8, device=dev)
    pages = -(-x.T // S)
    indptr = torch.arange(B + 1, device=dev, dtype=torch.int32) * pages
    indices = x.table[:, :pages].reshape(-1).contiguous()
    last = torch.full((B,), x.T - (pages - 1) * S, dtype=torch.int32, device=dev)
    wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
        workspace, "NHD", use_cuda_graph=True, use_tensor_cores=tensor_cores,
        paged_kv_indptr_buffer=indptr.clone(), paged_kv_indices_buffer=indices.clone(),
        paged_kv_last_page_len_buffer=last.clone())
    wrapper.plan(indptr, indices, last, H, G, d, S, q_data_type=x.q.dtype,
                 kv_data_type=x.k_pages.dtype)
    q = x.q[:, 0].contiguous()
    return lambda: wrapper.run(q, (x.k_pages, x.v_pages))


@DECODE.impl("flashinfer", devices=("cuda",), against=AGAINST)
def _flashinfer(x: DecodeInputs):
    """FlashInfer's decode kernel (CUDA cores), its default."""
    return _flashinfer_wrapper(x, tensor_cores=False)


@DECODE.impl("flashinfer.tc", devices=("cuda",), against=AGAINST)
def _flashinfer_tc(x: DecodeInputs):
    """FlashInfer's decode on its prefill kernels (tensor cores), what it advises for GQA
    groups of four or more."""
    return _flashinfer_wrapper(x, tensor_cores=True)
