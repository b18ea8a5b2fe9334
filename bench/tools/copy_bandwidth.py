"""Device-to-device copy bandwidth: the ceiling the decode tables' GB/s are read against.

    python bench/tools/copy_bandwidth.py [--gib 4] [--reps 20]

Copies a buffer of --gib GiB into another with ``Tensor.copy_`` between CUDA events after a
warm-up and prints the median rate counting the bytes read and written (2 x size / time), the
convention of the device notes (~3.0 TB/s on an H100 SXM, ~4.3 TB/s on an H200).
"""

from __future__ import annotations

import argparse
import statistics

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gib", type=float, default=4.0, help="buffer size in GiB (default 4)")
    ap.add_argument("--reps", type=int, default=20, help="timed copies (default 20)")
    a = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("copy_bandwidth.py needs a CUDA device")
    n = int(a.gib * 2**30)
    src = torch.empty(n, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    times = []
    for _ in range(a.reps):
        t0, t1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        t0.record()
        dst.copy_(src)
        t1.record()
        t1.synchronize()
        times.append(t0.elapsed_time(t1) / 1e3)
    t = statistics.median(times)
    print(f"{torch.cuda.get_device_name()}: copy of {a.gib:g} GiB, median of {a.reps}: "
          f"{t * 1e3:.3f} ms, {2 * n / t / 1e9:.0f} GB/s (read + written)")


if __name__ == "__main__":
    main()
