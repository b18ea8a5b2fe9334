"""Forward and backward of mka.attention, and with --sdpa of SDPA's cuDNN backend, in one
process: B*T = 16k tokens, H = 16, bf16, d 128 and 64, causal T 1k/4k/16k and non-causal 4k;
`triton.testing.do_bench` medians (gradients reset each call), bwd = fwd+bwd - fwd, TF/s with
forward 4*B*H*T^2*d (halved when causal) and backward 2.5x that. To A/B two builds, run it
once per build with a label: python bench/tools/attention_vs_cudnn.py LABEL [--sdpa]"""

import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from triton.testing import do_bench

import mka

SHAPES = ((1024, True), (4096, True), (16384, True), (4096, False))  # (T, causal)


def fwd_and_total(f, g, leaves) -> tuple[float, float]:
    """Median ms of f() and of f().backward(g)."""
    fwd = do_bench(f, warmup=50, rep=300)

    def both():
        f().backward(g)
    return fwd, do_bench(both, warmup=50, rep=300, grad_to_none=leaves)


def row(label, d, T, causal, flops, fwd, total) -> str:
    bwd = total - fwd
    return (f"{label:6s} d{d} T{T:5d} {'causal' if causal else 'full  '} "
            f"fwd {fwd:7.3f} ms {flops / fwd / 1e9:5.0f} TF/s  bwd {bwd:7.3f} ms "
            f"{2.5 * flops / bwd / 1e9:5.0f} TF/s  fwd+bwd {3.5 * flops / total / 1e9:5.0f} TF/s")


def main() -> None:
    if len(sys.argv) < 2 or not torch.cuda.is_available():
        sys.exit(__doc__)
    label, with_sdpa = sys.argv[1], "--sdpa" in sys.argv
    torch.manual_seed(0)
    for d in (128, 64):
        for T, causal in SHAPES:
            B = 16384 // T
            q, k, v = (torch.randn(B, T, 16, d, device="cuda", dtype=torch.bfloat16,
                                   requires_grad=True) for _ in range(3))
            g = torch.randn(B, T, 16, d, device="cuda", dtype=torch.bfloat16)
            flops = 4 * B * 16 * T * T * d * (0.5 if causal else 1.0)
            times = fwd_and_total(lambda: mka.attention(q, k, v, causal=causal), g, [q, k, v])
            print(row(label, d, T, causal, flops, *times), flush=True)
            if with_sdpa:  # SDPA's (B, H, T, d) views of the same tensors
                qt, kt, vt = (x.detach().transpose(1, 2).requires_grad_() for x in (q, k, v))
                with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
                    times = fwd_and_total(
                        lambda: F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal),
                        g.transpose(1, 2), [qt, kt, vt])
                print(row("cudnn", d, T, causal, flops, *times), flush=True)


if __name__ == "__main__":
    main()
