"""Fused building blocks of a decode step (SPEC §3.7) as PyTorch custom operators.

At decode sizes a transformer layer's elementwise work is a few kilobytes per kernel, so each
costs its launch and its latency, not its bytes; fusing two kernels into one is worth a
launch per layer per step. ``torch.ops.mka.add_layer_norm`` is the residual add followed by
the next LayerNorm (the pair every pre-LayerNorm block and the final norm run);
``torch.ops.mka.linear`` a linear layer, optionally followed by GELU, that up to
``MAX_ROWS`` rows (one decode token) read through a kernel made for it on CUDA (a warp per
output feature streaming its row of the weight: at decode sizes a linear layer is a read of
its weight; CPU tensors take torch's BLAS GEMV, which the C++ op's own CPU loop did not
beat). Native kernels: add_layer_norm on CPU (float32/float64) and CUDA
(float16/bfloat16/float32), linear on CUDA; other inputs (half
precision on the CPU, weights of another dtype as under autocast, more rows) run the same
arithmetic in PyTorch, as do CUDA tensors in a build of mka without its CUDA kernels.
Inference only: no autograd.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules import module as _module

from . import _C
from ._validate import _same_device
from .kernels import _State
from .memory.ops import _inference_op
from .ops import _launch, _native

_NATIVE = {"cpu": (torch.float32, torch.float64),
           "cuda": (torch.float16, torch.bfloat16, torch.float32)}


def _native_dtype(t: Tensor, devices=("cpu", "cuda")) -> bool:
    """Whether the native kernels take ``t``'s dtype on its device (CUDA tensors: only in a
    build with the CUDA kernels)."""
    kind = t.device.type
    return (kind in devices and t.dtype in _NATIVE[kind]
            and (kind != "cuda" or _C.built_with_cuda()))


def _check(x: Tensor, residual: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
           eps: float) -> None:
    if x.dim() < 1 or x.shape != residual.shape:
        raise ValueError(f"residual: expected the shape of x {tuple(x.shape)}, got "
                         f"{tuple(residual.shape)}")
    _same_device(residual, "residual", x, "x")
    C = x.shape[-1]
    for t, name in ((weight, "weight"), (bias, "bias")):
        if t is not None:
            if t.shape != (C,):
                raise ValueError(f"{name}: expected ({C},), got {tuple(t.shape)}")
            _same_device(t, name, x, "x")
    if not eps >= 0:
        raise ValueError(f"eps: must be >= 0, got {eps}")


def _rows(residual: Tensor) -> Optional[Tensor]:
    """``residual`` as ``(N, C)`` rows sharing its memory (it is written in place), or None."""
    try:
        return residual.view(-1, residual.shape[-1])
    except RuntimeError:
        return None


@_inference_op("add_layer_norm", mutates_args=("residual",), refuse_grad=True)
def add_layer_norm(x: Tensor, residual: Tensor, weight: Optional[Tensor] = None,
                   bias: Optional[Tensor] = None,
                   eps: float = 1e-5) -> Tensor:
    """``residual += x``, then ``layer_norm(residual, (C,), weight, bias, eps)``: the sum
    is rounded to ``residual``'s dtype before the statistics are taken, as in the unfused
    pair, so both give the same residual stream."""
    _check(x, residual, weight, bias, eps)
    rows = _rows(residual)
    same = all(t is None or t.dtype == residual.dtype for t in (x, weight, bias))
    if (rows is None or (rows.shape[1] > 1 and rows.stride(1) != 1) or not same
            or not _native_dtype(residual)):
        residual.add_(x)
        return F.layer_norm(residual, (x.shape[-1],), weight, bias, eps)
    out = torch.empty(rows.shape, dtype=rows.dtype, device=rows.device)
    _native(_C.add_layer_norm, x=x.reshape(rows.shape).contiguous(), residual=rows,
            weight=None if weight is None else weight.contiguous(),
            bias=None if bias is None else bias.contiguous(), out=out, eps=eps,
            **_launch(x, _State.token))
    return out.view(x.shape)


@add_layer_norm.register_fake
def _(x, residual, weight=None, bias=None, eps=1e-5):
    _check(x, residual, weight, bias, eps)
    return torch.empty_like(residual, memory_format=torch.contiguous_format)


_ACTIVATIONS = {"none": 0, "gelu": 1}
# Rows (tokens) the linear kernel takes; more go to torch's GEMM. The kernel computes up to 8
# (linear_ops.h), but on the H100 only one row beat cuBLAS where both were measured (8 rows
# at 4096 x 4096: 43 us against 9 us): a warp per feature re-reads x once per row.
MAX_ROWS = 1


def _check_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], activation: str) -> None:
    if activation not in _ACTIVATIONS:
        raise ValueError(f"activation: one of {sorted(_ACTIVATIONS)}, got {activation!r}")
    if x.dim() < 1 or weight.dim() != 2 or weight.shape[1] != x.shape[-1]:
        raise ValueError(f"weight: expected (N, {x.shape[-1] if x.dim() else '?'}) for x "
                         f"{tuple(x.shape)}, got {tuple(weight.shape)}")
    _same_device(weight, "weight", x, "x")
    if bias is not None:
        if bias.shape != (weight.shape[0],):
            raise ValueError(f"bias: expected ({weight.shape[0]},), got {tuple(bias.shape)}")
        _same_device(bias, "bias", x, "x")


@_inference_op("linear", refuse_grad=True)
def linear(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None,
           activation: str = "none") -> Tensor:
    """``activation(x @ weight.T + bias)`` for ``x: (..., K)``, ``weight: (N, K)`` (nn.Linear's
    layout); ``activation`` "none" or "gelu" (erf form, of the product in ``x``'s dtype, as
    ``F.gelu(F.linear(...))``)."""
    _check_linear(x, weight, bias, activation)
    K, N = x.shape[-1], weight.shape[0]
    rows = x.reshape(-1, K)
    same = all(t is None or t.dtype == x.dtype for t in (weight, bias))
    if (rows.shape[0] > MAX_ROWS or not same or not _native_dtype(x, ("cuda",))
            or weight.stride(-1) != 1 or rows.shape[0] == 0):
        y = F.linear(x, weight, bias)
        return F.gelu(y) if activation == "gelu" else y
    out = torch.empty(rows.shape[0], N, dtype=x.dtype, device=x.device)
    _native(_C.linear_small, x=rows if rows.stride(-1) == 1 else rows.contiguous(), weight=weight,
            bias=None if bias is None else bias.contiguous(), out=out,
            activation=_ACTIVATIONS[activation], **_launch(x, _State.token))
    return out.view(*x.shape[:-1], N)


@linear.register_fake
def _(x, weight, bias=None, activation="none"):
    _check_linear(x, weight, bias, activation)
    return x.new_empty(*x.shape[:-1], weight.shape[0])


def plain(layer: nn.Module, kind: type) -> bool:
    """Whether calling ``layer`` is exactly ``kind``'s own computation with its parameters:
    a ``kind`` itself (not a subclass or a wrapper such as an adapter) with no forward hooks
    of its own or global ones (observers, quantisation, activation capture) — what the fused
    paths may replace by reading its parameters."""
    return (type(layer) is kind and not layer._forward_hooks
            and not layer._forward_pre_hooks and not _module._global_forward_hooks
            and not _module._global_forward_pre_hooks)


def apply_linear(layer: nn.Module, x: Tensor, activation: str = "none") -> Tensor:
    """``layer(x)`` (then GELU with ``activation="gelu"``) through :func:`linear` where that is
    the same computation (:func:`plain`), else by calling the layer, so hooks and wrapped
    layers keep their behaviour. For inference (no autograd)."""
    if plain(layer, nn.Linear):
        return linear(x, layer.weight, layer.bias, activation)
    y = layer(x)
    return F.gelu(y) if activation == "gelu" else y
