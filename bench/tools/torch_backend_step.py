"""The decode step of a GPT model on the native ops against the same model on
``attn_backend="torch"`` (issue 19's bar: the torch backend within 1.5x of the native path),
or, with ``--rows``, any attention variants and backends (``mha,fastmka,mka``: MKA's and
FastMKA's step against MHA's), all in one process with their rounds interleaved, so the
host's drift between runs (±25 % on the GPU machines) moves them alike. After a prefill of the
prompt, each round times a batch of decode steps per row (the model's forward over its paged
cache; greedy tokens); medians and ranges of ms per step, and each row ÷ the first:

    python bench/tools/torch_backend_step.py --device cuda                 # GPT-2-small size, bf16
    python bench/tools/torch_backend_step.py --device cpu --layers 12 --embd 64 --heads 2 --prompt 64
    python bench/tools/torch_backend_step.py --device cpu --rows mha,fastmka --layers 12 --embd 128 --heads 4 --prompt 256 --vocab 256 --batches 1

To time another tree of the library with the same native module (an A/B of two commits),
``MKA_BENCH_TREE=PATH/python`` imports that tree (an editable install's finder would import
the installed one: it is dropped).
"""
import argparse
import os
import statistics
import sys
import time

if os.environ.get("MKA_BENCH_TREE"):
    sys.meta_path = [f for f in sys.meta_path if "editable" not in type(f).__module__]
    sys.path.insert(0, os.environ["MKA_BENCH_TREE"])

import torch  # noqa: E402

from mka.models import GPT, GPTConfig  # noqa: E402

ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("--device", default="cuda")
ap.add_argument("--rows", default="mha,mha@torch",
                help="attention variants, each @backend or native (default mha,mha@torch)")
ap.add_argument("--batches", default="1,16")
ap.add_argument("--prompt", type=int, default=1024)
ap.add_argument("--layers", type=int, default=12)
ap.add_argument("--embd", type=int, default=768)
ap.add_argument("--heads", type=int, default=12)
ap.add_argument("--vocab", type=int, default=50257)
ap.add_argument("--rounds", type=int, default=8)
ap.add_argument("--steps", type=int, default=20, help="decode steps per backend and round")
a = ap.parse_args()
cuda = a.device == "cuda"
dtype = torch.bfloat16 if cuda else torch.float32
if not cuda:
    torch.set_num_threads(1)  # the host's cost per step, as on a GPU machine's host thread


def sync() -> None:
    if cuda:
        torch.cuda.synchronize()


block = a.prompt + a.rounds * (a.steps + 3) + 8
print(f"{torch.cuda.get_device_name() if cuda else 'cpu'}, {dtype}, GPT {a.layers} layers of "
      f"{a.embd} ({a.heads} heads), prompt {a.prompt}; ms per decode step, median (range) of "
      f"{a.rounds} rounds of {a.steps} steps")
for B in [int(x) for x in a.batches.split(",")]:
    torch.manual_seed(0)
    idx = torch.randint(0, a.vocab, (B, a.prompt), device=a.device)
    runs = {}
    with torch.no_grad():
        for row in a.rows.split(","):
            variant, _, backend = row.partition("@")
            torch.manual_seed(0)  # the same weights
            m = GPT(GPTConfig(n_layer=a.layers, n_embd=a.embd, n_head=a.heads, block_size=block,
                              vocab_size=a.vocab, attention=variant,
                              attn_backend=backend or "mka"))
            m = m.to(a.device, dtype).eval()
            caches, logits = m._prefill(list(idx))
            runs[row] = (m, caches, logits.argmax(-1, keepdim=True))
        times = {row: [] for row in runs}
        for _ in range(a.rounds):
            for row, (m, caches, nxt) in runs.items():
                for _ in range(3):
                    m(nxt, caches=caches)
                sync()
                t = time.perf_counter()
                for _ in range(a.steps):
                    m(nxt, caches=caches)
                sync()
                times[row].append((time.perf_counter() - t) / a.steps * 1e3)
    med = {row: statistics.median(v) for row, v in times.items()}
    first = next(iter(med.values()))
    cells = "  ".join(f"{row} {med[row]:.2f} ({min(v):.2f}-{max(v):.2f})" for row, v in times.items())
    ratios = "  ".join(f"{row} / first {med[row] / first:.2f}" for row in list(med)[1:])
    print(f"B {B}: {cells}  {ratios}")
