"""Attention modules by name, built from a model config."""

from __future__ import annotations

import inspect

import torch

from .base import CausalSelfAttention
from .fastmka_attention import FastMKAAttention
from .gqa import GroupedQueryAttention, MultiHeadAttention, MultiQueryAttention
from .mka_attention import MKAAttention
from .mla import MultiHeadLatentAttention

ATTENTION_REGISTRY: dict[str, type[CausalSelfAttention]] = {
    "mha": MultiHeadAttention,
    "mqa": MultiQueryAttention,
    "gqa": GroupedQueryAttention,
    "mla": MultiHeadLatentAttention,
    "mka": MKAAttention,
    "fastmka": FastMKAAttention,
}

# Taken from the config's own fields, not from attn_options.
_FROM_CONFIG = ("n_embd", "n_head", "n_kv_head", "bias", "dropout", "backend")


def attention_options(name: str) -> tuple[str, ...]:
    """The ``attn_options`` keys the variant ``name`` accepts."""
    names: list[str] = []
    for cls in _variant(name).__mro__:  # a constructor taking **kwargs passes them up
        params = inspect.signature(cls.__init__).parameters
        names += [p for p in params if p not in names]
        if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
            break
    return tuple(p for p in names if p not in ("self", "kwargs", *_FROM_CONFIG))


def _variant(name: str) -> type[CausalSelfAttention]:
    if name not in ATTENTION_REGISTRY:
        raise ValueError(f"attention: unknown variant {name!r}, expected one of "
                         f"{sorted(ATTENTION_REGISTRY)}")
    return ATTENTION_REGISTRY[name]


def build_attention(config) -> CausalSelfAttention:
    """The attention module ``config`` asks for. ``config`` has ``attention`` (a registry
    name), ``n_embd, n_head, n_kv_head, bias, dropout, attn_backend`` and ``attn_options``
    (a dict of the variant's own options, see :func:`attention_options`)."""
    cls = _variant(config.attention)
    options = dict(config.attn_options or {})
    allowed = attention_options(config.attention)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"attn_options: {unknown} not options of attention "
                         f"{config.attention!r} (allowed: {list(allowed)})")
    return cls(config.n_embd, config.n_head, config.n_kv_head, bias=config.bias,
               dropout=config.dropout, backend=config.attn_backend, **options)


def check_attention_config(config) -> None:
    """Raises the ValueError that :func:`build_attention` would, without allocating weights."""
    with torch.device("meta"):
        build_attention(config)
