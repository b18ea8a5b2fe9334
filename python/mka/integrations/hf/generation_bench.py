"""``mka generate-bench``: prefill and decode of a Hugging Face causal LM under transformers'
``sdpa`` and the library's ``mka`` attention, side by side in one run.

Per attention, batch and prompt length: prefill tokens/s (one forward over the prompt into a
fresh ``DynamicCache``), decode tokens/s and ms per output token (greedy steps of one token
per sequence), peak memory per phase (CUDA: peak allocated bytes, reset before each phase;
CPU: not measured — torch keeps no CPU peak, and the process high-water mark cannot be reset
per phase), and KV bytes per token read from the cache object after prefill. The default
model on CUDA is a Llama-architecture model of about 1B parameters with random weights.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Optional

import torch

SIZES = {  # LlamaConfig fields; "1b": Llama-3.2-1B's shape with a 32k vocabulary
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
               num_attention_heads=32, num_key_value_heads=8, vocab_size=32000),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, vocab_size=128),
}
DEFAULTS = {
    "cuda": dict(size="1b", dtype="bfloat16", batches=[1, 32], prompts=[1024, 16384], new_tokens=256),
    "cpu": dict(size="tiny", dtype="float32", batches=[1, 2], prompts=[64], new_tokens=8),
}


@dataclass
class Settings:
    device: str
    dtype: torch.dtype
    batches: list[int]
    prompts: list[int]
    new_tokens: int
    size: str = "tiny"
    model: Optional[str] = None  # a local model folder instead of a random-weight config
    attns: list[str] = field(default_factory=lambda: ["sdpa", "mka"])
    seed: int = 0


def build_model(s: Settings):
    """The model to time and a line saying what it is."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from .conversion import load_model
    if s.model is not None:
        model = load_model(s.model, dtype=s.dtype).to(s.device)
        what = f"{s.model}"
    else:
        config = LlamaConfig(**SIZES[s.size], max_position_embeddings=max(s.prompts) + s.new_tokens,
                             tie_word_embeddings=False)
        torch.manual_seed(s.seed)
        with torch.device(s.device):
            model = LlamaForCausalLM(config).to(s.dtype)
        what = f"Llama architecture, size {s.size!r}, random weights"
    params = sum(p.numel() for p in model.parameters())
    return model.eval(), f"{what}: {params / 1e6:.1f}M parameters, {s.dtype}, {s.device}"


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _phase(device: str, fn):
    """(result, seconds, peak bytes or None) of ``fn()``."""
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    _sync(device)
    start = time.perf_counter()
    out = fn()
    _sync(device)
    seconds = time.perf_counter() - start
    return out, seconds, torch.cuda.max_memory_allocated() if device == "cuda" else None


def kv_bytes_per_token(cache, batch: int) -> float:
    """Bytes the cache holds per token and sequence, read from its layers' tensors."""
    held = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)
    return held / (batch * cache.get_seq_length())


def measure(model, attn: str, batch: int, prompt: int, new_tokens: int, device: str,
            seed: int) -> dict:
    from transformers import DynamicCache

    model.set_attn_implementation(attn)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (batch, prompt), generator=g).to(device)
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        out, t_prefill, mem_prefill = _phase(device, lambda: model(
            ids, past_key_values=cache, use_cache=True, logits_to_keep=1))
        kv = kv_bytes_per_token(cache, batch)

        def decode():
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            for _ in range(new_tokens):
                step = model(token, past_key_values=cache, use_cache=True)
                token = step.logits[:, -1].argmax(-1, keepdim=True)
        _, t_decode, mem_decode = _phase(device, decode)
    return {"attn": attn, "batch": batch, "prompt": prompt, "new_tokens": new_tokens,
            "prefill_tok_s": batch * prompt / t_prefill,
            "decode_tok_s": batch * new_tokens / t_decode,
            "ms_per_output_token": 1e3 * t_decode / new_tokens,
            "peak_prefill_bytes": mem_prefill, "peak_decode_bytes": mem_decode,
            "kv_bytes_per_token": kv}


def run(s: Settings) -> tuple[str, list[dict]]:
    """(what model ran, one row per attention, batch and prompt length)."""
    import mka.integrations.hf  # noqa: F401  (registers "mka")

    model, what = build_model(s)
    for attn in s.attns:  # warm-up: first calls, allocator, kernel choice
        measure(model, attn, 1, min(s.prompts), 2, s.device, s.seed)
    rows = []
    for batch in s.batches:
        for prompt in s.prompts:
            for attn in s.attns:
                try:
                    rows.append(measure(model, attn, batch, prompt, s.new_tokens, s.device, s.seed))
                except torch.OutOfMemoryError as e:
                    rows.append({"attn": attn, "batch": batch, "prompt": prompt,
                                 "new_tokens": s.new_tokens, "error": f"out of memory: {e}"[:200]})
                    torch.cuda.empty_cache()
    return what, rows


def report(what: str, rows: list[dict], device: str) -> str:
    gib = lambda b: "n/a (cpu)" if b is None else f"{b / 2**30:.2f}"  # noqa: E731
    lines = [f"model: {what}",
             f"{'attn':<6} {'B':>3} {'prompt':>7} {'new':>5} {'prefill tok/s':>14} "
             f"{'decode tok/s':>13} {'ms/token':>9} {'peak prefill GiB':>17} "
             f"{'peak decode GiB':>16} {'KV B/token':>11}"]
    for r in rows:
        head = f"{r['attn']:<6} {r['batch']:>3} {r['prompt']:>7} {r['new_tokens']:>5} "
        if "error" in r:
            lines.append(head + r["error"])
            continue
        lines.append(head + f"{r['prefill_tok_s']:>14.1f} {r['decode_tok_s']:>13.1f} "
                     f"{r['ms_per_output_token']:>9.2f} {gib(r['peak_prefill_bytes']):>17} "
                     f"{gib(r['peak_decode_bytes']):>16} {r['kv_bytes_per_token']:>11.0f}")
    if device != "cuda":
        lines.append("peak memory: not measured on cpu (torch tracks CUDA allocations only)")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    from ...cli import _ints, _names

    p = argparse.ArgumentParser(prog="mka generate-bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda if available")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                   help="default: bfloat16 on cuda, float32 on cpu")
    p.add_argument("--size", choices=sorted(SIZES), help="random-weight Llama shape "
                   "(default: 1b on cuda, tiny on cpu)")
    p.add_argument("--model", help="a local model folder instead of random weights")
    p.add_argument("--batches", type=_ints, help="default: 1,32 on cuda, 1,2 on cpu")
    p.add_argument("--prompts", type=_ints, help="prompt lengths, e.g. 1k,16k (default: 1k,16k "
                   "on cuda, 64 on cpu)")
    p.add_argument("--new-tokens", type=int, help="default: 256 on cuda, 8 on cpu")
    p.add_argument("--attns", type=_names, default=["sdpa", "mka"],
                   help="attention implementations (default: sdpa,mka)")
    p.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    args = p.parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    d = DEFAULTS[device]
    pick = lambda key: d[key] if getattr(args, key) is None else getattr(args, key)  # noqa: E731
    s = Settings(device=device, dtype=getattr(torch, pick("dtype")), batches=pick("batches"),
                 prompts=pick("prompts"), new_tokens=pick("new_tokens"), size=pick("size"),
                 model=args.model, attns=args.attns)
    try:
        what, rows = run(s)
    except ValueError as e:
        print(f"mka generate-bench: error: {e}", file=sys.stderr)
        return 2
    print(report(what, rows, device))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": what, "settings": {**asdict(s), "dtype": str(s.dtype)},
                       "rows": rows}, f, indent=1)
    return 0
