"""Where a Hugging Face model's prefill or decode step spends its time, per attention and
cache: wall time against the GPU kernels' sum (torch.profiler), and the top kernels. The
model is `mka generate-bench`'s 1B Llama shape with random weights, bf16, on CUDA.

    python bench/tools/hf_profile.py decode --prompt 1024 --batch 32
    python bench/tools/hf_profile.py prefill --prompt 16384

Rows: `sdpa.flash` and `mka` on a DynamicCache, and for decode `mka` on the PagedCache;
decode: after the prompt, 5 untimed steps, 20 timed (wall), 5 profiled; prefill: 3, 5, 1.
A wall time well above the kernels' sum is host time (or a synchronisation). To tell the two
apart, each row also times the host alone: one call queued behind a sleeping GPU (~0.2 s). A
call that synchronises waits out the sleep; one that does not returns in its host time. With
`--host-top N` the profile also records the host and lists its N most expensive events
(CUDA runtime calls included: a blocking one shows there)."""

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
    ap.add_argument("--host-top", type=int, default=0,
                    help="also profile the host and list its N most expensive events per row")
    ap.add_argument("--sync-site", action="store_true",
                    help="also find where a call waits for the GPU (module hooks, one call)")
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
            host = host_ms(run, tok)
            if a.sync_site:
                tok = sync_site(model, run, tok)
            acts = [ProfilerActivity.CUDA] + ([ProfilerActivity.CPU] if a.host_top else [])
            with profile(activities=acts) as prof:
                for _ in range(a.steps):
                    tok = run(tok)
                torch.cuda.synchronize()
        stats = prof.key_averages()
        gpu = sum(e.self_device_time_total for e in stats) / a.steps
        print(f"== {a.phase} {attn} {kind} B{a.batch} T{a.prompt}: wall {wall * 1e3:.2f} ms, "
              f"GPU kernels {gpu / 1e3:.2f} ms per call; host alone {host:.2f} ms for one call "
              f"behind a {SLEEP_MS} ms GPU sleep")
        for e in sorted(stats, key=lambda e: -e.self_device_time_total)[:a.top]:
            print(f"   {e.self_device_time_total / a.steps / 1e3:8.3f} ms {e.count / a.steps:6.1f}x"
                  f"  {e.key[:90]}")
        if a.host_top:
            print("   host events (self CPU ms per call, calls per call):")
            for e in sorted(stats, key=lambda e: -e.self_cpu_time_total)[:a.host_top]:
                print(f"   {e.self_cpu_time_total / a.steps / 1e3:8.3f} ms {e.count / a.steps:6.1f}x"
                      f"  {e.key[:90]}")
        del cache
        torch.cuda.empty_cache()


SLEEP_MS = 200


def sync_site(model, run, tok):
    """Where a call waits for the GPU: one call queued behind a sleeping GPU, the host clock
    stamped at every module's entry and exit; the widest gaps between stamps name the module
    in which the host blocked. PyTorch's synchronising operations in the call are listed with
    the caller's line (torch.cuda.set_sync_debug_mode)."""
    import traceback
    import warnings
    stamps = [(0.0, "start")]
    hooks = []
    for name, m in model.named_modules():
        name = name or "<root>"
        hooks.append(m.register_forward_pre_hook(
            lambda mod, args, name=name: stamps.append((time.perf_counter(), "enter " + name))))
        hooks.append(m.register_forward_hook(
            lambda mod, args, out, name=name: stamps.append((time.perf_counter(), "exit " + name))))
    sites = []

    def note(message, *args, **kwargs):
        if "synchroniz" not in str(message) or "prototype" in str(message):
            return  # the debug mode's own notice, or another warning
        frames = [f for f in traceback.extract_stack()[:-1]
                  if "/torch/" not in f.filename and "warnings" not in f.filename]
        sites.append(f"{str(message)[:60]} at " + " <- ".join(
            f"{f.filename.split('/')[-1]}:{f.lineno} {f.name}" for f in frames[-3:]))
    torch.cuda.synchronize()
    torch.cuda._sleep(int(SLEEP_MS * 1e3 * 1980))
    try:
        with warnings.catch_warnings():  # restores showwarning on leaving
            warnings.simplefilter("always")
            warnings.showwarning = note
            torch.cuda.set_sync_debug_mode("warn")
            stamps[0] = (time.perf_counter(), "start")
            tok = run(tok)
            stamps.append((time.perf_counter(), "end"))
    finally:
        torch.cuda.set_sync_debug_mode(0)
        for h in hooks:
            h.remove()
    torch.cuda.synchronize()
    gaps = sorted(((b[0] - a[0], a[1], b[1]) for a, b in zip(stamps, stamps[1:])),
                  reverse=True)[:3]
    print(f"   one call behind a {SLEEP_MS} ms sleep: {(stamps[-1][0] - stamps[0][0]) * 1e3:.1f} ms")
    for g, x, y in gaps:
        print(f"   {g * 1e3:8.2f} ms from '{x}' to '{y}'")
    for site in dict.fromkeys(sites):
        print(f"   sync: {site}")
    # Host time inside each kind of module (layer indices folded), median over its instances,
    # and the span between a layer's v_proj and o_proj (RoPE, the cache, the attention).
    import re
    inside: dict[str, list[float]] = {}
    opened: dict[str, float] = {}
    last_v = None
    for t, what in stamps[1:-1]:
        kind, name = what.split(" ", 1)
        if kind == "enter":
            opened[name] = t
            if name.endswith("o_proj") and last_v is not None:
                inside.setdefault("v_proj -> o_proj", []).append(t - last_v)
        else:
            inside.setdefault(re.sub(r"\.\d+", ".#", name), []).append(t - opened.pop(name))
            if name.endswith("v_proj"):
                last_v = t
    for name in ("<root>", "model", "model.layers.#", "model.layers.#.self_attn",
                 "v_proj -> o_proj", "model.layers.#.mlp", "lm_head"):
        if name in inside:
            us = sorted(inside[name])
            print(f"   host in {name:28s} {us[len(us) // 2] * 1e6:8.1f} us median of "
                  f"{len(us)}, {sum(us) * 1e3:7.2f} ms in all")
    return tok


def host_ms(run, tok) -> float:
    """Host time of one call queued behind a sleeping GPU (ms): near the sleep if the call
    synchronises with the device. One call only: a 1B model's decode step queues ~600
    launches, and a second one would fill the launch queue, which blocks the host as a
    synchronisation would."""
    torch.cuda.synchronize()
    torch.cuda._sleep(int(SLEEP_MS * 1e3 * 1980))  # cycles at the H100's 1980 MHz; a slower clock sleeps longer
    start = time.perf_counter()
    run(tok)
    elapsed = time.perf_counter() - start
    torch.cuda.synchronize()
    return elapsed * 1e3


if __name__ == "__main__":
    main()
