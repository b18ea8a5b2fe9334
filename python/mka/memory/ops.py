"""The paged ops of SPEC §7.1 as PyTorch custom operators: ``torch.ops.mka.paged_write``,
``paged_write_ema``, ``paged_write_fused``, ``paged_attention`` and ``paged_mka_attention``.

Inference only (no autograd). Float32/float64 pages on the CPU run the native kernels
(``cpp/src/cpu/paged_*.cpp``), float16/bfloat16/float32 pages on CUDA the CUDA kernels
(``cuda/memory/``, head dims up to 256); other pages (half precision on the CPU, a build
without CUDA, wider heads) run the PyTorch implementation of :mod:`.torch_paged`. Every op
has a fake kernel with the same shape checks, so ``torch.compile(fullgraph=True)`` traces
through them.

On CUDA the block table and lengths stay on the device: the writes check the slots they
write on the host (one synchronisation; a silently lost token would be worse), the
attention does not (it would synchronise every decode step) — a kernel meeting an invalid
entry reads nothing outside the pages and returns NaN for the rows that needed it.

``v_pages=None`` (and ``v=None`` for the writes) means the values are the keys: MLA's
absorbed path caches one latent that serves as both.
"""

import functools
from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import _C
from .._validate import check_paged, check_route
from ..kernels import _State
from ..ops import _PLAIN, _cast, _eager, _lam, _launch, _native
from . import torch_paged

_OptT = Optional[Tensor]
_OptF = Optional[float]
_OptI = Optional[int]


_CUDA_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_LIB = torch.library.Library("mka", "FRAGMENT")


def _no_gradient(name: str, args, kwargs) -> None:
    """An op without a backward whose output is a function of its inputs: an input that asks
    for a gradient is an error, where autograd would run on and leave that gradient silently
    missing."""
    for value in (*args, *kwargs.values()):
        if isinstance(value, Tensor) and value.requires_grad:
            raise ValueError(f"mka.{name}: inference only (no gradients); an input requires "
                             "grad: call it under torch.no_grad() or on detached tensors")


def _inference_op(name: str, mutates_args: Tuple[str, ...] = (), refuse_grad: bool = False):
    """Registers ``fn`` as ``torch.ops.mka.<name>`` straight on the dispatcher's CPU and CUDA
    keys (schema inferred as torch.library.custom_op does). custom_op would also wrap each
    call in a Python autograd function and a dynamo guard — ~30 us a call on a slow host,
    paid by every layer of every decode step — which ops without gradients do not need.
    ``refuse_grad``: inputs that require grad (with grad mode on) raise (:func:`_no_gradient`);
    the paged ops leave it off, as a model decoding with grad mode on writes its keys to the
    cache, a store without gradients. Returns the op as a function with custom_op's
    ``register_fake``."""
    def wrap(fn):
        _LIB.define(name + torch.library.infer_schema(fn, mutates_args=mutates_args))
        for key in ("CPU", "CUDA"):
            _LIB.impl(name, fn, key)
        op = getattr(torch.ops.mka, name).default

        @functools.wraps(fn)
        def call(*args, **kwargs):
            grad = torch.is_grad_enabled()
            if refuse_grad and grad:
                _no_gradient(name, args, kwargs)
            if _direct(grad, args, kwargs):
                return fn(*args, **kwargs)
            return op(*args, **kwargs)

        call.register_fake = lambda fake: torch.library.register_fake(f"mka::{name}", fake,
                                                                      lib=_LIB)
        return call
    return wrap


def _direct(grad: bool, args: tuple, kwargs: dict) -> bool:
    """Whether an inference op may run its implementation without the dispatcher (~4 us a
    call on a slow host, paid by each paged op of every layer of a decode step): as
    :func:`mka.ops._eager` allows (no compilation, tracing, dispatch mode or functorch
    transform; plain tensors only) and no input asks for a gradient with grad mode on (those
    calls keep the dispatcher's autograd fallback)."""
    if not _eager() or torch._C._get_tracing_state() is not None:  # torch.jit.trace records ops
        return False
    for a in (*args, *kwargs.values()):
        if isinstance(a, Tensor) and (type(a) not in _PLAIN or (grad and a.requires_grad)):
            return False
    return True


def _native_pages(pages: Tensor, *others: _OptT) -> bool:
    """Whether the native kernels take these pages (``others``: more pages, for head dims)."""
    if pages.device.type == "cpu":
        return pages.dtype in (torch.float32, torch.float64)
    return (pages.device.type == "cuda" and _C.built_with_cuda() and pages.dtype in _CUDA_DTYPES
            and max(t.shape[-1] for t in (pages, *others) if t is not None) <= 256)


def _check_write(k: Tensor, k_pages: Tensor, block_table: Tensor, cache_seqlens: Tensor) -> None:
    """The host check of the slots a CUDA write touches (the native layer checks CPU ones),
    unless the table and lengths are a cache's own."""
    if k_pages.device.type == "cuda" and k.shape[1] > 0 and not torch_paged.own_tables(
            block_table, cache_seqlens):
        torch_paged.check_slots(block_table, cache_seqlens + k.shape[1], k_pages.shape[0],
                                k_pages.shape[1], "cache_seqlens", starts=cache_seqlens)


def _state(t: _OptT, like: Tensor) -> _OptT:
    return None if t is None else t.detach().to(like.dtype).contiguous()


@_inference_op("paged_write", mutates_args=("k_pages", "v_pages"))
def paged_write(k: Tensor, v: _OptT, k_pages: Tensor, v_pages: _OptT, block_table: Tensor,
                cache_seqlens: Tensor) -> None:
    """Writes ``k, v: (B, T, G, d)`` at positions ``[cache_seqlens[b], cache_seqlens[b] + T)``
    of each sequence's pages (in place)."""
    check_paged(k, k_pages, v_pages, block_table, cache_seqlens, "cache_seqlens", v=v)
    v, v_pages = (k, k_pages) if v_pages is None else (v, v_pages)
    if not _native_pages(k_pages, v_pages):
        return torch_paged.paged_write(k, v, k_pages, v_pages, block_table, cache_seqlens)
    _check_write(k, k_pages, block_table, cache_seqlens)
    _write_native(k, v, k_pages, v_pages, block_table, cache_seqlens)


def _write_native(k: Tensor, v: Tensor, k_pages: Tensor, v_pages: Tensor, block_table: Tensor,
                  cache_seqlens: Tensor) -> None:
    """The native write, its inputs checked (or a cache's own)."""
    _native(_C.paged_write, k=k, v=v, k_pages=k_pages, v_pages=v_pages, block_table=block_table,
            cache_seqlens=cache_seqlens, **_launch(k, _State.token))


@paged_write.register_fake
def _(k, v, k_pages, v_pages, block_table, cache_seqlens):
    check_paged(k, k_pages, v_pages, block_table, cache_seqlens, "cache_seqlens", v=v)


@_inference_op("paged_write_ema",
               mutates_args=("k_pages", "v_pages", "k_page_states", "v_page_states"))
def paged_write_ema(k: Tensor, v: Tensor, k_pages: Tensor, v_pages: Tensor, block_table: Tensor,
                    cache_seqlens: Tensor, beta: float, k_page_states: Tensor,
                    v_page_states: Tensor, k_state: _OptT = None,
                    v_state: _OptT = None) -> Tuple[Tensor, Tensor]:
    """:func:`paged_write` for MKA: also carries the EMA of k and v from the running states
    ``k_state, v_state: (B, G, d)`` (zeros if None) through the new tokens, checkpointing it
    in ``k_page_states, v_page_states: (P, G, d)`` before each page's first token; returns the
    states after the new tokens."""
    check_paged(k, k_pages, v_pages, block_table, cache_seqlens, "cache_seqlens", v=v,
                page_states=(k_page_states, v_page_states), beta=beta)
    if not _native_pages(k_pages, v_pages):
        return torch_paged.paged_write_ema(k, v, k_pages, v_pages, block_table, cache_seqlens,
                                           beta, k_page_states, v_page_states, k_state, v_state)
    _check_write(k, k_pages, block_table, cache_seqlens)
    ks, vs = (k_page_states.new_empty((k.shape[0], *k.shape[2:])) for _ in range(2))
    _native(_C.paged_write, k=k, v=v, k_pages=k_pages, v_pages=v_pages, block_table=block_table,
            cache_seqlens=cache_seqlens, beta=beta,
            k_page_states=k_page_states, v_page_states=v_page_states,
            k_state=_state(k_state, k_page_states), v_state=_state(v_state, k_page_states),
            k_state_out=ks, v_state_out=vs, **_launch(k, _State.token))
    return ks, vs


@paged_write_ema.register_fake
def _(k, v, k_pages, v_pages, block_table, cache_seqlens, beta, k_page_states, v_page_states,
      k_state=None, v_state=None):
    check_paged(k, k_pages, v_pages, block_table, cache_seqlens, "cache_seqlens", v=v,
                page_states=(k_page_states, v_page_states), beta=beta)
    return tuple(k_page_states.new_empty((k.shape[0], *k.shape[2:])) for _ in range(2))


def _check_fused(k, v, lam, beta, k_pages, v_pages, block_table, cache_seqlens, k_state,
                 v_state, k3, v3) -> None:
    check_paged(k, k_pages, v_pages, block_table, cache_seqlens, "cache_seqlens", v=v)
    check_route(k, v, lam, beta, k3, v3, k_state, v_state, None, "(B, T, L)", True)
    for t, name in ((k_state, "k_state"), (v_state, "v_state")):
        if t is None:
            raise ValueError(f"{name}: required (the running EMA state; it is overwritten with "
                             "the state after the new tokens)")


@_inference_op("paged_write_fused",
               mutates_args=("k_pages", "v_pages", "k_state", "v_state"))
def paged_write_fused(k: Tensor, v: Tensor, lam: Tensor, beta: float, k_pages: Tensor,
                      v_pages: Tensor, block_table: Tensor, cache_seqlens: Tensor,
                      k_state: Tensor, v_state: Tensor, k3: _OptT = None,
                      v3: _OptT = None) -> None:
    """FastMKA's write: ``route_fuse`` (SPEC §3.2) of the new tokens ``k, v: (B, T, G, d)``
    with ``lam: (B, T, L)`` (and ``k3, v3`` iff L = 3) from the running EMA states ``k_state,
    v_state: (B, G, d)``, the fused rows written where :func:`paged_write` writes ``k, v``,
    and the states overwritten with those after the new tokens — in place, as a cache keeps
    them. Natively one kernel: a decode step's fusion, write and state update in one launch."""
    _check_fused(k, v, lam, beta, k_pages, v_pages, block_table, cache_seqlens, k_state,
                 v_state, k3, v3)
    if not _native_pages(k_pages, v_pages):
        return torch_paged.paged_write_fused(k, v, lam, beta, k_pages, v_pages, block_table,
                                             cache_seqlens, k_state, v_state, k3, v3)
    _check_write(k, k_pages, block_table, cache_seqlens)
    _native(_C.paged_write_fused, k=k, v=v, k_pages=k_pages, v_pages=v_pages,
            block_table=block_table, cache_seqlens=cache_seqlens, lam=_lam(lam, k.dtype),
            beta=float(beta), k3=k3, v3=v3, k_state=k_state, v_state=v_state,
            **_launch(k, _State.token))


@paged_write_fused.register_fake
def _(k, v, lam, beta, k_pages, v_pages, block_table, cache_seqlens, k_state, v_state, k3=None,
      v3=None):
    _check_fused(k, v, lam, beta, k_pages, v_pages, block_table, cache_seqlens, k_state,
                 v_state, k3, v3)


def _out(q: Tensor, k_pages: Tensor, v_pages: _OptT) -> Tensor:
    dv = (k_pages if v_pages is None else v_pages).shape[-1]
    return q.new_empty((*q.shape[:3], dv), dtype=k_pages.dtype)


@_inference_op("paged_attention")
def paged_attention(q: Tensor, k_pages: Tensor, v_pages: _OptT, block_table: Tensor,
                    seqlens: Tensor, causal: bool = True, scale: _OptF = None,
                    window: _OptI = None) -> Tensor:
    """Attention of ``q: (B, Tq, H, dk)`` over the first ``seqlens[b]`` tokens of each
    sequence's pages (its new tokens included), bottom-right causal per sequence, GQA,
    optional window: ``(B, Tq, H, dv)`` in the pages' dtype."""
    check_paged(q, k_pages, v_pages, block_table, seqlens, "seqlens", causal=causal,
                scale=scale, window=window)
    v_pages = k_pages if v_pages is None else v_pages
    if not _native_pages(k_pages, v_pages):
        return torch_paged.paged_attention(q.to(k_pages.dtype), k_pages, v_pages, block_table,
                                           seqlens, causal, scale, window)
    return _attention_native(q, k_pages, v_pages, block_table, seqlens, causal, scale, window)


def _attention_native(q: Tensor, k_pages: Tensor, v_pages: Tensor, block_table: Tensor,
                      seqlens: Tensor, causal: bool, scale: _OptF, window: _OptI) -> Tensor:
    """The native paged attention, its inputs checked (or a cache's own)."""
    out = _out(q, k_pages, v_pages)
    _native(_C.paged_attention, q=q, k_pages=k_pages, v_pages=v_pages, block_table=block_table,
            seqlens=seqlens, causal=causal, scale=scale, window=window, out=out,
            **_launch(q, _State.token))
    return out


@paged_attention.register_fake
def _(q, k_pages, v_pages, block_table, seqlens, causal=True, scale=None, window=None):
    check_paged(q, k_pages, v_pages, block_table, seqlens, "seqlens", causal=causal,
                scale=scale, window=window)
    return _out(q, k_pages, v_pages)


@_inference_op("paged_mka_attention")
def paged_mka_attention(q: Tensor, k_pages: Tensor, v_pages: Tensor, k_page_states: Tensor,
                        v_page_states: Tensor, block_table: Tensor, seqlens: Tensor,
                        lam: Tensor, beta: float, causal: bool = True, scale: _OptF = None,
                        window: _OptI = None) -> Tensor:
    """MKA's levels 1 and 2 over pages: ``lam[..., 0] O1 + lam[..., 1] O2`` with ``O1`` the
    (windowed) attention over the raw keys and ``O2`` the attention over ``EMA(k), EMA(v)``,
    rebuilt inside the kernel from the page checkpoints — nothing re-scans the sequence.
    ``lam: (B, Tq, L)``; a third level (recalled memory) is the caller's to add."""
    check_paged(q, k_pages, v_pages, block_table, seqlens, "seqlens", causal=causal,
                scale=scale, window=window, page_states=(k_page_states, v_page_states),
                beta=beta, lam=lam)
    if not _native_pages(k_pages, v_pages):
        return torch_paged.paged_mka_attention(q.to(k_pages.dtype), k_pages, v_pages,
                                               k_page_states, v_page_states, block_table,
                                               seqlens, lam, beta, causal, scale, window)
    out = _out(q, k_pages, v_pages)
    _native(_C.paged_attention, q=q, k_pages=k_pages, v_pages=v_pages, block_table=block_table,
            seqlens=seqlens, causal=causal, scale=scale, window=window, beta=beta,
            k_page_states=k_page_states, v_page_states=v_page_states,
            lam=_cast(lam, k_pages.dtype), out=out, **_launch(q, _State.token))
    return out


@paged_mka_attention.register_fake
def _(q, k_pages, v_pages, k_page_states, v_page_states, block_table, seqlens, lam, beta,
      causal=True, scale=None, window=None):
    check_paged(q, k_pages, v_pages, block_table, seqlens, "seqlens", causal=causal,
                scale=scale, window=window, page_states=(k_page_states, v_page_states),
                beta=beta, lam=lam)
    return _out(q, k_pages, v_pages)


# --------------------------------------------------------------------------- a cache's own steps

def _cache_write(lc, step, k: Tensor, v: _OptT) -> None:
    """:func:`paged_write` of new tokens ``k, v: (B, T, G, d)`` into the pages of ``lc`` (a
    :class:`~mka.memory.cache.LayerCache`) at ``step`` (what its ``step`` returned: the
    cache's own block table and lengths, valid by construction). Where the native kernels
    take the pages and the op would run its implementation directly (:func:`_direct`), the
    native op is called without :func:`check_paged`: the native layer checks the same shapes,
    dtypes and devices (cpp/src/memory/paged_ops.cpp: messages naming the same arguments),
    and the host check of a CUDA write skips a cache's own tables anyway. ~8 us less host
    time per layer and step on a slow CPU. Else the op, checks and all."""
    kp, vp = lc.k_pages, lc.v_pages
    if _native_pages(kp, vp) and _direct(torch.is_grad_enabled(), (k, v), {}):
        v, vp = (k, kp) if vp is None else (v, vp)
        return _write_native(k, v, kp, vp, step.block_table, step.cache_seqlens)
    paged_write(k, v, kp, vp, step.block_table, step.cache_seqlens)


def _cache_write_fused(lc, step, k: Tensor, v: Tensor, lam: Tensor, beta: float) -> None:
    """:func:`paged_write_fused` of new tokens into the pages and running states of ``lc`` at
    ``step``, as :func:`_cache_write` calls :func:`paged_write`: the native op without the
    Python checks where it runs directly (the native layer checks the same arguments)."""
    kp, vp, ks, vs = lc.k_pages, lc.v_pages, lc.states["k"], lc.states["v"]
    if _native_pages(kp, vp) and _direct(torch.is_grad_enabled(), (k, v, lam), {}):
        return _native(_C.paged_write_fused, k=k, v=v, k_pages=kp, v_pages=vp,
                       block_table=step.block_table, cache_seqlens=step.cache_seqlens,
                       lam=_lam(lam, k.dtype), beta=float(beta), k_state=ks, v_state=vs,
                       **_launch(k, _State.token))
    paged_write_fused(k, v, lam, beta, kp, vp, step.block_table, step.cache_seqlens, ks, vs)


def _cache_attention(lc, step, q: Tensor, scale: _OptF, window: _OptI) -> Tensor:
    """:func:`paged_attention` (causal) of ``q: (B, Tq, H, dk)`` over the pages of ``lc`` at
    ``step``, as :func:`_cache_write` calls :func:`paged_write`: the native op without the
    Python checks where it would run directly (the native layer checks ``q``, the options and
    every table entry it reads on the CPU; a cache's own table and lengths are valid)."""
    kp, vp = lc.k_pages, lc.v_pages
    if _native_pages(kp, vp) and _direct(torch.is_grad_enabled(), (q,), {}):
        return _attention_native(q, kp, kp if vp is None else vp, step.block_table,
                                 step.seqlens, True, scale, window)
    return paged_attention(q, kp, vp, step.block_table, step.seqlens, causal=True, scale=scale,
                           window=window)
