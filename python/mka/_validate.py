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
    if ref is not None:
        _same_device(t, name, ref, ref_name)


def _same_device(t: Tensor, name: str, ref: Tensor, ref_name: str) -> None:
    if t.device != ref.device:
        _fail(f"{name}: is on {t.device} but {ref_name} is on {ref.device}")


def _same_dtype(t: Tensor, name: str, ref: Tensor, ref_name: str) -> None:
    if t.dtype != ref.dtype:
        _fail(f"{name}: dtype {t.dtype} does not match {ref_name}'s {ref.dtype}")


def _supported(t: Tensor, name: str) -> None:
    kind = t.device.type
    ok = CUDA_DTYPES if kind == "cuda" else CPU_DTYPES
    if kind not in ("cpu", "cuda"):
        _fail(f"{name}: device {t.device} is not supported (cpu, cuda)")
    if t.dtype not in ok:
        _fail(f"{name}: dtype {t.dtype} is not supported on {kind} "
              f"({', '.join(str(d) for d in ok)})")


# The largest |scale| of inputs below float64: their kernels compute in float32, the GPU ones
# with scale * log2(e) (cpp/include/mka/problem.h: kMaxFloatScale).
MAX_FLOAT_SCALE = 3.4028234663852886e38 / 1.4426950408889634


def _check_options(causal, scale, window, dtype: torch.dtype) -> None:
    """causal, scale and window of an attention call (SPEC §1, §4)."""
    if not isinstance(causal, bool):
        _fail(f"causal: must be True or False, got {_short(causal)}")
    if window is not None and not (_is_int(window) and window >= 1):
        _fail(f"window: must be at least 1 (an integer, or None for no window), got {_short(window)}")
    if scale is not None and not (_is_real(scale) and abs(scale) < float("inf")):
        _fail(f"scale: must be a finite number or None, got {_short(scale)}")
    if scale is not None and dtype != torch.float64 and abs(scale) > MAX_FLOAT_SCALE:
        _fail(f"scale: {scale} is out of float32's range for {dtype} inputs "
              f"(|scale| at most {MAX_FLOAT_SCALE:.4g})")


def check_attention(q, k, v, scale=None, window=None, causal=True, dropout_p=0.0,
                    seed=None) -> None:
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
    kind = q.device.type
    if kind == "cuda" and d not in CUDA_HEAD_DIMS:
        _fail(f"q: head dim {d} is not supported on cuda {CUDA_HEAD_DIMS}")
    if kind == "cpu" and not 1 <= d <= CPU_MAX_HEAD_DIM:
        _fail(f"q: head dim {d} is not supported on cpu (1 to {CPU_MAX_HEAD_DIM})")
    _check_options(causal, scale, window, q.dtype)
    check_dropout(dropout_p, seed)


def attention_takes(q: Tensor) -> bool:
    """Whether the attention ops (attention, fastmka, mka) take queries like ``q`` (device,
    head dim): the paged ops take more (CUDA head dims up to 256), so a caller choosing
    between them asks first."""
    d, kind = q.shape[-1], q.device.type
    return d in CUDA_HEAD_DIMS if kind == "cuda" else kind == "cpu" and 1 <= d <= CPU_MAX_HEAD_DIM


def check_dropout(dropout_p, seed) -> None:
    """Attention dropout (SPEC §3.5): p in [0, 1) and a seed with it."""
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)) \
            or not 0.0 <= dropout_p < 1.0:
        _fail(f"dropout_p: must be a float in [0, 1), got {_short(dropout_p)}")
    if dropout_p > 0 and (seed is None or seed.dtype != torch.int64 or seed.numel() != 1):
        _fail("seed: a one-element int64 tensor is required with dropout_p > 0")


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


def check_paged(x, k_pages, v_pages, block_table, lens, lens_name: str, *, v=None,
                causal=True, scale=None, window=None, page_states=None, beta=None,
                lam=None) -> None:
    """The paged ops' inputs (SPEC §7.1): ``x`` is ``q: (B, Tq, H, dk)`` for attention or the
    new keys ``k: (B, T, G, dk)`` for a write (with ``v``). Shapes, dtypes and devices only:
    index values are checked where the op runs (natively, or on the host)."""
    writing = lens_name == "cache_seqlens"
    _tensor(k_pages, "k_pages", 4, "(P, S, G, dk)")
    _supported(k_pages, "k_pages")
    P, S, G, dk = k_pages.shape
    if S < 1 or G < 1:
        _fail(f"k_pages: expected (P, S, G, dk) with a page size and heads >= 1, got {tuple(k_pages.shape)}")
    if v_pages is not None:
        _tensor(v_pages, "v_pages", 4, "(P, S, G, dv)", k_pages, "k_pages")
        _same_dtype(v_pages, "v_pages", k_pages, "k_pages")
        if tuple(v_pages.shape[:3]) != (P, S, G):
            _fail(f"v_pages: expected (P, S, G, dv) = ({P}, {S}, {G}, dv) matching k_pages, "
                  f"got {tuple(v_pages.shape)}")
    dv = (k_pages if v_pages is None else v_pages).shape[3]
    name = "k" if writing else "q"
    layout = "(B, T, G, dk)" if writing else "(B, Tq, H, dk)"
    _tensor(x, name, 4, layout, k_pages, "k_pages")
    _same_dtype(x, name, k_pages, "k_pages")
    B = x.shape[0]
    if x.shape[3] != dk:
        _fail(f"{name}: expected head dim dk = {dk} of k_pages, got shape {tuple(x.shape)}")
    if writing:
        if x.shape[2] != G:
            _fail(f"k: expected G = {G} key/value heads of k_pages, got shape {tuple(x.shape)}")
        if (v is None) != (v_pages is None):
            _fail("v: give v and v_pages together (both None: the values are the keys)")
        if v is not None:
            _tensor(v, "v", 4, "(B, T, G, dv)", k_pages, "k_pages")
            _same_dtype(v, "v", k_pages, "k_pages")
            if tuple(v.shape) != (*x.shape[:3], dv):
                _fail(f"v: expected shape {(*x.shape[:3], dv)}, got {tuple(v.shape)}")
    elif x.shape[2] % G:
        _fail(f"q: the number of query heads H = {x.shape[2]} must be a multiple of the "
              f"key/value heads G = {G}")
    for t, tname, shape in ((block_table, "block_table", "(B, W) int32"),
                            (lens, lens_name, "(B,) int32")):
        if not isinstance(t, Tensor) or t.dtype != torch.int32 or t.device != k_pages.device:
            _fail(f"{tname}: expected an int32 tensor {shape} on {k_pages.device}, got "
                  f"{_short(t) if not isinstance(t, Tensor) else f'{t.dtype} on {t.device}'}")
    if block_table.dim() != 2 or block_table.shape[0] != B:
        _fail(f"block_table: expected shape (B, W) with B = {B}, got {tuple(block_table.shape)}")
    if tuple(lens.shape) != (B,):
        _fail(f"{lens_name}: expected shape (B,) = ({B},), got {tuple(lens.shape)}")
    _check_options(causal, scale, window, k_pages.dtype)
    if k_pages.device.type == "cpu" and not 1 <= max(dk, dv) <= CPU_MAX_HEAD_DIM:
        _fail(f"k_pages: head dim {max(dk, dv)} is not supported on cpu (1 to {CPU_MAX_HEAD_DIM})")
    if page_states is None:
        return
    if not (_is_real(beta) and 0.0 <= beta < 1.0):
        _fail(f"beta: must be a float in [0, 1), got {_short(beta)}")
    if v_pages is None or dv != dk:
        _fail("v_pages: MKA's level 2 needs value pages of the keys' head dim")
    sdt = torch.float64 if k_pages.dtype == torch.float64 else torch.float32
    for t, tname in zip(page_states, ("k_page_states", "v_page_states")):
        _tensor(t, tname, 3, "(P, G, d)", k_pages, "k_pages")
        if t.dtype != sdt or tuple(t.shape) != (P, G, dk) or not t.is_contiguous():
            _fail(f"{tname}: expected a contiguous {sdt} tensor (P, G, d) = {(P, G, dk)}, got "
                  f"{t.dtype} {tuple(t.shape)}")
    if lam is not None:
        _tensor(lam, "lam", 3, "(B, Tq, L)", k_pages, "k_pages")
        if lam.shape[0] != B or lam.shape[1] != x.shape[1] or lam.shape[2] < 2:
            _fail(f"lam: expected shape (B, Tq, L >= 2) = ({B}, {x.shape[1]}, L), got {tuple(lam.shape)}")
