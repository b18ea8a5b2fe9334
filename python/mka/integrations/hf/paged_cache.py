"""A transformers ``Cache`` on the library's page pool (SPEC §7.1, §9): ``PagedCache``.

One :class:`mka.memory.PagedKVCache` holds every decoder layer's keys and values in
preallocated pages. transformers' attention layers call ``past_key_values.update(k, v,
layer_idx)`` and pass what it returns to the attention function; here ``update`` returns a
:class:`PagedKV` (the new tokens and their layer) instead of concatenated tensors, and the
library's attention functions (``"mka"``, ``"mka_fastmka"``, ``"mka_mka"``) hand it to
:meth:`PagedLayer.attend`, which writes the new tokens into the pages and attends over them
through the block table (``paged_write`` + ``paged_attention``; FastMKA fuses the new tokens
with the carried EMA states as it writes them, ``paged_write_fused``; MKA writes with
``paged_write_ema`` and attends with ``paged_mka_attention``). The write waits for the
attention function because it needs the call's left padding (the mask function's
:class:`MaskSpec`) and, for FastMKA, the router weights of the new tokens.

Left padding: a sequence's pages hold its real tokens only, from position 0; transformers'
view of the cache (``get_seq_length``, the mask sizes) stays the padded length it expects.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor
from transformers.cache_utils import Cache, CacheLayerMixin

import mka
from mka._validate import attention_takes
from mka.memory import LayerSpec, PagedKVCache, paged_mka_attention, paged_write, paged_write_ema
from mka.memory.cache import PageStep
from mka.memory.ops import _cache_attention, _cache_write, _cache_write_fused

from .masks import MaskSpec

# What each variant caches per layer: keys and values; FastMKA its fused keys and the running
# EMA states; MKA the raw keys plus per-page EMA checkpoints and the running states.
_SPECS = {
    "attention": dict(),
    "fastmka": dict(states=("k", "v")),
    "mka": dict(page_states=True, states=("k", "v")),
}


def layer_spec(text_config, variant: str) -> LayerSpec:
    """What one decoder layer of ``text_config`` caches per token under ``variant``
    ("attention", "fastmka" or "mka"): its key/value heads and head size."""
    heads = text_config.num_attention_heads
    kv_heads = getattr(text_config, "num_key_value_heads", None) or heads
    head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // heads
    return LayerSpec(kv_heads, head_dim, head_dim, **_SPECS[variant])


@dataclass(frozen=True)
class PagedKV:
    """What :meth:`PagedLayer.update` returns in place of key/value tensors: the step's new
    keys and values ``(B, G, T, d)`` as transformers made them, and the layer whose pages they
    go to. Only the library's attention functions take it."""

    layer: "PagedLayer"
    keys: Tensor
    values: Tensor


class PagedLayer(CacheLayerMixin):
    """One decoder layer's view of a :class:`PagedCache` (its pages are ``cache.pages[i]``)."""

    is_compileable = False  # host-side page bookkeeping each step (SPEC §9)
    is_sliding = False  # every token stays in the pages; the attention applies the window

    def __init__(self, owner: "PagedCache", index: int):
        super().__init__()
        # Weak: the cache holds its layers (a strong reference back would keep a dropped
        # cache's page pool until a garbage collection).
        self.owner, self.index = weakref.proxy(owner), index
        self.seen = 0  # tokens transformers counts, left padding included
        self.is_initialized = True  # the pages are preallocated

    @property
    def pages(self):
        return self.owner.pages[self.index]

    @property
    def batch_size(self) -> int:
        return self.owner.pages.batch_size

    @property
    def is_croppable(self) -> bool:
        return self.owner.variant != "fastmka"

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        """Nothing to allocate (the pages exist); checks that the tensors fit them."""
        lc = self.pages
        spec, ks, vs = lc.spec, key_states.shape, value_states.shape
        # Every layer of every step: one test of the usual case (~1 us, against ~3 for the
        # checks below, which then only run to name what is wrong).
        if (len(ks) == 4 and len(vs) == 4 and ks[0] == vs[0] == len(lc.written)
                and ks[1] == vs[1] == spec.kv_heads and ks[3] == spec.key_dim
                and vs[3] == spec.value_dim and key_states.dtype == value_states.dtype == lc.dtype
                and key_states.device == lc.device and value_states.device == lc.device):
            return
        for name, t, dim in (("key_states", key_states, spec.key_dim),
                             ("value_states", value_states, spec.value_dim)):
            if t.dim() != 4 or t.shape[1] != spec.kv_heads or t.shape[3] != dim:
                raise ValueError(f"{name}: expected (B, {spec.kv_heads}, T, {dim}) for layer "
                                 f"{self.index} of the PagedCache, got {tuple(t.shape)}")
            self.pages.check(name, t)

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs):
        if self.index == 0:  # once a step: the layers share the config (~2 us a read)
            self._check_implementation()
        self.lazy_initialization(key_states, value_states)
        kv = PagedKV(self, key_states, value_states)
        return kv, kv

    def _check_implementation(self) -> None:
        implementation = self.owner.config._attn_implementation
        if implementation != self.owner.implementation:
            raise ValueError(
                f"past_key_values: a PagedCache hands its pages to the library's attention "
                f"{self.owner.implementation!r}; the model runs {implementation!r} (set "
                f"model.set_attn_implementation({self.owner.implementation!r}))")

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen + query_length, 0

    def get_max_length(self) -> int:
        return self.owner.pages.max_tokens

    # ------------------------------------------------------------------ one step

    def attend(self, variant: str, q: Tensor, k: Tensor, v: Tensor, spec: MaskSpec,
               scale: Optional[float], lam: Optional[Tensor] = None,
               beta: Optional[float] = None) -> Tensor:
        """Writes the new tokens ``k, v: (B, T, G, d)`` (their padding left out) and attends
        ``q: (B, T, H, d)`` over each sequence's pages: bottom-right causal per sequence, so
        padding queries see no key and output zeros. ``lam``: the router weights of the new
        tokens (FastMKA fuses with them, MKA mixes its levels with them); ``beta`` the EMA
        decay."""
        if variant != self.owner.variant:
            raise ValueError(f"past_key_values: the PagedCache was made for the model's "
                             f"{self.owner.variant!r} attention, not {variant!r}; make it from "
                             "the model as it runs now")
        lc, T = self.pages, k.shape[1]
        if self._lean(variant, spec, T):
            step = lc.step(T)
            self.seen += T
            _cache_write(lc, step, k, v)
            return _cache_attention(lc, step, q, scale, spec.window)
        new = self._new_tokens(spec.left_padding, k.shape[1])
        step = self._step(new)
        # A prompt into an empty cache: its own keys are all the keys, and the ops over them
        # (padding cut) replace the decode kernel, which would read every key again for every
        # few query rows of a long prompt. FastMKA and MKA take it without left padding: the
        # fused keys and the EMA states are per sequence.
        empty, self.seen = self.seen == 0, self.seen + k.shape[1]
        plain = (empty and k.shape[1] > 0 and attention_takes(q)
                 and (variant == "attention" or spec.left_padding is None))
        y = None
        if plain and variant == "mka":  # from the states before the write moves them
            y, _, _ = mka.mka(q, k, v, lam[..., :2], beta, k_state=lc.states["k"],
                              v_state=lc.states["v"], causal=True, scale=scale,
                              window=spec.window)
        written = self._write(variant, k, v, new, step, lam, beta, keep=plain)
        if y is not None:
            return y
        if plain:
            from .attention import over_sequences  # attention.py imports this module
            k, v = written if variant == "fastmka" else (k, v)
            return over_sequences(lambda q, k, v: mka.attention(
                q, k, v, causal=True, scale=scale, window=spec.window), q, k, v,
                spec.left_padding)
        if variant == "mka":
            return paged_mka_attention(q, lc.k_pages, lc.v_pages, lc.k_page_states,
                                       lc.v_page_states, step.block_table, step.seqlens, lam,
                                       beta, causal=True, scale=scale, window=spec.window)
        return _cache_attention(lc, step, q, scale, spec.window)

    def _lean(self, variant: str, spec: MaskSpec, T: int) -> bool:
        """Whether a call takes :meth:`attend`'s lean path, the usual decode step: plain
        attention, no padding, a cache that is not empty and whose sequences hold all earlier
        tokens (what :meth:`_new_tokens` checks), so all ``T`` tokens are new in each; one
        write and one paged attention through the step's own table, the general path's calls
        without its bookkeeping (~10 us a layer less on a slow host)."""
        written = self.pages.written
        return (variant == "attention" and spec.left_padding is None and self.seen > 0
                and T > 0 and written.count(self.seen) == len(written))

    def _new_tokens(self, left_padding: Optional[tuple[int, ...]], T: int) -> list[int]:
        """Real (not padding) tokens among the ``T`` new ones, per sequence; checks that the
        pages hold exactly the earlier real tokens."""
        padding = left_padding or (0,) * self.batch_size
        written = self.pages.lengths
        for b, (n, held) in enumerate(zip(padding, written)):
            if held != max(0, self.seen - n):
                raise ValueError(
                    f"attention_mask: sequence {b} has {n} leading padding tokens in this call, "
                    f"but layer {self.index} of the PagedCache holds {held} of its {self.seen} "
                    "earlier tokens; pass the same left-padding mask (extended by the new "
                    "tokens) with every call on a cache")
        self.owner.padding = list(padding)
        return [T - min(T, max(0, n - self.seen)) for n in padding]

    def _step(self, new: list[int]) -> PageStep:
        """Room for ``new[b]`` more tokens in sequence ``b`` (they differ under left padding)."""
        return self.pages.step(new[0] if len(set(new)) == 1 else new)

    def _write(self, variant: str, k: Tensor, v: Tensor, new: list[int], step: PageStep,
               lam: Optional[Tensor], beta: Optional[float],
               keep: bool = False) -> Optional[tuple[Tensor, Tensor]]:
        """Writes the last ``new[b]`` tokens of each sequence: one call per group of sequences
        with the same count (one call for the whole batch without padding). Returns the keys
        and values written when that one call took the whole batch (FastMKA's fused ones),
        if ``keep`` asks for them; FastMKA's whole-batch write otherwise fuses as it writes
        (``paged_write_fused``: one kernel, the states updated in place)."""
        written = None
        lc, T = self.pages, k.shape[1]
        groups: dict[int, list[int]] = {}
        for b, n in enumerate(new):
            groups.setdefault(n, []).append(b)
        for n, rows in groups.items():
            if n == 0:
                continue
            index = None if len(rows) == len(new) else torch.tensor(rows, device=k.device)
            pick = (lambda t: t) if index is None else (lambda t: t.index_select(0, index))
            kg, vg = pick(k)[:, T - n:], pick(v)[:, T - n:]
            where = (pick(step.block_table), pick(step.cache_seqlens))
            if variant == "fastmka" and index is None and not keep:
                _cache_write_fused(lc, step, kg, vg, lam[:, T - n:], beta)
                continue
            states = [pick(lc.states[s]) for s in lc.spec.states]
            if variant in ("attention", "fastmka"):
                if variant == "fastmka":
                    kg, vg, *states = mka.route_fuse(kg, vg, pick(lam)[:, T - n:], beta,
                                                     k_state=states[0], v_state=states[1])
                if index is None:  # the step's own table and lengths
                    _cache_write(lc, step, kg, vg)
                    written = (kg, vg)
                else:
                    paged_write(kg, vg, lc.k_pages, lc.v_pages, *where)
                if variant == "attention":
                    continue
            else:
                states = paged_write_ema(kg, vg, lc.k_pages, lc.v_pages, *where, beta,
                                         lc.k_page_states, lc.v_page_states, *states)
            for name, state in zip(lc.spec.states, states):
                lc.states[name].index_copy_(0, index, state) if index is not None else \
                    lc.states[name].copy_(state)
        return written

    def _rebuild_states(self, beta: float) -> None:
        """MKA's running EMA states after each sequence's last cached token, from the
        checkpoint of that token's page and the raw tokens before it in the page (crop)."""
        lc, S = self.pages, self.owner.pages.page_size
        table = lc.parent.block_table()
        for b, n in enumerate(lc.lengths):
            if n == 0:
                for s in lc.states.values():
                    s[b].zero_()
                continue
            page, used = int(table[b, (n - 1) // S]), (n - 1) % S + 1
            k, v = lc.k_pages[page, None, :used], lc.v_pages[page, None, :used]
            keys_only = torch.zeros((1, used, 2), dtype=k.dtype, device=k.device)
            keys_only[..., 1] = 1  # route_fuse's level 2 alone: its states are the EMA's
            _, _, ks, vs = mka.route_fuse(k, v, keys_only, beta,
                                          k_state=lc.k_page_states[page, None],
                                          v_state=lc.v_page_states[page, None])
            lc.states["k"][b], lc.states["v"][b] = ks[0], vs[0]


class PagedCache(Cache):
    """transformers ``Cache`` whose layers keep keys and values in the library's pages.

    ``PagedCache(model, batch_size, max_tokens)``: one page pool for all of ``model``'s
    decoder layers (key/value heads and head dim from its config; converted FastMKA/MKA models
    cache what their attention needs, see :data:`_SPECS`), on the model's device and dtype
    unless given. ``batch_size`` counts every row generate runs (``num_beams`` times the
    prompts for beam search); ``max_tokens`` bounds a sequence (prompt plus new tokens);
    ``num_pages`` defaults to every sequence at ``max_tokens`` plus one page per sequence: beam
    search's forked rows copy a shared last page before writing it (copy-on-write), and the
    page table asks for room for every such copy at once. Needs the model's attention to be
    the library's (``"mka"``, or a converted model's)."""

    def __init__(self, model: torch.nn.Module, batch_size: int, max_tokens: int, *,
                 page_size: int = 16, num_pages: Optional[int] = None,
                 device: Optional[torch.device] = None, dtype: Optional[torch.dtype] = None):
        # Imported here: conversion imports this module's PagedKV through attention.py.
        from .conversion import CONFIG_KEY, ROUTED_IMPLEMENTATIONS

        if not isinstance(page_size, int) or isinstance(page_size, bool) or page_size < 1:
            raise ValueError(f"page_size: must be a positive integer, got {page_size!r}")
        self.config = model.config
        text = model.config.get_text_config(decoder=True)
        kinds = set(getattr(text, "layer_types", None) or ["full_attention"])
        if not kinds <= {"full_attention", "sliding_attention"}:
            raise ValueError(f"model: a PagedCache caches attention layers only; this model has "
                             f"layer types {sorted(kinds)}")
        options = getattr(text, CONFIG_KEY, None)
        self.variant = options["variant"] if isinstance(options, dict) else "attention"
        self.implementation = ROUTED_IMPLEMENTATIONS.get(self.variant, "mka")
        self.beta = options["beta"] if isinstance(options, dict) else None
        spec = layer_spec(text, self.variant)
        param = next(model.parameters())
        if num_pages is None:
            num_pages = batch_size * (math.ceil(max_tokens / page_size) + 1)
        self.pages = PagedKVCache([spec] * text.num_hidden_layers, batch_size,
                                  max_tokens=max_tokens, page_size=page_size, num_pages=num_pages,
                                  device=param.device if device is None else device,
                                  dtype=param.dtype if dtype is None else dtype)
        self.padding = [0] * batch_size  # leading padding tokens per sequence
        super().__init__(layers=[PagedLayer(self, i) for i in range(text.num_hidden_layers)])

    # ------------------------------------------------------------------ accounting

    def nbytes(self) -> int:
        """Every byte the cache holds (preallocated pages, checkpoints, states)."""
        return self.pages.nbytes()

    def used_bytes(self) -> int:
        """Bytes of the pages the sequences hold (shared pages once) plus the states."""
        return self.pages.used_bytes()

    def kv_bytes_per_token(self) -> int:
        """Bytes one cached token of one sequence takes in the pages of all layers."""
        return sum(layer.spec.bytes_per_token(self.pages.dtype) for layer in self.pages)

    # ------------------------------------------------------------------ batch changes

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: row ``j`` continues row ``beam_idx[j]``; repeated rows share their
        pages until written (copy-on-write, ``PagedKVCache.reorder``)."""
        self._select(beam_idx.tolist())

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._select([b for b in range(self.pages.batch_size) for _ in range(repeats)])

    def batch_select_indices(self, indices: Tensor) -> None:
        if indices.dtype == torch.bool:
            indices = indices.nonzero().flatten()
        self._select(indices.tolist())

    def _select(self, rows: list[int]) -> None:
        self.pages.reorder(rows)
        self.padding = [self.padding[r] for r in rows]

    def crop(self, tokens_to_remove: int) -> None:
        """Drops the last ``-tokens_to_remove`` tokens (transformers' convention; a positive
        value is the length to keep, as ``DynamicLayer.crop`` still accepts). Pages emptied
        by it go back to the pool (``PageTable.truncate``). MKA's running states are rebuilt
        from the page checkpoints; FastMKA's cannot be (its pages hold fused keys), so it
        raises."""
        tokens_to_remove = int(tokens_to_remove)  # assisted generation passes a 0-d tensor
        seen = self.get_seq_length()
        keep = min(seen, tokens_to_remove) if tokens_to_remove > 0 else seen + tokens_to_remove
        if keep < 0:
            raise ValueError(f"tokens_to_remove: {tokens_to_remove} removes more than the "
                             f"{seen} cached tokens")
        if keep == seen:
            return
        if self.variant == "fastmka":
            raise ValueError("past_key_values: a FastMKA PagedCache cannot be cropped: its pages "
                             "hold fused keys, from which the running EMA state of an earlier "
                             "token cannot be rebuilt (assisted decoding needs use_cache=False "
                             "or a DynamicCache)")
        self._truncate(keep)

    def reset(self) -> None:
        self._truncate(0)
        for layer in self.pages:
            for state in layer.states.values():
                state.zero_()
        self.padding = [0] * self.pages.batch_size

    def _truncate(self, keep: int) -> None:
        """Every layer keeps the first ``keep`` tokens transformers counts."""
        self.pages.truncate([max(0, keep - n) for n in self.padding])
        for layer in self.layers:
            layer.seen = keep
            if self.variant == "mka":
                layer._rebuild_states(self.beta)

    def __repr__(self) -> str:
        return f"PagedCache({self.variant}, {self.pages!r})"


def paged_generate(model: torch.nn.Module, input_ids: Tensor, *, max_new_tokens: int,
                   page_size: int = 16, num_pages: Optional[int] = None, **kwargs):
    """``model.generate(input_ids, max_new_tokens=..., **kwargs)`` on a :class:`PagedCache`
    sized for it: a row per prompt and beam (or returned sequence), each up to its prompt plus
    ``max_new_tokens`` tokens."""
    if "past_key_values" in kwargs:
        raise ValueError("past_key_values: paged_generate makes the PagedCache; call "
                         "model.generate(past_key_values=PagedCache(...)) to pass your own")
    config = model.generation_config
    rows = max(kwargs.get("num_beams") or config.num_beams or 1,
               kwargs.get("num_return_sequences") or config.num_return_sequences or 1)
    cache = PagedCache(model, input_ids.shape[0] * rows, input_ids.shape[1] + max_new_tokens,
                       page_size=page_size, num_pages=num_pages)
    return model.generate(input_ids, max_new_tokens=max_new_tokens, past_key_values=cache,
                          **kwargs)
