"""Input checks of SPEC §4, run before any native code (and by the fake kernels, so that
torch.compile reports the same errors). The native layer checks again."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

CPU_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
CUDA_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
CUDA_HEAD_DIMS = (64, 128)
CPU_MAX_HEAD_DIM = 256


def _fail(msg: str) -> None:
    raise ValueError(msg)


def _short(value) -> str:
    """A value for an error message: its repr when short, else its type (an array's repr
    would fill the screen)."""
    text = repr(value)
    return text if len(text) <= 40 else f"an object of type {type(value).__name__}"


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _tensor(t, name: str, ndim: int, layout: str, ref: Optional[Tensor] = None,
            ref_name: str = "q") -> None:
    if not isinstance(t, Tensor):
        _fail(f"{name}: expected a tensor {layout}, got {type(t).__name__}")
    if t.dim() != ndim:
        _fail(f"{name}: expected a {ndim}-d tensor {layout}, got shape {tuple(t.shape)}")
    if t.shape[-1] > 1 and t.numel() > 0 and t.stride(-1) != 1:
        _fail(f"{name}: the last dimension must be contiguous (stride 1), got stride {t.stride(-1)}")
    if ref is not None and t.device != ref.device:
        _fail(f"{name}: is on {t.device} but {ref_name} is on {ref.device}")


def _same_dtype(t: Tensor, name: str, ref: Tensor, ref_name: str) -> None:
    if t.dtype != ref.dtype:
        _fail(f"{name}: dtype {t.dtype} does not match {ref_name}'s {ref.dtype}")


def _supported(t: Tensor, name: str) -> None:
    ok = CUDA_DTYPES if t.device.type == "cuda" else CPU_DTYPES
    if t.device.type not in ("cpu", "cuda"):
        _fail(f"{name}: device {t.device} is not supported (cpu, cuda)")
    if t.dtype not in ok:
        _fail(f"{name}: dtype {t.dtype} is not supported on {t.device.type} "
              f"({', '.join(str(d) for d in ok)})")


# The largest |scale| of inputs below float64: their kernels compute in float32, the GPU ones
# with scale * log2(e) (cpp/include/mka/problem.h: kMaxFloatScale).
MAX_FLOAT_SCALE = 3.4028234663852886e38 / 1.4426950408889634


def check_attention(q, k, v, scale=None, window=None, causal=True) -> None:
    if not isinstance(causal, bool):
        _fail(f"causal: must be True or False, got {_short(causal)}")
    _tensor(q, "q", 4, "(B, Tq, H, d)")
    _tensor(k, "k", 4, "(B, Tk, G, d)", q)
    _tensor(v, "v", 4, "(B, Tk, G, d)", q)
    _supported(q, "q")
    _same_dtype(k, "k", q, "q")
    _same_dtype(v, "v", q, "q")
    B, Tq, H, d = q.shape
    if k.shape[0] != B or k.shape[3] != d:
        _fail(f"k: expected shape (B, Tk, G, d) = ({B}, Tk, G, {d}) matching q, got {tuple(k.shape)}")
    if v.shape != k.shape:
        _fail(f"v: expected the shape of k {tuple(k.shape)}, got {tuple(v.shape)}")
    G = k.shape[2]
    if G < 1:
        _fail(f"k: needs at least one key/value head, got G = {G}")
    if H % G != 0:
        _fail(f"q: the number of query heads H = {H} must be a multiple of the key/value heads G = {G}")
    if q.device.type == "cuda" and d not in CUDA_HEAD_DIMS:
        _fail(f"q: head dim {d} is not supported on cuda {CUDA_HEAD_DIMS}")
    if q.device.type == "cpu" and not 1 <= d <= CPU_MAX_HEAD_DIM:
        _fail(f"q: head dim {d} is not supported on cpu (1 to {CPU_MAX_HEAD_DIM})")
    if window is not None and not (_is_int(window) and window >= 1):
        _fail(f"window: must be at least 1 (an integer, or None for no window), got {_short(window)}")
    if scale is not None and not (_is_real(scale) and abs(scale) < float("inf")):
        _fail(f"scale: must be a finite number or None, got {_short(scale)}")
    if scale is not None and q.dtype != torch.float64 and abs(scale) > MAX_FLOAT_SCALE:
        _fail(f"scale: {scale} is out of float32's range for {q.dtype} inputs "
              f"(|scale| at most {MAX_FLOAT_SCALE:.4g})")


def check_route(k, v, lam, beta, k3, v3, k_state, v_state, lam_tokens: Optional[int],
                lam_shape: str, with_l3: bool) -> int:
    """Checks the EMA/routing inputs; returns the number of levels L. lam_tokens: the tokens
    lam covers (None: k's, for key-side routing)."""
    _tensor(k, "k", 4, "(B, T, G, d)")
    if lam_tokens is None:
        lam_tokens = k.shape[1]
    _tensor(v, "v", 4, "(B, T, G, d)", k, "k")
    _supported(k, "k")
    _same_dtype(v, "v", k, "k")
    if v.shape != k.shape:
        _fail(f"v: expected the shape of k {tuple(k.shape)}, got {tuple(v.shape)}")
    if not (_is_real(beta) and 0.0 <= beta < 1.0):
        _fail(f"beta: must be a float in [0, 1), got {_short(beta)}")
    _tensor(lam, "lam", 3, lam_shape, k, "k")
    if lam.dtype not in (k.dtype, torch.float32):
        _fail(f"lam: dtype {lam.dtype} must be float32 or the inputs' {k.dtype}")
    B = k.shape[0]
    if lam.shape[0] != B or lam.shape[1] != lam_tokens:
        _fail(f"lam: expected shape {lam_shape} = ({B}, {lam_tokens}, L), got {tuple(lam.shape)}")
    L = lam.shape[2]
    if L not in (2, 3):
        _fail(f"lam: expected L = 2 or 3 levels in its last dim, got {L}")
    if with_l3:
        for t, name in ((k3, "k3"), (v3, "v3")):
            if (t is not None) != (L == 3):
                _fail(f"{name}: required when lam has L = 3 levels" if L == 3 else
                      f"{name}: given, but lam has L = 2 levels (pass L = 3 to use it)")
            if t is not None:
                _tensor(t, name, 4, "(B, Tk, G, d)", k, "k")
                _same_dtype(t, name, k, "k")
                if t.shape != k.shape:
                    _fail(f"{name}: expected the shape of k {tuple(k.shape)}, got {tuple(t.shape)}")
    sdt = torch.float64 if k.dtype == torch.float64 else torch.float32
    for t, name in ((k_state, "k_state"), (v_state, "v_state")):
        if t is None:
            continue
        _tensor(t, name, 3, "(B, G, d)", k, "k")
        if t.dtype != sdt:
            _fail(f"{name}: dtype {t.dtype} must be {sdt} for {k.dtype} inputs")
        if tuple(t.shape) != (B, k.shape[2], k.shape[3]):
            _fail(f"{name}: expected shape (B, G, d) = {(B, k.shape[2], k.shape[3])}, got {tuple(t.shape)}")
    return L


def check_memory(q, k, mem_k, mem_v, L: int) -> None:
    for t, name in ((mem_k, "mem_k"), (mem_v, "mem_v")):
        if (t is not None) != (L == 3):
            _fail(f"{name}: required when lam has L = 3 levels (it may hold M = 0 tokens)"
                  if L == 3 else f"{name}: given, but lam has L = 2 levels (pass L = 3 to use it)")
        if t is None:
            continue
        _tensor(t, name, 4, "(B, M, G, d)", q)
        _same_dtype(t, name, q, "q")
        B, _, G, d = k.shape
        if t.shape[0] != B or t.shape[2] != G or t.shape[3] != d or t.shape != mem_k.shape:
            _fail(f"{name}: expected shape (B, M, G, d) = ({B}, M, {G}, {d}), got {tuple(t.shape)}")
