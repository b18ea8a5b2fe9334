"""A GPT decode step captured in a CUDA graph (SPEC §8): at small batch a decode step is a few
hundred kernel launches of a few microseconds each, so the host, not the GPU, sets its time;
replaying the captured step launches them all at once.

What capture needs from the step — no host synchronisation, no host-side change the replay
would miss, tensors that stay put — the static paged cache provides (``make_static``: every
page reserved, lengths in device tensors moved in place, EMA states written in place) and
the ops keep (CUDA writes through the cache's own tables skip the host check). The host's
copy of the lengths is the one thing the step changes on the host: capture runs the host side
without the device side, so it is put back, and each replay advances it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..memory import PagedKVCache


class DecodeGraph:
    """``step(tokens (B, 1)) -> logits (B, vocab)`` of ``model`` over ``caches``, made static
    for ``capacity`` tokens per sequence: the first step runs eagerly (it is a real step and
    sets up what the step's kernels initialise once: kernel attributes, library handles,
    memory pools), then the step is captured and every later one is a replay."""

    def __init__(self, model: torch.nn.Module, caches: PagedKVCache, capacity: int):
        if caches.device.type != "cuda":
            raise ValueError(f"cuda_graph: needs a CUDA cache, got one on {caches.device}")
        if any(getattr(b.attn, "backend", "mka") != "mka" for b in model.blocks):
            raise ValueError("cuda_graph: needs attn_backend='mka' (the torch backend's paged "
                             "path reads lengths on the host every step)")
        caches.make_static(capacity)
        self.model, self.caches, self.capacity = model, caches, capacity
        self.idx = torch.zeros(caches.batch_size, 1, dtype=torch.long, device=caches.device)
        self.graph = None
        self.logits = None

    def room(self) -> bool:
        """Whether one more step fits the static capacity."""
        return max(self.caches[0].lengths) < self.capacity

    def step(self, tokens: Tensor) -> Tensor:
        if self.graph is None:
            logits = self.model(tokens, caches=self.caches)[0][:, -1]
            if self.room():
                self._capture()
            return logits
        self.idx.copy_(tokens)
        self.graph.replay()
        self.caches.advance(1, host_only=True)
        return self.logits.clone()  # the next replay overwrites the graph's output

    def _capture(self) -> None:
        graph = torch.cuda.CUDAGraph()
        try:
            with self.caches.host_counts_kept(), torch.cuda.graph(graph):
                self.logits = self.model(self.idx, caches=self.caches)[0][:, -1]
        except RuntimeError as e:
            raise RuntimeError(f"cuda_graph: the decode step could not be captured ({e})") from e
        self.graph = graph
