"""Decoding with the DRAM tier (SPEC §7.3) at long contexts: a stack of MKA layers (window,
level 2 over EMA summaries, level 3 by recall) prefilled to each context length in steps,
then decode steps timed. Reports, per context: the device-side bytes the cache holds (pages
in use, summaries, signatures, states) against the full KV bytes of the context, the host
bytes, the PCIe bytes per decode step (chunks recalled from host memory, chunks spilled to
it), and the step time — beside the all-resident cache (``--resident-max``) and beside full
attention over the whole KV cache, GQA layers of the same shape (``--full-max``), where they
fit. A decode step reads about what the device side holds (the window's pages, every summary
and signature, the recalled chunks): the HBM bytes per step.

    python bench/tools/dram_tier.py --contexts 16384,65536,262144,1048576 --device cpu
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from mka.memory import HostTier, PagedKVCache
from mka.nn import GroupedQueryAttention, MKAAttention


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run(args, context: int, mode: str) -> dict:
    """One context under ``mode``: "resident", "host tier" or "full attention"."""
    torch.manual_seed(0)
    dev, dt = torch.device(args.device), getattr(torch, args.dtype)
    host = mode == "host tier"
    if mode == "full attention":
        make = lambda: GroupedQueryAttention(args.n_embd, args.heads, args.kv_heads)
    else:
        make = lambda: MKAAttention(args.n_embd, args.heads, args.kv_heads, levels=3,
                                    recall_chunk=args.chunk, recall_top=args.top,
                                    window=args.window, ema_stride=args.chunk,
                                    recall_score=args.score)
    layers = [make().to(dev, dt).eval() for _ in range(args.layers)]
    tier = (HostTier(args.host_gib << 30, pinned=dev.type == "cuda", step_tokens=args.step)
            if host else None)  # page-locked on the GPU host: asynchronous copies
    total = context + 1 + args.decode
    cache = PagedKVCache([m.cache_spec() for m in layers], 1, max_tokens=total,
                         page_size=args.page_size, device=dev, dtype=dt, host=tier)
    x = torch.randn(1, total, args.n_embd, device=dev, dtype=dt)

    def forward(h: torch.Tensor) -> None:
        for m, c in zip(layers, cache):
            h = m(h, cache=c)

    with torch.no_grad():
        start = time.perf_counter()
        for t in range(0, context, args.step):
            forward(x[:, t:min(t + args.step, context)])
        _sync(dev)
        prefill_s = time.perf_counter() - start
        forward(x[:, context:context + 1])  # untimed: spills the prefill's last chunks
        read0 = sum(c.host.read_bytes for c in cache) if host else 0
        stored0 = cache.host_bytes()
        times = []
        for t in range(context + 1, total):
            _sync(dev)
            t0 = time.perf_counter()
            forward(x[:, t:t + 1])
            _sync(dev)
            times.append(time.perf_counter() - t0)
    spec = layers[0].cache_spec()
    kv = total * spec.bytes_per_token(dt) * args.layers
    pages = {p for s in cache.seqs for p in cache.table.pages(s) if p >= 0}
    page_bytes = len(pages) * sum(m.cache_spec().bytes_per_page(args.page_size, dt) for m in layers)
    states = sum(t.numel() * t.element_size() for c in cache for t in c.states.values())
    read = (sum(c.host.read_bytes for c in cache) - read0) / args.decode if host else 0
    written = (cache.host_bytes() - stored0) / args.decode
    return dict(context=context, mode=mode, kv_mb=kv / 2**20,
                device_mb=(page_bytes + states) / 2**20, device_pct=100 * (page_bytes + states) / kv,
                host_mb=cache.host_bytes() / 2**20, read_kb=read / 2**10, write_kb=written / 2**10,
                step_ms=1e3 * statistics.median(times), prefill_s=prefill_s)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--contexts", default="16384,65536")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--n-embd", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--chunk", type=int, default=64)
    p.add_argument("--top", type=int, default=8)
    p.add_argument("--score", default="hash", help="recall_score: hash, mean, bound, corners")
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--step", type=int, default=1024, help="prefill step (tokens)")
    p.add_argument("--decode", type=int, default=64,
                   help="decode steps timed (64: one chunk spills on the way)")
    p.add_argument("--host-gib", type=int, default=16)
    p.add_argument("--resident-max", type=int, default=65536,
                   help="longest context also run with every page resident")
    p.add_argument("--full-max", type=int, default=0,
                   help="longest context also run with full attention (GQA) over every page")
    args = p.parse_args()
    if args.decode < 1:
        p.error(f"--decode: must be at least 1 (steps timed), got {args.decode}")
    print(f"{args.layers} MKA layers, d_model {args.n_embd}, H {args.heads}, G {args.kv_heads}, "
          f"window {args.window}, chunk {args.chunk}, top {args.top}, {args.dtype} on {args.device}")
    print("| context | cache | full KV MB | device MB (% of KV) | host MB | PCIe KB/step: "
          "recalled + spilled | decode ms/step | prefill s |")
    print("|---|---|---|---|---|---|---|---|", flush=True)
    for n in (int(c) for c in args.contexts.split(",")):
        modes = (["full attention"] if n <= args.full_max else []) + \
                (["resident"] if n <= args.resident_max else []) + ["host tier"]
        for mode in modes:
            r = run(args, n, mode)
            print(f"| {r['context']} | {r['mode']} | {r['kv_mb']:.1f} | {r['device_mb']:.1f} "
                  f"({r['device_pct']:.1f}%) | {r['host_mb']:.1f} | {r['read_kb']:.0f} + "
                  f"{r['write_kb']:.0f} | {r['step_ms']:.2f} | {r['prefill_s']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
