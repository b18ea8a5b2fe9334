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
_FROM_CONFIG = ("n_embd", "n_head", "n_kv_head", "bias", "dropout", "backend", "rope",
                "key_shift")


def attention_options(name: str) -> tuple[str, ...]:
    """The ``attn_options`` keys the variant ``name`` accepts."""
    return tuple(p for p in _parameters(_variant(name))
                 if p not in ("self", "kwargs", *_FROM_CONFIG))


def _parameters(cls: type) -> list[str]:
    """The constructor's parameters, with those a ``**kwargs`` passes up to a base class."""
    names: list[str] = []
    for c in cls.__mro__:
        params = inspect.signature(c.__init__).parameters
        names += [p for p in params if p not in names]
        if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
            break
    return names


def _variant(name: str) -> type[CausalSelfAttention]:
    if name not in ATTENTION_REGISTRY:
        raise ValueError(f"attention: unknown variant {name!r}, expected one of "
                         f"{sorted(ATTENTION_REGISTRY)}")
    return ATTENTION_REGISTRY[name]


def build_attention(config) -> CausalSelfAttention:
    """The attention module ``config`` asks for. ``config`` has ``attention`` (a registry
    name), ``n_embd, n_head, n_kv_head, bias, dropout, attn_backend`` and ``attn_options``
    (a dict of the variant's own options, see :func:`attention_options`); the optional
    ``rope`` (the model's rotary base, None: a position table) and ``key_shift`` go to the
    variants with plain key heads (not MLA: it rotates its decoupled dims always, by its own
    ``rope_theta``, next to the model's position table)."""
    cls = _variant(config.attention)
    options = dict(config.attn_options or {})
    allowed = attention_options(config.attention)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"attn_options: {unknown} not options of attention "
                         f"{config.attention!r} (allowed: {list(allowed)})")
    for name in ("rope", "key_shift"):
        value = getattr(config, name, None)
        if value is not None and value is not False:  # 0 too: the module's check refuses it
            if name not in _parameters(cls):
                raise ValueError(f"{name}: attention {config.attention!r} does not take it")
            options[name] = value
    return cls(config.n_embd, config.n_head, config.n_kv_head, bias=config.bias,
               dropout=config.dropout, backend=config.attn_backend, **options)


def check_attention_config(config) -> None:
    """Raises the ValueError that :func:`build_attention` would, without allocating weights."""
    with torch.device("meta"):
        build_attention(config)
