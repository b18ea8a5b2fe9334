"""Converting a transformers decoder to FastMKA or MKA attention, and loading it back.

:func:`convert` gives every attention layer a router (``mka.nn.Router``, from the layer's
query after RoPE, as ``mka.nn``'s modules route) and switches the model to the
implementation that runs ``mka.fastmka`` (key-side routing) or ``mka.mka`` (query-side).
The router starts at ``lam = (1, 2**-25)``: level 1 (the attention the model had) takes the
whole weight to float32 precision, so the converted model computes what the original did.
``levels=3`` (MKA) adds level 3 by recall (SPEC §7.2): chunks of the layer's own earlier keys
recalled by SimHash, outside its sliding window if it has one; the router starts with
``lam = (1, 2**-26, 2**-26)``.

Cached generation: ``mka.mka`` recomputes level 2's EMA over every cached key inside the
op, so transformers' ``DynamicCache`` holding the raw keys/values is all its decode needs.
``mka.fastmka`` fuses key ``t`` with token ``t``'s router weights; those are not in the
cache, so each layer's weights of the cached tokens ride on its cache layer
(:class:`RoutedCacheLayer`, which crops, reorders and selects them with the keys).
"""

from __future__ import annotations

import json
import math
import os
import re
from typing import Optional

import torch
from torch import Tensor, nn
from transformers.cache_utils import DynamicLayer

import mka
from mka.memory.recall import Recall, recall_attention
from mka.nn import Router

from .attention import over_sequences, prepare
from .paged_cache import PagedKV

ROUTED_IMPLEMENTATIONS = {"fastmka": "mka_fastmka", "mka": "mka_mka"}
CONFIG_KEY = "mka"  # the conversion's options in config.json
_ROUTER_PATTERN = r"\.mka_router\."
_ADDED_PATTERN = r"\.mka_(router|recall)\."  # what convert() adds (recall: fixed hyperplanes)
# Router bias of level 1 over level 2: lam_1 = 2**-25, below half of float32's epsilon, so
# lam_0 rounds to exactly 1 in float32.
INIT_GAP = math.log(4 / torch.finfo(torch.float32).eps)


def convert(model: nn.Module, variant: str = "fastmka", beta: float = 0.9, levels: int = 2,
            router_hidden: int = 64, init_gap: float = INIT_GAP,
            recall: Optional[dict] = None) -> nn.Module:
    """Adds a router to each attention layer of ``model`` (in place; returned too) and sets
    its attention implementation to ``"mka_fastmka"`` or ``"mka_mka"``. ``init_gap``: the
    router's initial bias of level 1 over the others (the default makes outputs equal to the
    original's in float32; a smaller gap gives the router larger gradients at the start of
    fine-tuning, at the price of that equality). ``levels=3`` (``variant="mka"``): level 3 by
    recall, ``recall`` its options (``chunk`` 64, ``top`` 4, ``tables`` 4, ``bits`` 16,
    ``seed`` 0: :class:`mka.memory.recall.Recall`). Options go to ``model.config.mka``."""
    if variant not in ROUTED_IMPLEMENTATIONS:
        raise ValueError(f"variant: expected one of {sorted(ROUTED_IMPLEMENTATIONS)}, got {variant!r}")
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0.0 <= beta < 1.0:
        raise ValueError(f"beta: the EMA decay must be a float in [0, 1), got {beta!r}")
    if levels not in (2, 3) or (levels == 3 and variant != "mka"):
        raise ValueError(f"levels: 2 (local + session EMA), or 3 with variant='mka' (+ recall "
                         f"of earlier chunks), got levels={levels!r}, variant={variant!r}")
    if recall is not None and levels != 3:
        raise ValueError("recall: level 3's options; set levels=3")
    recall = _recall_options(recall) if levels == 3 else None
    if not math.isfinite(init_gap):
        raise ValueError(f"init_gap: must be finite, got {init_gap!r}")
    layers = attention_layers(model)
    param = next(model.parameters())
    for layer in layers:
        router = Router(layer.q_proj.out_features, levels, router_hidden)
        with torch.no_grad():
            router.out.weight.zero_()
            router.out.bias.zero_()
            # the levels after the first share e^-gap: 2**-25 in all, as with two levels
            router.out.bias[0] = init_gap + math.log(levels - 1)
        layer.mka_router = router.to(device=param.device, dtype=param.dtype)
        layer.mka_beta = float(beta)
        if recall is not None:
            layer.mka_recall = Recall(layer.head_dim, **recall).to(param.device)
        _watch_cache(layer)
    setattr(model.config, CONFIG_KEY, {"variant": variant, "beta": float(beta), "levels": levels,
                                      "router_hidden": router_hidden,
                                      **({"recall": recall} if recall else {})})
    model.set_attn_implementation(ROUTED_IMPLEMENTATIONS[variant])
    return model


def _recall_options(recall: Optional[dict]) -> dict:
    options = {"chunk": 64, "top": 4, "tables": 4, "bits": 16, "seed": 0}
    unknown = sorted(set(recall or {}) - set(options))
    if unknown:
        raise ValueError(f"recall: unknown options {unknown} (allowed: {sorted(options)})")
    return {**options, **(recall or {})}


def attention_layers(model: nn.Module) -> list[nn.Module]:
    """The attention modules of a transformers decoder: those with a query projection and a
    layer index (Llama, Qwen2/3, Mistral and their kin)."""
    layers = [m for m in model.modules()
              if isinstance(getattr(m, "q_proj", None), nn.Linear) and hasattr(m, "layer_idx")]
    if not layers:
        raise ValueError(f"model: found no attention layers (modules with q_proj and layer_idx) "
                         f"in {type(model).__name__}")
    return layers


def load_converted(path: str, **kwargs) -> nn.Module:
    """Loads a converted model that ``save_pretrained`` wrote to ``path``: the base weights
    through ``AutoModelForCausalLM.from_pretrained(path, **kwargs)``, then the routers."""
    from safetensors import safe_open
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    config = AutoConfig.from_pretrained(path)
    options = getattr(config, CONFIG_KEY, None)
    if not isinstance(options, dict):
        raise ValueError(f"path: {path} has no '{CONFIG_KEY}' entry in config.json, so it is not "
                         "a converted model; load it with from_pretrained(attn_implementation='mka')")
    kwargs.setdefault("attn_implementation", "mka")
    model_cls = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    # The routers are loaded below; the class-level pattern keeps from_pretrained from
    # reporting them as unexpected weights while it builds the model.
    ignored = model_cls._keys_to_ignore_on_load_unexpected
    model_cls._keys_to_ignore_on_load_unexpected = [*(ignored or []), _ADDED_PATTERN]
    try:
        model = model_cls.from_pretrained(path, config=config, **kwargs)
    finally:
        model_cls._keys_to_ignore_on_load_unexpected = ignored
    convert(model, **options)
    wanted = {n: p for n, p in model.named_parameters() if re.search(_ROUTER_PATTERN, n)}
    found = set()
    for file in _weight_files(path):
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                if name in wanted:
                    with torch.no_grad():
                        wanted[name].copy_(f.get_tensor(name))
                    found.add(name)
    if missing := sorted(set(wanted) - found):
        raise ValueError(f"path: {path} lacks router weights {missing[:3]}"
                         f"{' ...' if len(missing) > 3 else ''}")
    return model


def load_model(path: str, attn_implementation: str = "mka", **kwargs) -> nn.Module:
    """A causal LM from ``path``: :func:`load_converted` if its config.json has the
    conversion's entry, else ``from_pretrained`` with ``attn_implementation``."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if isinstance(getattr(AutoConfig.from_pretrained(path), CONFIG_KEY, None), dict):
        return load_converted(path, **kwargs)
    return AutoModelForCausalLM.from_pretrained(path, attn_implementation=attn_implementation,
                                                **kwargs)


def _weight_files(path: str) -> list[str]:
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            return sorted({os.path.join(path, n) for n in json.load(f)["weight_map"].values()})
    single = os.path.join(path, "model.safetensors")
    if not os.path.exists(single):
        raise ValueError(f"path: no model.safetensors (or its index) in {path}")
    return [single]


# --- the attention functions of converted models ----------------------------------------------

def fastmka_attention_forward(module: nn.Module, query: Tensor, key: Tensor, value: Tensor,
                              attention_mask, dropout: float = 0.0, scaling: Optional[float] = None,
                              sliding_window: Optional[int] = None, **kwargs):
    """``"mka_fastmka"``: ``mka.fastmka`` with key-side router weights of every key."""
    q, k, v, spec = prepare(module, query, key, value, attention_mask, dropout, sliding_window, kwargs)
    lam = module.mka_router(q)
    if isinstance(key, PagedKV):  # fuses the new tokens from the carried EMA states
        return key.layer.attend("fastmka", q, k, v, spec, scaling, lam, module.mka_beta), None
    cache_layer = _cache_layer(module, q.shape[1], k.shape[1])
    if isinstance(cache_layer, RoutedCacheLayer):
        lam = cache_layer.extend(lam, k.shape[1], module.layer_idx)
    elif cache_layer is not None and k.shape[1] != q.shape[1]:
        raise ValueError(f"past_key_values: layer {module.layer_idx} is a "
                         f"{type(cache_layer).__name__}, which does not hold the router weights "
                         "of its cached tokens that FastMKA fuses them with; decode with a "
                         "DynamicCache")

    def call(q, k, v, lam):
        return mka.fastmka(q, k, v, lam, module.mka_beta, causal=True, scale=scaling,
                           window=spec.window, dropout_p=dropout)[0]
    return over_sequences(call, q, k, v, spec.left_padding, key_side=lam), None


def mka_routed_attention_forward(module: nn.Module, query: Tensor, key: Tensor, value: Tensor,
                                 attention_mask, dropout: float = 0.0,
                                 scaling: Optional[float] = None,
                                 sliding_window: Optional[int] = None, **kwargs):
    """``"mka_mka"``: ``mka.mka`` with query-side router weights; level 2's EMA starts at the
    first key (the first real token under left padding)."""
    q, k, v, spec = prepare(module, query, key, value, attention_mask, dropout, sliding_window, kwargs)
    lam = module.mka_router(q)
    recall = getattr(module, "mka_recall", None)
    if isinstance(key, PagedKV):  # level 2 from the page checkpoints, no re-scan
        if recall is not None:
            raise ValueError("past_key_values: a converted model with level 3 (recall) decodes "
                             "with a DynamicCache; the paged cache of the HF integration has no "
                             "recall yet")
        return key.layer.attend("mka", q, k, v, spec, scaling, lam, module.mka_beta), None
    _cache_layer(module, q.shape[1], k.shape[1])
    if dropout and recall is not None:
        raise ValueError(f"dropout: {dropout} with level 3 by recall: the recall op has no "
                         "attention dropout; set config.attention_dropout = 0.0")

    def call(q, k, v, lam):
        out = mka.mka(q, k, v, lam[..., :2], module.mka_beta, causal=True, scale=scaling,
                      window=spec.window, dropout_p=dropout)[0]
        if recall is None:
            return out
        o3 = recall_attention(q, k, v, chunk=recall.chunk, top=recall.top, planes=recall.planes,
                              window=spec.window, scale=scaling)[0]
        return out + lam[..., 2, None, None].to(out.dtype) * o3
    return over_sequences(call, q, k, v, spec.left_padding, query_side=lam), None


class RoutedCacheLayer(DynamicLayer):
    """transformers' ``DynamicLayer`` that also holds the router weights ``lam: (B, T, L)``
    of its cached tokens, kept in step with the keys through crop, beam reordering and batch
    selection."""

    lam: Optional[Tensor] = None

    def extend(self, lam_new: Tensor, kv_length: int, layer_idx: int) -> Tensor:
        """The router weights of all ``kv_length`` keys: the held ones, then ``lam_new``."""
        held = 0 if self.lam is None else self.lam.shape[1]
        if held + lam_new.shape[1] != kv_length or (self.lam is not None
                                                     and self.lam.shape[0] != lam_new.shape[0]):
            raise ValueError(
                f"past_key_values: layer {layer_idx} caches {kv_length - lam_new.shape[1]} earlier "
                f"tokens but holds router weights for {held} (batch "
                f"{None if self.lam is None else self.lam.shape[0]}, now {lam_new.shape[0]}); "
                "the cache was changed outside transformers' Cache methods")
        self.lam = lam_new if self.lam is None else torch.cat((self.lam, lam_new.to(self.lam.dtype)), 1)
        return self.lam

    def _follow_keys(self, pick) -> None:
        if self.lam is not None:
            self.lam = pick(self.lam)[:, :self.get_seq_length()]

    def crop(self, tokens_to_remove: int) -> None:
        super().crop(tokens_to_remove)
        self._follow_keys(lambda lam: lam)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self._follow_keys(lambda lam: lam.index_select(0, beam_idx.to(lam.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        self._follow_keys(lambda lam: lam.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: Tensor) -> None:
        super().batch_select_indices(indices)
        self._follow_keys(lambda lam: lam[indices])

    def reset(self) -> None:
        super().reset()
        self.lam = None


def _cache_layer(module: nn.Module, q_length: int, kv_length: int):
    """The cache layer of this call, checked to pass every token from the first to the
    attention (level 2's EMA runs over all of them); None without a cache. A fresh
    ``DynamicLayer`` becomes a :class:`RoutedCacheLayer`."""
    cache = getattr(module, "_mka_past_key_values", None)
    if cache is None:
        if kv_length != q_length:
            raise ValueError(f"past_key_values: {kv_length - q_length} earlier keys reached a "
                             "converted layer, but it saw no past_key_values keyword argument")
        return None
    layer = cache.layers[module.layer_idx]
    if layer.get_seq_length() != kv_length:
        raise ValueError(
            f"past_key_values: layer {module.layer_idx} is a {type(layer).__name__} that has seen "
            f"{layer.get_seq_length()} tokens but passes {kv_length} keys; level 2's EMA needs "
            "every token from the first (sliding-window and static cache layers drop or "
            "pre-allocate tokens): generate with use_cache=False, or with a DynamicCache of "
            "full-attention layers")
    if type(layer) is DynamicLayer and kv_length == q_length:
        layer.__class__ = RoutedCacheLayer  # a fresh layer: from now on it holds lam as well
    return layer


def _watch_cache(layer: nn.Module) -> None:
    """transformers passes the cache to the attention module, not to the attention function:
    hooks keep it on the module for the duration of its forward."""
    if getattr(layer, "_mka_hooks", None):
        return
    layer._mka_hooks = (
        layer.register_forward_pre_hook(_keep_cache, with_kwargs=True),
        layer.register_forward_hook(_drop_cache, with_kwargs=True, always_call=True))


def _keep_cache(module, args, kwargs):
    # transformers >= 5.25 passes the cache to the attention modules as `cache` (before:
    # `past_key_values`, accepted until 5.40).
    module._mka_past_key_values = kwargs.get("cache", kwargs.get("past_key_values"))


def _drop_cache(module, args, kwargs, output):
    module._mka_past_key_values = None
