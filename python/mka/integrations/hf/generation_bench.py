"""``mka generate-bench``: prefill and decode of a Hugging Face causal LM under transformers'
``sdpa`` and the library's ``mka`` attention, and of the library's own GPT variants, side by
side in one run.

``sdpa`` is what transformers runs by default: PyTorch picks SDPA's backend, and on Hopper with
a recent cuDNN that is cuDNN's attention, which builds an execution plan for every new
key length (each decode step over a growing ``DynamicCache``) unless PyTorch is told
otherwise. ``sdpa.flash`` is the same model code with cuDNN ruled out (flash, else the
memory-efficient or math kernel): the baseline of SDPA's kernels rather than of that plan
cache.

Per attention, cache, batch and prompt length: prefill tokens/s (one forward over the prompt
into a fresh cache), decode tokens/s and ms per output token (greedy steps of one token per
sequence), peak memory per phase (CUDA: peak allocated bytes, reset before each phase; CPU:
not measured — torch keeps no CPU peak, and the process high-water mark cannot be reset per
phase), and KV bytes per token read from the cache object after prefill. The Hugging Face
model runs with transformers' ``DynamicCache`` (the ``sdpa`` baseline, and ``mka``) and with
the library's ``PagedCache`` (``mka``); the default model on CUDA is a Llama-architecture
model of about 1B parameters with random weights. The GPT rows (``mka.models.GPT``, one per
attention variant, random weights; GPT-2-small's shape on CUDA) run on their own paged cache
(``GPT.new_caches``).
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
GPT_SIZES = {  # GPTConfig fields; "gpt2-small": 12 layers, 768 wide, 12 heads
    "gpt2-small": dict(n_layer=12, n_embd=768, n_head=12, block_size=2048, vocab_size=50304),
    "tiny": dict(n_layer=2, n_embd=64, n_head=4, block_size=128, vocab_size=128),
}
GPT_VARIANTS = ["mha", "gqa", "mla", "mka", "fastmka"]
CACHES = {"dynamic": "DynamicCache", "paged": "PagedCache"}  # --caches names: cache classes
DEFAULTS = {
    "cuda": dict(size="1b", gpt_size="gpt2-small", dtype="bfloat16", batches=[1, 32],
                 prompts=[1024, 16384], new_tokens=256, attns=["sdpa", "sdpa.flash", "mka"]),
    "cpu": dict(size="tiny", gpt_size="tiny", dtype="float32", batches=[1, 2], prompts=[64],
                new_tokens=8, attns=["sdpa", "mka"]),
}
SDPA_WITHOUT_CUDNN = ".flash"  # --attns sdpa.flash: transformers' sdpa, SDPA's cuDNN ruled out


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
    caches: list[str] = field(default_factory=lambda: list(CACHES))
    gpt: list[str] = field(default_factory=lambda: list(GPT_VARIANTS))
    gpt_size: str = "tiny"
    gpt_graph: bool = False  # also GPT and PagedCache rows with the decode step in a CUDA graph
    seed: int = 0
    rounds: int = 1  # rounds per shape, rows in alternating order (medians)


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


def attn_implementation(attn: str) -> str:
    """The transformers attention implementation an ``--attns`` name runs."""
    return attn.removesuffix(SDPA_WITHOUT_CUDNN)


def sdpa_backends(attn: str):
    """A context in which the row runs: SDPA without its cuDNN backend for ``sdpa.flash``."""
    import contextlib
    if not attn.endswith(SDPA_WITHOUT_CUDNN):
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel
    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                        SDPBackend.MATH])


def kv_bytes_per_token(cache, batch: int) -> float:
    """Bytes the cache holds per token and sequence, read from the cache object: the pages the
    sequences hold (``used_bytes``) of a paged cache, the layers' tensors of a
    ``DynamicCache``."""
    if hasattr(cache, "used_bytes"):
        return cache.used_bytes() / (batch * cache.get_seq_length())
    held = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)
    return held / (batch * cache.get_seq_length())


def _timed(device: str, batch: int, new_tokens: int, prefill, step, kv_bytes, warm,
           setup) -> dict:
    """Times ``prefill() -> logits (B, V)`` of the last position and ``new_tokens`` greedy
    ``step(token (B, 1)) -> logits (B, V)``; ``kv_bytes()`` is read after prefill. ``warm()``
    runs first, untimed: a prefill of the same shape into a cache of its own (kernel choice,
    plans, allocator blocks of that shape); then ``setup()`` makes the measured cache, once
    the warm-up's is gone: a paged cache allocates its whole pool when made, and two pools
    at once would not fit where one does."""
    with torch.no_grad():
        warm()
        setup()
        last, t_prefill, mem_prefill = _phase(device, prefill)
        kv = kv_bytes()

        marks = []  # after the first two steps (a graph's eager step and its capture), and at the end

        def decode():
            token = last.argmax(-1, keepdim=True)
            for i in range(new_tokens):
                token = step(token).argmax(-1, keepdim=True)
                if i == 1 or i == new_tokens - 1:
                    _sync(device)
                    marks.append(time.perf_counter())
        _, t_decode, mem_decode = _phase(device, decode)
    steady = (marks[-1] - marks[0]) / (new_tokens - 2) if new_tokens > 2 else None
    return {"prefill_seconds": t_prefill, "decode_seconds": t_decode, "steady_step_seconds": steady,
            "peak_prefill_bytes": mem_prefill, "peak_decode_bytes": mem_decode,
            "kv_bytes_per_token": kv}


def _ids(vocab: int, batch: int, prompt: int, device: str, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, prompt), generator=g).to(device)


def measure(model, attn: str, cache_kind: str, batch: int, prompt: int, new_tokens: int,
            device: str, seed: int, graph: bool = False) -> dict:
    """One row of the Hugging Face model: ``cache_kind`` "dynamic" (``DynamicCache``) or
    "paged" (the library's ``PagedCache``); ``graph``: on the paged cache, decode steps
    replayed from a CUDA graph (:class:`~.decode_graph.HFDecodeGraph`; its capture, in the
    first step, is timed with the decode)."""
    from transformers import DynamicCache

    from .decode_graph import HFDecodeGraph, cache_keyword
    from .paged_cache import PagedCache

    model.set_attn_implementation(attn_implementation(attn))
    ids = _ids(model.config.vocab_size, batch, prompt, device, seed)
    new_cache = lambda: (PagedCache(model, batch, prompt + new_tokens)  # noqa: E731
                         if cache_kind == "paged" else DynamicCache(config=model.config))
    key = cache_keyword(model)
    held = []  # the measured cache, made by _timed's setup after the warm-up
    forward = lambda t, c, **kw: model(t, use_cache=True, **{key: c}, **kw).logits[:, -1]  # noqa: E731
    step = lambda t: forward(t, held[0])  # noqa: E731
    if graph:
        made: list[HFDecodeGraph] = []

        def step(t):  # the graph is made at the first decode step, after the prefill
            if not made:
                made.append(HFDecodeGraph(model, held[0]))
            return made[0].step(t)
    with sdpa_backends(attn):
        times = _timed(device, batch, new_tokens, lambda: forward(ids, held[0], logits_to_keep=1),
                       step, lambda: kv_bytes_per_token(held[0], batch),
                       warm=lambda: forward(ids, new_cache(), logits_to_keep=1),
                       setup=lambda: held.append(new_cache()))
    return _row("hf", attn, CACHES[cache_kind] + ("+graph" if graph else ""), batch, prompt,
                new_tokens, times)


def measure_gpt(model, batch: int, prompt: int, new_tokens: int, device: str, seed: int,
                graph: bool = False) -> dict:
    """One row of a library GPT on its paged cache (``GPT.new_caches``); ``graph``: decode
    steps replayed from a CUDA graph (DecodeGraph; its capture, in the first step, is timed
    with the decode)."""
    from mka.models.decode_graph import DecodeGraph

    ids = _ids(model.config.vocab_size, batch, prompt, device, seed)
    held = []  # the measured caches, made by _timed's setup after the warm-up
    forward = lambda t, c: model(t, caches=c)[0][:, -1]  # noqa: E731
    step = lambda t: forward(t, held[0])  # noqa: E731
    if graph:
        made: list[DecodeGraph] = []

        def step(t):  # the graph is made at the first decode step, after the prefill
            if not made:
                made.append(DecodeGraph(model, held[0], prompt + new_tokens))
            return made[0].step(t)
    times = _timed(device, batch, new_tokens, lambda: forward(ids, held[0]), step,
                   lambda: held[0].used_bytes() / (batch * held[0][0].length),
                   warm=lambda: forward(ids, model.new_caches(batch)),
                   setup=lambda: held.append(model.new_caches(batch)))
    name = type(held[0]).__name__ + ("+graph" if graph else "")
    attn = model.config.attention + ("@torch" if model.config.attn_backend == "torch" else "")
    return _row("gpt", attn, name, batch, prompt, new_tokens, times)


def _row(source: str, attn: str, cache: str, batch: int, prompt: int, new_tokens: int,
         times: Optional[dict] = None, error: Optional[str] = None) -> dict:
    row = {"model": source, "attn": attn, "cache": cache, "batch": batch, "prompt": prompt,
           "new_tokens": new_tokens}
    if error is not None:
        return {**row, "error": error}
    return {**row, "prefill_tok_s": batch * prompt / times["prefill_seconds"],
            "decode_tok_s": batch * new_tokens / times["decode_seconds"],
            "ms_per_output_token": 1e3 * times["decode_seconds"] / new_tokens,
            "steady_ms_per_token": (None if times["steady_step_seconds"] is None
                                    else 1e3 * times["steady_step_seconds"]),
            **{k: times[k] for k in ("peak_prefill_bytes", "peak_decode_bytes",
                                     "kv_bytes_per_token")}}


def median_row(rounds: list[dict]) -> dict:
    """One row from the rounds of one measurement: the median prefill time and ms per output
    token (the rates follow from them), the median steady step, peaks and KV bytes of the
    first round, and the range of ms per output token; a round's error stands for the row."""
    import statistics
    first = rounds[0]
    if len(rounds) == 1 or any("error" in r for r in rounds):
        return next((r for r in rounds if "error" in r), first)
    tokens = first["batch"] * first["prompt"]
    prefill = statistics.median(tokens / r["prefill_tok_s"] for r in rounds)
    ms = [r["ms_per_output_token"] for r in rounds]
    steady = [r["steady_ms_per_token"] for r in rounds if r["steady_ms_per_token"] is not None]
    return {**first, "prefill_tok_s": tokens / prefill,
            "decode_tok_s": first["batch"] * 1e3 / statistics.median(ms),
            "ms_per_output_token": statistics.median(ms),
            "steady_ms_per_token": statistics.median(steady) if steady else None,
            "rounds": len(rounds), "ms_per_output_token_range": [min(ms), max(ms)]}


def _or_out_of_memory(key: tuple, fn) -> dict:
    """``fn()``'s row, or a row saying the shape ran out of memory."""
    try:
        return fn()
    except torch.OutOfMemoryError as e:
        torch.cuda.empty_cache()
        return _row(*key, error=f"out of memory: {e}"[:200])


def hf_runs(s: Settings) -> list[tuple[str, str]]:
    """(attention, cache) pairs: every attention on a ``DynamicCache``, the library's also on
    the ``PagedCache`` (``sdpa`` cannot read pages)."""
    return [(a, c) for a in s.attns for c in s.caches
            if c == "dynamic" or attn_implementation(a) != "sdpa"]


def gpt_variant(name: str) -> tuple[str, str]:
    """``--gpt`` names: ``VARIANT`` (native ops) or ``VARIANT@torch`` (the PyTorch backend,
    SDPA): (attention, attn_backend)."""
    variant, _, backend = name.partition("@")
    return variant, backend or "mka"


def build_gpt(s: Settings, name: str):
    from mka.models import GPT, GPTConfig

    variant, backend = gpt_variant(name)
    shape = GPT_SIZES[s.gpt_size]
    kv_heads = shape["n_head"] // 2 if variant == "gqa" else None  # mka train's gqa default
    torch.manual_seed(s.seed)
    with torch.device(s.device):
        model = GPT(GPTConfig(**shape, n_kv_head=kv_heads, attention=variant,
                              attn_backend=backend))
    return model.to(s.dtype).eval()


def _interleaved(runs: dict, shapes: list[tuple[int, int]], s: Settings) -> list[dict]:
    """One row per run and shape. ``runs``: (model kind, attention, cache) -> ``measure(batch,
    prompt) -> row``. The host's speed drifts between rows (eager decoding is host-bound): each
    shape's runs go ``s.rounds`` times, in alternating order so that every row sees the same
    drift, and :func:`median_row` merges a row's rounds."""
    rows = []
    for batch, prompt in shapes:
        done: dict[tuple, list[dict]] = {}
        order = list(runs)
        for r in range(s.rounds):
            for name in (order if r % 2 == 0 else order[::-1]):
                key = (*name, batch, prompt, s.new_tokens)
                done.setdefault(key, []).append(
                    _or_out_of_memory(key, lambda: runs[name](batch, prompt)))
        rows += [median_row(done[key]) for key in done]
    return rows


def run(s: Settings) -> tuple[str, list[dict]]:
    """(what models ran, one row per model, attention, cache, batch and prompt length)."""
    import mka.integrations.hf  # noqa: F401  (registers "mka")

    rows, what = [], []
    shapes = [(b, p) for b in s.batches for p in s.prompts]
    if s.attns:
        model, line = build_model(s)
        what.append(line)
        for attn, cache in hf_runs(s):  # warm-up: first calls, allocator, kernel choice
            measure(model, attn, cache, 1, min(s.prompts), 2, s.device, s.seed)
        runs = {("hf", attn, CACHES[cache] + ("+graph" if graph else "")):
                (lambda b, p, attn=attn, cache=cache, graph=graph: measure(
                    model, attn, cache, b, p, s.new_tokens, s.device, s.seed, graph=graph))
                for attn, cache in hf_runs(s)
                for graph in ((False, True) if s.gpt_graph and cache == "paged" else (False,))}
        rows += _interleaved(runs, shapes, s)
        del model, runs
    models = {}
    for variant in s.gpt:
        model = models[variant] = build_gpt(s, variant)
        params = sum(p.numel() for p in model.parameters())
        what.append(f"gpt {variant}: mka.models.GPT, size {s.gpt_size!r}, random weights: "
                    f"{params / 1e6:.1f}M parameters, {s.dtype}, {s.device}")
        measure_gpt(model, 1, min(min(s.prompts), model.config.block_size - 2), 2, s.device,
                    s.seed)

    def gpt_row(variant: str, graph: bool):
        model, block = models[variant], models[variant].config.block_size
        key = ("gpt", variant, "PagedKVCache" + ("+graph" if graph else ""))

        def row(b: int, p: int) -> dict:
            if p + s.new_tokens > block:
                return _row(*key, b, p, s.new_tokens,
                            error=f"prompt + new tokens exceed block_size {block}")
            return measure_gpt(model, b, p, s.new_tokens, s.device, s.seed, graph=graph)
        return key, row
    rows += _interleaved(dict(gpt_row(variant, graph) for variant in s.gpt  # torch backend: no graph
                              for graph in ((False, True) if s.gpt_graph
                                            and gpt_variant(variant)[1] == "mka" else (False,))),
                         shapes, s)
    del models
    return "\n".join(what), rows


def report(what: str, rows: list[dict], device: str) -> str:
    gib = lambda b: "n/a (cpu)" if b is None else f"{b / 2**30:.2f}"  # noqa: E731
    steady = lambda r: "–" if r["steady_ms_per_token"] is None else f"{r['steady_ms_per_token']:.2f}"  # noqa: E731
    lines = [f"model: {line}" for line in what.splitlines()]
    lines.append(f"{'model':<5} {'attn':<14} {'cache':<12} {'B':>3} {'prompt':>7} {'new':>5} "
                 f"{'prefill tok/s':>14} {'decode tok/s':>13} {'ms/token':>9} {'steady':>7} "
                 f"{'peak prefill GiB':>17} {'peak decode GiB':>16} {'KV B/token':>11}")
    spread = lambda r: ("{:.2f}-{:.2f} of {}".format(*r["ms_per_output_token_range"], r["rounds"])  # noqa: E731
                        if "rounds" in r else "")
    for r in rows:
        head = (f"{r['model']:<5} {r['attn']:<14} {r['cache']:<12} {r['batch']:>3} "
                f"{r['prompt']:>7} {r['new_tokens']:>5} ")
        if "error" in r:
            lines.append(head + r["error"])
            continue
        lines.append(head + f"{r['prefill_tok_s']:>14.1f} {r['decode_tok_s']:>13.1f} "
                     f"{r['ms_per_output_token']:>9.2f} {steady(r):>7} {gib(r['peak_prefill_bytes']):>17} "
                     f"{gib(r['peak_decode_bytes']):>16} {r['kv_bytes_per_token']:>11.0f}"
                     f"  {spread(r)}".rstrip())
    if any("rounds" in r for r in rows):
        lines.append("rows with rounds: medians of rounds in alternating order; last column: "
                     "the range of ms/token over the rounds")
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
    p.add_argument("--attns", type=_names,
                   help="attention implementations of the Hugging Face model (default: "
                   "sdpa,sdpa.flash,mka on cuda, sdpa,mka on cpu; none: no Hugging Face rows); "
                   "sdpa.flash: sdpa with SDPA's cuDNN backend ruled out")
    p.add_argument("--caches", type=_names, default=list(CACHES),
                   help="caches of the Hugging Face model: dynamic (transformers' DynamicCache), "
                   "paged (the library's PagedCache, for the library's attentions) (default: both)")
    p.add_argument("--gpt", type=_names, default=list(GPT_VARIANTS),
                   help=f"library GPT variants to run (default: {','.join(GPT_VARIANTS)}; none: "
                   "no GPT rows); VARIANT@torch: the variant on the PyTorch backend (SDPA)")
    p.add_argument("--gpt-size", choices=sorted(GPT_SIZES), help="GPT shape (default: "
                   "gpt2-small on cuda, tiny on cpu)")
    p.add_argument("--cuda-graph", action="store_true", help="also rows with the decode step "
                   "replayed from a CUDA graph: the GPT variants (GPT.generate(cuda_graph=True)'s "
                   "DecodeGraph) and the Hugging Face model on the PagedCache (HFDecodeGraph)")
    p.add_argument("--rounds", type=int, default=1,
                   help="measure each row N times per shape, the rows of a model kind (Hugging "
                   "Face, GPT) in alternating order, and report medians (the host's speed "
                   "drifts, and eager decoding is host-bound: rounds give every row the same "
                   "drift) (default: 1)")
    p.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    args = p.parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.cuda_graph and device != "cuda":
        p.error("--cuda-graph: needs --device cuda")
    if args.rounds < 1:
        p.error(f"--rounds: must be at least 1, got {args.rounds}")
    d = DEFAULTS[device]
    pick = lambda key: d[key] if getattr(args, key) is None else getattr(args, key)  # noqa: E731
    gpt_known = [*GPT_VARIANTS, *(f"{v}@torch" for v in GPT_VARIANTS)]
    attns = pick("attns")
    if bad := [a for a in attns if a.endswith(SDPA_WITHOUT_CUDNN) and a != "sdpa.flash"]:
        p.error(f"--attns: {bad}: only sdpa{SDPA_WITHOUT_CUDNN} rules out a backend")
    for name, given, known in (("--caches", args.caches, CACHES), ("--gpt", args.gpt, gpt_known)):
        if unknown := sorted(set(given) - set(known) - {"none"}):
            p.error(f"{name}: unknown {unknown}, expected some of {','.join(known)} or none")
    drop_none = lambda names: [n for n in names if n != "none"]  # noqa: E731
    s = Settings(device=device, dtype=getattr(torch, pick("dtype")), batches=pick("batches"),
                 prompts=pick("prompts"), new_tokens=pick("new_tokens"), size=pick("size"),
                 model=args.model, attns=drop_none(attns), caches=drop_none(args.caches),
                 gpt=drop_none(args.gpt), gpt_size=pick("gpt_size"), gpt_graph=args.cuda_graph,
                 rounds=args.rounds)
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
