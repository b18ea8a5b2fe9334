"""Attention modules behind one interface (:class:`CausalSelfAttention`): hidden states
``(B, T, D)`` in and out, an optional paged cache (a layer of a
:class:`mka.memory.PagedKVCache`), and the cache's bytes per token. Each runs on the native ops (``backend="mka"``) or on plain PyTorch
(``backend="torch"``: SDPA and a chunked EMA)."""

from .base import CausalSelfAttention, QKVAttention
from .fastmka_attention import FastMKAAttention
from .gqa import GroupedQueryAttention, MultiHeadAttention, MultiQueryAttention
from .long_term_memory import LongTermMemory
from .mka_attention import MKAAttention
from .mla import MultiHeadLatentAttention
from .registry import (ATTENTION_REGISTRY, attention_options, build_attention,
                       check_attention_config)
from .router import Router

__all__ = [
    "CausalSelfAttention", "QKVAttention", "GroupedQueryAttention",
    "MultiHeadAttention", "MultiQueryAttention", "MultiHeadLatentAttention", "MKAAttention",
    "FastMKAAttention", "LongTermMemory", "Router", "ATTENTION_REGISTRY", "attention_options",
    "build_attention", "check_attention_config",
]
