"""GPU time of attention forward + backward per kernel choice at the short sequences small
models train at (the Shakespeare recipe's B 64, T 256, H 6, d 64 by default), with and
without dropout, against SDPA's cuDNN and flash backends: the sum of the profiled CUDA
kernels per call (so host time between calls does not count) and the three largest kernels.
Whether another kernel choice than the default wins at these shapes is what it answers.

    python bench/tools/short_seq_kernels.py [--shapes 64x256x6x64,16x1024x6x64] [--p 0.0,0.2]
"""

from __future__ import annotations

import argparse
import collections

import torch

MODES = ("tma", "lockstep", "pingpong", "mma")


def kernel_us(fn, calls: int) -> tuple[float, str]:
    """Summed CUDA kernel time per call of fn (µs) and its three largest kernels."""
    from torch.profiler import ProfilerActivity, profile
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    per = collections.Counter()
    for e in prof.key_averages():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            per[e.key] += e.device_time_total / calls
    top = ", ".join(f"{k[:40]} {v:.0f}" for k, v in per.most_common(3))
    return sum(per.values()), top


def rows(B: int, T: int, H: int, d: int, p: float):
    """(label, fn) per implementation: one fwd+bwd call each, causal, bf16."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    import mka
    q, k, v = (torch.randn(B, T, H, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    g = torch.randn(B, T, H, d, device="cuda", dtype=torch.bfloat16)
    qt, kt, vt = (x.detach().transpose(1, 2).requires_grad_() for x in (q, k, v))

    def ours(mode):
        def call():
            with mka.use_kernels(attention=mode):
                torch.autograd.backward(mka.attention(q, k, v, dropout_p=p), g)
        return call

    def sdpa(backend):
        def call():
            with sdpa_kernel(backend):
                out = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, dropout_p=p)
                torch.autograd.backward(out, g.transpose(1, 2))
        return call

    return ([(f"mka {m}", ours(m)) for m in MODES] +
            [("sdpa cudnn", sdpa(SDPBackend.CUDNN_ATTENTION)),
             ("sdpa flash", sdpa(SDPBackend.FLASH_ATTENTION))])


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="64x256x6x64,16x1024x6x64", help="BxTxHxd,...")
    ap.add_argument("--p", default="0.0,0.2", help="dropout probabilities")
    ap.add_argument("--calls", type=int, default=10)
    a = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("short_seq_kernels.py: needs a CUDA device")
    torch.manual_seed(0)
    print(torch.cuda.get_device_name(), torch.__version__)
    for shape in a.shapes.split(","):
        B, T, H, d = (int(x) for x in shape.split("x"))
        for p in (float(x) for x in a.p.split(",")):
            print(f"B {B} T {T} H {H} d {d}, dropout {p}: GPU µs per causal fwd+bwd (kernel sum)")
            for label, fn in rows(B, T, H, d, p):
                us, top = kernel_us(fn, a.calls)
                print(f"  {label:12s} {us:8.1f}  [{top}]")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
