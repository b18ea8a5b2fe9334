"""Where an op's host time goes, on the GPU machine: cProfile of N forward+backward calls
(Python functions; a native launcher's time shows as its caller's, ops.py:_native), then the
torch profiler's CPU-side table (CUDA runtime calls: a cudaMalloc, cudaFree or synchronization
there blocks the host on the GPU). Run: python bench/host_profile.py --op fastmka"""

from __future__ import annotations

import argparse
import cProfile
import pstats

import torch
from torch.profiler import ProfilerActivity, profile

import mka  # noqa: F401

H, D = 16, 128


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--op", default="fastmka", choices=["attention", "fastmka", "mka"])
    ap.add_argument("--B", type=int, default=16)
    ap.add_argument("--T", type=int, default=1024)
    ap.add_argument("--G", type=int, default=16)
    ap.add_argument("--calls", type=int, default=50)
    ap.add_argument("--lam-grad", action="store_true")
    a = ap.parse_args()
    g = torch.Generator(device="cuda").manual_seed(0)
    r = lambda *s: torch.randn(*s, device="cuda", dtype=torch.bfloat16, generator=g)  # noqa: E731
    q, k, v = (r(a.B, a.T, h, D).requires_grad_(True) for h in (H, a.G, a.G))
    lam = torch.softmax(torch.randn(a.B, a.T, 2, device="cuda", generator=g), -1).to(torch.bfloat16)
    lam.requires_grad_(a.lam_grad)
    gout = r(a.B, a.T, H, D)
    ins = (q, k, v, lam) if a.lam_grad else (q, k, v)
    op = {"attention": lambda: torch.ops.mka.attention(q, k, v, True),
          "fastmka": lambda: torch.ops.mka.fastmka(q, k, v, lam, 0.9)[0],
          "mka": lambda: torch.ops.mka.mka(q, k, v, lam, 0.9)[0]}[a.op]

    def call():
        torch.autograd.grad(op(), ins, gout)

    for _ in range(5):
        call()
    pr = cProfile.Profile()
    for _ in range(a.calls):  # each call behind a sleep kernel: the launch queue never fills
        torch.cuda.synchronize()
        torch.cuda._sleep(30_000_000)
        pr.enable()
        call()
        pr.disable()
    torch.cuda.synchronize()
    print(f"--- {a.op} fwd+bwd, B={a.B} T={a.T} G={a.G}, {a.calls} calls: cProfile (s, all calls)")
    pstats.Stats(pr).sort_stats("tottime").print_stats(25)
    pstats.Stats(pr).sort_stats("cumulative").print_stats(25)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(10):
            torch.cuda.synchronize()
            torch.cuda._sleep(30_000_000)
            call()
        torch.cuda.synchronize()
    print(f"--- {a.op}: host-side table, 10 calls")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25,
                                    max_name_column_width=45))


if __name__ == "__main__":
    main()
