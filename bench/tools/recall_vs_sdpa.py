"""Recall attention (the native op) against SDPA causal attention, forward and forward+backward,
on random distinct earlier chunks per row (no reuse between neighbouring rows: the worst case of
the row-block merge), B 1, H 32, G 8, d 128, chunks of 64, top 8, bf16, CUDA
(bench/results/h100_recall.md). Recall runs on both tensor-core paths (the ``recall`` kernel
option: chunk-major and row-major), one line each.

    python bench/tools/recall_vs_sdpa.py 8192 32768 65536
"""
import sys, torch, triton.testing as tt
import torch.nn.functional as F
import mka
from mka.memory.recall_ops import recall_op
for T in [int(x) for x in sys.argv[1:]] or [65536]:
    B, H, G, d, C, R = 1, 32, 8, 128, 64, 8
    mk = lambda n: torch.randn(B, T, n, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    q, k, v = mk(H), mk(G), mk(G)
    nC = T // C
    cnt = torch.arange(T, device="cuda") // C
    key = torch.rand(B, T, G, nC, device="cuda").masked_fill(torch.arange(nC, device="cuda") >= cnt[:, None, None], -1.0)
    chosen = key.topk(R, -1).indices
    chosen = torch.where(torch.arange(R, device="cuda") < cnt[:, None, None], chosen, -1).int()
    del key
    go = torch.randn_like(q)
    def fwd():
        with torch.no_grad():
            recall_op(q, k, v, chosen, C)
    def rec():
        q.grad = k.grad = v.grad = None
        recall_op(q, k, v, chosen, C).backward(go)
    qt, kt, vt = (x.detach().transpose(1, 2).contiguous().requires_grad_() for x in (q, k, v))
    got = go.transpose(1, 2).contiguous()
    def sfwd():
        with torch.no_grad():
            F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=True)
    def sdpa():
        qt.grad = kt.grad = vt.grad = None
        F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=True).backward(got)
    t_sf, t_s = tt.do_bench(sfwd), tt.do_bench(sdpa)
    for path in ("chunks", "rows"):
        with mka.use_kernels(recall=path):
            t_f, t_r = tt.do_bench(fwd), tt.do_bench(rec)
        print(f"recall ({path}) T={T} R={R} C={C}: fwd {t_f:.2f} ms vs SDPA causal fwd {t_sf:.2f} ms "
              f"({t_sf/t_f:.1f}x); fwd+bwd {t_r:.2f} ms vs {t_s:.2f} ms ({t_s/t_r:.1f}x)")
