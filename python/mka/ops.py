"""The ops of SPEC §3 as PyTorch custom operators: ``torch.ops.mka.{attention, route_fuse,
fastmka, mka}``.

Layering: each public op is a thin composite over private ``mka::_*_fwd`` / ``mka::_*_bwd``
custom ops. The private forward ops also return what the backward needs (softmax
logsumexp, per-level outputs) and the private backward ops call the native backward
kernels — autograd never falls back to PyTorch math. Every private op has a fake kernel
running the same validation as the real one, so ``torch.compile(fullgraph=True)`` traces
through without graph breaks and reports the same errors. Plain eager calls run the same
implementations, setup and backward as an autograd.Function (:class:`_Eager`), without the
custom-op dispatch layers' host time.

Devices: one implementation per op hands DLPack views of detached tensors to
``mka._C`` by keyword, together with the current stream and the kernel choice; the native
layer fills the op's descriptor (``cpp/include/mka/op_args.h``) and picks the CPU or CUDA
kernels (``cpp/src/ops/dispatch.cpp``). On CPU, float16/bfloat16 inputs are computed in
float32 (SPEC §4): :func:`_compute_dtype`.

Kernel choice (:mod:`mka.kernels`): each public op reads the current choice as a token at
its forward and passes it to its private forward op; the autograd setup saves it, and the
backward op gets the same token, so a forward and its backward never disagree.

The type hints stay real objects (no ``from __future__ import annotations``): the custom
ops' schemas are inferred from them, which older torch releases cannot do from strings.
"""

from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor
from torch.utils._python_dispatch import _get_current_dispatch_mode
from torch.utils.dlpack import to_dlpack

from . import _C
from . import _validate as V
from .kernels import KernelOptions, _State, launch
from .reference import state_dtype

_OptT = Optional[Tensor]
_OptF = Optional[float]
_OptI = Optional[int]
_HALF = (torch.float16, torch.bfloat16)
_PLAIN = (torch.Tensor, torch.nn.Parameter)


# --------------------------------------------------------------------------- helpers

def _launch(t: Tensor, kernels: str) -> dict:
    """Where the native op runs: the current stream of t's device (0 on CPU) and the kernels."""
    return launch(kernels, _stream(t.device.index) if t.device.type == "cuda" else 0)


def _official_stream(index: int) -> int:
    return torch.cuda.current_stream(index).cuda_stream


_stream_of = None  # the accessor _stream uses, chosen at the first CUDA call


def _stream(index: int) -> int:
    """The handle of device ``index``'s current CUDA stream. torch.cuda.current_stream builds
    a Stream object each call (microseconds, paid by every op of every decode step); torch's
    raw accessor (the one inductor's generated code calls) returns the handle itself. It is
    used once it gave the public API's handle on the current stream and on a side stream (on
    the default stream both may say 0); else, or where it is missing, the public API is."""
    global _stream_of
    if _stream_of is None:
        if torch.cuda.is_current_stream_capturing():  # choose outside a capture
            return _official_stream(index)
        raw = getattr(torch._C, "_cuda_getCurrentRawStream", None)

        def agree() -> bool:
            return raw(index) == _official_stream(index)
        same = raw is not None and agree()
        if same:
            side = torch.cuda.Stream(index)
            with torch.cuda.stream(side):
                same = agree() and raw(index) == side.cuda_stream
        _stream_of = raw if same else _official_stream
    return _stream_of(index)


def _native(fn, **kw) -> None:
    """Calls a native op with its arguments by name, every tensor handed over as a DLPack
    capsule (of a detached view where it requires grad, which DLPack refuses): ``to_dlpack``
    costs ~0.5 us a tensor, against ~3 us through ``Tensor.__dlpack__``, which nanobind calls
    otherwise (a fastmka forward and backward pass 24 tensors). ``kw`` keeps the tensors alive
    while the native op reads them."""
    for k, a in kw.items():  # kw is this call's own dict: replaced in place (~0.5 us less)
        if isinstance(a, Tensor):
            kw[k] = to_dlpack(a.detach() if a.requires_grad else a)
    fn(**kw)


def _compute_dtype(t: Tensor) -> torch.dtype:
    return torch.float32 if (t.device.type == "cpu" and t.dtype in _HALF) else t.dtype


def _lam_dtype(lam: Tensor, cdt: torch.dtype) -> torch.dtype:
    """The CUDA kernels read routing weights as given (float32, or the inputs' dtype: no
    cast, no extra launch); the CPU kernels take them in the compute dtype."""
    return lam.dtype if lam.device.type == "cuda" and cdt != torch.float64 else cdt


def _as(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``t`` in ``dtype``, detached where converted: a native op's input or output (no call
    when it is already: ``.to`` costs ~1 us even then, paid per tensor of every call; an
    unconverted input is detached by :func:`_native`)."""
    return t if t.dtype == dtype else t.detach().to(dtype)


def _cast(t: _OptT, dtype: torch.dtype) -> _OptT:
    """:func:`_as` of an optional input."""
    return None if t is None else _as(t, dtype)


def _lam(lam: Tensor, cdt: torch.dtype) -> Tensor:
    return _cast(lam, _lam_dtype(lam, cdt))


def _like(t: Tensor, dtype: Optional[torch.dtype] = None) -> Tensor:
    """An uninitialized contiguous tensor of t's shape and device in ``dtype`` (t's if None):
    a native op's output, real or fake. ``empty_like`` takes ~1.1 us of host time where
    ``new_empty(t.shape)`` takes 2.5-3.4 (the shape goes through Python's argument parsing);
    a fastmka forward and backward make a dozen."""
    return torch.empty_like(t, dtype=dtype, memory_format=torch.contiguous_format)


def _empty(like: Tensor) -> Tensor:
    """Placeholder output for the gradient of an absent optional input."""
    return like.new_empty(0)


def _grad(g: _OptT, like: Tensor) -> Tensor:
    """Incoming gradient: contiguous, in the compute dtype; zeros where autograd gave None."""
    return torch.zeros_like(like) if g is None else _opt_grad(g, like.dtype)


def _opt_grad(g: _OptT, dtype: torch.dtype) -> _OptT:
    """Incoming gradient contiguous, in ``dtype``; None stays None."""
    if g is None:
        return None
    g = _as(g.detach(), dtype)
    return g if g.is_contiguous() else g.contiguous()


def _none_if_empty(t: Tensor) -> _OptT:
    return None if t.numel() == 0 and t.dim() == 1 else t


# --------------------------------------------------------------------------- op plumbing

def _custom_op(impl):
    """``impl`` (named ``_X_impl``) registered as the custom op ``mka::_X``."""
    return torch.library.custom_op(f"mka::{impl.__name__[:-len('_impl')]}", mutates_args=())(impl)


class _Eager(torch.autograd.Function):
    """A private forward op as a plain autograd.Function, for eager calls on plain tensors
    (:func:`_eager`): it runs the op's implementation and the same setup_context and backward
    as its custom-op registration, and the backward calls the backward op's implementation
    (:func:`_bwd`), so neither pass goes through the dispatcher's custom-op layers (default
    filling, alias checks, dynamo guards), which cost ~0.2 ms of host time per fastmka forward
    and backward and can leave the GPU waiting on the host at short sequences
    (docs/kernels.md). The last argument is (implementation, setup, backward)."""

    @staticmethod
    def forward(ctx, *args):
        (impl, setup, backward), inputs = args[-1], args[:-1]
        output = impl(*inputs)
        setup(ctx, inputs, output)
        ctx.eager, ctx.backward_fn = True, backward
        return output

    @staticmethod
    def backward(ctx, *grads):
        return (*ctx.backward_fn(ctx, *grads), None)


def _eager(*tensors: Tensor) -> bool:
    """Whether a public op may run :class:`_Eager`: no compilation, tracing, dispatch mode or
    functorch transform is active and every tensor is a plain one (no fake, functional or
    other subclass), so nothing needs the custom ops' registrations (fake kernels, schemas)."""
    return (not torch.compiler.is_compiling() and _get_current_dispatch_mode() is None
            and not torch._C._are_functorch_transforms_active()
            and all(type(t) in _PLAIN for t in tensors))


def _forward(op, eager_parts, args: tuple):
    """A private forward op on args: as :class:`_Eager` (eager_parts: implementation, setup,
    backward) where :func:`_eager` allows — the implementation alone when no gradient can
    be asked for (no grad mode, or no input needs one: inference and decoding skip the
    autograd.Function's bookkeeping) — else the custom op itself."""
    tensors = [a for a in args if isinstance(a, Tensor)]
    if _eager(*tensors):
        if not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors)):
            return eager_parts[0](*args)
        return _Eager.apply(*args, eager_parts)
    return op(*args)


def _bwd(ctx, op, impl):
    """The backward op to call from a backward function: its implementation on the eager
    path, else the custom op (autograd of the custom op, under torch.compile too).

    The backward ops do not check their inputs again: they are what the forward checked and
    saved (the native layer still checks shapes); the Python checks were ~15 % of a small
    call's host time."""
    return impl if getattr(ctx, "eager", False) else op


# --------------------------------------------------------------------------- attention

def _lse(q: Tensor, dtype: torch.dtype) -> Tensor:
    return q.new_empty((q.shape[0], q.shape[2], q.shape[1]), dtype=dtype)


def _attention_fwd_impl(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: _OptF,
                        window: _OptI, dropout_p: float, seed: _OptT,
                        kernels: str) -> Tuple[Tensor, Tensor]:
    V.check_attention(q, k, v, scale, window, causal, dropout_p, seed)
    cdt = _compute_dtype(q)
    out = _like(q, cdt)
    lse = _lse(q, state_dtype(cdt))
    _native(_C.attention_forward, **_attn_args(q, causal, scale, window, dropout_p, seed, cdt),
            k=_cast(k, cdt), v=_cast(v, cdt), out=out, lse=lse, **_launch(q, kernels))
    return _as(out, q.dtype), lse


_attention_fwd = _custom_op(_attention_fwd_impl)


@_attention_fwd.register_fake
def _(q, k, v, causal, scale, window, dropout_p, seed, kernels):
    V.check_attention(q, k, v, scale, window, causal, dropout_p, seed)
    return _like(q), _lse(q, state_dtype(q.dtype))


def _attention_bwd_impl(q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, dout: Tensor,
                        causal: bool, scale: _OptF, window: _OptI, dropout_p: float,
                        seed: _OptT, kernels: str) -> Tuple[Tensor, Tensor, Tensor]:
    cdt = _compute_dtype(q)
    # Uninitialized: the kernels overwrite every element (accumulate=False), no zero fills.
    dq, dk, dv = (_like(t, cdt) for t in (q, k, v))
    _native(_C.attention_backward, **_attn_args(q, causal, scale, window, dropout_p, seed, cdt),
            k=_cast(k, cdt), v=_cast(v, cdt), out=_cast(out, cdt), lse=lse.contiguous(),
            dout=_cast(dout, cdt).contiguous(), dq=dq, dk=dk, dv=dv, accumulate=False,
            **_launch(q, kernels))
    return _as(dq, q.dtype), _as(dk, k.dtype), _as(dv, v.dtype)


_attention_bwd = _custom_op(_attention_bwd_impl)


@_attention_bwd.register_fake
def _(q, k, v, out, lse, dout, causal, scale, window, dropout_p, seed, kernels):
    return _like(q), _like(k), _like(v)


def _attention_setup(ctx, inputs, output):
    ctx.set_materialize_grads(False)  # unused outputs' grads stay None: no zero fills
    q, k, v, causal, scale, window, dropout_p, seed, kernels = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, seed)
    ctx.opts = (causal, scale, window, dropout_p)
    ctx.kernels = kernels
    ctx.mark_non_differentiable(lse)


def _attention_backward(ctx, dout, _dlse):
    q, k, v, out, lse, seed = ctx.saved_tensors
    bwd = _bwd(ctx, _attention_bwd, _attention_bwd_impl)
    dq, dk, dv = bwd(q, k, v, out, lse, _grad(dout, out), *ctx.opts, seed, ctx.kernels)
    return dq, dk, dv, None, None, None, None, None, None


_attention_fwd.register_autograd(_attention_backward, setup_context=_attention_setup)


# --------------------------------------------------------------------------- route_fuse

def _states_out(k: Tensor) -> Tuple[Tensor, Tensor]:
    B, _, G, d = k.shape
    sdt = state_dtype(k.dtype)
    return k.new_empty((B, G, d), dtype=sdt), k.new_empty((B, G, d), dtype=sdt)


def _route_args(k: Tensor, v: Tensor, lam: Tensor, beta: float, x3: _OptT, v3: _OptT,
                k_state: _OptT, v_state: _OptT, cdt: torch.dtype, level3: str = "k3") -> dict:
    """The routing inputs (op_args.h: RouteInputs) and k, v, in the compute dtype; level 3's
    inputs are k3, v3 (route_fuse, fastmka) or mem_k, mem_v (mka)."""
    names = ("k3", "v3") if level3 == "k3" else ("mem_k", "mem_v")
    return {"k": _cast(k, cdt), "v": _cast(v, cdt), "lam": _lam(lam, cdt), "beta": float(beta),
            names[0]: _cast(x3, cdt), names[1]: _cast(v3, cdt), "k_state": k_state,
            "v_state": v_state}


def _route_fuse_fwd_impl(k: Tensor, v: Tensor, lam: Tensor, beta: float, k3: _OptT, v3: _OptT,
                         k_state: _OptT, v_state: _OptT,
                         kernels: str) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    V.check_route(k, v, lam, beta, k3, v3, k_state, v_state, None, "(B, Tk, L)", True)
    cdt = _compute_dtype(k)
    kf = _like(k, cdt)
    vf = _like(v, cdt)
    ks, vs = _states_out(k)
    _native(_C.route_fuse_forward, **_route_args(k, v, lam, beta, k3, v3, k_state, v_state, cdt),
            k_fused=kf, v_fused=vf, k_state_out=ks, v_state_out=vs, **_launch(k, kernels))
    return _as(kf, k.dtype), _as(vf, v.dtype), ks, vs


_route_fuse_fwd = _custom_op(_route_fuse_fwd_impl)


@_route_fuse_fwd.register_fake
def _(k, v, lam, beta, k3, v3, k_state, v_state, kernels):
    V.check_route(k, v, lam, beta, k3, v3, k_state, v_state, None, "(B, Tk, L)", True)
    return _like(k), _like(v), *_states_out(k)


def _route_grads_fake(k: Tensor, lam: Tensor, x3: _OptT, k_state: _OptT, v_state: _OptT,
                      need_dlam: bool = True):
    like = lambda t: _empty(k) if t is None else _like(t)  # noqa: E731
    return (_like(k), _like(k), like(lam if need_dlam else None), like(x3), like(x3),
            like(k_state), like(v_state))


def _route_grads_alloc(k: Tensor, lam: Tensor, x3: _OptT, k_state: _OptT, v_state: _OptT,
                       cdt: torch.dtype, need_dlam: bool = True) -> dict:
    """Uninitialized gradient buffers by name (dk, dv and op_args.h's RouteGrads): the
    backward ops overwrite every element (accumulate=False), no zero fills. Absent inputs get
    none, and so does lam where autograd does not need its gradient (`need_dlam`: the GPU scan
    then skips its dlam pass, which reads k/v again). x3 is the third level's key-like input
    (k3 for route_fuse/fastmka, mem_k for mka)."""
    e = lambda t, dt: None if t is None else _like(t, dt)  # noqa: E731
    return {"dk": _like(k, cdt), "dv": _like(k, cdt),
            "dlam": e(lam if need_dlam else None, _lam_dtype(lam, cdt)), "dk3": e(x3, cdt),
            "dv3": e(x3, cdt), "dk_state": e(k_state, state_dtype(cdt)),
            "dv_state": e(v_state, state_dtype(cdt))}


def _route_grads_out(g: dict, k: Tensor, lam: Tensor) -> Tuple[Tensor, ...]:
    """(dk, dv, dlam, d level-3 keys, d level-3 values, dk_state, dv_state) in the inputs'
    dtypes; absent ones empty."""
    back = lambda t, dt: _empty(k) if t is None else _as(t, dt)  # noqa: E731
    dks, dvs = g["dk_state"], g["dv_state"]
    return (_as(g["dk"], k.dtype), _as(g["dv"], k.dtype), back(g["dlam"], lam.dtype),
            back(g["dk3"], k.dtype), back(g["dv3"], k.dtype),
            back(dks, dks.dtype if dks is not None else k.dtype),
            back(dvs, dvs.dtype if dvs is not None else k.dtype))


def _route_fuse_bwd_impl(k: Tensor, v: Tensor, lam: Tensor, beta: float, k3: _OptT, v3: _OptT,
                         k_state: _OptT, v_state: _OptT, dk_fused: Tensor, dv_fused: Tensor,
                         dk_state_out: _OptT, dv_state_out: _OptT, need_dlam: bool,
                         kernels: str) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor,
                                                Tensor]:
    """Returns (dk, dv, dlam, dk3, dv3, dk_state, dv_state); absent inputs (and lam without
    need_dlam) get empty grads."""
    cdt = _compute_dtype(k)
    g = _route_grads_alloc(k, lam, k3, k_state, v_state, cdt, need_dlam)
    sdt = state_dtype(cdt)
    _native(_C.route_fuse_backward, **_route_args(k, v, lam, beta, k3, v3, k_state, v_state, cdt),
            dk_fused=_cast(dk_fused, cdt).contiguous(), dv_fused=_cast(dv_fused, cdt).contiguous(),
            dk_state_out=_opt_grad(dk_state_out, sdt), dv_state_out=_opt_grad(dv_state_out, sdt),
            **g, accumulate=False, **_launch(k, kernels))
    return _route_grads_out(g, k, lam)


_route_fuse_bwd = _custom_op(_route_fuse_bwd_impl)


@_route_fuse_bwd.register_fake
def _(k, v, lam, beta, k3, v3, k_state, v_state, dk_fused, dv_fused, dk_state_out,
      dv_state_out, need_dlam, kernels):
    return _route_grads_fake(k, lam, k3, k_state, v_state, need_dlam)


def _route_inputs_grads(grads) -> Tuple[_OptT, ...]:
    """(dlam, dk3, dv3, dk_state, dv_state) with empty placeholders turned into None."""
    return tuple(_none_if_empty(t) for t in grads)


def _route_fuse_setup(ctx, inputs, output):
    ctx.set_materialize_grads(False)  # unused outputs' grads stay None: no zero fills
    k, v, lam, beta, k3, v3, k_state, v_state, kernels = inputs
    ctx.save_for_backward(k, v, lam, k3, v3, k_state, v_state)
    ctx.args = (beta, kernels)


def _route_fuse_backward(ctx, dkf, dvf, dks, dvs):
    k, v, lam, k3, v3, ks, vs = ctx.saved_tensors
    beta, kernels = ctx.args
    bwd = _bwd(ctx, _route_fuse_bwd, _route_fuse_bwd_impl)
    g = bwd(k, v, lam, beta, k3, v3, ks, vs, _grad(dkf, k), _grad(dvf, v), dks, dvs,
            ctx.needs_input_grad[2], kernels)
    dlam, dk3, dv3, dks_in, dvs_in = _route_inputs_grads(g[2:])
    return g[0], g[1], dlam, None, dk3, dv3, dks_in, dvs_in, None


_route_fuse_fwd.register_autograd(_route_fuse_backward, setup_context=_route_fuse_setup)


# --------------------------------------------------------------------------- fastmka

def _check_fastmka(q, k, v, lam, beta, k3, v3, k_state, v_state, causal, scale, window,
                   dropout_p=0.0, seed=None) -> None:
    V.check_attention(q, k, v, scale, window, causal, dropout_p, seed)
    V.check_route(k, v, lam, beta, k3, v3, k_state, v_state, None, "(B, Tk, L)", True)


def _fastmka_saved(q: Tensor, k: Tensor, cdt: torch.dtype,
                   kernels: str) -> Tuple[Tensor, Tensor, Tensor]:
    """What the forward keeps for the backward: the fused keys/values and, on CUDA, the EMA
    scan's chunk start states (an opaque float32 buffer, sized by the scan the kernel choice
    names; empty on the CPU)."""
    B, Tk, G, d = k.shape
    n = _C.fastmka_carry_numel(B, Tk, G, d, q.device.type == "cuda",
                               KernelOptions.from_token(kernels).scan)
    return (_like(k, cdt), _like(k, cdt),
            k.new_empty((n,), dtype=torch.float32))


def _seed(dropout_p: float) -> _OptT:
    """A call's dropout seed (SPEC §3.5), drawn from torch's default CPU generator (so
    ``torch.manual_seed`` repeats it) as a one-element int64 tensor; None without dropout."""
    if not dropout_p:
        return None
    return torch.randint(0, 2 ** 62, (1,), dtype=torch.int64)


def _attn_args(q: Tensor, causal: bool, scale: _OptF, window: _OptI, dropout_p: float,
               seed: _OptT, cdt: torch.dtype) -> dict:
    """q in the compute dtype and the attention options (op_args.h: AttnOptions); the
    dropout seed, a one-element int64 tensor, read on the host (it lives there)."""
    return {"q": _cast(q, cdt), "causal": causal, "scale": scale, "window": window,
            "dropout_p": float(dropout_p), "seed": None if seed is None else seed.item()}


def _fastmka_fwd_impl(q: Tensor, k: Tensor, v: Tensor, lam: Tensor, beta: float, k3: _OptT,
                      v3: _OptT, k_state: _OptT, v_state: _OptT, causal: bool, scale: _OptF,
                      window: _OptI, dropout_p: float, seed: _OptT,
                      kernels: str) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor,
                                             Tensor]:
    """Returns (out, lse, k_state, v_state, k_fused, v_fused, carry)."""
    _check_fastmka(q, k, v, lam, beta, k3, v3, k_state, v_state, causal, scale, window,
                   dropout_p, seed)
    cdt = _compute_dtype(q)
    out = _like(q, cdt)
    lse = _lse(q, state_dtype(cdt))
    ks, vs = _states_out(k)
    kf, vf, carry = _fastmka_saved(q, k, cdt, kernels)
    _native(_C.fastmka_forward, **_attn_args(q, causal, scale, window, dropout_p, seed, cdt),
            **_route_args(k, v, lam, beta, k3, v3, k_state, v_state, cdt), out=out, lse=lse,
            k_state_out=ks, v_state_out=vs, saved_k=kf, saved_v=vf, saved_carry=carry,
            **_launch(q, kernels))
    return _as(out, q.dtype), lse, ks, vs, kf, vf, carry


_fastmka_fwd = _custom_op(_fastmka_fwd_impl)


@_fastmka_fwd.register_fake
def _(q, k, v, lam, beta, k3, v3, k_state, v_state, causal, scale, window, dropout_p, seed,
      kernels):
    _check_fastmka(q, k, v, lam, beta, k3, v3, k_state, v_state, causal, scale, window,
                   dropout_p, seed)
    return (_like(q), _lse(q, state_dtype(q.dtype)), *_states_out(k),
            *_fastmka_saved(q, k, _compute_dtype(q), kernels))


def _fastmka_bwd_impl(q: Tensor, k: Tensor, v: Tensor, lam: Tensor, beta: float, k3: _OptT,
                      v3: _OptT, k_state: _OptT, v_state: _OptT, causal: bool, scale: _OptF,
                      window: _OptI, dropout_p: float, seed: _OptT, out: Tensor, lse: Tensor,
                      dout: Tensor, dk_state_out: _OptT, dv_state_out: _OptT, k_fused: Tensor,
                      v_fused: Tensor, carry: Tensor, need_dlam: bool,
                      kernels: str) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor,
                                             Tensor, Tensor]:
    """Returns (dq, dk, dv, dlam, dk3, dv3, dk_state, dv_state); dlam is empty without
    need_dlam."""
    cdt = _compute_dtype(q)
    sdt = state_dtype(cdt)
    dq = _like(q, cdt)  # overwritten (accumulate=False), as all of g
    g = _route_grads_alloc(k, lam, k3, k_state, v_state, cdt, need_dlam)
    _native(_C.fastmka_backward, **_attn_args(q, causal, scale, window, dropout_p, seed, cdt),
            **_route_args(k, v, lam, beta, k3, v3, k_state, v_state, cdt), out=_cast(out, cdt),
            lse=lse.contiguous(), dout=_cast(dout, cdt).contiguous(),
            dk_state_out=_opt_grad(dk_state_out, sdt), dv_state_out=_opt_grad(dv_state_out, sdt),
            dq=dq, **g, saved_k=k_fused, saved_v=v_fused, saved_carry=carry, accumulate=False,
            **_launch(q, kernels))
    return (_as(dq, q.dtype), *_route_grads_out(g, k, lam))


_fastmka_bwd = _custom_op(_fastmka_bwd_impl)


@_fastmka_bwd.register_fake
def _(q, k, v, lam, beta, k3, v3, k_state, v_state, causal, scale, window, dropout_p, seed, out,
      lse, dout, dk_state_out, dv_state_out, k_fused, v_fused, carry, need_dlam, kernels):
    return _like(q), *_route_grads_fake(k, lam, k3, k_state, v_state, need_dlam)


def _fastmka_setup(ctx, inputs, output):
    ctx.set_materialize_grads(False)  # unused outputs' grads stay None: no zero fills
    (q, k, v, lam, beta, k3, v3, k_state, v_state, causal, scale, window, dropout_p, seed,
     kernels) = inputs
    out, lse, _, _, kf, vf, carry = output
    ctx.save_for_backward(q, k, v, lam, k3, v3, k_state, v_state, out, lse, kf, vf, carry, seed)
    ctx.args = (beta, causal, scale, window, dropout_p, kernels)
    ctx.mark_non_differentiable(lse, kf, vf, carry)


def _fastmka_backward(ctx, dout, _dlse, dks, dvs, _dkf, _dvf, _dcarry):
    q, k, v, lam, k3, v3, ks, vs, out, lse, kf, vf, carry, seed = ctx.saved_tensors
    beta, causal, scale, window, dropout_p, kernels = ctx.args
    bwd = _bwd(ctx, _fastmka_bwd, _fastmka_bwd_impl)
    g = bwd(q, k, v, lam, beta, k3, v3, ks, vs, causal, scale, window, dropout_p, seed, out, lse,
            _grad(dout, out), dks, dvs, kf, vf, carry, ctx.needs_input_grad[3], kernels)
    dlam, dk3, dv3, dks_in, dvs_in = _route_inputs_grads(g[3:])
    return (g[0], g[1], g[2], dlam, None, dk3, dv3, dks_in, dvs_in, None, None, None, None, None,
            None)


_fastmka_fwd.register_autograd(_fastmka_backward, setup_context=_fastmka_setup)


# --------------------------------------------------------------------------- mka

def _check_mka(q, k, v, lam, beta, mem_k, mem_v, k_state, v_state, causal, scale, window,
               dropout_p=0.0, seed=None) -> int:
    V.check_attention(q, k, v, scale, window, causal, dropout_p, seed)
    L = V.check_route(k, v, lam, beta, None, None, k_state, v_state, q.shape[1], "(B, Tq, L)",
                      False)
    V.check_memory(q, k, mem_k, mem_v, L)
    return L


def _mka_saved(q: Tensor, L: int, cdt: torch.dtype) -> Tuple[Tensor, Tensor]:
    """Each level's output and softmax statistics, kept for the backward, both float32 (float64
    for float64 inputs): the backward's row sums <dout, O_l> lose the state gradient's
    accuracy to rounded outputs (its terms cancel)."""
    B, Tq, H, d = q.shape
    sdt = state_dtype(cdt)
    return q.new_empty((L, B, Tq, H, d), dtype=sdt), q.new_empty((L, B, H, Tq), dtype=sdt)


def _mka_fwd_impl(q: Tensor, k: Tensor, v: Tensor, lam: Tensor, beta: float, mem_k: _OptT,
                  mem_v: _OptT, k_state: _OptT, v_state: _OptT, causal: bool, scale: _OptF,
                  window: _OptI, dropout_p: float, seed: _OptT,
                  kernels: str) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns (out, o_levels (L, B, Tq, H, d), lse_levels (L, B, H, Tq), k_state, v_state,
    k_ema, v_ema): the levels' outputs, statistics and EMA keys/values kept for backward."""
    L = _check_mka(q, k, v, lam, beta, mem_k, mem_v, k_state, v_state, causal, scale, window,
                   dropout_p, seed)
    cdt = _compute_dtype(q)
    out = _like(q, cdt)
    o_levels, lse_levels = _mka_saved(q, L, cdt)
    ks, vs = _states_out(k)
    ke, ve = _like(k, cdt), _like(v, cdt)
    _native(_C.mka_forward, **_attn_args(q, causal, scale, window, dropout_p, seed, cdt),
            **_route_args(k, v, lam, beta, mem_k, mem_v, k_state, v_state, cdt, "mem_k"),
            out=out, o_levels=o_levels, lse_levels=lse_levels, k_state_out=ks, v_state_out=vs,
            saved_k=ke, saved_v=ve, **_launch(q, kernels))
    return _as(out, q.dtype), o_levels, lse_levels, ks, vs, ke, ve


_mka_fwd = _custom_op(_mka_fwd_impl)


@_mka_fwd.register_fake
def _(q, k, v, lam, beta, mem_k, mem_v, k_state, v_state, causal, scale, window, dropout_p, seed,
      kernels):
    L = _check_mka(q, k, v, lam, beta, mem_k, mem_v, k_state, v_state, causal, scale, window,
                   dropout_p, seed)
    cdt = _compute_dtype(q)
    return (_like(q), *_mka_saved(q, L, cdt), *_states_out(k), _like(k, cdt), _like(v, cdt))


def _mka_bwd_impl(q: Tensor, k: Tensor, v: Tensor, lam: Tensor, beta: float, mem_k: _OptT,
                  mem_v: _OptT, k_state: _OptT, v_state: _OptT, causal: bool, scale: _OptF,
                  window: _OptI, dropout_p: float, seed: _OptT, o_levels: Tensor,
                  lse_levels: Tensor, dout: Tensor, dk_state_out: _OptT, dv_state_out: _OptT,
                  k_ema: Tensor, v_ema: Tensor,
                  kernels: str) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor,
                                         Tensor]:
    """Returns (dq, dk, dv, dlam, dmem_k, dmem_v, dk_state, dv_state)."""
    cdt = _compute_dtype(q)
    sdt = state_dtype(cdt)
    dq = _like(q, cdt)  # overwritten (accumulate=False), as all the rest
    g = _route_grads_alloc(k, lam, mem_k, k_state, v_state, cdt)
    _native(_C.mka_backward, **_attn_args(q, causal, scale, window, dropout_p, seed, cdt),
            **_route_args(k, v, lam, beta, mem_k, mem_v, k_state, v_state, cdt, "mem_k"),
            o_levels=o_levels, lse_levels=lse_levels.contiguous(),
            dout=_cast(dout, cdt).contiguous(), dk_state_out=_opt_grad(dk_state_out, sdt),
            dv_state_out=_opt_grad(dv_state_out, sdt), dq=dq, dk=g["dk"], dv=g["dv"],
            dmem_k=g["dk3"], dmem_v=g["dv3"], dlam=g["dlam"], dk_state=g["dk_state"],
            dv_state=g["dv_state"], saved_k=k_ema, saved_v=v_ema, accumulate=False,
            **_launch(q, kernels))
    return (_as(dq, q.dtype), *_route_grads_out(g, k, lam))


_mka_bwd = _custom_op(_mka_bwd_impl)


@_mka_bwd.register_fake
def _(q, k, v, lam, beta, mem_k, mem_v, k_state, v_state, causal, scale, window, dropout_p, seed,
      o_levels, lse_levels, dout, dk_state_out, dv_state_out, k_ema, v_ema, kernels):
    return _like(q), *_route_grads_fake(k, lam, mem_k, k_state, v_state)


def _mka_setup(ctx, inputs, output):
    ctx.set_materialize_grads(False)  # unused outputs' grads stay None: no zero fills
    (q, k, v, lam, beta, mem_k, mem_v, k_state, v_state, causal, scale, window, dropout_p, seed,
     kernels) = inputs
    _, o_levels, lse_levels, _, _, ke, ve = output
    ctx.save_for_backward(q, k, v, lam, mem_k, mem_v, k_state, v_state, o_levels, lse_levels,
                          ke, ve, seed)
    ctx.args = (beta, causal, scale, window, dropout_p, kernels)
    ctx.mark_non_differentiable(o_levels, lse_levels, ke, ve)


def _mka_backward(ctx, dout, _dol, _dlse, dks, dvs, _dke, _dve):
    q, k, v, lam, mem_k, mem_v, ks, vs, o_levels, lse_levels, ke, ve, seed = ctx.saved_tensors
    beta, causal, scale, window, dropout_p, kernels = ctx.args
    bwd = _bwd(ctx, _mka_bwd, _mka_bwd_impl)
    g = bwd(q, k, v, lam, beta, mem_k, mem_v, ks, vs, causal, scale, window, dropout_p, seed,
            o_levels, lse_levels, _grad(dout, q), dks, dvs, ke, ve, kernels)
    dlam, dmk, dmv, dks_in, dvs_in = _route_inputs_grads(g[3:])
    return (g[0], g[1], g[2], dlam, None, dmk, dmv, dks_in, dvs_in, None, None, None, None, None,
            None)


_mka_fwd.register_autograd(_mka_backward, setup_context=_mka_setup)


# --------------------------------------------------------------------------- public ops
# Composites of the private ops above: fake tensors and torch.compile go through the private
# ops' registrations, plain eager calls through _Eager. Each reads the kernel choice here, at
# its forward (_State.token: mka.kernels), and hands it on as the private ops' last argument.

_lib = torch.library.Library("mka", "FRAGMENT")
_lib.define("attention(Tensor q, Tensor k, Tensor v, bool causal=True, float? scale=None, "
            "int? window=None, float dropout_p=0.0) -> Tensor")
_lib.define("route_fuse(Tensor k, Tensor v, Tensor lam, float beta, Tensor? k3=None, "
            "Tensor? v3=None, Tensor? k_state=None, Tensor? v_state=None) "
            "-> (Tensor, Tensor, Tensor, Tensor)")
_lib.define("fastmka(Tensor q, Tensor k, Tensor v, Tensor lam, float beta, Tensor? k3=None, "
            "Tensor? v3=None, Tensor? k_state=None, Tensor? v_state=None, bool causal=True, "
            "float? scale=None, int? window=None, float dropout_p=0.0) -> (Tensor, Tensor, Tensor)")
_lib.define("mka(Tensor q, Tensor k, Tensor v, Tensor lam, float beta, Tensor? mem_k=None, "
            "Tensor? mem_v=None, Tensor? k_state=None, Tensor? v_state=None, bool causal=True, "
            "float? scale=None, int? window=None, float dropout_p=0.0) -> (Tensor, Tensor, Tensor)")


def attention(q: Tensor, k: Tensor, v: Tensor, causal: bool = True, scale: _OptF = None,
              window: _OptI = None, dropout_p: float = 0.0) -> Tensor:
    """Exact attention, BTHD layout, GQA, bottom-right causal mask, optional window; with
    ``dropout_p``, dropout of the attention weights (SPEC §3.5)."""
    return _forward(torch.ops.mka._attention_fwd, (_attention_fwd_impl, _attention_setup,
                    _attention_backward),
                    (q, k, v, causal, scale, window, dropout_p, _seed(dropout_p),
                     _State.token))[0]


def route_fuse(k: Tensor, v: Tensor, lam: Tensor, beta: float, k3: _OptT = None,
               v3: _OptT = None, k_state: _OptT = None,
               v_state: _OptT = None) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Key-side routing of SPEC §3: ``(k_fused, v_fused, k_state_out, v_state_out)``."""
    return _forward(torch.ops.mka._route_fuse_fwd, (_route_fuse_fwd_impl, _route_fuse_setup,
                    _route_fuse_backward),
                    (k, v, lam, beta, k3, v3, k_state, v_state, _State.token))


def fastmka(q: Tensor, k: Tensor, v: Tensor, lam: Tensor, beta: float, k3: _OptT = None,
            v3: _OptT = None, k_state: _OptT = None, v_state: _OptT = None,
            causal: bool = True, scale: _OptF = None, window: _OptI = None,
            dropout_p: float = 0.0) -> Tuple[Tensor, Tensor, Tensor]:
    """Route fusion (key-side lam) then one attention: ``(out, k_state, v_state)``."""
    out, _, ks, vs, _, _, _ = _forward(
        torch.ops.mka._fastmka_fwd, (_fastmka_fwd_impl, _fastmka_setup, _fastmka_backward),
        (q, k, v, lam, beta, k3, v3, k_state, v_state, causal, scale, window, dropout_p,
         _seed(dropout_p), _State.token))
    return out, ks, vs


def mka(q: Tensor, k: Tensor, v: Tensor, lam: Tensor, beta: float, mem_k: _OptT = None,
        mem_v: _OptT = None, k_state: _OptT = None, v_state: _OptT = None, causal: bool = True,
        scale: _OptF = None, window: _OptI = None,
        dropout_p: float = 0.0) -> Tuple[Tensor, Tensor, Tensor]:
    """Full MKA, one attention per level mixed by query-side lam: ``(out, k_state, v_state)``;
    with ``dropout_p`` each level's weights get their own mask."""
    out, _, _, ks, vs, _, _ = _forward(
        torch.ops.mka._mka_fwd, (_mka_fwd_impl, _mka_setup, _mka_backward),
        (q, k, v, lam, beta, mem_k, mem_v, k_state, v_state, causal, scale, window, dropout_p,
         _seed(dropout_p), _State.token))
    return out, ks, vs


for _name, _fn in (("attention", attention), ("route_fuse", route_fuse), ("fastmka", fastmka),
                   ("mka", mka)):
    _lib.impl(_name, _fn, "CompositeImplicitAutograd")

__all__: Sequence[str] = ("attention", "route_fuse", "fastmka", "mka")

