"""One call of each decode implementation of `mka bench --cases decode` per shape, between
cudaProfilerStart/Stop, for Nsight Compute with --profile-from-start off (warm-up calls are
outside the range): which kernels a decode step launches and their time, DRAM bytes and
throughput, beside SDPA's cuDNN kernels on the same bytes (bench/results/h100_decode.md).

    ncu --profile-from-start off --csv --page raw \\
        --metrics gpu__time_duration.sum,dram__bytes_read.sum,dram__throughput.avg.pct_of_peak_sustained_elapsed,launch__grid_size,launch__registers_per_thread \\
        python bench/tools/decode_ncu.py paged,paged_mka,sdpa.cudnn 8x1x4096,8x16x4096

Shapes are GxBxT (kv heads, batch, cached tokens) with H = 32, d = 128, bf16."""

import sys

import torch

from mka.bench.cases import Shape
from mka.bench.decode import DECODE, decode_inputs


def main() -> None:
    if len(sys.argv) != 3 or not torch.cuda.is_available():
        sys.exit(__doc__)
    impls = sys.argv[1].split(",")
    shapes = [tuple(int(x) for x in s.split("x")) for s in sys.argv[2].split(",")]
    calls = []
    for G, B, T in shapes:
        x = decode_inputs(Shape(B, T, 32, G, 128), "cuda", torch.bfloat16)
        for name in impls:
            f = DECODE.impls[name].fn(x)
            for _ in range(5):
                f()
            calls.append((f"G{G} B{B} T{T} {name}", f))
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStart()
    for label, f in calls:
        torch.cuda.nvtx.range_push(label)
        f()
        torch.cuda.synchronize()
        torch.cuda.nvtx.range_pop()
    torch.cuda.cudart().cudaProfilerStop()
    print("profiled, in this order:", ", ".join(label for label, _ in calls))


if __name__ == "__main__":
    main()
