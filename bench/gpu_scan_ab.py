"""Interleaved A/B of the EMA scan (the default: single-pass forward, 3-pass backward;
against MKA_CUDA_SCAN=3pass throughout) inside fastmka and mka: forward and forward+backward
ms, medians over rounds in a fresh order each (gpu_bench.bench_shape), bf16 causal H = 16
d = 128 B*T = 16k.
Run: python bench/gpu_scan_ab.py [--seqs 2048,8192] [--groups 16,4]"""

from __future__ import annotations

import argparse

import torch

import mka  # noqa: F401
from gpu_bench import TOKENS, bench_shape


def variants():
    ops = {"fastmka": lambda q, k, v, lam: torch.ops.mka.fastmka(q, k, v, lam, 0.9)[0],
           "mka": lambda q, k, v, lam: torch.ops.mka.mka(q, k, v, lam, 0.9)[0]}
    out = {}
    for name, op in ops.items():
        for mode in ("3pass", "1pass"):
            fn = (lambda op: lambda q, k, v, lam: op(q, k, v, lam))(op)
            fn.env = {"MKA_CUDA_SCAN": mode}  # anything but 3pass is the default
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
            rows = bench_shape(variants(), TOKENS // T, T, G, a.rounds, a.reps)
            cells = [f"{r['impl']} " + (f"error: {r['error'][:40]}" if "error" in r else
                                        f"{r['fwd_ms']:.3f} / {r['fwd_bwd_ms']:.3f}")
                     for r in rows]
            print(f"G={G:>2} T={T:>5}  " + "   ".join(cells), flush=True)


if __name__ == "__main__":
    main()
