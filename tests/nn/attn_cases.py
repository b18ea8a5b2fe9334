"""The attention variants every module test runs over, and how to build one (float64, CPU)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from mka.nn import build_attention

N_EMBD, N_HEAD = 32, 4

# test id -> (attention name, n_kv_head, attn_options)
VARIANTS = {
    "mha": ("mha", None, {}),
    "mqa": ("mqa", None, {}),
    "gqa": ("gqa", 2, {}),
    "gqa-window": ("gqa", 2, {"window": 3}),
    "mla-naive": ("mla", None, {"path": "naive"}),
    "mla-absorb-qlora": ("mla", None, {"path": "absorb", "q_lora_rank": 12}),
    "mka": ("mka", 2, {"beta": 0.8}),
    "mka-l3-window": ("mka", 2, {"levels": 3, "window": 4, "memory_slots": 3}),
    "fastmka": ("fastmka", None, {}),
    "fastmka-l3-gqa-window": ("fastmka", 2, {"levels": 3, "window": 5, "memory_slots": 3}),
}
BACKENDS = ["mka", "torch"]


def config(name: str, n_kv_head=None, backend: str = "mka", n_embd: int = N_EMBD,
           **options) -> SimpleNamespace:
    return SimpleNamespace(attention=name, n_embd=n_embd, n_head=N_HEAD, n_kv_head=n_kv_head,
                           bias=True, dropout=0.0, attn_backend=backend, attn_options=options)


def make(variant: str, backend: str = "mka", seed: int = 0, dtype=torch.float64,
         n_embd: int = N_EMBD):
    """The variant's module with weights that depend on ``seed`` only (not the backend)."""
    name, n_kv_head, options = VARIANTS[variant]
    torch.manual_seed(seed)
    return build_attention(config(name, n_kv_head, backend, n_embd, **options)).to(dtype)


def variant_params():
    return [pytest.param(v, id=v) for v in VARIANTS]


def hidden(B: int = 2, T: int = 11, dtype=torch.float64, n_embd: int = N_EMBD) -> torch.Tensor:
    return torch.randn(B, T, n_embd, dtype=dtype)
