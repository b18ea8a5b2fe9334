"""The mask function registered with ``transformers.masking_utils.AttentionMaskInterface``.

The library's attention op takes no mask: it computes bottom-right causal attention,
optionally within a window (SPEC §1). So instead of a 4D tensor this mask function returns a
:class:`MaskSpec` that says which op call reproduces the mask transformers asks for, and it
refuses, with a ``ValueError``, any mask the op cannot reproduce exactly (right padding,
gaps, packed sequences, custom overlays, a static cache's empty slots).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from transformers.masking_utils import causal_mask_function, prepare_padding_mask, sdpa_mask

# Mask elements materialised at once while a mask is checked (bools: 128 MiB).
_CHECK_CHUNK_ELEMENTS = 1 << 27


@dataclass(frozen=True)
class MaskSpec:
    """What ``mka.attention`` must be called with to compute the mask of one forward.

    ``window``: SPEC §1's window (transformers' ``sliding_window``: key ``j`` visible from
    query position ``i`` iff ``i - window < j <= i``), or None. ``left_padding``: per sequence,
    the number of leading keys (of the ``kv_length`` keys of this call) that are padding, or
    None when no key is padding. The queries are the last ``q_length`` key positions.
    """

    window: Optional[int]
    left_padding: Optional[tuple[int, ...]]


def mka_mask(batch_size: int, q_length: int, kv_length: int, q_offset: int = 0,
             kv_offset: int = 0, mask_function: Callable = causal_mask_function,
             attention_mask: Optional[torch.Tensor] = None, local_size: Optional[int] = None,
             device="cpu", **kwargs) -> MaskSpec:
    """The ``AttentionMaskInterface`` entry for the library's implementations (arguments as
    transformers' ``sdpa_mask``)."""
    padding = prepare_padding_mask(attention_mask, kv_length, kv_offset)
    left = None
    if padding is not None:
        padding = padding[:, kv_offset:kv_offset + kv_length]
        left = _left_padding(padding)
    aligned = q_offset + q_length == kv_offset + kv_length
    # The plain causal mask of a growing cache: nothing to check (the common case, free).
    if mask_function is causal_mask_function and aligned and local_size is None:
        return MaskSpec(None, left)
    spec = MaskSpec(local_size, left)
    step = max(1, _CHECK_CHUNK_ELEMENTS // max(1, batch_size * kv_length))
    for start in range(0, q_length, step):
        rows = min(step, q_length - start)
        want = sdpa_mask(batch_size=batch_size, q_length=rows, kv_length=kv_length,
                         q_offset=q_offset + start, kv_offset=kv_offset,
                         mask_function=mask_function, attention_mask=attention_mask,
                         local_size=local_size, allow_is_causal_skip=False,
                         use_vmap=kwargs.get("use_vmap", False), device=device)
        got = spec_mask(spec, batch_size, q_length, kv_length, start, rows, want.device)
        if not torch.equal(want.expand_as(got), got):
            raise ValueError(
                "attention_mask: the mask transformers builds here is not one the 'mka' "
                "attention computes (bottom-right causal, optionally a sliding window, left "
                "padding only); right padding, gaps, packed sequences, custom mask overlays "
                "and static caches are not supported")
    return spec


def spec_mask(spec: MaskSpec, batch_size: int, q_length: int, kv_length: int,
              start: int = 0, rows: Optional[int] = None, device="cpu") -> torch.Tensor:
    """The boolean mask ``(B, 1, rows, kv_length)`` that the op calls of ``spec`` compute
    for query rows ``start .. start + rows`` (True: the key is attended)."""
    rows = q_length - start if rows is None else rows
    pos = torch.arange(start, start + rows, device=device)[:, None] + (kv_length - q_length)
    j = torch.arange(kv_length, device=device)[None, :]
    visible = j <= pos
    if spec.window is not None:
        visible &= j > pos - spec.window
    first = torch.tensor(spec.left_padding or [0] * batch_size, device=device)
    return (visible[None] & (j[None] >= first[:, None, None]))[:, None]


def _left_padding(padding: torch.Tensor) -> Optional[tuple[int, ...]]:
    """Leading padding per row of a boolean ``(B, kv_length)`` mask; None if there is none.
    Raises if a row has padding after its first real token."""
    if bool(padding.all()):
        return None
    seen = padding.cumsum(dim=1) > 0  # True from the first real token on
    bad = (seen & ~padding).any(dim=1)
    if bool(bad.any()):
        row = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"attention_mask: sequence {row} has padding after its first token (right padding "
            "or a gap); the 'mka' attention supports left padding only "
            "(tokenizer.padding_side = 'left')")
    return tuple(int(n) for n in (~seen).sum(dim=1).tolist())
