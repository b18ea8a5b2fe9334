"""mka.attention against SDPA on the CPU at the shapes where fixed costs and small head dims
decide: one query token over short and long caches (decode), and forward + backward of small
heads (tiny models). One thread, float32, min of 5 repeats of N calls; prints JSON with
`--json` (one object: row -> [mka us, SDPA us]).

    python bench/tools/cpu_small_shapes.py
    python bench/tools/cpu_small_shapes.py --extension OTHER/_C.cpython-311-x86_64-linux-gnu.so

`--extension` loads another build of the native module as `mka._C` (an A/B of two builds:
run the tool once per build, alternating, and compare the mka ÷ SDPA ratios, which the
machine's drift moves less than the times)."""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import timeit

DECODE = [(4, 2, 16, 64), (4, 2, 16, 300), (4, 2, 16, 4000), (12, 12, 64, 64),
          (12, 12, 64, 300), (12, 12, 64, 1000), (32, 8, 128, 4), (32, 8, 128, 64),
          (32, 8, 128, 200), (32, 8, 128, 300)]       # H, G, d, cached tokens
TRAIN = [(8, 256, 4, 4, 16), (8, 256, 6, 6, 64), (4, 256, 4, 2, 48)]  # B, T, H, G, d


def load_extension(path: str) -> None:
    spec = importlib.util.spec_from_file_location("mka._C", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["mka._C"] = module
    spec.loader.exec_module(module)


def best_us(fn, calls: int) -> float:
    for _ in range(max(3, calls // 10)):
        fn()
    return min(timeit.repeat(fn, number=calls, repeat=5)) / calls * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--extension", help="a build of the native module to load as mka._C")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    if a.extension:
        load_extension(a.extension)
    import torch
    import torch.nn.functional as F

    import mka
    torch.set_num_threads(1)
    rows = {}
    with torch.no_grad():
        for H, G, d, Tk in DECODE:
            q = torch.randn(1, 1, H, d)
            k, v = torch.randn(1, Tk, G, d), torch.randn(1, Tk, G, d)
            qs, ks, vs = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
            ours = mka.attention(q, k, v)
            want = F.scaled_dot_product_attention(qs, ks, vs, enable_gqa=True).transpose(1, 2)
            assert torch.allclose(ours, want, atol=1e-5), (H, G, d, Tk)
            rows[f"decode H {H} G {G} d {d}, {Tk} cached"] = (
                best_us(lambda: mka.attention(q, k, v), 300),
                best_us(lambda: F.scaled_dot_product_attention(qs, ks, vs, enable_gqa=True), 300))
    for B, T, H, G, d in TRAIN:
        q = torch.randn(B, T, H, d, requires_grad=True)
        k, v = (torch.randn(B, T, G, d, requires_grad=True) for _ in range(2))
        qs, ks, vs = (x.detach().transpose(1, 2).requires_grad_() for x in (q, k, v))
        rows[f"fwd+bwd B {B} T {T} H {H} G {G} d {d}"] = (
            best_us(lambda: mka.attention(q, k, v).sum().backward(), 20),
            best_us(lambda: F.scaled_dot_product_attention(
                qs, ks, vs, is_causal=True, enable_gqa=True).sum().backward(), 20))
    if a.json:
        print(json.dumps(rows))
        return
    print(f"{'shape':40s} {'mka us':>9s} {'SDPA us':>9s} {'SDPA / mka':>10s}")
    for name, (ours, sdpa) in rows.items():
        print(f"{name:40s} {ours:9.1f} {sdpa:9.1f} {sdpa / ours:10.2f}")


if __name__ == "__main__":
    main()
