"""A Hugging Face causal LM's decode step captured in a CUDA graph over a static
:class:`~.paged_cache.PagedCache`: ``HFDecodeGraph``.

At small batch a transformers decode step is host time — hundreds of kernel launches and the
Python around them (a 1B Llama at batch 1 spends ~0.6 ms per layer on the host, the GPU
~0.1 ms); replaying the captured step launches them all at once. The paged cache is made
static (``PagedKVCache.make_static``: every page reserved, the lengths in device tensors that
move in place), so the step's attention reads nothing from the host; the positions are a
device tensor handed to the model as ``position_ids`` and moved in the graph. What the step
changes on the host — the cache's lengths and the layers' token counts — capture runs without
the device side, so it is put back, and each replay advances it.

Limits, each an error when met: CUDA only; batches without left padding (the mask of a padded
batch is read on the host each step); models whose mask function checks a mask on the device
(sliding-window models) cannot be captured.
"""

from __future__ import annotations

import inspect

import torch
from torch import Tensor

from .paged_cache import PagedCache


def cache_keyword(model: torch.nn.Module) -> str:
    """The name a model's forward takes its cache by: transformers >= 5.25 ``cache``
    (``past_key_values`` until 5.40), older ones ``past_key_values``."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


class HFDecodeGraph:
    """``step(tokens (B, 1)) -> logits (B, vocab)`` of ``model`` over ``cache`` (a
    :class:`PagedCache` holding the prompt), made static for ``capacity`` tokens per sequence
    (default: the cache's ``max_tokens``). The first step runs eagerly (a real step that also
    sets up what kernels initialise once), then the step is captured and every later one is a
    replay. After it, the cache is static: it decodes through this object only."""

    def __init__(self, model: torch.nn.Module, cache: PagedCache, capacity: int | None = None):
        if not isinstance(cache, PagedCache):
            raise ValueError(f"cache: expected a PagedCache, got {type(cache).__name__}")
        pages = cache.pages
        if pages.device.type != "cuda":
            raise ValueError(f"cache: a CUDA graph needs a CUDA cache, got one on {pages.device}")
        if any(cache.padding):
            raise ValueError("cache: left-padded sequences; a captured step cannot read the "
                             "padding mask each step (decode them eagerly)")
        seen = cache.get_seq_length()
        if seen == 0:
            raise ValueError("cache: empty; prefill the prompt into it first")
        capacity = pages.max_tokens if capacity is None else capacity
        pages.make_static(capacity)
        self.model, self.cache, self.capacity = model, cache, capacity
        self.keyword = cache_keyword(model)
        device = pages.device
        self.tokens = torch.zeros(pages.batch_size, 1, dtype=torch.long, device=device)
        self.positions = torch.full((pages.batch_size, 1), seen, dtype=torch.long, device=device)
        self.graph = None
        self.logits = None

    def room(self) -> bool:
        """Whether one more step fits the static capacity."""
        return self.cache.get_seq_length() < self.capacity

    def _forward(self, tokens: Tensor) -> Tensor:
        out = self.model(tokens, position_ids=self.positions, use_cache=True,
                         **{self.keyword: self.cache})
        return out.logits[:, -1]

    def _advance(self) -> None:
        """The step's device-side moves: the cache's lengths and the positions."""
        self.cache.pages.advance(1)
        self.positions.add_(1)

    def step(self, tokens: Tensor) -> Tensor:
        if not self.room():
            raise ValueError(f"tokens: the cache was made static for {self.capacity} tokens "
                             "per sequence and holds them all")
        if self.graph is None:
            logits = self._forward(tokens)
            self._advance()
            if self.room():
                self._capture()
            return logits
        self.tokens.copy_(tokens)
        self.graph.replay()
        self.cache.pages.advance(1, host_only=True)
        for layer in self.cache.layers:
            layer.seen += 1
        return self.logits.clone()  # the next replay overwrites the graph's output

    def _capture(self) -> None:
        seen = [layer.seen for layer in self.cache.layers]
        graph = torch.cuda.CUDAGraph()
        try:
            with self.cache.pages.host_counts_kept(), torch.cuda.graph(graph):
                self.logits = self._forward(self.tokens)
                self._advance()
        except RuntimeError as e:
            raise RuntimeError(f"cuda_graph: the decode step could not be captured ({e}); "
                               "decode eagerly") from e
        finally:  # the layers' token counts, like the cache's lengths
            for layer, n in zip(self.cache.layers, seen):
                layer.seen = n
        self.graph = graph
