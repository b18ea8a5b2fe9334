"""Timing of the ops next to PyTorch's scaled_dot_product_attention, shared by `mka bench`
and the pytest-benchmark suites in bench/.

Timing method: warm-up calls first, then the median of many timed calls (CUDA events on a
GPU, a monotonic clock on the CPU), inputs drawn once from a normal distribution (never zeros).
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

import mka  # noqa: F401  (registers torch.ops.mka)


def median_ms(fn: Callable[[], object], device: str, warmup: int = 3, reps: int = 10) -> float:
    """Median wall time of fn() in milliseconds after warm-up."""
    for _ in range(warmup):
        fn()
    times = []
    if device == "cuda":
        torch.cuda.synchronize()
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def attention_flops(B: int, H: int, Tq: int, Tk: int, d: int, causal: bool,
                    backward: bool = False) -> float:
    """Forward 4·B·H·Tq·Tk·d, halved for causal square attention; backward is 2.5x forward."""
    f = 4.0 * B * H * Tq * Tk * d * (0.5 if causal and Tq == Tk else 1.0)
    return f * 2.5 if backward else f


@dataclass
class Shape:
    B: int = 1
    T: int = 1024
    H: int = 8
    G: int = 8
    d: int = 64
    causal: bool = True


def make_inputs(s: Shape, device: str, dtype: torch.dtype, grad: bool, levels: int = 2):
    mk = lambda *sh: torch.randn(*sh, device=device, dtype=dtype, requires_grad=grad)  # noqa: E731
    q, k, v = mk(s.B, s.T, s.H, s.d), mk(s.B, s.T, s.G, s.d), mk(s.B, s.T, s.G, s.d)
    lam = torch.softmax(torch.randn(s.B, s.T, levels, device=device), -1).to(dtype)
    return q, k, v, lam.requires_grad_(grad)


def sdpa_bthd(q, k, v, causal: bool = True, backend=None):
    """SDPA on (B, T, H, d) tensors, with GQA where the heads differ."""
    gqa = q.shape[2] != k.shape[2]
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
    if backend is None:
        return F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal,
                                              enable_gqa=gqa).transpose(1, 2)
    from torch.nn.attention import sdpa_kernel
    with sdpa_kernel(backend):
        return F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal,
                                              enable_gqa=gqa).transpose(1, 2)


def op_callables(s: Shape, device: str, dtype: torch.dtype, backward: bool,
                 beta: float = 0.9) -> dict[str, Callable[[], object]]:
    """name -> a zero-argument call running that op (forward, or forward+backward)."""
    q, k, v, lam = make_inputs(s, device, dtype, backward)
    g = torch.randn_like(q)

    def run(f):
        if not backward:
            def call():
                with torch.no_grad():
                    return f()
            return call

        def call_bwd():
            out = f()
            torch.autograd.backward(out, g)
        return call_bwd

    calls = {
        "mka.attention": run(lambda: torch.ops.mka.attention(q, k, v, s.causal)),
        "mka.fastmka": run(lambda: torch.ops.mka.fastmka(q, k, v, lam, beta, causal=s.causal)[0]),
        "mka.mka": run(lambda: torch.ops.mka.mka(q, k, v, lam, beta, causal=s.causal)[0]),
        "sdpa": run(lambda: sdpa_bthd(q, k, v, s.causal)),
    }
    if device == "cuda":
        from torch.nn.attention import SDPBackend
        calls["sdpa[flash]"] = run(lambda: sdpa_bthd(q, k, v, s.causal, SDPBackend.FLASH_ATTENTION))
        calls["sdpa[cudnn]"] = run(lambda: sdpa_bthd(q, k, v, s.causal,
                                                     SDPBackend.CUDNN_ATTENTION))
    return calls


def call_overhead_us(device: str, reps: int = 200) -> dict[str, float]:
    """Per-call time of a torch.ops.mka.attention call on tiny inputs, next to SDPA's."""
    s = Shape(B=1, T=4, H=1, G=1, d=16 if device == "cpu" else 64)
    calls = op_callables(s, device, torch.float32, backward=False)
    return {n: median_ms(calls[n], device, warmup=20, reps=reps) * 1e3
            for n in ("mka.attention", "sdpa")}


def tflops(ms: float, flops: float) -> float:
    return flops / (ms * 1e-3) / 1e12 if ms > 0 and math.isfinite(ms) else float("nan")


def run_table(shapes: list[Shape], device: str, dtype: torch.dtype, progress: Optional[Callable] = None,
              warmup: int = 2, reps: int = 5) -> list[dict]:
    """Times every op of op_callables, forward and forward+backward, on each shape."""
    rows = []
    jobs = [(s, bwd) for s in shapes for bwd in (False, True)]
    for s, bwd in (progress(jobs) if progress else jobs):
        calls = op_callables(s, device, dtype, backward=bwd)
        fl = attention_flops(s.B, s.H, s.T, s.T, s.d, s.causal) * (3.5 if bwd else 1.0)
        base = None
        for name, fn in calls.items():
            try:
                ms = median_ms(fn, device, warmup=warmup, reps=reps)
                err = ""
            except (RuntimeError, ValueError) as e:  # e.g. a backend missing on this device
                ms, err = float("nan"), str(e).splitlines()[0][:60]
            if name == "sdpa":
                base = ms
            rows.append(dict(shape=f"B={s.B} T={s.T} H={s.H} G={s.G} d={s.d}",
                             pass_="fwd+bwd" if bwd else "fwd", op=name, ms=ms,
                             tflops=tflops(ms, fl), error=err))
        for r in rows[-len(calls):]:
            r["vs_sdpa"] = (base / r["ms"]) if base and r["ms"] == r["ms"] else float("nan")
    return rows


def format_table(rows: list[dict], device: str = "cuda") -> str:
    """Fixed-width table; throughput in TFLOP/s on a GPU, GFLOP/s on the CPU."""
    unit, mult = ("TFLOP/s", 1.0) if device == "cuda" else ("GFLOP/s", 1e3)
    head = f"{'shape':<30} {'pass':<8} {'op':<14} {'ms':>9} {unit:>8} {'x SDPA':>7}"
    lines = [head, "-" * len(head)]
    for r in rows:
        note = f"  ({r['error']})" if r["error"] else ""
        lines.append(f"{r['shape']:<30} {r['pass_']:<8} {r['op']:<14} {r['ms']:>9.3f} "
                     f"{r['tflops'] * mult:>8.2f} {r['vs_sdpa']:>7.2f}{note}")
    return "\n".join(lines)
