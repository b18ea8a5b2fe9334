"""Fixed-length blocks of token ids, no padding anywhere.

A block of ``seq_len`` inputs reads ``seq_len + 1`` consecutive ids (inputs, then targets
shifted by one). Training blocks tile the training ids from an offset drawn per epoch
(so a block boundary is not the same every epoch) and are visited in a per-epoch random
order; both come from ``(seed, epoch)`` alone, so the data position is just the step
number. Held-out blocks tile the held-out ids from 0, with one shorter block for the
tail, so every held-out token is predicted exactly once.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .options import ConfigError


@dataclass(frozen=True)
class MicroBatch:
    x: torch.Tensor   # (B, T) inputs
    y: torch.Tensor   # (B, T) next-token targets


def _to_batch(rows: list[np.ndarray], device: torch.device) -> MicroBatch:
    a = torch.from_numpy(np.stack(rows).astype(np.int64))
    return _move(a[:, :-1], a[:, 1:], device)


def example_batch(examples: list, device: torch.device) -> MicroBatch:
    """Task examples (``recall_tasks.Example``, of one length): targets -1 but at answers."""
    x = torch.from_numpy(np.stack([e.tokens[:-1] for e in examples]))
    return _move(x, torch.from_numpy(np.stack([e.targets() for e in examples])), device)


def _move(x: torch.Tensor, y: torch.Tensor, device: torch.device) -> MicroBatch:
    if device.type == "cuda":
        return MicroBatch(*(pinned(t).to(device, non_blocking=True) for t in (x, y)))
    return MicroBatch(x.contiguous(), y.contiguous())


def pinned(t: torch.Tensor) -> torch.Tensor:
    """A contiguous page-locked copy of CPU tensor ``t``, for a ``non_blocking`` transfer that
    leaves the host free. Not ``t.pin_memory()``: that keeps ``t``'s strides, and the inputs and
    targets are strided views of one (B, T + 1) array; the transfer of a strided tensor first
    copies it into ordinary (pageable) memory, and a copy from pageable memory may wait for the
    work already queued on the device (CUDA's API synchronization rules), so the host would lose
    its lead on the GPU at every step."""
    out = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    return out.copy_(t)


class TrainSampler:
    """Global batch of step s = blocks perm_e[j*G:(j+1)*G] of epoch e = s // steps_per_epoch.

    The global batch (G = batch_size * grad_accum * world) is cut into world * grad_accum
    micro-batches; rank r takes micro-batch m * world + r at accumulation step m. Any split
    of the same G blocks therefore averages gradients over the same global batch.
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, batch_size: int, grad_accum: int,
                 world: int, seed: int):
        self.tokens, self.T, self.B = tokens, seq_len, batch_size
        self.accum, self.world, self.seed = grad_accum, world, seed
        self.global_batch = batch_size * grad_accum * world
        self.blocks_per_epoch = (len(tokens) - seq_len) // seq_len   # fits any offset < seq_len
        self.steps_per_epoch = self.blocks_per_epoch // self.global_batch
        if self.steps_per_epoch < 1:
            raise ConfigError(
                f"the training split has {len(tokens)} tokens: {self.blocks_per_epoch} blocks of --seq-len "
                f"{seq_len}, fewer than one global batch of {self.global_batch} blocks "
                f"(--batch-size x --grad-accum x processes); use more data or smaller settings")
        self._epoch, self._layout = None, None

    def step_tokens(self, step: int) -> int:
        """Input tokens of optimizer step ``step`` (0-based), over all processes."""
        return self.global_batch * self.T

    def tokens_through(self, steps: int) -> int:
        return steps * self.global_batch * self.T

    @property
    def lengths_text(self) -> str:
        return str(self.T)

    def layout(self, epoch: int) -> tuple[int, np.ndarray]:
        if epoch != self._epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._epoch = epoch
            self._layout = (int(rng.integers(self.T)), rng.permutation(self.blocks_per_epoch))
        return self._layout

    def block(self, epoch: int, index: int) -> np.ndarray:
        offset, perm = self.layout(epoch)
        start = offset + int(perm[index]) * self.T
        return np.asarray(self.tokens[start:start + self.T + 1])

    def micro_batch(self, step: int, micro: int, rank: int, device: torch.device) -> MicroBatch:
        epoch, j = divmod(step, self.steps_per_epoch)
        first = j * self.global_batch + (micro * self.world + rank) * self.B
        return _to_batch([self.block(epoch, first + i) for i in range(self.B)], device)


def heldout_blocks(tokens: np.ndarray, seq_len: int, max_tokens: int = 0) -> list[np.ndarray]:
    """Consecutive blocks covering the held-out ids (or their first `max_tokens` targets)."""
    n_targets = len(tokens) - 1
    if max_tokens:
        n_targets = min(n_targets, max_tokens)
    if n_targets < 1:
        raise ConfigError(f"the held-out split has {len(tokens)} tokens: nothing to evaluate")
    return [np.asarray(tokens[s:min(s + seq_len, n_targets) + 1]) for s in range(0, n_targets, seq_len)]


def heldout_batches(blocks: list[np.ndarray], batch_size: int) -> list[list[np.ndarray]]:
    """Batches of equal-length blocks (the short tail block goes alone)."""
    full = [b for b in blocks if len(b) == len(blocks[0])]
    tail = [b for b in blocks if len(b) != len(blocks[0])]
    batches = [full[i:i + batch_size] for i in range(0, len(full), batch_size)]
    return batches + [tail] if tail else batches


def to_device(rows: list[np.ndarray], device: torch.device) -> MicroBatch:
    return _to_batch(rows, device)
