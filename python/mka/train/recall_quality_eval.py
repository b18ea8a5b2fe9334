"""``mka eval recall-quality``: how much of the attention level 3 would serve do chunk
selectors recall, on the queries and keys of a model ``mka train`` trained on text?

The checkpoint's model reads the first ``--length`` held-out tokens of its own data (or
``--data``); each layer's queries and keys (taken from its fused q/k/v projection) go to
:func:`mka.memory.recall_quality.recall_quality`: the captured share of the eligible
attention mass for SimHash recall, the exact scores (mean key, Quest's bound, the box
corners' mean) and the oracle, at each budget. Prints a
table per layer and the mean over layers; ``--out`` writes the JSON. Models whose attention
has a fused q/k/v projection (mha, mqa, gqa, mka, fastmka) only.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional

import torch

from ..memory.recall_quality import METHODS
from . import distributed as D
from .dataset import prepare
from .options import BY_NAME, OPTIONS, ConfigError, Settings, parse_lengths
from .recall_eval import model_of, read_checkpoint


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mka eval recall-quality",
        description="Captured attention mass of chunk selectors (SimHash recall, the exact mean key, Quest, oracle) on a text "
                    "model's own queries and keys.")
    p.add_argument("checkpoint", help="a checkpoint file, or a variant's folder of them (its newest)")
    p.add_argument("--length", type=int, help="held-out tokens read (default: the model's block size)")
    p.add_argument("--chunk", type=int, default=64, help="tokens per chunk (default 64)")
    p.add_argument("--window", type=int, default=256, help="L1 window the chunks lie before (default 256)")
    p.add_argument("--budgets", default="0.01,0.02,0.05,0.1",
                   help="fractions of the context recalled (default 0.01,0.02,0.05,0.1)")
    p.add_argument("--tables", type=int, default=4, help="SimHash tables (default 4)")
    p.add_argument("--bits", type=int, default=16, help="bits per table (default 16)")
    p.add_argument("--sub-chunks", type=int, default=1,
                   help="an experiment: SimHash keeps a signature of each of a chunk's S equal "
                   "parts and scores by the best (default 1: the chunk's mean key, as recall does)")
    p.add_argument("--seed", type=int, default=0, help="the hyperplanes' seed (default 0)")
    p.add_argument("--data", help="text to read instead of the run's own data (its held-out split)")
    p.add_argument("--cache-dir", help="tokenizer/token cache (default: the run's)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--out", help="write the results as JSON here")
    return p


def text_settings(state: dict, path: Path, data: Optional[str], cache_dir: Optional[str]) -> Settings:
    t = dict(state["trajectory"])
    if t.get("task"):
        raise ConfigError(f"{path}: trained on --task {t['task']}, not text: use mka eval recall")
    if data:
        t["data"] = data
    values = {o.name: o.default for o in OPTIONS}
    values.update({k: v for k, v in t.items() if k in BY_NAME})
    if cache_dir:
        values["cache_dir"] = cache_dir
    return Settings(values, set(t))


def queries_and_keys(model, idx: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each layer's ``q: (B, T, H, d)`` and ``k: (B, T, G, d)`` for the tokens ``idx``."""
    taken = []
    hooks = []
    for block in model.blocks:
        attn = block.attn
        if not hasattr(attn, "qkv"):
            raise ConfigError(f"checkpoint: {type(attn).__name__} has no fused q/k/v projection "
                              "(mha, mqa, gqa, mka, fastmka have)")

        def hook(module, inputs, attn=attn):  # q, k as attention reads them (rotated, shifted)
            q, k, _ = attn._project(inputs[0])
            taken.append((q.float(), k.float()))
        hooks.append(attn.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            model(idx)
    finally:
        for h in hooks:
            h.remove()
    return taken


def main(argv: Optional[list[str]] = None) -> int:
    from mka.memory.recall import simhash_planes
    from mka.memory.recall_quality import recall_quality

    args = _parser().parse_args(sys.argv[1:] if argv is None else list(argv))
    try:
        budgets = [float(x) for x in args.budgets.split(",") if x.strip()]
        if args.device == "cuda" and not torch.cuda.is_available():
            raise ConfigError("--device cuda: no CUDA device is available")
        use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
        rt = D.Runtime(torch.device("cuda" if use_cuda else "cpu"))
        file, state = read_checkpoint(Path(args.checkpoint).expanduser())
        s = text_settings(state, file, args.data, args.cache_dir)
        length = args.length or s.seq_len
        if length > s.seq_len:
            raise ConfigError(f"--length: {length} exceeds the block size {s.seq_len} of {file}")
        data = prepare(s, rt)
        if len(data.heldout) < length:
            raise ConfigError(f"--length: the held-out split has {len(data.heldout)} tokens, fewer "
                              f"than {length}")
        model = model_of(state, s, data.vocab_size, rt.device, "auto")
        idx = torch.tensor(data.heldout[:length], dtype=torch.long, device=rt.device)[None]
        layers = queries_and_keys(model, idx)
        planes = simhash_planes(layers[0][0].shape[-1], args.tables, args.bits, args.seed,
                                rt.device)
        per_layer = [recall_quality(q, k, chunk=args.chunk, window=args.window, budgets=budgets,
                                    planes=planes, sub_chunks=args.sub_chunks) for q, k in layers]
    except (ConfigError, ValueError) as e:
        print(f"mka eval recall-quality: {e}", file=sys.stderr)
        return 2
    mean = {m: {f: sum(r[m][f] for r in per_layer) / len(per_layer) for f in budgets}
            for m in METHODS}
    print(f"{file}: {s.attention}, {length} held-out tokens of {s.data}, chunk {args.chunk}, "
          f"window {args.window}, SimHash {args.tables} x {args.bits} bits"
          f"{f' of {args.sub_chunks} sub-chunks' if args.sub_chunks > 1 else ''}; captured "
          "share of the eligible attention mass")
    head = "layer  method  " + "  ".join(f"{f:>7.0%}" for f in budgets)
    print(head)
    for name, rows in [(str(i), r) for i, r in enumerate(per_layer)] + [("mean", mean)]:
        for m in METHODS:
            print(f"{name:>5}  {m:<7} " + "  ".join(f"{rows[m][f]:>7.3f}" for f in budgets))
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"checkpoint": str(file), "attention": s.attention,
                                   "length": length, "data": s.data, "chunk": args.chunk,
                                   "window": args.window, "budgets": budgets,
                                   "tables": args.tables, "bits": args.bits,
                                   "sub_chunks": args.sub_chunks,
                                   "per_layer": per_layer, "mean": mean}, indent=2))
    return 0
