"""Interleaved A/B of the EMA scan (the single pass, the default, against MKA_CUDA_SCAN=3pass)
inside fastmka and mka: forward and forward+backward ms, median over rounds (each round a fresh
order, as gpu_bench.bench_shape), bf16 causal H = 16 d = 128 B*T = 16k.
Run: python bench/gpu_scan_ab.py [--seqs 2048,8192] [--groups 16,4]"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch

import mka  # noqa: F401
from gpu_bench import TOKENS, make_inputs, timed_pair


def variants():
    ops = {"fastmka": lambda q, k, v, lam: torch.ops.mka.fastmka(q, k, v, lam, 0.9)[0],
           "mka": lambda q, k, v, lam: torch.ops.mka.mka(q, k, v, lam, 0.9)[0]}
    out = {}
    for name, op in ops.items():
        for mode in ("3pass", "1pass"):
            fn = (lambda op: lambda q, k, v, lam: op(q, k, v, lam))(op)
            fn.env = {"MKA_CUDA_SCAN": mode}  # anything but 3pass is the single pass
            out[f"{name}.{mode}"] = fn
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seqs", default="1024,2048,8192,16384")
    ap.add_argument("--groups", default="16,4")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--reps", type=int, default=10)
    a = ap.parse_args()
    print(f"{torch.cuda.get_device_name()}  ms fwd / fwd+bwd, median of {a.rounds} rounds")
    for G in map(int, a.groups.split(",")):
        for T in map(int, a.seqs.split(",")):
            q, k, v, lam, gout = make_inputs(TOKENS // T, T, G, seed=T + G)
            vs = variants()
            times = {n: ([], []) for n in vs}
            order = list(vs)
            for rnd in range(a.rounds):
                random.Random(rnd).shuffle(order)
                for n in order:
                    time.sleep(0.1)
                    f, fb = timed_pair(vs[n], q, k, v, lam, gout, a.reps)
                    times[n][0].append(f)
                    times[n][1].append(fb)
            cells = [f"{n} {statistics.median(f):.3f} / {statistics.median(fb):.3f}"
                     for n, (f, fb) in times.items()]
            print(f"G={G:>2} T={T:>5}  " + "   ".join(cells), flush=True)


if __name__ == "__main__":
    main()
