"""Hugging Face transformers integration (needs the ``hf`` extra: ``pip install "mka[hf]"``).

Importing this package registers the library's attention with transformers (see
:func:`register`), so any decoder built on transformers' attention interface runs on it::

    import mka.integrations.hf
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="mka")

``convert(model, variant="fastmka" | "mka")`` adds a router per attention layer and runs the
model on ``mka.fastmka`` / ``mka.mka``; ``load_converted(path)`` loads what a converted
model's ``save_pretrained`` wrote. ``PagedCache(model, batch_size, max_tokens)`` (or
``paged_generate(model, ids, max_new_tokens=...)``) generates on the library's paged KV cache;
``HFDecodeGraph(model, cache)`` replays its decode step from a CUDA graph.
``docs/integrations.md`` has the details.
"""

from __future__ import annotations

from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from .attention import mka_attention_forward
from .conversion import (ROUTED_IMPLEMENTATIONS, attention_layers, convert,
                         fastmka_attention_forward, load_converted, load_model,
                         mka_routed_attention_forward)
from .decode_graph import HFDecodeGraph
from .masks import MaskSpec, mka_mask
from .paged_cache import PagedCache, PagedKV, paged_generate

IMPLEMENTATIONS = {
    "mka": mka_attention_forward,
    ROUTED_IMPLEMENTATIONS["fastmka"]: fastmka_attention_forward,
    ROUTED_IMPLEMENTATIONS["mka"]: mka_routed_attention_forward,
}


def register() -> None:
    """Registers ``attn_implementation="mka"`` (and the converted models' ``"mka_fastmka"``,
    ``"mka_mka"``) with ``transformers.AttentionInterface``, and their mask function with
    ``AttentionMaskInterface`` (without it transformers cannot build masks for a new name).
    Idempotent: registering again replaces the entries with the same functions."""
    for name, fn in IMPLEMENTATIONS.items():
        AttentionInterface.register(name, fn)
        AttentionMaskInterface.register(name, mka_mask)


register()

__all__ = ["register", "convert", "load_converted", "load_model", "attention_layers",
           "mka_attention_forward", "mka_mask",
           "MaskSpec", "IMPLEMENTATIONS", "PagedCache", "PagedKV", "paged_generate",
           "HFDecodeGraph"]
