"""Where a training step's time goes: `mka`'s GPT (library kernels, or SDPA with
--attn-backend torch) against the nanoGPT-equivalent baseline (nanogpt_baseline.py), same
recipe and batch, forward + backward + fused AdamW under bf16 autocast. Per model: wall time
per step (the device synchronized around the timed steps), the sum of its CUDA kernels' time
per step (torch.profiler; wall − kernels is where the GPU waited on the host), and the kernels
that take the most time; with --host also the host-side events (aten ops, CUDA runtime calls)
with the most self time per step. Random token batches: the speed, not the loss, is measured.

    python bench/tools/train_profile.py [--steps 20] [--top 12] [--rows baseline,mka,mka.torch] [--host]
"""

from __future__ import annotations

import argparse
import collections
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from mka.models import GPT, GPTConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/tools is not a package
import nanogpt_baseline as nb  # noqa: E402


def build(row: str, vocab: int, device: torch.device):
    r = nb.Recipe()
    if row == "baseline":
        model = nb.BaselineGPT(r, vocab)
    else:
        cfg = GPTConfig(n_layer=r.n_layer, n_head=r.n_head, n_embd=r.n_embd,
                        block_size=r.block_size, vocab_size=vocab, dropout=r.dropout, bias=r.bias,
                        attention="mha", attn_backend="torch" if row == "mka.torch" else "mka")
        model = GPT(cfg)
    model = model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    return model, opt, r


def step(model, opt, x, y) -> None:
    with torch.autocast("cuda", dtype=torch.bfloat16):
        _, loss = model(x, y)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def measure(row: str, steps: int, top: int, host: bool, vocab: int = 65) -> None:
    device = torch.device("cuda")
    torch.manual_seed(0)
    model, opt, r = build(row, vocab, device)
    x = torch.randint(0, vocab, (r.batch_size, r.block_size), device=device)
    y = torch.randint(0, vocab, (r.batch_size, r.block_size), device=device)
    for _ in range(10):
        step(model, opt, x, y)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step(model, opt, x, y)
    torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) / steps * 1e3
    acts = [ProfilerActivity.CUDA] + ([ProfilerActivity.CPU] if host else [])
    with profile(activities=acts) as prof:
        for _ in range(steps):
            step(model, opt, x, y)
        torch.cuda.synchronize()
    per = collections.Counter()
    for e in prof.key_averages():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            per[e.key] += e.device_time_total / 1e3 / steps  # ms per step
    kernels = sum(per.values())
    tokens = r.batch_size * r.block_size
    print(f"\n== {row}: {wall:.3f} ms per step ({tokens / wall * 1e3:,.0f} tokens/s), "
          f"kernels {kernels:.3f} ms per step (GPU busy {kernels / wall:.0%})")
    for name, ms in per.most_common(top):
        print(f"  {ms:7.3f} ms  {name[:110]}")
    if host:
        cpu = collections.Counter()
        calls = collections.Counter()
        for e in prof.key_averages():
            if e.device_type == torch.autograd.DeviceType.CPU:
                cpu[e.key] += e.self_cpu_time_total / 1e3 / steps
                calls[e.key] += e.count / steps
        print(f"  host: {sum(cpu.values()):.3f} ms of self time per step in profiled events")
        for name, ms in cpu.most_common(top):
            print(f"  {ms:7.3f} ms  {calls[name]:6.0f} calls  {name[:90]}")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument("--rows", default="baseline,mka,mka.torch")
    ap.add_argument("--host", action="store_true", help="also the host-side events")
    a = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("train_profile.py: needs a CUDA device")
    print(torch.cuda.get_device_name(), torch.__version__)
    for row in a.rows.split(","):
        measure(row, a.steps, a.top, a.host)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
