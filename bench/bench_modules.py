"""Attention variants at GPT-2-small width on the CPU: one transformer block's forward +
backward at T = 512, B = 1 (float32), on both attention backends.

    pytest bench/bench_modules.py --benchmark-only --benchmark-enable
    python bench/bench_modules.py        # parameters and KV-cache bytes per token, markdown

Results and the table are recorded in bench/results/modules_cpu.md.
"""

from __future__ import annotations

import pytest
import torch

from mka.models import GPT, GPTConfig
from mka.models.gpt import Block

GPT2_SMALL = dict(n_layer=12, n_embd=768, n_head=12, block_size=1024, vocab_size=50257)
T, B = 512, 1

# id -> (attention, n_kv_head, attn_options)
VARIANTS = {
    "mha": ("mha", None, {}),
    "mqa": ("mqa", None, {}),
    "gqa-4": ("gqa", 4, {}),
    "mla-naive": ("mla", None, {"path": "naive"}),
    "mla-absorb": ("mla", None, {"path": "absorb"}),
    "mka": ("mka", None, {}),
    "mka-l3": ("mka", None, {"levels": 3}),
    "fastmka": ("fastmka", None, {}),
    "fastmka-gqa-4": ("fastmka", 4, {}),
    "fastmka-l3": ("fastmka", None, {"levels": 3}),
}


def config(variant: str, backend: str = "mka") -> GPTConfig:
    attention, n_kv_head, options = VARIANTS[variant]
    return GPTConfig(**GPT2_SMALL, attention=attention, n_kv_head=n_kv_head,
                     attn_backend=backend, attn_options=dict(options))


@pytest.mark.parametrize("backend", ["mka", "torch"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_block_forward_backward(benchmark, variant, backend):
    torch.manual_seed(0)
    block = Block(config(variant, backend))
    x = torch.randn(B, T, GPT2_SMALL["n_embd"], requires_grad=True)
    w = torch.randn(B, T, GPT2_SMALL["n_embd"])

    def step():
        block.zero_grad(set_to_none=True)
        (block(x) * w).sum().backward()

    benchmark.pedantic(step, rounds=5, warmup_rounds=1)
    benchmark.extra_info["block_params"] = sum(p.numel() for p in block.parameters())
    benchmark.extra_info["attn_params"] = sum(p.numel() for p in block.attn.parameters())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend", ["mka", "torch"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_block_forward_backward_cuda(benchmark, variant, backend):
    """The same block on a GPU as the trainer runs it: bf16 autocast, B = 8, T = 1024."""
    torch.manual_seed(0)
    block = Block(config(variant, backend)).cuda()
    x = torch.randn(8, 1024, GPT2_SMALL["n_embd"], device="cuda", requires_grad=True)
    w = torch.randn(8, 1024, GPT2_SMALL["n_embd"], device="cuda")

    def step():
        block.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = block(x)
        (y.float() * w).sum().backward()
        torch.cuda.synchronize()

    benchmark.pedantic(step, rounds=20, warmup_rounds=3)


def size_table() -> str:
    """Parameters and KV-cache bytes per token of the whole GPT-2-small model, per variant."""
    rows = ["| variant | params (non-embedding) | attention params / layer | "
            "KV cache bytes / token (bf16, 12 layers) | vs MHA | fixed state bytes / sequence |",
            "|---|---:|---:|---:|---:|---:|"]
    mha_bytes = None
    for variant in VARIANTS:
        with torch.device("meta"):
            m = GPT(config(variant))
        per_token = m.kv_cache_bytes_per_token(torch.bfloat16)
        mha_bytes = mha_bytes or per_token
        attn = sum(p.numel() for p in m.blocks[0].attn.parameters())
        rows.append(f"| {variant} | {m.num_params():,} | {attn:,} | {per_token:,} | "
                    f"{per_token / mha_bytes:.3f} | {m.kv_cache_state_bytes(torch.bfloat16):,} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(size_table())
