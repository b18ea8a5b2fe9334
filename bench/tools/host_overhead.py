"""Host (CPU) time per call against GPU time per call for the ops of `mka bench` at one
shape: where the host's share of a call reaches the GPU's, the GPU idles between calls and
the benchmark's event timings measure Python and the launchers, not the kernels.

Host time: warm calls queued behind a long sleep kernel (the GPU runs behind, and the launch
queue never fills: a full one would block the host and count GPU time as host time).
GPU time: the benchmark's timer (mka.bench.time_ms: calls back to back between CUDA events).
Run: python bench/tools/host_overhead.py [--T 1024] [--impls attention,fastmka]"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from mka.bench import OPS, Shape, time_ms


def host_us(call, reps: int) -> float:
    """Median host time of one call, 4 calls at a time behind ~20 ms of GPU sleep (2 calls
    before them untimed: the first after a synchronization runs cold)."""
    times = []
    for _ in range(reps):
        torch.cuda.synchronize()
        torch.cuda._sleep(30_000_000)
        call()
        call()
        t0 = time.perf_counter()
        for _ in range(4):
            call()
        times.append((time.perf_counter() - t0) / 4 * 1e6)
    torch.cuda.synchronize()
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--B", type=int, default=16)
    ap.add_argument("--T", type=int, default=1024)
    ap.add_argument("--H", type=int, default=16)
    ap.add_argument("--G", type=int, default=16)
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--impls", default="attention,fastmka,fastmka+dlam,mka,sdpa.flash")
    a = ap.parse_args()
    shape = Shape(a.B, a.T, a.H, a.G, a.d)
    x = OPS.inputs(shape, "cuda", torch.bfloat16)
    print(f"{shape}, bf16, causal; us per call")
    print(f"{'impl':18s} {'host fwd':>9s} {'gpu fwd':>9s} {'host f+b':>9s} {'gpu f+b':>9s}")
    for name in a.impls.split(","):
        fn = OPS.impls[name].fn
        row = []
        for build in OPS.passes.values():  # fwd, fwd+bwd
            call = build(fn, x)
            row += [host_us(call, a.reps), time_ms(call, "cuda", reps=20) * 1e3]
        print(f"{name:18s} " + " ".join(f"{v:9.1f}" for v in row))


if __name__ == "__main__":
    main()
