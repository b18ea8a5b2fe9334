"""Held-out metrics of a recall task, on answer positions only: the cross-entropy, the
accuracy per answer token (greedy: the argmax is the target) and per example (every
answer of the example right), per length and over all lengths, reduced across ranks.
Reads only the held-out examples it is given."""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F

from . import distributed as D
from .blocks import example_batch
from .evaluation import autocast, each_batch, perplexity

# What answer_counts returns, in order; summed over batches and ranks.
COUNTS = ("loss_sum", "answer_tokens", "correct_tokens", "examples", "correct_examples")


def answer_counts(logits: torch.Tensor, targets: torch.Tensor) -> list[float]:
    """COUNTS of one batch: ``logits (B, T, V)``; ``targets (B, T)``, -1 where no answer is due."""
    answer = targets != -1
    loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-1, reduction="sum")
    hit = (logits.argmax(-1) == targets) & answer
    exact = hit.sum(1) == answer.sum(1)
    return [float(loss), float(answer.sum()), float(hit.sum()), float(targets.shape[0]), float(exact.sum())]


def summarize(counts: list[float]) -> dict:
    c = dict(zip(COUNTS, counts))
    mean = c["loss_sum"] / c["answer_tokens"]
    return {"loss": mean, "ppl": perplexity(mean), "tokens": int(c["answer_tokens"]),
            "token_accuracy": c["correct_tokens"] / c["answer_tokens"],
            "example_accuracy": c["correct_examples"] / c["examples"], "examples": int(c["examples"])}


@torch.no_grad()
def heldout_recall(model, sets: dict[int, list], batch_size: int, rt: D.Runtime, precision: str,
                   stop_requested: Optional[Callable[[], bool]] = None) -> Optional[dict]:
    """``sets``: length -> held-out examples. summarize()'s keys over all examples, plus
    ``by_length``: {length: summarize()'s keys}; None if ``stop_requested()`` turned true."""
    batches = [(n, ex[i:i + batch_size]) for n, ex in sets.items() for i in range(0, len(ex), batch_size)]
    sums = {n: [0.0] * len(COUNTS) for n in sets}

    def measure(batch, weight):
        n, examples = batch
        mb = example_batch(examples, rt.device)
        with autocast(rt.device, precision):
            logits, _ = model(mb.x)
        sums[n] = [s + weight * c for s, c in zip(sums[n], answer_counts(logits, mb.y))]

    if not each_batch(model, batches, rt, measure, stop_requested):
        return None
    k = len(COUNTS)
    flat = D.all_reduce(rt, [c for n in sets for c in sums[n]])
    per_length = [flat[i * k:(i + 1) * k] for i in range(len(sets))]
    overall = summarize([sum(col) for col in zip(*per_length)])
    return {**overall, "by_length": {str(n): summarize(c) for n, c in zip(sets, per_length)}}
