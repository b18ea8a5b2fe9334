"""Tiny GPT configurations, one per attention variant, for the model tests (CPU)."""

from __future__ import annotations

import pytest
import torch

from mka.models import GPT, GPTConfig

# test id -> (attention, n_kv_head, attn_options[, other GPTConfig fields])
VARIANTS = {
    "mha": ("mha", None, {}),
    "mqa": ("mqa", None, {}),
    "gqa": ("gqa", 2, {}),
    "mla-naive": ("mla", None, {"path": "naive"}),
    "mla-absorb": ("mla", None, {"path": "absorb", "q_lora_rank": 16}),
    "mka": ("mka", 2, {}),
    "mka-l3-window": ("mka", None, {"levels": 3, "window": 6, "memory_slots": 4}),
    "fastmka": ("fastmka", 2, {}),
    "fastmka-l3": ("fastmka", None, {"levels": 3, "memory_slots": 4}),
    # rotary positions instead of the table (a small base: angles that differ at these
    # lengths), keys that read the previous token
    "gqa-rope": ("gqa", 2, {}, {"rope": 100.0}),
    "mha-shift": ("mha", None, {}, {"key_shift": True}),
    "mka-rope-shift-window": ("mka", 2, {"window": 6}, {"rope": 100.0, "key_shift": True}),
    "mka-rope-shift-recall": ("mka", None, {"levels": 3, "window": 4, "recall_chunk": 2,
                                            "recall_top": 2}, {"rope": 100.0, "key_shift": True}),
    "mka-recall-mean": ("mka", 2, {"levels": 3, "window": 4, "recall_chunk": 2, "recall_top": 2,
                                   "recall_score": "mean"}),
    "mka-recall-bound": ("mka", 2, {"levels": 3, "window": 4, "recall_chunk": 2, "recall_top": 2,
                                    "recall_score": "bound"}),
    "fastmka-rope-shift": ("fastmka", None, {"levels": 3, "memory_slots": 4},
                           {"rope": 100.0, "key_shift": True}),
}


def tiny_config(variant: str, backend: str = "mka", **overrides) -> GPTConfig:
    attention, n_kv_head, options, *more = VARIANTS[variant]
    fields = dict(n_layer=2, n_embd=32, n_head=4, n_kv_head=n_kv_head, block_size=24,
                  vocab_size=19, attention=attention, attn_backend=backend,
                  attn_options=dict(options), **(more[0] if more else {}))
    fields.update(overrides)
    return GPTConfig(**fields)


def tiny_model(variant: str, backend: str = "mka", dtype=torch.float64, seed: int = 0,
               **overrides) -> GPT:
    torch.manual_seed(seed)
    return GPT.from_config(tiny_config(variant, backend, **overrides)).to(dtype).eval()


def variant_params():
    return [pytest.param(v, id=v) for v in VARIANTS]
