"""``mka eval ruler``: RULER-style tasks (:mod:`.ruler`) on a model the integration loads.

Scores are what the model answers, greedily decoded with transformers' ``generate``; the
report names the model, its attention implementation and its parameter count. A model with
random weights scores near zero: real scores need real weights.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Optional

import torch

from . import ruler

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def evaluate(model, tokenizer, tasks: list[str], lengths: list[int], samples: int,
             seed: int) -> list[dict]:
    """One row per task and length: the mean score over ``samples`` prompts, in percent."""
    count = lambda text: len(tokenizer(text)["input_ids"])  # noqa: E731
    device = next(model.parameters()).device
    rows = []
    for task in tasks:
        for length in lengths:
            made = ruler.make_samples(task, length, count, samples, seed)
            predictions = []
            for sample in made:
                ids = tokenizer(sample.prompt, return_tensors="pt").to(device)
                with torch.no_grad():
                    out = model.generate(**ids, max_new_tokens=ruler.TASKS[task].new_tokens,
                                         do_sample=False, pad_token_id=tokenizer.pad_token_id
                                         if tokenizer.pad_token_id is not None
                                         else tokenizer.eos_token_id)
                answer = tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
                predictions.append(ruler.clean(answer))
            score = ruler.METRICS[ruler.TASKS[task].metric](predictions, [s.references for s in made])
            rows.append({"task": task, "length": length, "samples": samples,
                         "prompt_tokens": max(s.tokens for s in made),
                         "metric": f"string_match_{ruler.TASKS[task].metric}", "score": score})
    return rows


def _parser() -> argparse.ArgumentParser:
    from ...cli import _ints, _names

    p = argparse.ArgumentParser(prog="mka eval", description="Long-context evaluation of a "
                                "Hugging Face causal LM on the library's attention.")
    sub = p.add_subparsers(dest="suite", required=True, metavar="SUITE")
    r = sub.add_parser("ruler", help="RULER-style synthetic tasks",
                       description="Needle in a haystack (single, multi-key), variable tracking "
                       "and common-words extraction, generated offline at lengths counted in the "
                       "model's tokens, scored by RULER's string matching (percent).")
    r.add_argument("--model", required=True, help="a local model folder (config.json, weights, "
                   "tokenizer); converted models (mka.integrations.hf.convert) load as converted")
    r.add_argument("--lengths", type=_ints, default=[4096], help="prompt lengths in tokens, "
                   "e.g. 4k,16k (default: 4k)")
    r.add_argument("--tasks", type=_names, default=list(ruler.TASKS),
                   help=f"comma-separated (default: all: {','.join(ruler.TASKS)})")
    r.add_argument("--samples", type=int, default=10, help="prompts per task and length (default: 10)")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--attn", default="mka", help="attn_implementation of an unconverted model "
                   "(default: mka; sdpa for the reference)")
    r.add_argument("--device", help="default: cuda if available, else cpu")
    r.add_argument("--dtype", choices=sorted(DTYPES), help="default: bfloat16 on cuda, float32 on cpu")
    r.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    return p


def main(argv: Optional[list[str]] = None) -> int:
    from transformers import AutoTokenizer

    from .conversion import load_model

    args = _parser().parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = DTYPES[args.dtype or ("bfloat16" if device == "cuda" else "float32")]
    try:
        if args.samples < 1:
            raise ValueError(f"samples: must be at least 1, got {args.samples}")
        for task in args.tasks:
            if task not in ruler.TASKS:
                raise ValueError(f"tasks: unknown task {task!r} (known: {', '.join(ruler.TASKS)})")
        tokenizer = AutoTokenizer.from_pretrained(args.model)
        model = load_model(args.model, args.attn, dtype=dtype).to(device).eval()
        rows = evaluate(model, tokenizer, args.tasks, args.lengths, args.samples, args.seed)
    except ValueError as e:
        print(f"mka eval: error: {e}", file=sys.stderr)
        return 2
    params = sum(p.numel() for p in model.parameters())
    print(f"model: {args.model} ({type(model).__name__}, {params / 1e6:.1f}M parameters, "
          f"attn_implementation={model.config._attn_implementation}, {dtype}, {device}); "
          f"seed {args.seed}")
    print(f"{'task':<20} {'length':>8} {'tokens':>8} {'samples':>8} {'metric':<18} {'score':>7}")
    for r in rows:
        print(f"{r['task']:<20} {r['length']:>8} {r['prompt_tokens']:>8} {r['samples']:>8} "
              f"{r['metric']:<18} {r['score']:>7.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "attn": model.config._attn_implementation,
                       "dtype": str(dtype), "device": device, "rows": rows}, f, indent=1)
    return 0
