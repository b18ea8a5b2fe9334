"""Held-out loss: the token-weighted mean cross-entropy over held-out blocks, reduced across
ranks. Never reads training data."""

from __future__ import annotations

import math
from contextlib import nullcontext
from typing import Callable, Optional

import numpy as np
import torch

from . import distributed as D
from .blocks import heldout_batches, to_device


def autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


@torch.no_grad()
def heldout_loss(model, blocks: list[np.ndarray], batch_size: int, rt: D.Runtime, precision: str,
                 stop_requested: Optional[Callable[[], bool]] = None) -> Optional[dict]:
    """{'loss', 'ppl', 'tokens'}, or None if `stop_requested()` turned true on the way.
    Batches are dealt round-robin to ranks; every rank runs the same number of forwards (a
    rank short of batches repeats one with weight 0) because a sharded (FSDP) model needs
    all ranks in each forward."""
    batches = heldout_batches(blocks, batch_size)
    mine = batches[rt.rank::rt.world]
    rounds = -(-len(batches) // rt.world)
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(rounds):
        if stop_requested is not None and stop_requested():
            model.train(was_training)
            return None
        rows, weight = (mine[i], 1) if i < len(mine) else (batches[0], 0)
        mb = to_device(rows, rt.device)
        with autocast(rt.device, precision):
            _, loss = model(mb.x, mb.y)
        n = mb.y.numel()
        total += weight * float(loss.double()) * n   # model's loss is the mean over n targets
        count += weight * n
    model.train(was_training)
    total, count = D.all_reduce(rt, [total, float(count)])
    mean = total / count
    ppl = math.exp(mean) if mean < 709 else math.inf  # exp overflows a float beyond ~709.78
    return {"loss": mean, "ppl": ppl, "tokens": int(count)}
