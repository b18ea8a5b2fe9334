"""Recall (level 3) with its L1 window against DeepSeek's Native Sparse Attention and full
attention, forward and forward+backward, CUDA, bf16 (issue 21 item 6's anchor: NSA reported
9.0x forward and 6.0x backward against full attention at 64k).

NSA is fla-core's Triton kernel (``fla.ops.nsa.parallel_nsa``: compressed, selected and
sliding-window branches, gates given) with the paper's settings: top 16 blocks of 64 and a
window of 512; fla requires 16 or more query heads per kv head, so the shape is B 1, HQ 64,
H 4, d 64. Ours: ``mka.attention`` over the window of 512 plus ``recall_attention`` of the
top 16 chunks of 64 before it (selection included; ``--scores``), the two outputs summed —
MKA's levels 1 and 3 without the router or level 2. Full attention: SDPA causal (the kv heads
expanded to the query heads before timing) and ``mka.attention``. ``triton.testing.do_bench``
medians, ms:

    python bench/tools/nsa_vs_recall.py --seqs 8192,16384,32768,65536
"""
import argparse

import torch
import torch.nn.functional as F
import triton.testing as tt

import mka
from mka.memory.recall import recall_attention, simhash_planes

p = argparse.ArgumentParser()
p.add_argument("--seqs", default="8192,16384,32768,65536")
p.add_argument("--scores", default="hash,bound", help="recall scores to time (corners: slow)")
p.add_argument("--heads", type=int, default=64)
p.add_argument("--kv-heads", type=int, default=4)
p.add_argument("--head-dim", type=int, default=64)
args = p.parse_args()
try:
    from fla.ops.nsa import parallel_nsa
except ImportError as e:  # the wheel travels separately
    parallel_nsa = None
    print(f"fla-core not importable ({e}): NSA rows left out")
else:
    import fla.ops.nsa.parallel as _nsa

    if getattr(_nsa, "flash_attn_func", None) is None:
        # fla runs NSA's sliding-window branch through the flash-attn package; without it,
        # through mka.attention's window (the same kernel our rows' window takes, so the two
        # differ only in compression + selection against recall). flash-attn's
        # window_size=(W - 1, 0) is SPEC §1's window W.
        def _window_attention(q, k, v, causal, window_size):
            return mka.attention(q, k, v, causal=causal, window=window_size[0] + 1)
        _nsa.flash_attn_func = _window_attention
        print("flash-attn not installed: NSA's window branch runs on mka.attention")

dev, dt = "cuda", torch.bfloat16
HQ, H, d, C, TOP, W = args.heads, args.kv_heads, args.head_dim, 64, 16, 512
planes = simhash_planes(d, device=dev)


def timed(fn, backward_of=None):
    """ms of ``fn()`` without gradients, and of ``fn()`` then the backward of its output."""
    def fwd():
        with torch.no_grad():
            fn()
    fb = None
    if backward_of is not None:
        def both():
            for t in backward_of:
                t.grad = None
            out = fn()
            out.backward(torch.ones_like(out))
        fb = tt.do_bench(both, warmup=50, rep=300)
    return tt.do_bench(fwd, warmup=50, rep=300), fb


scores = [s for s in args.scores.split(",") if s]
names = ["sdpa", "attention"] + (["nsa"] if parallel_nsa is not None else []) + \
    [f"recall-{s}" for s in scores]
print(f"{torch.cuda.get_device_name()}, bf16, B 1, HQ {HQ}, H {H}, d {d}; top {TOP} of "
      f"{C}-token blocks, window {W}; ms forward / forward+backward (x: SDPA's time over it)")
print("T      " + "  ".join(f"{n:>26}" for n in names), flush=True)


def show(T, res):
    """One row, printed as soon as it is measured: a long run cut short keeps its rows."""
    base_f, base_b = res["sdpa"]
    cells = [f"{f:7.2f} / {b:7.2f} ({base_f / f:4.1f}x/{base_b / b:4.1f}x)" for f, b in res.values()]
    print(f"{T:<6} " + "  ".join(f"{c:>26}" for c in cells), flush=True)


for T in [int(s) for s in args.seqs.split(",")]:
    torch.manual_seed(0)
    mk = lambda n: torch.randn(1, T, n, d, device=dev, dtype=dt, requires_grad=True)  # noqa: E731
    q, k, v = mk(HQ), mk(H), mk(H)
    leaves = (q, k, v)
    kx, vx = (x.detach().repeat_interleave(HQ // H, 2).requires_grad_() for x in (k, v))
    qt = q.detach().transpose(1, 2).requires_grad_()
    kt, vt = kx.detach().transpose(1, 2).requires_grad_(), vx.detach().transpose(1, 2).requires_grad_()
    res = {"sdpa": timed(lambda: F.scaled_dot_product_attention(qt, kt, vt, is_causal=True),
                         (qt, kt, vt)),
           "attention": timed(lambda: mka.attention(q, k, v, causal=True), leaves)}
    del kx, vx, kt, vt
    if parallel_nsa is not None:
        gates = [torch.rand(1, T, HQ, device=dev, dtype=dt, requires_grad=True) for _ in range(3)]
        res["nsa"] = timed(lambda: parallel_nsa(q, k, v, *gates, block_counts=TOP, block_size=C,
                                                window_size=W), leaves + tuple(gates))
    for score in scores:
        res[f"recall-{score}"] = timed(
            lambda score=score: mka.attention(q, k, v, causal=True, window=W)
            + recall_attention(q, k, v, chunk=C, top=TOP, planes=planes, window=W,
                               score=score)[0], leaves)
    show(T, res)
    torch.cuda.empty_cache()
