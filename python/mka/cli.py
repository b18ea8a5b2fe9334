"""The `mka` command: `mka bench` (ops vs SDPA on this machine) and `mka train`."""

from __future__ import annotations

import argparse
import sys
from typing import Optional

import torch


def _bench(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from . import _C
    from .benchmark import Shape, call_overhead_us, format_table, run_table

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype) if args.dtype else (
        torch.bfloat16 if device == "cuda" else torch.float32)
    if device == "cpu":
        shapes = [Shape(B=1, T=t, H=8, G=g, d=64) for t in args.seq_lens or (256, 1024)
                  for g in (8, 2)]
    else:  # B x T = 16k tokens, as in the GPU suite
        shapes = [Shape(B=max(1, 16384 // t), T=t, H=16, G=g, d=128)
                  for t in args.seq_lens or (1024, 4096) for g in (16, 4)]
    print(f"mka bench: {device} ({torch.cuda.get_device_name() if device == 'cuda' else _C.cpu_isa()}"
          f", {_C.num_threads()} threads), {str(dtype)[6:]}, causal; median of {args.reps} runs")
    bar = lambda jobs: tqdm(jobs, desc="benchmarking", unit="case", file=sys.stderr)  # noqa: E731
    rows = run_table(shapes, device, dtype, progress=bar, reps=args.reps)
    over = call_overhead_us(device)
    print(format_table(rows, device))
    print(f"per-call overhead on tiny inputs: mka.attention {over['mka.attention']:.1f} us, "
          f"sdpa {over['sdpa']:.1f} us")
    return 0


def _train(argv: list[str]) -> int:
    from .train import main as train_main
    return int(train_main(argv) or 0)


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["train"]:  # the training CLI parses its own flags
        return _train(argv[1:])
    p = argparse.ArgumentParser(prog="mka", description="Memory-Keyed Attention tools")
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("bench", help="time the ops against scaled_dot_product_attention")
    b.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda if present")
    b.add_argument("--dtype", choices=["float32", "float64", "bfloat16", "float16"])
    b.add_argument("--seq-lens", type=int, nargs="+", help="sequence lengths to time")
    b.add_argument("--reps", type=int, default=5, help="timed runs per case (median)")
    sub.add_parser("train", help="train GPT-style models per attention variant (see mka train -h)")
    args = p.parse_args(argv)
    return _bench(args)


if __name__ == "__main__":
    raise SystemExit(main())
