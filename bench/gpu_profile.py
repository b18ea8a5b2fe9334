"""Which CUDA kernels mka.attention launches, and their GPU time, per kernel choice
(MKA_CUDA_WGMMA = lockstep | pingpong | 0): the torch profiler's kernel table for a few
forward and backward calls, bf16, causal, H = 16, d = 128. Also the target of
`ncu --kernel-name regex:attention_ python bench/gpu_profile.py --mode M --calls 1`.
Run: python bench/gpu_profile.py"""

from __future__ import annotations

import argparse
import os

import torch
from torch.profiler import ProfilerActivity, profile

import mka  # noqa: F401


def run(mode: str, B: int, T: int, G: int, calls: int, table: bool) -> None:
    os.environ["MKA_CUDA_WGMMA"] = mode
    g = torch.Generator(device="cuda").manual_seed(0)
    r = lambda *s: torch.randn(*s, device="cuda", dtype=torch.bfloat16, generator=g)  # noqa: E731
    q, k, v = (r(B, T, H, 128).requires_grad_(True) for H in (16, G, G))
    out = torch.ops.mka.attention(q, k, v, True)  # warm-up
    out.backward(torch.ones_like(out))
    torch.cuda.synchronize()
    if not table:
        for _ in range(calls):
            torch.ops.mka.attention(q, k, v, True).backward(torch.ones_like(out))
        torch.cuda.synchronize()
        return
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            torch.ops.mka.attention(q, k, v, True).backward(torch.ones_like(out))
        torch.cuda.synchronize()
    print(f"--- MKA_CUDA_WGMMA={mode}  B={B} T={T} G={G}, {calls} fwd+bwd calls")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=8, max_name_column_width=60))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", default="all")
    ap.add_argument("--T", type=int, default=4096)
    ap.add_argument("--B", type=int, default=4)
    ap.add_argument("--G", type=int, default=16)
    ap.add_argument("--calls", type=int, default=5)
    ap.add_argument("--no-table", action="store_true")
    a = ap.parse_args()
    for mode in (["lockstep", "pingpong", "0"] if a.mode == "all" else [a.mode]):
        run(mode, a.B, a.T, a.G, a.calls, not a.no_table)


if __name__ == "__main__":
    main()
