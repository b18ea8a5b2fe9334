"""The DRAM tier in generation (SPEC §7.3): a paged cache whose older chunks live in host
memory, in one native :class:`~mka._C.ChunkStore` per layer, and come back when recalled.

A layer may spill when nothing but recall reads its pages outside the L1 window
(:attr:`LayerSpec.spillable`: level 1 windowed, level 2 over EMA summaries, level 3 by
recall). Chunk ``c`` of a sequence ``n`` tokens long is then never read by level 1 again once
``(c + 1) C <= n - W + 1`` — exactly when recall may first choose it — so at the start of each
step the cache moves such chunks to the store (one entry per key/value head: the head's keys
and values of the chunk, and its signature) and gives their pages back to the pool. The pool
holds the window, the chunks still completing and the step's new tokens; the store holds the
rest, bounded by its byte budget (a clear error when full).

Recall of a cached step (:meth:`LayerHost.recall`): the new rows' chunks are chosen on the
device from the signatures the cache keeps (int8 signs, ``B x chunks x G x bits`` bytes); the
chosen indices come to the host (the step's one synchronisation), the spilled chunks among them
are read from the store into a staging buffer (page-locked on CUDA) and copied to the device
on a side stream, chunks not yet spilled are gathered from the pages, and the rows attend to
them exactly as :func:`recall_decode` does over resident pages — the same selection and the
same result.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from .._C import ChunkStore
from .recall import (Distinct, attend_distinct, choose_for_step, distinct_chunks,
                     pack_signatures, page_chunks)


class RecallPlan(NamedTuple):
    """The chunks a step's rows recall: ``chosen (B, T, G, R)`` on the device, its copy on
    the host once ``ready`` (a CUDA event; None on the CPU), and the chunks any row may see."""

    chosen: Tensor
    chosen_host: Tensor
    ready: Optional[object]
    chunks: int


@dataclass(frozen=True)
class HostTier:
    """Options of the DRAM tier of a :class:`PagedKVCache`: ``budget_bytes`` of host memory
    for all layers' stores together (split evenly; full is a ``ValueError`` — a chunk dropped
    silently could be one recall picks), ``pinned`` page-locked arenas (asynchronous copies to
    the GPU; CUDA builds), ``step_tokens`` the most tokens a step adds per sequence (the pool
    is sized for it)."""

    budget_bytes: int
    pinned: bool = False
    step_tokens: int = 1024

    def __post_init__(self):
        for value, name in ((self.budget_bytes, "budget_bytes"), (self.step_tokens, "step_tokens")):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}: must be a positive integer, got {value!r}")


def check_host(specs, page_size: int, host: HostTier) -> None:
    """Every layer may spill, in whole pages."""
    for i, spec in enumerate(specs):
        if not spec.spillable:
            raise ValueError(
                f"host: layer {i} reads pages outside its window ({spec}); the DRAM tier "
                "needs every layer windowed, with level 2 over summaries (MKA ema_stride > 1) "
                "and level 3 by recall (recall_chunk > 0)")
        if spec.recall_chunk % page_size:
            raise ValueError(f"host: layer {i}'s recall chunk ({spec.recall_chunk} tokens) must "
                             f"be a multiple of page_size = {page_size} (chunks spill as pages)")


def spill_target(length: int, chunk: int, window: int) -> int:
    """Chunks of a sequence of ``length`` tokens that level 1 never reads again: ``c`` with
    ``(c + 1) C <= length - W + 1`` (the next row sits at position ``length``)."""
    return max(0, length - window + 1) // chunk


class LayerHost:
    """One layer's chunk store and what it has spilled per sequence (by the page table's
    sequence id: :meth:`PagedKVCache.select`'s views of some rows share it). Its methods take
    the layer's cache, or a view of some of its rows."""

    def __init__(self, layer, tier: HostTier, budget_bytes: int):
        spec = layer.spec
        self.chunk, self.heads = spec.recall_chunk, spec.kv_heads
        self.dk, self.dv = spec.key_dim, spec.value_dim
        itemsize = layer.dtype.itemsize
        self.store = ChunkStore(self.chunk * (self.dk + self.dv) * itemsize, 1, spec.recall_bits,
                                budget_bytes, pinned=tier.pinned)
        self.spilled: dict[int, int] = {}  # table sequence id -> chunks in the store
        self.read_bytes = 0  # chunk bytes read back from the store (host -> device), in all
        self.copy_stream = (torch.cuda.Stream(layer.device) if layer.device.type == "cuda"
                            else None)
        # spill reads the layer's window: spill_target needs it
        self.window = spec.window

    def _key(self, seq: int, g: int) -> int:
        return seq * self.heads + g  # one store sequence per (sequence, kv head)

    def spilled_tokens(self, seq: int) -> int:
        return self.spilled.get(seq, 0) * self.chunk

    # ------------------------------------------------------------------ spill

    def spill(self, layer, row: int, seq: int, length: int, block_table_row: list[int]) -> None:
        """Moves sequence ``seq``'s (batch row ``row`` of ``layer``) chunks that level 1 is done
        with into the store; their pages are the caller's to release."""
        C = self.chunk
        done, target = self.spilled.get(seq, 0), spill_target(length, C, self.window)
        if target <= done:
            return
        S = layer.parent.page_size
        pos = torch.arange(done * C, target * C)
        pages = torch.tensor(block_table_row, dtype=torch.long)[pos // S].to(layer.device)
        slots = (pos % S).to(layer.device)
        keys = layer.k_pages[pages, slots].reshape(target - done, C, self.heads, self.dk)
        vals = layer.v_pages[pages, slots].reshape(target - done, C, self.heads, self.dv)
        payload = torch.cat((keys, vals), -1).permute(0, 2, 1, 3).contiguous().cpu()  # (n, G, C, dk + dv)
        words = pack_signatures(layer.states["chunk_signs"][row, done:target].float()).cpu()
        n, G = target - done, self.heads
        heads = torch.arange(G).repeat(n)
        self.store.insert_many(self._key(seq, heads), torch.arange(done, target).repeat_interleave(G),
                               payload, words.contiguous())  # one call: all or nothing
        self.spilled[seq] = target

    # ------------------------------------------------------------------ recall

    def select(self, layer, q: Tensor, before: list[int], *, top: int, planes: Tensor,
               window: Optional[int], score: str = "hash",
               scale: Optional[float] = None) -> "RecallPlan":
        """Chooses the chunks of the new rows ``q: (B, T, H, d)`` (row ``i`` of sequence ``b``
        at position ``before[b] + i``) on the device and starts copying the choice to the
        host: the caller launches the step's other work before :meth:`recall` waits for it.
        ``score``, ``scale``: the layer's recall score and attention scale, as
        :func:`~mka.memory.recall.recall_decode` takes them."""
        chosen, nC = choose_for_step(q, layer.states["chunk_signs"], before, chunk=self.chunk,
                                     top=top, planes=planes, window=window,
                                     exact=layer.states.get("chunk_keys"), score=score,
                                     scale=scale)
        if q.device.type != "cuda":
            return RecallPlan(chosen, chosen, None, nC)
        host = torch.empty(chosen.shape, dtype=chosen.dtype, pin_memory=True)
        host.copy_(chosen, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        return RecallPlan(chosen, host, event, nC)

    def recall(self, layer, q: Tensor, plan: "RecallPlan",
               scale: Optional[float] = None) -> Tensor:
        """``O3`` of the rows :meth:`select` chose for, their chunks read from the store or,
        not yet spilled, from the pages."""
        C, G, nC = self.chunk, self.heads, plan.chunks
        B = q.shape[0]
        if plan.chosen.shape[-1] == 0:
            return q.new_zeros(q.shape)
        if plan.ready is not None:
            plan.ready.synchronize()  # the choice only: the GPU goes on with the step
        d = distinct_chunks(plan.chosen_host, G, nC)
        keys, vals = self._fetch(layer, d)
        scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale  # as recall_decode
        return attend_distinct(q, keys, vals, plan.chosen, d, C, scale)

    def _fetch(self, layer, d: Distinct) -> tuple[Tensor, Tensor]:
        """The distinct chunks ``d`` on the device, ``keys (U, C, dk)``, ``vals (U, C, dv)``:
        spilled ones read from the store (staged, then copied), the others from the pages."""
        C = self.chunk
        row_seqs = torch.tensor(layer.parent.seqs, dtype=torch.int64)  # per batch row
        row_spilled = torch.tensor([self.spilled.get(s, 0) for s in layer.parent.seqs],
                                   dtype=torch.int64)
        rows = d.rows.long()
        stored = d.index.long() < row_spilled[rows]
        dt, dev = layer.dtype, layer.device
        cuda = dev.type == "cuda"
        staged = torch.empty((int(stored.sum()), C, self.dk + self.dv), dtype=dt, pin_memory=cuda)
        picked = torch.nonzero(stored).flatten()
        self.store.read_many(self._key(row_seqs[rows[picked]], d.heads[picked].long()),
                             d.index[picked].long().contiguous(), staged)  # one call
        self.read_bytes += staged.numel() * staged.element_size()
        out = torch.empty((d.rows.numel(), C, self.dk + self.dv), dtype=dt, device=dev)
        if staged.shape[0]:  # host -> device beside the layer's other work, then joined
            moved = staged
            if cuda:  # allocated on the copy stream, handed to the compute stream
                with torch.cuda.stream(self.copy_stream):
                    moved = staged.to(dev, non_blocking=True)
                main = torch.cuda.current_stream(dev)
                main.wait_stream(self.copy_stream)
                moved.record_stream(main)
            out[picked.to(dev)] = moved
        if not bool(stored.all()):  # chunks still in the pool: gathered from the pages
            u = torch.nonzero(~stored).flatten()
            k, v = page_chunks(layer.k_pages, layer.v_pages, layer.parent.block_table(), d, C, u)
            out[u.to(dev)] = torch.cat((k, v), -1)
        return out[..., :self.dk], out[..., self.dk:]
