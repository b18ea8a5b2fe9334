"""Attention forward+backward with and without dropout, mka against PyTorch SDPA (causal, bf16,
CUDA), `triton.testing.do_bench` medians (bench/results/h100_ops.md, "Dropout").

    python bench/tools/dropout_speed.py
"""

import torch
import torch.nn.functional as F

import mka


def main() -> None:
    from triton.testing import do_bench
    if not torch.cuda.is_available():
        raise SystemExit("dropout_speed.py: needs a CUDA device")
    torch.manual_seed(0)
    print(torch.cuda.get_device_name())
    for B, T, H, d in ((64, 256, 6, 64), (8, 1024, 16, 64), (4, 4096, 16, 128)):
        q, k, v = (torch.randn(B, T, H, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                   for _ in range(3))
        g = torch.randn(B, T, H, d, device="cuda", dtype=torch.bfloat16)
        qt, kt, vt = (x.detach().transpose(1, 2).requires_grad_() for x in (q, k, v))
        gt = g.transpose(1, 2)
        ms = {}
        for p in (0.0, 0.1):
            ms["mka", p] = do_bench(lambda: mka.attention(q, k, v, dropout_p=p).backward(g),
                                    warmup=10, rep=60)
            ms["sdpa", p] = do_bench(lambda: F.scaled_dot_product_attention(
                qt, kt, vt, is_causal=True, dropout_p=p).backward(gt), warmup=10, rep=60)
        print(f"B {B} T {T} H {H} d {d}: mka p=0 {ms['mka', 0.0] * 1e3:.0f} us, p=0.1 "
              f"{ms['mka', 0.1] * 1e3:.0f} us; sdpa p=0 {ms['sdpa', 0.0] * 1e3:.0f} us, p=0.1 "
              f"{ms['sdpa', 0.1] * 1e3:.0f} us")


if __name__ == "__main__":
    main()
