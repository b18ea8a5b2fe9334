"""Recall attention as a custom op (SPEC §7.2): ``O3`` of every query row over the chunks
chosen for it, read in place by the native kernels (CPU ``cpp/src/cpu/recall_attention.cpp``,
CUDA ``cuda/memory/recall_attention.cu``) — no gathered copy of the recalled keys. ``mka::_recall_fwd`` returns the output and the
softmax logsumexp, ``mka::_recall_bwd`` the gradients of ``q, k, v``; fake kernels make both
traceable by ``torch.compile``. The selection (``chosen``) is discrete and the caller's.

Native kernels run CPU float32/float64 (half inputs computed in float32, as the other ops)
and CUDA float16/bfloat16/float32 (tensor cores for 16-bit inputs with head dim 64 or 128:
chunk-major or row-major by the ``recall`` kernel option, :mod:`mka.kernels`, read at the
forward and handed to the backward as the other ops do; on the current stream); elsewhere
the PyTorch composite (:func:`mka.memory.recall._attend_in_blocks`): :func:`native` says
which. On CUDA an invalid ``chosen`` entry is not raised (the indices stay on the device):
its row's output, lse and dq are NaN.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import _C
from ..kernels import _State
from ..ops import _compute_dtype, _custom_op, _launch, _native
from ..reference import state_dtype


def native(q: Tensor) -> bool:
    """Whether the native kernels take ``q`` (its device; float64 has no CUDA kernel)."""
    return q.device.type == "cpu" or (q.device.type == "cuda" and _C.built_with_cuda()
                                      and q.dtype != torch.float64)


def _scale(q: Tensor, scale: Optional[float]) -> float:
    return 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale


def _recall_fwd_impl(q: Tensor, k: Tensor, v: Tensor, chosen: Tensor, chunk: int,
                     scale: float, kernels: str) -> Tuple[Tensor, Tensor]:
    cdt = _compute_dtype(q)
    out = q.new_empty(q.shape, dtype=cdt)
    lse = q.new_empty((q.shape[0], q.shape[2], q.shape[1]), dtype=state_dtype(cdt))
    _native(_C.recall_forward, q=q.detach().to(cdt), k=k.detach().to(cdt), v=v.detach().to(cdt),
            chosen=chosen.to(torch.int32), chunk=chunk, scale=scale, out=out, lse=lse,
            **_launch(q, kernels))
    return out.to(q.dtype), lse


_recall_fwd = _custom_op(_recall_fwd_impl)


@_recall_fwd.register_fake
def _(q, k, v, chosen, chunk, scale, kernels):
    return torch.empty_like(q), q.new_empty((q.shape[0], q.shape[2], q.shape[1]),
                                            dtype=state_dtype(_compute_dtype(q)))


def _recall_bwd_impl(q: Tensor, k: Tensor, v: Tensor, chosen: Tensor, chunk: int, scale: float,
                     out: Tensor, lse: Tensor, dout: Tensor,
                     kernels: str) -> Tuple[Tensor, Tensor, Tensor]:
    cdt = _compute_dtype(q)
    dq, dk, dv = (t.new_empty(t.shape, dtype=cdt) for t in (q, k, v))  # every element written
    _native(_C.recall_backward, q=q.to(cdt), k=k.to(cdt), v=v.to(cdt),
            chosen=chosen.to(torch.int32), chunk=chunk, scale=scale, out=out.to(cdt),
            lse=lse.contiguous(), dout=dout.to(cdt), dq=dq, dk=dk, dv=dv, **_launch(q, kernels))
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


_recall_bwd = _custom_op(_recall_bwd_impl)


@_recall_bwd.register_fake
def _(q, k, v, chosen, chunk, scale, out, lse, dout, kernels):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup(ctx, inputs, output):
    q, k, v, chosen, chunk, scale, kernels = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, chosen, out, lse)
    ctx.args = (chunk, scale)
    ctx.kernels = kernels
    ctx.mark_non_differentiable(lse)


def _backward(ctx, dout, _dlse):
    q, k, v, chosen, out, lse = ctx.saved_tensors
    dout = torch.zeros_like(out) if dout is None else dout
    dq, dk, dv = _recall_bwd(q, k, v, chosen, *ctx.args, out, lse, dout.contiguous(),
                             ctx.kernels)
    return dq, dk, dv, None, None, None, None


_recall_fwd.register_autograd(_backward, setup_context=_setup)


def recall_op(q: Tensor, k: Tensor, v: Tensor, chosen: Tensor, chunk: int,
              scale: Optional[float] = None) -> Tensor:
    """``O3: (B, Tq, H, d)`` of ``q`` over the chunks ``chosen: (B, Tq, G, R)`` (-1: none) of
    ``k, v: (B, Tk, G, d)``; differentiable in ``q, k, v``."""
    return _recall_fwd(q, k, v, chosen, chunk, _scale(q, scale), _State.token)[0]
