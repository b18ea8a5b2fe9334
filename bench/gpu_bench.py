"""Side-by-side GPU benchmark (issue 3, item 4): forward and forward+backward TFLOP/s of
mka::attention, mka::fastmka and mka::mka next to scaled_dot_product_attention with the
flash and cuDNN backends. bf16, causal, B*T = 16k tokens, H = 16, d = 128, G in {16, 4}.

FLOPs: forward 4*B*H*T^2*d, halved for causal; backward 2.5x forward (so fwd+bwd = 3.5x).
The same FLOP count is used for every implementation (fastmka's fusion pass and mka's
second level are overhead, not credited work), so the columns compare wall time.
Timing: per shape, every implementation once per round (CUDA events around each of 10 calls
queued back to back after at least 3 and 0.1 s of warm-up calls, median), 5 rounds in a fresh
random order each, a 0.1 s pause before each implementation,
medians over rounds; a 1 s warm-up of the GPU first.
Gradients via torch.autograd.grad (no accumulation into .grad). Run: python bench/gpu_bench.py --out results.json  (prints a table last).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import mka  # noqa: F401

TOKENS, H, D = 16384, 16, 128


WARM_S = 0.1  # seconds of calls before each timing


def flops_fwd(B: int, T: int) -> float:
    return 4.0 * B * H * T * T * D / 2  # causal


def time_ms(fn, warmup: int = 3, reps: int = 10) -> float:
    """Median GPU time of one fn() call: calls queued back to back (as do_bench does), each
    between two CUDA events, one synchronization at the end. The host work of a call then
    overlaps the GPU work of the one before, as in a training step; a synchronization after
    every call would add each op's host overhead to its time (~0.15 ms per mka op call on the
    H100 host: bench/PERF_NOTES.md)."""
    # Warm up for a while, not for a few calls: after the pause before each implementation
    # the GPU's clocks need tens of ms to come back up, longer than a few short calls take
    # (1k rows timed whole rounds 2-4x slow with 3 warm-up calls).
    start, calls = time.perf_counter(), 0
    while calls < warmup or time.perf_counter() - start < WARM_S:
        fn()
        calls += 1
        if calls % 4 == 0:
            torch.cuda.synchronize()
    torch.cuda.synchronize()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
              for _ in range(reps)]
    for a, b in events:
        a.record()
        fn()
        b.record()
    torch.cuda.synchronize()
    return statistics.median(a.elapsed_time(b) for a, b in events)


def make_inputs(B: int, T: int, G: int, seed: int):
    g = torch.Generator(device="cuda").manual_seed(seed)
    r = lambda *s: torch.randn(*s, device="cuda", dtype=torch.bfloat16, generator=g)  # noqa: E731
    q, k, v = r(B, T, H, D), r(B, T, G, D), r(B, T, G, D)
    lam = torch.softmax(torch.randn(B, T, 2, device="cuda", generator=g), -1).to(torch.bfloat16)
    return q, k, v, lam, r(B, T, H, D)


def implementations(G: int):
    def sdpa(backend):
        def run(q, k, v, lam):
            with sdpa_kernel(backend):
                # SDPA wants (B, H, T, d); its GQA support expands heads itself.
                o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                                   v.transpose(1, 2), is_causal=True,
                                                   enable_gqa=G != H)
            return o.transpose(1, 2)
        return run

    def kernel(mode):  # mka.attention with another kernel choice (timed_pair sets the env)
        def run(q, k, v, lam):
            return torch.ops.mka.attention(q, k, v, True)
        run.env = {"MKA_CUDA_WGMMA": mode}
        return run

    def separate(fn):  # the scan's backward in its own passes, not through the attention's
        def run(q, k, v, lam):
            return fn(q, k, v, lam)
        run.env = {"MKA_CUDA_SCAN_THROUGH": "0"}
        return run

    fastmka = lambda q, k, v, lam: torch.ops.mka.fastmka(q, k, v, lam, 0.9)[0]  # noqa: E731
    mka = lambda q, k, v, lam: torch.ops.mka.mka(q, k, v, lam, 0.9)[0]  # noqa: E731
    fastmka_dlam = lambda q, k, v, lam: torch.ops.mka.fastmka(  # noqa: E731
        q, k, v, lam.detach().requires_grad_(q.requires_grad), 0.9)[0]

    return {
        "mka.attention": lambda q, k, v, lam: torch.ops.mka.attention(q, k, v, True),
        "mka.attn.lock": kernel("lockstep"),
        "mka.attn.pp": kernel("pingpong"),
        "mka.attn.mma": kernel("0"),
        # Gradients are taken for q, k, v (as for attention); lam is a constant, so fastmka's
        # backward skips dlam. "+dlam": lam requires grad as a router's output does (mka's
        # backward makes dlam either way, from its level sums).
        "mka.fastmka": fastmka,
        "mka.fastmka+dlam": fastmka_dlam,
        "mka.mka": mka,
        # The same ops with the scan's backward in separate passes (MKA_CUDA_SCAN_THROUGH=0).
        "mka.fastmka.sep": separate(fastmka),
        "mka.fastmka+dlam.sep": separate(fastmka_dlam),
        "mka.mka.sep": separate(mka),
        "sdpa.flash": sdpa(SDPBackend.FLASH_ATTENTION),
        "sdpa.cudnn": sdpa(SDPBackend.CUDNN_ATTENTION),
    }


def timed_pair(fn, q, k, v, lam, gout, reps: int) -> tuple[float, float]:
    """(forward ms, forward+backward ms) of one implementation, medians of `reps` timings."""
    env = getattr(fn, "env", {})
    os.environ.update(env)  # forward and backward both run under the kernel choice
    try:
        t_f = time_ms(lambda: fn(q, k, v, lam), warmup=3, reps=reps)
        qq, kk, vv = (x.detach().requires_grad_(True) for x in (q, k, v))

        def fwd_bwd():  # the op's gradients only: no accumulation into .grad
            torch.autograd.grad(fn(qq, kk, vv, lam), (qq, kk, vv), gout)

        return t_f, time_ms(fwd_bwd, warmup=3, reps=reps)
    finally:
        for key in env:
            del os.environ[key]


def bench_shape(impls, B, T, G, rounds: int, reps: int):
    """Every implementation once per round, rounds interleaved, so a drift of the GPU's clocks
    shifts all of them alike; each figure is the median over rounds (spread kept)."""
    q, k, v, lam, gout = make_inputs(B, T, G, seed=T + G)
    times = {name: [] for name in impls}
    errors = {}
    order = list(impls)
    for rnd in range(rounds):
        # A fresh order each round, and a pause before each implementation: a kernel timed
        # right after cuDNN's ran up to 12 % slow (the GPU had lowered its clocks), so no
        # implementation may always follow the same one or start on a hot GPU.
        random.Random(1000 * T + 10 * G + rnd).shuffle(order)
        for name in order:
            fn = impls[name]
            if name in errors:
                continue
            time.sleep(0.1)
            try:
                times[name].append(timed_pair(fn, q, k, v, lam, gout, reps))
            except Exception as e:  # a backend may refuse a shape: record why, keep going
                errors[name] = f"{type(e).__name__}: {e}"[:300]
    f = flops_fwd(B, T)
    rows = []
    for name in impls:
        res = {"impl": name, "B": B, "T": T, "G": G}
        if name in errors:
            res["error"] = errors[name]
        else:
            t_f = statistics.median(t for t, _ in times[name])
            t_fb = statistics.median(t for _, t in times[name])
            t_b = statistics.median(fb - fw for fw, fb in times[name])
            res.update(fwd_ms=t_f, fwd_bwd_ms=t_fb, bwd_ms=t_b, rounds=rounds,
                       fwd_bwd_ms_rounds=[round(t, 4) for _, t in times[name]],
                       fwd_ms_range=[min(t for t, _ in times[name]), max(t for t, _ in times[name])],
                       fwd_tflops=f / t_f / 1e9, fwd_bwd_tflops=3.5 * f / t_fb / 1e9,
                       bwd_tflops=2.5 * f / max(t_b, 1e-9) / 1e9)
        rows.append(res)
    return rows


def check_against_sdpa(B=1, T=2048, G=4):
    """The benchmarked op computes attention: rel. error of output and grads vs cuDNN/flash."""
    q, k, v, lam, gout = make_inputs(B, T, G, seed=1)
    outs = {}
    for name in ("mka.attention", "sdpa.flash"):
        qq, kk, vv = (x.detach().requires_grad_(True) for x in (q, k, v))
        o = implementations(G)[name](qq, kk, vv, lam)
        o.backward(gout)
        outs[name] = [o.float(), qq.grad.float(), kk.grad.float(), vv.grad.float()]
    rel = lambda a, b: ((a - b).norm() / b.norm()).item()  # noqa: E731
    return {n: rel(a, b) for n, a, b in zip(("out", "dq", "dk", "dv"), outs["mka.attention"],
                                             outs["sdpa.flash"])}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="gpu_bench.json")
    ap.add_argument("--seqs", default="1024,2048,4096,8192,16384")
    ap.add_argument("--groups", default="16,4")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--impls", default="", help="comma-separated subset (default: all)")
    args = ap.parse_args()
    chosen = [n for n in args.impls.split(",") if n]
    torch.backends.cuda.matmul.allow_tf32 = False
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
               "check_vs_flash": check_against_sdpa(), "rows": []}
    print("check mka.attention vs sdpa.flash (bf16, rel. error):", results["check_vs_flash"],
          flush=True)
    # Bring the GPU to its steady clocks before the first timed row (the first rows of an
    # earlier run read up to 13 % low against the same kernel timed right after them).
    q, k, v, lam, gout = make_inputs(TOKENS // 2048, 2048, 16, seed=0)
    warm = implementations(16)["sdpa.flash"]
    for _ in range(2000):  # about a second
        warm(q, k, v, lam)
    torch.cuda.synchronize()
    del q, k, v, lam, gout
    for G in map(int, args.groups.split(",")):
        for T in map(int, args.seqs.split(",")):
            impls = implementations(G)
            if chosen:
                impls = {n: f for n, f in impls.items() if n in chosen}
            for r in bench_shape(impls, TOKENS // T, T, G, args.rounds, args.reps):
                results["rows"].append(r)
                print(json.dumps(r), flush=True)
            torch.cuda.empty_cache()
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)
    print_table(results)


def print_table(results):
    rows = results["rows"]
    print(f"\n{results['device']}  bf16 causal H={H} d={D} B*T={TOKENS}  (TFLOP/s, medians of interleaved rounds; bwd = fwd_bwd - fwd)")
    print(f"{'G':>3} {'T':>6} {'impl':<17} {'fwd':>7} {'bwd':>7} {'fwd+bwd':>8} {'fwd_ms':>8} {'f+b_ms':>8}")
    for r in rows:
        if "error" in r:
            print(f"{r['G']:>3} {r['T']:>6} {r['impl']:<17} error: {r['error'][:60]}")
            continue
        print(f"{r['G']:>3} {r['T']:>6} {r['impl']:<17} {r['fwd_tflops']:7.1f} {r['bwd_tflops']:7.1f} "
              f"{r['fwd_bwd_tflops']:8.1f} {r['fwd_ms']:8.3f} {r['fwd_bwd_ms']:8.3f}")
    # The bars, computed from the same rows.
    by = {(r["G"], r["T"], r["impl"]): r for r in rows if "error" not in r}
    print("\nbars: attn fwd >= flash (T>=2k); attn bwd >= 0.8 flash; fastmka f+b <= 1.15 attn; mka f+b <= 2.3 attn")
    for (G, T, impl), r in sorted(by.items()):
        if impl != "mka.attention":
            continue
        fl, fm, mk = by.get((G, T, "sdpa.flash")), by.get((G, T, "mka.fastmka")), by.get((G, T, "mka.mka"))
        fd = by.get((G, T, "mka.fastmka+dlam"))
        fs, ms = by.get((G, T, "mka.fastmka.sep")), by.get((G, T, "mka.mka.sep"))
        fds = by.get((G, T, "mka.fastmka+dlam.sep"))
        parts = [f"G={G:>2} T={T:>5}"]
        if fl:
            parts.append(f"fwd/flash={r['fwd_tflops'] / fl['fwd_tflops']:.2f}")
            parts.append(f"bwd/flash={r['bwd_tflops'] / fl['bwd_tflops']:.2f}")
        if fm:
            parts.append(f"fastmka/attn={fm['fwd_bwd_ms'] / r['fwd_bwd_ms']:.2f}")
        if fd:
            parts.append(f"(+dlam {fd['fwd_bwd_ms'] / r['fwd_bwd_ms']:.2f})")
        if fds:
            parts.append(f"(+dlam sep {fds['fwd_bwd_ms'] / r['fwd_bwd_ms']:.2f})")
        if fs:
            parts.append(f"(sep {fs['fwd_bwd_ms'] / r['fwd_bwd_ms']:.2f})")
        if mk:
            parts.append(f"mka/attn={mk['fwd_bwd_ms'] / r['fwd_bwd_ms']:.2f}")
        if ms:
            parts.append(f"(sep {ms['fwd_bwd_ms'] / r['fwd_bwd_ms']:.2f})")
        print("  ".join(parts))


if __name__ == "__main__":
    main()
