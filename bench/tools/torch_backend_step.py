"""The decode step of a GPT model on the native ops against the same model on
``attn_backend="torch"`` (issue 19's bar: the torch backend within 1.5x of the native path),
both in one process with their rounds interleaved, so the host's drift between runs (±25 % on
the GPU machines) moves both alike. After a prefill of the prompt, each round times a batch
of decode steps per backend (the model's forward over its paged cache; greedy tokens);
medians and ranges of ms per step:

    python bench/tools/torch_backend_step.py --device cuda                 # GPT-2-small size, bf16
    python bench/tools/torch_backend_step.py --device cpu --layers 12 --embd 64 --heads 2 --prompt 64
"""
import argparse
import statistics
import time

import torch

from mka.models import GPT, GPTConfig

ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("--device", default="cuda")
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
        for backend in ("mka", "torch"):
            torch.manual_seed(0)  # the same weights
            m = GPT(GPTConfig(n_layer=a.layers, n_embd=a.embd, n_head=a.heads, block_size=block,
                              vocab_size=a.vocab, attention="mha", attn_backend=backend))
            m = m.to(a.device, dtype).eval()
            caches, logits = m._prefill(list(idx))
            runs[backend] = (m, caches, logits.argmax(-1, keepdim=True))
        times = {backend: [] for backend in runs}
        for _ in range(a.rounds):
            for backend, (m, caches, nxt) in runs.items():
                for _ in range(3):
                    m(nxt, caches=caches)
                sync()
                t = time.perf_counter()
                for _ in range(a.steps):
                    m(nxt, caches=caches)
                sync()
                times[backend].append((time.perf_counter() - t) / a.steps * 1e3)
    med = {backend: statistics.median(v) for backend, v in times.items()}
    cells = "  ".join(f"{'native' if backend == 'mka' else 'torch'} {med[backend]:.2f} "
                      f"({min(v):.2f}-{max(v):.2f})" for backend, v in times.items())
    print(f"B {B}: {cells}  torch / native {med['torch'] / med['mka']:.2f}")
