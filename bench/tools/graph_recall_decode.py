"""Decode of small GPT models whose MKA layers recall chunks (and attend to level-2 summaries),
eager against a CUDA graph of the decode step (`generate(..., cuda_graph=True)`: the static
cache of SPEC §7.2's recall and §7.3's summaries), with full attention (GQA) beside. CUDA,
bf16, random weights, greedy tokens. After a prefill of the prompt, N decode steps are timed
as a whole (eager: the model's forward over the cache; graph: `DecodeGraph.step`, after its
eager first step and the capture), ms per step, medians of --rounds:

    python bench/tools/graph_recall_decode.py --prompt 8192 --new 128
"""
import argparse
import statistics
import time

import torch

from mka.models import GPT, GPTConfig
from mka.models.decode_graph import DecodeGraph


def model(prompt: int, new: int, attention: str, **options) -> GPT:
    torch.manual_seed(0)
    config = GPTConfig(n_layer=2, n_embd=256, n_head=4, n_kv_head=2, block_size=prompt + new + 4,
                       vocab_size=256, attention=attention, attn_options=options)
    return GPT(config).cuda().to(torch.bfloat16).eval()


def step_ms(m: GPT, idx: torch.Tensor, new: int, graph: bool) -> float:
    """ms per decode step over ``new`` steps after a prefill of ``idx``."""
    caches, logits = m._prefill(list(idx))
    nxt = logits.argmax(-1, keepdim=True)
    if graph:
        g = DecodeGraph(m, caches, idx.shape[1] + new + 2)
        for _ in range(2):  # the eager first step, then the capture
            nxt = g.step(nxt).argmax(-1, keepdim=True)
        step = g.step
    else:
        step = lambda t: m(t, caches=caches)[0][:, -1]  # noqa: E731
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(new):
        nxt = step(nxt).argmax(-1, keepdim=True)
    torch.cuda.synchronize()
    return 1e3 * (time.perf_counter() - t0) / new


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompt", type=int, default=8192)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    recall = dict(levels=3, window=512, recall_chunk=64, recall_top=8)
    rows = [("gqa", model(a.prompt, a.new, "gqa")),
            ("mka recall + summaries", model(a.prompt, a.new, "mka", ema_stride=64, **recall)),
            ("mka recall", model(a.prompt, a.new, "mka", **recall))]
    idx = torch.randint(0, 256, (1, a.prompt), device="cuda")
    print(f"{torch.cuda.get_device_name()}, bf16, B 1, prompt {a.prompt}, {a.new} new tokens")
    print(f"{'model':24s} {'eager ms/step':>14s} {'graph ms/step':>14s}")
    for name, m in rows:
        with torch.no_grad():
            ms = {g: statistics.median(step_ms(m, idx, a.new, g) for _ in range(a.rounds))
                  for g in (False, True)}
        print(f"{name:24s} {ms[False]:14.2f} {ms[True]:14.2f}", flush=True)


if __name__ == "__main__":
    main()
