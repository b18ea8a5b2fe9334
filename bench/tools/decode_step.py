"""Where a small decode step's time goes, on a CUDA device (bench/results/h100_decode.md).

Three tables, each timed inside a CUDA graph (20 calls captured, median of 7 replays: at these
sizes a call is a few microseconds and the eager host would be what is measured):

1. ``paged``: `paged_attention` and `paged_mka_attention` per call at small caches (pages of
   16, a shuffled table).
2. ``layers``: `mka.layers.linear` and `add_layer_norm` against torch on the same tensors.
3. ``step``: a GPT (GPT-2-small size by default, random weights) decode step at 1k cached
   tokens: its kernels per step (torch.profiler over replays of `DecodeGraph`) and the replay
   time.

    python bench/tools/decode_step.py                    # all three, bf16
    python bench/tools/decode_step.py --only step --variant mka --batch 16
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F


def graph_us(fn, calls: int = 20) -> float:
    """Median µs per call of ``fn`` replayed from a CUDA graph of ``calls`` calls."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(7):
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / calls)
    return sorted(times)[3]


def paged(dtype: torch.dtype) -> None:
    from mka.memory import paged_attention, paged_mka_attention
    S = 16
    print("paged_attention and paged_mka_attention per call (graph), one query token per sequence")
    for B, H, G, d, n in ((1, 12, 12, 64, 256), (1, 12, 12, 64, 1088), (1, 12, 12, 64, 4096),
                          (16, 12, 12, 64, 1088), (64, 12, 12, 64, 1088), (1, 32, 8, 128, 1024),
                          (1, 32, 8, 128, 4096)):
        W = -(-n // S)
        kp = torch.randn(B * W, S, G, d, device="cuda", dtype=dtype)
        vp = torch.randn_like(kp)
        table = torch.randperm(B * W, device="cuda", dtype=torch.int32).reshape(B, W)
        lens = torch.full((B,), n, device="cuda", dtype=torch.int32)
        q = torch.randn(B, 1, H, d, device="cuda", dtype=dtype)
        kst, vst = (torch.randn(B * W, G, d, device="cuda") for _ in range(2))
        lam = torch.full((B, 1, 2), 0.5, device="cuda", dtype=dtype)
        us = graph_us(lambda: paged_attention(q, kp, vp, table, lens))
        mka = graph_us(lambda: paged_mka_attention(q, kp, vp, kst, vst, table, lens, lam, 0.9))
        kv = 2 * B * n * G * d * kp.element_size()
        print(f"  B {B:3d} H {H} G {G} d {d:3d} tokens {n:5d}: {us:7.1f} us  ({kv / us / 1e3:.0f} GB/s), "
              f"MKA {mka:7.1f} us ({mka / us:.2f}x)")


def layers(dtype: torch.dtype) -> None:
    from mka.layers import add_layer_norm, linear
    print("mka.layers against torch, per call (graph)")
    for M, K, N, act in ((1, 768, 2304, "none"), (1, 768, 768, "none"), (1, 768, 3072, "gelu"),
                         (1, 3072, 768, "none"), (1, 768, 50304, "none")):
        x = torch.randn(M, K, device="cuda", dtype=dtype)
        w = torch.randn(N, K, device="cuda", dtype=dtype) / 30
        b = torch.randn(N, device="cuda", dtype=dtype)
        ref = (lambda: F.gelu(F.linear(x, w, b))) if act == "gelu" else (lambda: F.linear(x, w, b))
        ours, theirs = graph_us(lambda: linear(x, w, b, act)), graph_us(ref)
        print(f"  linear {M} x {K} -> {N} {act:4s}: mka {ours:6.2f} us ({N * K * w.element_size() / ours / 1e3:.0f} GB/s), "
              f"torch {theirs:6.2f} us")
    for C in (768, 4096):
        x, r = (torch.randn(1, C, device="cuda", dtype=dtype) for _ in range(2))
        ln = torch.nn.LayerNorm(C, device="cuda", dtype=dtype)
        ours = graph_us(lambda: add_layer_norm(x, r, ln.weight, ln.bias, ln.eps))
        print(f"  add_layer_norm 1 x {C}: mka {ours:5.2f} us, torch add + layer_norm "
              f"{graph_us(lambda: ln(r + x)):5.2f} us")


def step(dtype: torch.dtype, variant: str, batch: int, context: int, size: str) -> None:
    from torch.profiler import ProfilerActivity, profile

    from mka.models import GPT, GPTConfig
    from mka.models.decode_graph import DecodeGraph
    sizes = {"gpt2-small": dict(n_layer=12, n_embd=768, n_head=12)}
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = GPT(GPTConfig(**sizes[size], block_size=2048, vocab_size=50304, attention=variant))
    model = model.to(dtype).eval()
    with torch.no_grad():
        caches = model.new_caches(batch)
        tokens = model(torch.randint(0, 50304, (batch, context), device="cuda"),
                       caches=caches)[0][:, -1].argmax(-1, keepdim=True)
        graph = DecodeGraph(model, caches, context + 64)
        for _ in range(4):  # the eager step, the capture, replays
            tokens = graph.step(tokens).argmax(-1, keepdim=True)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        for _ in range(40):
            graph.graph.replay()
        end.record()
        torch.cuda.synchronize()
        us = start.elapsed_time(end) * 1e3 / 40
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                graph.graph.replay()
            torch.cuda.synchronize()
    rows = sorted(prof.key_averages(), key=lambda e: -e.device_time_total)
    kernels = [e for e in rows if e.device_time_total > 0]
    total = sum(e.device_time_total for e in kernels) / 5
    print(f"GPT {size} {variant} B {batch}, {context} cached tokens: replay {us:.1f} us per step, "
          f"kernels {total:.1f} us in {sum(e.count for e in kernels) / 5:.0f} launches")
    for e in kernels[:14]:
        print(f"  {e.device_time_total / 5:8.1f} us  {e.count / 5:5.1f}x  {e.key[:100]}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", choices=("paged", "layers", "step"))
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16"))
    p.add_argument("--variant", default="mha")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--size", default="gpt2-small", choices=("gpt2-small",))
    a = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("decode_step.py: needs a CUDA device")
    dtype = getattr(torch, a.dtype)
    print(torch.cuda.get_device_name())
    if a.only in (None, "paged"):
        paged(dtype)
    if a.only in (None, "layers"):
        layers(dtype)
    if a.only in (None, "step"):
        step(dtype, a.variant, a.batch, a.context, a.size)


if __name__ == "__main__":
    main()
