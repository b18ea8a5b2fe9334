"""One decode step of attention over a long cached context, CUDA, bf16 (issue 21 item 6's
decode time against full attention, 8k-128k; NSA reported 11.6x at 64k): full attention
over every cached token (the native paged decode kernel, and SDPA over contiguous keys)
against the L1 window of 512 plus level-3 recall of the top 16 chunks of 64 before it
(``recall_decode``: selection by SimHash signatures or by the chunks' max/min keys, the
chosen chunks gathered from the pages and attended) — MKA's levels 1 and 3 without the
router or level 2. Each step is captured in a CUDA graph and replayed (device time, the
launches' host cost gone), and timed eagerly too; medians of CUDA-event timings, µs:

    python bench/tools/recall_decode_speed.py --seqs 8192,32768,131072 --batches 1,16
"""
import argparse
import statistics

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import mka  # noqa: F401  (registers torch.ops.mka)
from mka.memory import paged_attention
from mka.memory.recall import chunk_keys, recall_decode, signatures, simhash_planes

p = argparse.ArgumentParser()
p.add_argument("--seqs", default="8192,16384,32768,65536,131072")
p.add_argument("--batches", default="1,16")
p.add_argument("--heads", type=int, default=32)
p.add_argument("--kv-heads", type=int, default=8)
p.add_argument("--head-dim", type=int, default=128)
p.add_argument("--page-size", type=int, default=16)
p.add_argument("--scores", default="hash,bound,corners")
p.add_argument("--reps", type=int, default=200)
p.add_argument("--profile", type=int, default=0, metavar="N",
               help="also list each recall row's N most expensive kernels (device µs per step, "
                    "torch.profiler over 10 replays of its graph)")
args = p.parse_args()

dev, dt = "cuda", torch.bfloat16
H, G, d, S = args.heads, args.kv_heads, args.head_dim, args.page_size
C, TOP, W = 64, 16, 512
planes = simhash_planes(d, device=dev)


# Written before each timed call, outside its events: a cache of a few tens of MB (B 1 at 8k-16k)
# would otherwise be read from L2 by back-to-back calls, which a decode step between layers
# does not see.
flush = torch.empty(256 << 20, dtype=torch.uint8, device=dev)


def event_median(fn, reps):
    """Median µs of ``fn()`` over ``reps`` calls, each between two CUDA events, L2 flushed."""
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        flush.zero_()
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3)
    return statistics.median(times)


def sdpa(q, k, v):
    """SDPA's fused kernels only: its math fallback would repeat the kv heads (34 GB at B 16,
    128k) — a clear error instead."""
    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION,
                      SDPBackend.EFFICIENT_ATTENTION]):
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)


def kernel_table(replay, top):
    """The ``top`` kernels of 10 graph replays by device time: (name, µs per step, calls per
    step) — where a step's device time goes."""
    from torch.profiler import ProfilerActivity, profile
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            replay()
        torch.cuda.synchronize()
    rows = [(e.key, e.device_time_total / 10, e.count / 10) for e in prof.key_averages()
            if e.device_time_total > 0]
    return sorted(rows, key=lambda r: -r[1])[:top]


def graphed(fn):
    """``fn`` captured in a CUDA graph (after warm-up calls on a side stream): its replay."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g.replay


scores = [s for s in args.scores.split(",") if s]
names = ["full (paged)", "full (SDPA)"] + [f"window + recall ({s})" for s in scores]
print(f"{torch.cuda.get_device_name()}, bf16, H {H}, G {G}, d {d}, pages of {S}; window {W} + "
      f"top {TOP} chunks of {C}; µs per step, eager / graph (x: full (paged) graph over it)")
print("B   T       " + "  ".join(f"{n:>26}" for n in names), flush=True)
for B in [int(x) for x in args.batches.split(",")]:
    for T in [int(x) for x in args.seqs.split(",")]:
        torch.manual_seed(0)
        pages_per_seq = -(-T // S)
        k = torch.randn(B, pages_per_seq * S, G, d, device=dev, dtype=dt)
        v = torch.randn_like(k)
        # sequence b's pages are b's own, in a shuffled order (a pool's pages are not in order)
        order = torch.randperm(B * pages_per_seq, device=dev)
        k_pages = torch.empty(B * pages_per_seq, S, G, d, device=dev, dtype=dt)
        v_pages = torch.empty_like(k_pages)
        k_pages[order] = k.reshape(-1, S, G, d)
        v_pages[order] = v.reshape(-1, S, G, d)
        table = order.reshape(B, pages_per_seq).int()
        lens = torch.full((B,), T, device=dev, dtype=torch.int32)
        before = lens - 1  # the query row is the last cached token
        q = torch.randn(B, 1, H, d, device=dev, dtype=dt)
        chunks = chunk_keys(k[:, :T], C, "mean")
        signs = signatures(chunks, planes).to(torch.int8)  # (B, T / C, G, P)
        exact = {s: chunk_keys(k[:, :T], C, s) for s in ("bound", "corners")}
        kt, vt = k[:, :T].transpose(1, 2), v[:, :T].transpose(1, 2)
        qt = q.transpose(1, 2)

        steps = {
            "full (paged)": lambda: paged_attention(q, k_pages, v_pages, table, lens),
            "full (SDPA)": lambda: sdpa(qt, kt, vt),
        }
        for score in scores:
            def step(score=score):
                o1 = paged_attention(q, k_pages, v_pages, table, lens, window=W)
                o3 = recall_decode(q, k_pages, v_pages, table, signs, before, chunk=C, top=TOP,
                                   planes=planes, window=W, exact=exact.get(score), score=score)
                return o1 + o3
            steps[f"window + recall ({score})"] = step
        with torch.no_grad():
            replays = {name: graphed(fn) for name, fn in steps.items()}
            res = {name: (event_median(fn, args.reps), event_median(replays[name], args.reps))
                   for name, fn in steps.items()}
        base = res["full (paged)"][1]  # printed as measured: a run cut short keeps its rows
        print(f"{B:<3} {T:<7} " + "  ".join(f"{e:7.1f} / {g:7.1f} ({base / g:5.2f}x)".rjust(26)
                                           for e, g in res.values()), flush=True)
        for name in [n for n in replays if n.startswith("window") and args.profile]:
            print(f"    {name}, B {B}, T {T}: µs per step, calls per step, kernel")
            with torch.no_grad():
                for kname, us, calls in kernel_table(replays[name], args.profile):
                    print(f"    {us:9.1f} {calls:5.1f}  {kname[:100]}", flush=True)
        del replays
        del k, v, k_pages, v_pages, kt, vt
        torch.cuda.empty_cache()

