"""One causal call of mka.attention and of SDPA's cuDNN backend on the same tensors (bf16),
between cudaProfilerStart/Stop, for Nsight Compute with --profile-from-start off (warm-up
calls are outside the range); and a summary of the source page ncu exports from it: samples
per stall reason, executed instructions and the hottest SASS lines per kernel.

    ncu --profile-from-start off --set full --import-source no -o REPORT \\
        python bench/tools/attention_ncu.py profile D T [B H] [--backward]
    ncu --import REPORT.ncu-rep --page source --print-source sass --csv > SASS.csv
    python bench/tools/attention_ncu.py summary SASS.csv

B defaults to 16384 // T, H to 16; --backward profiles forward and backward."""

from __future__ import annotations

import csv
import sys


def profile(args: list[str]) -> None:
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    import mka
    backward = "--backward" in args
    nums = [int(a) for a in args if a != "--backward"]
    d, T = nums[0], nums[1]
    B = nums[2] if len(nums) > 2 else 16384 // T
    H = nums[3] if len(nums) > 3 else 16
    q, k, v = (torch.randn(B, T, H, d, device="cuda", dtype=torch.bfloat16,
                           requires_grad=backward) for _ in range(3))
    qt, kt, vt = (x.detach().transpose(1, 2).requires_grad_(backward) for x in (q, k, v))

    def ours():
        out = mka.attention(q, k, v, True)
        if backward:
            out.backward(torch.ones_like(out))

    def cudnn():
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            out = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True)
        if backward:
            out.backward(torch.ones_like(out))

    for _ in range(3):
        ours(), cudnn()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStart()
    for f in (ours, cudnn):
        f()
        torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStop()
    print(f"profiled: mka.attention, then cuDNN (B {B}, T {T}, H {H}, d {d}, backward {backward})")


def summary(path: str) -> None:
    kernels: dict[str, list[list[str]]] = {}
    header: list[str] = []
    name = ""
    with open(path) as f:
        for row in csv.reader(f):
            if not row:
                continue
            if row[0] == "Kernel Name":
                name = row[1][:70]
                kernels[name] = []
            elif row[0] == "Address":
                header = row
            else:
                kernels[name].append(row)
    col = {h: i for i, h in enumerate(header)}
    reasons = [h for h in header if h.startswith("stall_") and "Not Issued" not in h]
    samples = col["Warp Stall Sampling (All Samples)"]
    for name, rows in kernels.items():
        total = sum(int(r[samples]) for r in rows) or 1
        executed = sum(int(r[col["Instructions Executed"]]) for r in rows)
        print(f"== {name}\n   instructions executed {executed / 1e6:.1f} M, samples {total}")
        by_reason = sorted(((sum(int(r[col[h]]) for r in rows), h) for h in reasons), reverse=True)
        print("   " + ", ".join(f"{h[6:]} {n / total:.1%}" for n, h in by_reason[:8]))
        for r in sorted(rows, key=lambda r: -int(r[samples]))[:10]:
            print(f"   {int(r[samples]) / total:6.1%}  {r[1].strip()[:72]}")


def main() -> None:
    if len(sys.argv) >= 4 and sys.argv[1] == "profile":
        profile(sys.argv[2:])
    elif len(sys.argv) == 3 and sys.argv[1] == "summary":
        summary(sys.argv[2])
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
