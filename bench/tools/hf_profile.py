"""Where a Hugging Face model's prefill or decode step spends its time, per attention and
cache: wall time against the GPU kernels' sum (torch.profiler), and the top kernels. The
model is `mka generate-bench`'s 1B Llama shape with random weights, bf16, on CUDA.

    python bench/tools/hf_profile.py decode --prompt 1024 --batch 32
    python bench/tools/hf_profile.py prefill --prompt 16384

Rows: `sdpa.flash` and `mka` on a DynamicCache, and for decode `mka` on the PagedCache;
decode: after the prompt, 5 untimed steps, 20 timed (wall), 5 profiled; prefill: 3, 5, 1.
A wall time well above the kernels' sum is host time (or a synchronisation)."""

from __future__ import annotations

import argparse
import inspect
import time

import torch
from torch.profiler import ProfilerActivity, profile

ROWS = {"decode": [("sdpa.flash", "dynamic"), ("mka", "dynamic"), ("mka", "paged")],
        "prefill": [("sdpa.flash", "dynamic"), ("mka", "dynamic")]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("phase", choices=sorted(ROWS))
    ap.add_argument("--prompt", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=None,
                    help="profiled calls (default: 5 decode steps, 1 prefill)")
    ap.add_argument("--top", type=int, default=6, help="kernels listed per row")
    a = ap.parse_args()
    warm, timed = (5, 20) if a.phase == "decode" else (3, 5)  # untimed, then timed calls
    a.steps = a.steps or (5 if a.phase == "decode" else 1)
    if not torch.cuda.is_available():
        ap.error("needs a CUDA device")
    from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

    import mka.integrations.hf as hf
    from mka.integrations.hf.generation_bench import SIZES, attn_implementation, sdpa_backends
    from mka.integrations.hf.paged_cache import PagedCache
    hf.register()
    torch.manual_seed(0)
    with torch.device("cuda"):
        config = LlamaConfig(**SIZES["1b"], max_position_embeddings=a.prompt + 64)
        model = LlamaForCausalLM(config).to(torch.bfloat16).eval()
    key = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    ids = torch.randint(0, config.vocab_size, (a.batch, a.prompt), device="cuda")
    for attn, kind in ROWS[a.phase]:
        model.set_attn_implementation(attn_implementation(attn))

        def new_cache():
            return (PagedCache(model, a.batch, a.prompt + 64) if kind == "paged"
                    else DynamicCache(config=model.config))
        cache = new_cache() if a.phase == "decode" else None

        def call(tokens=None):
            if a.phase == "prefill":
                return model(ids, use_cache=True, **{key: new_cache()}, logits_to_keep=1).logits
            return model(tokens, use_cache=True, **{key: cache}).logits[:, -1].argmax(-1, keepdim=True)
        with torch.no_grad(), sdpa_backends(attn):
            tok = None
            if a.phase == "decode":
                tok = model(ids, use_cache=True, **{key: cache},
                            logits_to_keep=1).logits[:, -1].argmax(-1, keepdim=True)
            run = (lambda t: call(t)) if a.phase == "decode" else (lambda t: (call(), t)[1])
            for _ in range(warm):
                tok = run(tok)
            torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(timed):
                tok = run(tok)
            torch.cuda.synchronize()
            wall = (time.perf_counter() - start) / timed
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(a.steps):
                    tok = run(tok)
                torch.cuda.synchronize()
        stats = prof.key_averages()
        gpu = sum(e.self_device_time_total for e in stats) / a.steps
        print(f"== {a.phase} {attn} {kind} B{a.batch} T{a.prompt}: wall {wall * 1e3:.2f} ms, "
              f"GPU kernels {gpu / 1e3:.2f} ms per call")
        for e in sorted(stats, key=lambda e: -e.self_device_time_total)[:a.top]:
            print(f"   {e.self_device_time_total / a.steps / 1e3:8.3f} ms {e.count / a.steps:6.1f}x"
                  f"  {e.key[:90]}")
        del cache
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
