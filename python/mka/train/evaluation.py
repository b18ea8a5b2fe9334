"""Held-out loss: the token-weighted mean cross-entropy over held-out blocks, reduced across
ranks. Never reads training data."""

from __future__ import annotations

import math
from contextlib import nullcontext
from typing import Any, Callable, Optional

import numpy as np
import torch

from . import distributed as D
from .blocks import heldout_batches, to_device


def autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def perplexity(mean_loss: float) -> float:
    return math.exp(mean_loss) if mean_loss < 709 else math.inf  # exp overflows a float beyond ~709.78


def each_batch(model, batches: list[Any], rt: D.Runtime, measure: Callable[[Any, int], None],
               stop_requested: Optional[Callable[[], bool]] = None) -> bool:
    """``measure(batch, weight)`` for this rank's share of ``batches`` in eval mode; False if
    ``stop_requested()`` turned true on the way. Batches are dealt round-robin to ranks; every
    rank runs the same number of forwards (a rank short of batches repeats one with weight 0)
    because a sharded (FSDP) model needs all ranks in each forward."""
    mine = batches[rt.rank::rt.world]
    rounds = -(-len(batches) // rt.world)
    was_training = model.training
    model.eval()
    try:
        for i in range(rounds):
            if stop_requested is not None and stop_requested():
                return False
            measure(*((mine[i], 1) if i < len(mine) else (batches[0], 0)))
    finally:
        model.train(was_training)
    return True


@torch.no_grad()
def heldout_loss(model, blocks: list[np.ndarray], batch_size: int, rt: D.Runtime, precision: str,
                 stop_requested: Optional[Callable[[], bool]] = None) -> Optional[dict]:
    """{'loss', 'ppl', 'tokens'}, or None if `stop_requested()` turned true on the way."""
    sums = [0.0, 0.0]  # loss x targets, targets

    def measure(rows, weight):
        mb = to_device(rows, rt.device)
        with autocast(rt.device, precision):
            _, loss = model(mb.x, mb.y)
        n = mb.y.numel()
        sums[0] += weight * float(loss.double()) * n   # model's loss is the mean over n targets
        sums[1] += weight * n

    if not each_batch(model, heldout_batches(blocks, batch_size), rt, measure, stop_requested):
        return None
    total, count = D.all_reduce(rt, sums)
    mean = total / count
    return {"loss": mean, "ppl": perplexity(mean), "tokens": int(count)}
