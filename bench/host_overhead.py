"""Host (CPU) time per call against GPU time per call, for the benchmarked ops at one shape:
where the host's share of a call reaches the GPU's, the GPU idles between calls and event
timings (bench/gpu_bench.py) measure Python and the launchers, not the kernels.
Host time: warm calls queued behind a long sleep kernel (the GPU runs behind, and the launch
queue never fills: a full one would block the host and count GPU time as host time);
GPU time: N calls to the final synchronization. Run: python bench/host_overhead.py [--T 1024]"""

from __future__ import annotations

import argparse
import time

import torch

import mka  # noqa: F401

H, D = 16, 128


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--B", type=int, default=16)
    ap.add_argument("--T", type=int, default=1024)
    ap.add_argument("--G", type=int, default=16)
    ap.add_argument("--calls", type=int, default=20)
    a = ap.parse_args()
    g = torch.Generator(device="cuda").manual_seed(0)
    r = lambda *s: torch.randn(*s, device="cuda", dtype=torch.bfloat16, generator=g)  # noqa: E731
    q, k, v = (r(a.B, a.T, h, D).requires_grad_(True) for h in (H, a.G, a.G))
    lam = torch.softmax(torch.randn(a.B, a.T, 2, device="cuda", generator=g), -1).to(torch.bfloat16)
    lam_g = lam.detach().requires_grad_(True)
    gout = r(a.B, a.T, H, D)
    fns = {
        "mka.attention": lambda: torch.ops.mka.attention(q, k, v, True),
        "mka.fastmka": lambda: torch.ops.mka.fastmka(q, k, v, lam, 0.9)[0],
        "mka.fastmka+dlam": lambda: torch.ops.mka.fastmka(q, k, v, lam_g, 0.9)[0],
        "mka.mka": lambda: torch.ops.mka.mka(q, k, v, lam, 0.9)[0],
        "sdpa.flash": lambda: torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True).transpose(1, 2),
    }
    print(f"B={a.B} T={a.T} H={H} G={a.G} d={D}, bf16, causal; us per call, {a.calls} calls")
    print(f"{'impl':18s} {'host fwd':>9s} {'gpu fwd':>9s} {'host f+b':>9s} {'gpu f+b':>9s}")
    for name, fn in fns.items():
        ins = (q, k, v, lam_g) if "dlam" in name else (q, k, v)

        def fwd():
            with torch.no_grad():
                fn()

        def fwd_bwd():
            torch.autograd.grad(fn(), ins, gout)

        row = []
        for call in (fwd, fwd_bwd):
            for _ in range(5):
                call()
            host = []
            for _ in range(a.calls // 4):  # 6 calls behind ~20 ms of GPU sleep: the last 4
                torch.cuda.synchronize()   # timed (the first after a synchronization run cold)
                torch.cuda._sleep(30_000_000)
                call()
                call()
                t0 = time.perf_counter()
                for _ in range(4):
                    call()
                host.append((time.perf_counter() - t0) / 4)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(a.calls):
                call()
            torch.cuda.synchronize()
            row += [sorted(host)[len(host) // 2] * 1e6, (time.perf_counter() - t0) / a.calls * 1e6]
        print(f"{name:18s} " + " ".join(f"{x:9.1f}" for x in row))


if __name__ == "__main__":
    main()
