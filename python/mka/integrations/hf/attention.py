"""``attn_implementation="mka"``: transformers' attention interface on ``mka.attention``.

transformers hands the attention function ``query: (B, H, Tq, d)`` and the keys/values its
cache returned, ``(B, G, Tk, d)``; the op's layout is ``(B, T, H, d)`` with any strides but a
contiguous last dim, so ``.transpose(1, 2)`` views go in without copies, and the op's GQA
reads the ``G`` key/value heads without repeating them. The output ``(B, Tq, H, d)`` is what
transformers expects back.

With a :class:`~.paged_cache.PagedCache` the cache returns a :class:`~.paged_cache.PagedKV`
(the new tokens and their cache layer) instead of tensors; the function hands it the query and
the call's :class:`MaskSpec`, and the layer writes the tokens into its pages and attends over
them.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

import mka

from .masks import MaskSpec
from .paged_cache import PagedKV

Call = Callable[..., Tensor]


def mka_attention_forward(module: torch.nn.Module, query: Tensor, key: Tensor, value: Tensor,
                          attention_mask, dropout: float = 0.0, scaling: Optional[float] = None,
                          sliding_window: Optional[int] = None, **kwargs) -> tuple[Tensor, None]:
    """The function registered as ``"mka"`` with ``transformers.AttentionInterface``."""
    q, k, v, spec = prepare(module, query, key, value, attention_mask, dropout,
                            sliding_window, kwargs)
    if isinstance(key, PagedKV):
        return key.layer.attend("attention", q, k, v, spec, scaling), None

    def call(q, k, v):
        return mka.attention(q, k, v, causal=True, scale=scaling, window=spec.window,
                             dropout_p=dropout)
    return over_sequences(call, q, k, v, spec.left_padding), None


def prepare(module: torch.nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask,
            dropout: float, sliding_window: Optional[int], kwargs: dict):
    """Checks the options the op cannot honour and returns ``q, k, v`` as ``(B, T, H, d)``
    views and the :class:`MaskSpec` to run them with (``k, v``: the new tokens of a
    :class:`PagedKV`)."""
    if dropout and isinstance(key, PagedKV):
        raise ValueError(f"dropout: {dropout} with the paged cache: it decodes (inference); "
                         "call model.eval() (attention dropout is for training)")
    for name, what in (("softcap", "attention logit soft-capping"),
                       ("s_aux", "attention sinks"), ("position_bias", "a position bias")):
        if kwargs.get(name) is not None:
            raise ValueError(f"{name}: {what} is not supported by the 'mka' attention")
    if kwargs.get("output_attentions"):
        raise ValueError("output_attentions: the 'mka' attention does not form attention "
                         "weights; use attn_implementation='eager' to get them")
    is_causal = kwargs.get("is_causal")
    if not (getattr(module, "is_causal", True) if is_causal is None else is_causal):
        raise ValueError("is_causal: the 'mka' attention is causal (decoder) attention only; "
                         "this call asks for bidirectional attention")
    spec = _mask_spec(attention_mask, sliding_window)
    if isinstance(key, PagedKV):
        key, value = key.keys, key.values
    q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
    if _any_autocast():  # (~0.5 us a layer less than asking q's device first)
        device = q.device.type
        if torch.is_autocast_enabled(device):  # RoPE's float32 tables promote q and k; sdpa casts all three too
            q, k, v = (t.to(torch.get_autocast_dtype(device)) for t in (q, k, v))
    return q, k, v, spec


# Whether autocast is on for any device (one call, where torch has it).
_any_autocast = getattr(torch._C, "_is_any_autocast_enabled", lambda: True)


def _mask_spec(attention_mask, sliding_window: Optional[int]) -> MaskSpec:
    if isinstance(attention_mask, MaskSpec):
        return attention_mask  # the mask decides, as it does for sdpa
    if attention_mask is None:  # no mask was built: causal, the module's own window
        return MaskSpec(sliding_window, None)
    if isinstance(attention_mask, Tensor):
        raise ValueError(
            f"attention_mask: a {attention_mask.dim()}-d mask tensor reached the 'mka' attention; "
            "it takes no custom masks — pass a 2-d padding mask (left padding) to the model "
            "and let transformers build the mask")
    raise ValueError(f"attention_mask: expected the mask of mka's mask function, a "
                     f"transformers.masking_utils mask, got {type(attention_mask).__name__}")


def over_sequences(call: Call, q: Tensor, k: Tensor, v: Tensor,
                   left_padding: Optional[tuple[int, ...]],
                   query_side: Optional[Tensor] = None, key_side: Optional[Tensor] = None) -> Tensor:
    """``call(q, k, v[, query_side][, key_side])`` over the whole batch, or, with left padding,
    once per group of sequences with the same padding: their padding keys cut off, and their
    queries that are padding themselves dropped (those rows come out zero, as SPEC §1 gives a
    row without a visible key). ``query_side: (B, Tq, ...)`` and ``key_side: (B, Tk, ...)`` are
    per-token inputs cut like the queries and the keys (the router weights)."""
    extra = lambda qs, ks: tuple(t for t in (qs, ks) if t is not None)  # noqa: E731
    if left_padding is None:
        return call(q, k, v, *extra(query_side, key_side))
    Tq, Tk = q.shape[1], k.shape[1]
    out = q.new_zeros(q.shape)
    groups: dict[int, list[int]] = {}
    for b, n in enumerate(left_padding):
        groups.setdefault(n, []).append(b)
    for n, rows in groups.items():
        first_query = max(0, n - (Tk - Tq))
        if first_query >= Tq:
            continue  # every query of these sequences is padding
        idx = torch.tensor(rows, device=q.device)
        cut = lambda t, start: None if t is None else t.index_select(0, idx)[:, start:]  # noqa: E731
        out[idx, first_query:] = call(cut(q, first_query), cut(k, n), cut(v, n),
                                      *extra(cut(query_side, first_query), cut(key_side, n)))
    return out
