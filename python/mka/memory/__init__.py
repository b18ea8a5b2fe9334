"""The HBM tier of the memory hierarchy (SPEC §7.1): a paged KV cache and the ops on pages.

``PageTable`` (native, ``cpp/include/mka/memory/page_table.h``) hands out pages and keeps
block tables; :class:`PagedKVCache` holds one model's page tensors and states on top of it;
the ops write into pages and attend over them. :class:`HostTier` adds the DRAM tier: chunks
outside the attention window kept in host memory and recalled from there (SPEC §7.3).
"""

from .._C import PageTable
from .cache import LayerCache, LayerSpec, PagedKVCache
from .host_tier import HostTier
from .ops import (paged_attention, paged_mka_attention, paged_write, paged_write_ema,
                  paged_write_fused)

__all__ = ["PageTable", "PagedKVCache", "HostTier", "LayerCache", "LayerSpec", "paged_attention",
           "paged_mka_attention", "paged_write", "paged_write_ema", "paged_write_fused"]
