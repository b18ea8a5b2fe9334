"""One small call of every CUDA kernel of mka, forward and backward, for compute-sanitizer
(memcheck, racecheck): run as `compute-sanitizer --tool memcheck python tests/cuda/sanitize_cases.py`.
Shapes are tiny but cover partial tiles, GQA, windows, Tq != Tk, both attention paths
(tensor cores for aligned half inputs, CUDA cores for float32), L = 3 and EMA states, and
attention dropout in each attention kernel that applies it."""

import torch

import mka

ops = torch.ops.mka


def r(*s, dtype=torch.bfloat16):
    return torch.randn(*s, device="cuda", dtype=dtype, requires_grad=True)


def main():
    torch.manual_seed(0)
    B, Tq, Tk, H, G = 1, 70, 90, 4, 2
    # Every attention kernel choice (on Hopper: two wgmma pipelines, and mma.sync).
    for mode in ("lockstep", "pingpong", "tma", "mma"):
        mka.set_kernels(attention=mode)
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            for d in (64, 128):
                q, k, v = r(B, Tq, H, d, dtype=dtype), r(B, Tk, G, d, dtype=dtype), r(B, Tk, G, d, dtype=dtype)
                ops.attention(q, k, v, True, None, 33).float().sum().backward()
                ops.attention(q, k, v, False).float().sum().backward()
    # Attention dropout: on Hopper the wgmma kernels' dropout instantiations (ping-pong and
    # lockstep forwards, both backwards), the mma.sync ones, and the CUDA-core ones (float32).
    for mode in ("pingpong", "lockstep", "tma", "mma"):
        mka.set_kernels(attention=mode)
        for dtype in (torch.bfloat16, torch.float32):
            for d in (64, 128):
                q, k, v = r(B, Tq, H, d, dtype=dtype), r(B, Tk, G, d, dtype=dtype), r(B, Tk, G, d, dtype=dtype)
                ops.attention(q, k, v, True, None, 33, 0.2).float().sum().backward()
    # More query blocks than SMs (256), in several waves of blocks.
    mka.set_kernels(attention="tma")
    for d in (64, 128):
        q, k, v = r(2, 1024, 16, d), r(2, 1024, 4, d), r(2, 1024, 4, d)
        ops.attention(q, k, v, True, None, 300).float().sum().backward()
    mka.set_kernels(attention="pingpong")
    d = 64
    q, k, v = r(B, Tq, H, d), r(B, Tk, G, d), r(B, Tk, G, d)
    k3, v3 = r(B, Tk, G, d), r(B, Tk, G, d)
    lam_k = torch.softmax(torch.randn(B, Tk, 3, device="cuda"), -1).to(torch.bfloat16).requires_grad_()
    lam_q = torch.softmax(torch.randn(B, Tq, 3, device="cuda"), -1).to(torch.bfloat16).requires_grad_()
    ks = torch.randn(B, G, d, device="cuda", requires_grad=True)
    vs = torch.randn(B, G, d, device="cuda", requires_grad=True)
    kf, vf, kso, vso = ops.route_fuse(k, v, lam_k, 0.9, k3, v3, ks, vs)
    (kf.float().sum() + vf.float().sum() + kso.sum() + vso.sum()).backward()
    # Views whose rows are not 16-byte aligned take the one-channel-per-thread scan.
    ku = torch.randn(B, Tk, G, d + 1, device="cuda", dtype=torch.bfloat16)[..., 1:].requires_grad_()
    lam2 = torch.softmax(torch.randn(B, Tk, 2, device="cuda"), -1).to(torch.bfloat16)
    kf, vf, kso, vso = ops.route_fuse(ku, v, lam2, 0.9)
    (kf.float().sum() + vf.float().sum()).backward()
    mk, mv = r(B, 20, G, d), r(B, 20, G, d)
    # The tensor-core backwards make the EMA scan's chunk sums for fastmka (lam with a
    # gradient) and run mka's level-2 scan (wgmma: through its write-out); `tma` runs the
    # warp-specialised backward with its row weights and dQ reductions.
    for mode in ("tma", "pingpong", "mma"):
        mka.set_kernels(attention=mode)
        out, kso, vso = ops.fastmka(q, k, v, lam_k, 0.9, k3, v3, ks, vs)
        (out.float().sum() + kso.sum()).backward()
        out, kso, vso = ops.mka(q, k, v, lam_q, 0.9, mk, mv, ks, vs, True, None, 25)
        (out.float().sum() + vso.sum()).backward()
    mka.set_kernels(attention="pingpong")
    # With dropout: each level's attention drops with its own mask (on Hopper through
    # ScanThrough where it applies).
    out, kso, vso = ops.fastmka(q, k, v, lam_k, 0.9, k3, v3, ks, vs, True, None, None, 0.2)
    (out.float().sum() + kso.sum()).backward()
    out, kso, vso = ops.mka(q, k, v, lam_q, 0.9, mk, mv, ks, vs, True, None, 25, 0.2)
    (out.float().sum() + vso.sum()).backward()
    # fastmka: the scan's backward through the attention backward's write-out (ScanThrough),
    # over three key blocks, with lam a constant and with its gradient (x staged by
    # cp.async); then with dlam by the separate passes (mka's level 2 above runs it too).
    T3 = 300
    q, k, v = r(B, T3, H, d), r(B, T3, G, d), r(B, T3, G, d)
    lam_c = torch.softmax(torch.randn(B, T3, 2, device="cuda"), -1).to(torch.bfloat16)
    for lam_t, through in ((lam_c, True), (lam_c.clone().requires_grad_(), True),
                           (lam_c.clone().requires_grad_(), False)):
        with mka.use_kernels(scan_through=through):
            out, kso, vso = ops.fastmka(q, k, v, lam_t, 0.9, None, None, ks, vs)
        (out.float().sum() + kso.sum() + vso.sum()).backward()
    paged_cases()
    recall_cases()
    torch.cuda.synchronize()
    print("sanitize cases: done")


def paged_cases():
    """The paged kernels (cuda/memory/): a prefill write with EMA checkpoints over pages of 16,
    decode and verification steps over split keys (plain, windowed, MKA's level 2), every
    head-dim kernel, and a table with an invalid entry (NaN rows, no access outside)."""
    from mka.memory import paged_attention, paged_mka_attention, paged_write_ema, paged_write_fused
    B, S, G, H, T = 2, 16, 2, 8, 700
    W = T // S + 2
    for dtype in (torch.bfloat16, torch.float32):
        for d in (64, 128, 256):
            P = B * W
            kp, vp = (torch.randn(P, S, G, d, device="cuda", dtype=dtype) for _ in range(2))
            kst, vst = (torch.zeros(P, G, d, device="cuda") for _ in range(2))
            table = torch.randperm(P, device="cuda").int().view(B, W)
            start = torch.zeros(B, dtype=torch.int32, device="cuda")
            k, v = (torch.randn(B, T, G, d, device="cuda", dtype=dtype) for _ in range(2))
            paged_write_ema(k, v, kp, vp, table, start, 0.9, kst, vst)
            lens = torch.tensor([T, T - 77], dtype=torch.int32, device="cuda")
            for Tq in (1, 3):
                q = torch.randn(B, Tq, H, d, device="cuda", dtype=dtype)
                lam = torch.full((B, Tq, 2), 0.5, device="cuda", dtype=dtype)
                paged_attention(q, kp, vp, table, lens)
                paged_attention(q, kp, vp, table, lens, window=100)
                paged_mka_attention(q, kp, vp, kst, vst, table, lens, lam, 0.9, window=50)
            # Decode-step writes (one pass): checkpoints, and FastMKA's fused rows.
            kst2, vst2 = kst.clone(), vst.clone()
            for n in (1, 3):
                start = torch.tensor([T - 77, T - 90], dtype=torch.int32, device="cuda")
                k1, v1 = k[:, :n].contiguous(), v[:, :n].contiguous()
                ks, vs = paged_write_ema(k1, v1, kp, vp, table, start, 0.9, kst2, vst2)
                lam = torch.full((B, n, 2), 0.5, device="cuda", dtype=dtype)
                paged_write_fused(k1, v1, lam, 0.9, kp, vp, table, start, ks, vs)
            bad = table.clone()
            bad[0, 3] = 10 ** 6
            assert torch.isnan(paged_attention(q, kp, vp, bad, lens)[0]).all()


def recall_cases():
    """The recall kernels (cuda/memory/recall_attention.cu): tensor cores (bf16, d 64 and
    128, a group of 20; chunk-major and row-major) and CUDA cores (float32, d 80), an odd
    chunk with keys past the last one, chunks of 200 (two forward key tiles), -1 padding, and
    invalid entries (NaN rows, no access outside k and v)."""
    from mka.memory.recall_ops import recall_op
    B, Tq, Tk, R = 2, 70, 500, 5
    for dtype, d, H, G, C in ((torch.bfloat16, 64, 8, 2, 24), (torch.bfloat16, 128, 40, 2, 24),
                              (torch.bfloat16, 128, 8, 2, 200), (torch.float32, 80, 8, 2, 24)):
        q, k, v = (torch.randn(B, T, n, d, device="cuda", dtype=dtype, requires_grad=True)
                   for T, n in ((Tq, H), (Tk, G), (Tk, G)))
        chosen = torch.randint(-1, Tk // C, (B, Tq, G, R), device="cuda", dtype=torch.int32)
        for path in ("chunks", "rows"):
            with mka.use_kernels(recall=path):
                recall_op(q, k, v, chosen, C).float().sum().backward()
                bad = chosen.clone()
                bad[0, 3, 1, 0], bad[1, 9, 0, 4] = 10 ** 6, -5
                out = recall_op(q, k, v, bad, C)
                out.float().sum().backward()
                assert torch.isnan(out[0, 3, H // 2:]).all()
                assert torch.isnan(out[1, 9, :H // 2]).all()


if __name__ == "__main__":
    main()
