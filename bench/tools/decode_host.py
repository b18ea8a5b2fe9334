"""Host time of one decode-shaped attention call, where it goes, against SDPA's: the shape a
Hugging Face Llama layer hands the attention function while decoding (q: one token, k/v: the
DynamicCache's (B, G, T, d) tensors as (B, T, G, d) views), bf16 on CUDA.

Host time per call: 8 warm calls queued behind a sleeping GPU (the queue of launches never
fills, so no call waits for the device), median of 7 rounds. For `mka.attention` the time
inside the native call (`_C.attention_forward`: checks, launch planning, workspace, the
split and combine launches) is timed apart from the Python around it.

    python bench/tools/decode_host.py [--B 32] [--T 1025] [--H 32] [--G 8] [--d 64]"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import mka
import mka.ops as ops

CALLS, ROUNDS = 8, 7


def host_us(call) -> float:
    times = []
    for _ in range(ROUNDS):
        torch.cuda.synchronize()
        torch.cuda._sleep(20_000_000)  # ~10 ms of GPU time ahead of the calls
        call()
        start = time.perf_counter()
        for _ in range(CALLS):
            call()
        times.append((time.perf_counter() - start) / CALLS * 1e6)
    torch.cuda.synchronize()
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name, default in (("B", 32), ("T", 1025), ("H", 32), ("G", 8), ("d", 64)):
        ap.add_argument(f"--{name}", type=int, default=default)
    a = ap.parse_args()
    if not torch.cuda.is_available():
        ap.error("needs a CUDA device")
    dev, dt = "cuda", torch.bfloat16
    q = torch.randn(a.B, a.H, 1, a.d, device=dev, dtype=dt)             # transformers' layout
    k, v = (torch.randn(a.B, a.G, a.T, a.d, device=dev, dtype=dt) for _ in range(2))
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))                    # the op's (B, T, ., d)
    kr, vr = (x.repeat_interleave(a.H // a.G, dim=1) for x in (k, v))      # SDPA without GQA
    rows = {}
    with torch.no_grad():
        rows["mka.attention"] = host_us(lambda: mka.attention(qt, kt, vt, causal=True))
        native = ops._C.attention_forward
        inside = []

        def timed(**kw):
            start = time.perf_counter()
            native(**kw)
            inside.append(time.perf_counter() - start)
        ops._C.attention_forward = timed
        try:
            host_us(lambda: mka.attention(qt, kt, vt, causal=True))
        finally:
            ops._C.attention_forward = native
        rows["  of which _C.attention_forward"] = statistics.median(inside) * 1e6
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            rows["sdpa.flash (GQA)"] = host_us(
                lambda: F.scaled_dot_product_attention(q, k, v, is_causal=False, enable_gqa=True))
            rows["sdpa.flash (repeated heads)"] = host_us(
                lambda: F.scaled_dot_product_attention(q, kr, vr, is_causal=False))
        rows["torch.empty (reference)"] = host_us(lambda: torch.empty(1, device=dev))
    print(f"B {a.B}, T {a.T}, H {a.H}, G {a.G}, d {a.d}, bf16: host us per call")
    for name, us in rows.items():
        print(f"  {name:34s} {us:8.1f}")


if __name__ == "__main__":
    main()
