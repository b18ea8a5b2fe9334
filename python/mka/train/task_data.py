"""A recall task as ``mka train``'s data: a training stream of generated examples and a
held-out set per evaluation length, the counterpart of dataset.TokenizedData."""

from __future__ import annotations

from typing import Callable, Optional

import torch

from . import distributed as D
from .blocks import MicroBatch, example_batch
from .options import Settings
from .recall_metrics import heldout_recall
from .recall_tasks import HELDOUT, TRAIN, RecallTask, build_task


class TaskSampler:
    """Step s trains on examples s*G .. s*G + G - 1 of the training stream (G = batch_size x
    grad_accum x processes), all of length lengths[s % len(lengths)]; rank r takes micro-batch
    m * world + r at accumulation step m, as TrainSampler does. The stream never repeats."""

    steps_per_epoch = None  # a generated stream has no epochs

    def __init__(self, task: RecallTask, lengths: list[int], batch_size: int, grad_accum: int, world: int,
                 seed: int):
        self.task, self.lengths, self.B = task, lengths, batch_size
        self.accum, self.world, self.seed = grad_accum, world, seed
        self.global_batch = batch_size * grad_accum * world

    def length(self, step: int) -> int:
        return self.lengths[step % len(self.lengths)]

    def micro_batch(self, step: int, micro: int, rank: int, device: torch.device) -> MicroBatch:
        first = step * self.global_batch + (micro * self.world + rank) * self.B
        n = self.length(step)
        return example_batch([self.task.example(self.seed, TRAIN, n, first + i) for i in range(self.B)], device)

    def step_tokens(self, step: int) -> int:
        return self.global_batch * self.length(step)

    def tokens_through(self, steps: int) -> int:
        cycles, rest = divmod(steps, len(self.lengths))
        return self.global_batch * (cycles * sum(self.lengths) + sum(self.lengths[:rest]))

    @property
    def lengths_text(self) -> str:
        return "/".join(map(str, self.lengths))


class TaskData:
    def __init__(self, settings: Settings):
        self.task = build_task(settings)
        self.seed = settings.seed

    @property
    def vocab_size(self) -> int:
        return self.task.vocab_size

    def describe(self) -> dict:
        return {**self.task.describe(), "train_source": f"--task {self.task.name}, generated (seed {self.seed}, "
                "training contents)", "heldout_source": "generated from other seeds (held-out contents)"}

    def summary(self) -> str:
        d = self.task.describe()
        return ", ".join(f"{k} {v}" for k, v in d.items()) + "; training and held-out examples generated"

    def train_sampler(self, s: Settings, world: int) -> TaskSampler:
        return TaskSampler(self.task, s.task_lengths_list(), s.batch_size, s.grad_accum, world, s.seed)

    def heldout_set(self, s: Settings, periodic: bool) -> dict[int, list]:
        """length -> the first examples of the held-out stream at that length; periodic
        evaluations read at most --eval-tokens // length of them."""
        sets = {}
        for n in s.eval_lengths_list():
            count = min(s.eval_examples, max(1, s.eval_tokens // n)) if periodic and s.eval_tokens else s.eval_examples
            sets[n] = [self.task.example(s.seed, HELDOUT, n, i) for i in range(count)]
        return sets

    def evaluate(self, model, heldout: dict[int, list], s: Settings, rt: D.Runtime,
                 stop_requested: Optional[Callable[[], bool]] = None) -> Optional[dict]:
        return heldout_recall(model, heldout, s.batch_size, rt, s.precision, stop_requested)

    @staticmethod
    def result_fields(final: Optional[dict]) -> dict:
        keys = {"token_accuracy": "heldout_token_accuracy", "example_accuracy": "heldout_example_accuracy",
                "examples": "heldout_examples", "by_length": "accuracy_by_length"}
        return {ours: final[k] if final else None for k, ours in keys.items()}
