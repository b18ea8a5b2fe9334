"""Which CUDA kernels an op launches, and their GPU time, per kernel choice
(MKA_CUDA_WGMMA = lockstep | pingpong | 0): the torch profiler's kernel table for a few
forward and backward calls of mka.attention, mka.fastmka or mka.mka (--op), bf16, causal,
H = 16, d = 128; for fastmka and mka the table splits the op's time between attention, the
EMA scan passes and everything else. Also the target of
`ncu --kernel-name regex:attention_ python bench/gpu_profile.py --mode M --calls 1 --no-table`.
Run: python bench/gpu_profile.py [--op fastmka]"""

from __future__ import annotations

import argparse
import os

import torch
from torch.profiler import ProfilerActivity, profile

import mka  # noqa: F401


def run(op: str, mode: str, B: int, T: int, G: int, calls: int, table: bool,
        fwd_only: bool = False, lam_grad: bool = False, rows: int = 16) -> None:
    if mode == "auto":  # the library's own choice
        os.environ.pop("MKA_CUDA_WGMMA", None)
    else:
        os.environ["MKA_CUDA_WGMMA"] = mode
    g = torch.Generator(device="cuda").manual_seed(0)
    r = lambda *s: torch.randn(*s, device="cuda", dtype=torch.bfloat16, generator=g)  # noqa: E731
    q, k, v = (r(B, T, H, 128).requires_grad_(True) for H in (16, G, G))
    lam = torch.softmax(torch.randn(B, T, 2, device="cuda", generator=g), -1).to(torch.bfloat16)
    lam.requires_grad_(lam_grad)  # as a router's output: the backward also makes dlam
    fns = {"attention": lambda: torch.ops.mka.attention(q, k, v, True),
           "fastmka": lambda: torch.ops.mka.fastmka(q, k, v, lam, 0.9)[0],
           "mka": lambda: torch.ops.mka.mka(q, k, v, lam, 0.9)[0]}
    fn = fns[op]
    out = fn()  # warm-up
    out.backward(torch.ones_like(out))
    torch.cuda.synchronize()
    if not table:
        for _ in range(calls):
            fn().backward(torch.ones_like(out))
        torch.cuda.synchronize()
        return
    gout = torch.ones_like(out)

    def call():
        if fwd_only:
            with torch.no_grad():
                fn()
        else:
            fn().backward(gout)

    # Event time per call, calls queued back to back (as gpu_bench.py times them): against
    # the kernels' sum below it shows how long the GPU idles between them.
    for _ in range(3):
        call()
    ev = [torch.cuda.Event(enable_timing=True) for _ in range(calls + 1)]
    torch.cuda.synchronize()
    ev[0].record()
    for i in range(calls):
        call()
        ev[i + 1].record()
    torch.cuda.synchronize()
    per_call = sorted(ev[i].elapsed_time(ev[i + 1]) * 1e3 for i in range(calls))
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            call()
        torch.cuda.synchronize()
    what = "forward" if fwd_only else "fwd+bwd"
    what += ", lam with grad" if lam_grad else ""
    print(f"--- {op}, MKA_CUDA_WGMMA={mode}  B={B} T={T} G={G}, {calls} {what} calls")
    avgs = prof.key_averages()
    print(avgs.table(sort_by="cuda_time_total", row_limit=rows, max_name_column_width=60))
    kernels = sum(e.self_device_time_total for e in avgs) / calls
    print(f"per call: kernels {kernels:.1f} us, events (median) {per_call[calls // 2]:.1f} us")
    print_gaps(prof, calls)


def print_gaps(prof, calls: int) -> None:
    """The GPU's idle time before each kernel or memset (its start minus the previous one's
    end, from the profiler's trace), summed over the calls by kind of activity: where the GPU
    waits between launches."""
    import collections
    import json
    import tempfile

    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        prof.export_chrome_trace(f.name)
        trace = json.load(open(f.name))
    acts = sorted((e for e in trace["traceEvents"]
                   if e.get("cat") in ("kernel", "gpu_memset", "gpu_memcpy") and "dur" in e),
                  key=lambda e: e["ts"])
    gaps = collections.defaultdict(list)
    for prev, e in zip(acts, acts[1:]):
        gaps[e["name"][:60]].append(e["ts"] - (prev["ts"] + prev["dur"]))
    print(f"GPU idle before each activity (us per call, {calls} calls; count per call):")
    for name, g in sorted(gaps.items(), key=lambda kv: -sum(kv[1])):
        print(f"  {sum(g) / calls:8.1f}  {len(g) / calls:4.1f}  {name}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--op", default="attention", choices=["attention", "fastmka", "mka"])
    ap.add_argument("--mode", default="all", help="auto, lockstep, pingpong, 0 or all")
    ap.add_argument("--T", type=int, default=4096)
    ap.add_argument("--B", type=int, default=4)
    ap.add_argument("--G", type=int, default=16)
    ap.add_argument("--calls", type=int, default=5)
    ap.add_argument("--no-table", action="store_true")
    ap.add_argument("--fwd-only", action="store_true", help="forward calls only (no_grad)")
    ap.add_argument("--lam-grad", action="store_true", help="lam requires grad (dlam is made)")
    ap.add_argument("--rows", type=int, default=16, help="kernel table rows")
    a = ap.parse_args()
    for mode in (["auto", "lockstep", "pingpong", "0"] if a.mode == "all" else [a.mode]):
        run(a.op, mode, a.B, a.T, a.G, a.calls, not a.no_table, a.fwd_only, a.lam_grad, a.rows)


if __name__ == "__main__":
    main()
