"""Interleaved A/B timing of the forward kernels (MKA_CUDA_WGMMA = lockstep | pingpong) and
sdpa.flash at short sequences, where single benchmark rows moved by up to 13 % between runs:
every round times each variant once (median of `reps` CUDA-event timings), and the table
reports the median over rounds plus the spread (min-max) across rounds.
bf16, causal, B*T = 16k, H = 16, d = 128. Run: python bench/gpu_ab.py [--seqs 1024,2048,4096]"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import mka  # noqa: F401
from gpu_bench import H, TOKENS, D, flops_fwd, make_inputs, time_ms


def variants(G: int):
    def ours(mode):
        def run(q, k, v):
            os.environ["MKA_CUDA_WGMMA"] = mode
            try:
                return torch.ops.mka.attention(q, k, v, True)
            finally:
                del os.environ["MKA_CUDA_WGMMA"]
        return run

    def flash(q, k, v):
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                                  v.transpose(1, 2), is_causal=True,
                                                  enable_gqa=G != H).transpose(1, 2)
    return {"lockstep": ours("lockstep"), "pingpong": ours("pingpong"), "flash": flash}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seqs", default="1024,2048,4096")
    ap.add_argument("--groups", default="16,4")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--reps", type=int, default=20)
    a = ap.parse_args()
    print(f"{torch.cuda.get_device_name()}  fwd TFLOP/s, median over {a.rounds} interleaved rounds "
          f"(min-max), bf16 causal H={H} d={D} B*T={TOKENS}")
    for G in map(int, a.groups.split(",")):
        for T in map(int, a.seqs.split(",")):
            q, k, v, _, _ = make_inputs(TOKENS // T, T, G, seed=T + G)
            vs = variants(G)
            tf = {n: [] for n in vs}
            order = list(vs)
            for rnd in range(a.rounds):  # fresh order, pause: as gpu_bench.bench_shape
                random.Random(rnd).shuffle(order)
                for n in order:
                    fn = vs[n]
                    time.sleep(0.1)
                    ms = time_ms(lambda: fn(q, k, v), warmup=5, reps=a.reps)
                    tf[n].append(flops_fwd(TOKENS // T, T) / ms / 1e9)
            cells = [f"{n} {statistics.median(x):6.1f} ({min(x):.0f}-{max(x):.0f})"
                     for n, x in tf.items()]
            print(f"G={G:>2} T={T:>5}  " + "  ".join(cells), flush=True)


if __name__ == "__main__":
    main()
