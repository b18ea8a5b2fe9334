"""Which CUDA kernels an op of `mka bench` launches, and their GPU time, per attention kernel
choice (mka.use_kernels(attention=...)): the torch profiler's kernel table for a few calls,
the per-call time of the benchmark's timer against the kernels' sum (the difference is the
GPU idling between launches), and the GPU's idle time before each kind of kernel.
With --no-table it only runs the calls: a target for
`ncu --kernel-name regex:attention_ python bench/tools/gpu_profile.py --no-table --calls 1`.
Run: python bench/tools/gpu_profile.py [--impl fastmka] [--mode all]"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import tempfile

import torch
from torch.profiler import ProfilerActivity, profile

import mka
from mka.bench import OPS, Shape, time_ms

MODES = ("pingpong", "lockstep", "tma", "mma")


def kernels(mode: str):
    return contextlib.nullcontext() if mode == "auto" else mka.use_kernels(attention=mode)


def run(impl: str, mode: str, shape: Shape, calls: int, table: bool, fwd_only: bool,
        rows: int) -> None:
    x = OPS.inputs(shape, "cuda", torch.bfloat16)
    call = OPS.passes["fwd" if fwd_only else "fwd+bwd"](OPS.impls[impl].fn, x)
    with kernels(mode):
        call()  # warm-up
        torch.cuda.synchronize()
        if not table:
            for _ in range(calls):
                call()
            torch.cuda.synchronize()
            return
        per_call_us = time_ms(call, "cuda", reps=calls) * 1e3
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(calls):
                call()
            torch.cuda.synchronize()
    what = "forward" if fwd_only else "fwd+bwd"
    print(f"--- {impl}, attention kernels: {mode}, {shape}, {calls} {what} calls")
    avgs = prof.key_averages()
    print(avgs.table(sort_by="cuda_time_total", row_limit=rows, max_name_column_width=60))
    kernel_us = sum(e.self_device_time_total for e in avgs) / calls
    print(f"per call: kernels {kernel_us:.1f} us, timer (median) {per_call_us:.1f} us")
    print_gaps(prof, calls)


def print_gaps(prof, calls: int) -> None:
    """The GPU's idle time before each kernel or memset (its start minus the previous one's
    end, from the profiler's trace), summed over the calls by kind of activity."""
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
    ap.add_argument("--impl", default="attention", choices=[i.name for i in OPS.on("cuda")])
    ap.add_argument("--mode", default="all", choices=("auto", "all") + MODES,
                    help="attention kernels (auto: the current default; all: each in turn)")
    ap.add_argument("--B", type=int, default=4)
    ap.add_argument("--T", type=int, default=4096)
    ap.add_argument("--H", type=int, default=16)
    ap.add_argument("--G", type=int, default=16)
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--calls", type=int, default=5)
    ap.add_argument("--no-table", action="store_true")
    ap.add_argument("--fwd-only", action="store_true", help="forward calls only")
    ap.add_argument("--rows", type=int, default=16, help="kernel table rows")
    a = ap.parse_args()
    shape = Shape(a.B, a.T, a.H, a.G, a.d)
    for mode in (("auto",) + MODES if a.mode == "all" else (a.mode,)):
        run(a.impl, mode, shape, a.calls, not a.no_table, a.fwd_only, a.rows)


if __name__ == "__main__":
    main()
