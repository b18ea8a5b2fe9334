"""Synthetic recall tasks for ``mka train --task``: examples generated on the fly, each a
function of ``(seed, stream, length, index)`` alone.

Both tasks draw filler from the ids ``[0, FILLER_IDS)`` and score only answer positions.

- ``mqar``, multi-query associative recall (Zoology, arXiv 2312.04927): ``P`` key–value
  pairs ``k v`` open the sequence, filler follows, and ``Q`` queries ``k v`` close it; the
  target at each query key is its paired value. Keys are the ids ``[FILLER_IDS,
  FILLER_IDS + h)``, values the next ``h`` ids, ``h = (vocab - FILLER_IDS) // 2``.
- ``passkey``: filler with ``PASS d1 .. dn`` placed at a depth (0: the start, 1: just
  before the query), then ``QUERY d1 .. dn`` at the end; the targets are the ``n`` digits
  after ``QUERY``. Ids: digits ``FILLER_IDS + 0..9``, then ``PASS``, ``QUERY``.

An example of length ``L`` holds ``L + 1`` tokens (inputs, then targets shifted by one).
Training and held-out examples come from different seeds, and their answer-determining
content (pairs and queries; the passkey's digits) is split by a hash: training keeps the
contents of even hash, held-out those of odd hash, so no held-out example's content ever
appears in training, at any length.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Optional

import numpy as np

from .options import ConfigError

FILLER_IDS = 16
FILLERS = ("random", "repeat")
TRAIN, HELDOUT = 0, 1
# A content space too small to fill both halves of the split fails after this many draws.
MAX_DRAWS = 64


@dataclass(frozen=True)
class Example:
    tokens: np.ndarray    # (L + 1,) int64
    answers: np.ndarray   # input positions whose next token is an answer, ascending

    def targets(self) -> np.ndarray:
        """(L,) next-token targets, -1 (ignored by the loss) except at answer positions."""
        y = np.full(len(self.tokens) - 1, -1, dtype=np.int64)
        y[self.answers] = self.tokens[self.answers + 1]
        return y


def _stream_of(content: np.ndarray) -> int:
    return hashlib.blake2b(content.astype(np.int64).tobytes(), digest_size=8).digest()[0] & 1


def _filler(rng: np.random.Generator, kind: str, n: int) -> np.ndarray:
    if kind == "random":
        return rng.integers(FILLER_IDS, size=n)
    return np.arange(n) % FILLER_IDS  # one fixed repetitive text


class RecallTask(ABC):
    name: str
    vocab_size: int
    min_length: int
    filler: str
    _enlarge: str   # the settings that make more distinct contents

    @abstractmethod
    def _content(self, rng: np.random.Generator) -> np.ndarray:
        """The ids that decide the answers (drawn first: the stream split hashes them)."""

    @abstractmethod
    def _lay_out(self, content: np.ndarray, rng: np.random.Generator, length: int) -> Example:
        """The example of ``length`` around ``content``, its filler drawn from ``rng``."""

    @abstractmethod
    def describe(self) -> dict:
        """The task's settings, for the results."""

    def example(self, seed: int, stream: int, length: int, index: int) -> Example:
        if length < self.min_length:
            raise ConfigError(f"{self.name}: length {length} is shorter than the task's {self.min_length} tokens")
        rng = np.random.default_rng([seed % 2**63, stream, length, index])
        for _ in range(MAX_DRAWS):
            content = self._content(rng)
            if _stream_of(content) == stream:
                return self._lay_out(content, rng, length)
        raise ConfigError(f"--task {self.name}: too few distinct examples to split into training and held-out "
                          f"contents; enlarge the task ({self._enlarge})")


class MQAR(RecallTask):
    name = "mqar"
    _enlarge = "--task-vocab or --num-kv-pairs"

    def __init__(self, vocab_size: int, num_kv_pairs: int, num_queries: int, filler: str):
        self.vocab_size, self.pairs, self.queries, self.filler = vocab_size, num_kv_pairs, num_queries, filler
        self.half = (vocab_size - FILLER_IDS) // 2
        if self.half < num_kv_pairs:
            raise ConfigError(f"--task-vocab {vocab_size}: MQAR needs {FILLER_IDS} filler ids and "
                              f"{num_kv_pairs} distinct keys and values (--num-kv-pairs), at least "
                              f"{FILLER_IDS + 2 * num_kv_pairs} ids")
        if num_queries > num_kv_pairs:
            raise ConfigError(f"--num-queries {num_queries}: each query asks a different key, so at most "
                              f"--num-kv-pairs ({num_kv_pairs})")
        self.min_length = 2 * (num_kv_pairs + num_queries) - 1

    def _content(self, rng):
        keys = rng.choice(self.half, self.pairs, replace=False) + FILLER_IDS
        values = rng.integers(self.half, size=self.pairs) + FILLER_IDS + self.half
        asked = rng.choice(self.pairs, self.queries, replace=False)
        return np.concatenate([keys, values, asked])

    def _lay_out(self, content, rng, length):
        P, Q = self.pairs, self.queries
        keys, values, asked = content[:P], content[P:2 * P], content[2 * P:]
        tokens = np.empty(length + 1, dtype=np.int64)
        tokens[0:2 * P:2], tokens[1:2 * P:2] = keys, values
        first = length + 1 - 2 * Q
        tokens[2 * P:first] = _filler(rng, self.filler, first - 2 * P)
        tokens[first::2], tokens[first + 1::2] = keys[asked], values[asked]
        return Example(tokens, np.arange(first, length + 1, 2))

    def describe(self) -> dict:
        return {"task": self.name, "vocab_size": self.vocab_size, "num_kv_pairs": self.pairs,
                "num_queries": self.queries, "filler": self.filler}


class Passkey(RecallTask):
    name = "passkey"
    _enlarge = "--passkey-digits"

    def __init__(self, digits: int, depth: Optional[float], filler: str):
        self.digits, self.depth, self.filler = digits, depth, filler
        self.first_digit, self.pass_id, self.query_id = FILLER_IDS, FILLER_IDS + 10, FILLER_IDS + 11
        self.vocab_size = FILLER_IDS + 12
        self.min_length = 2 * digits + 1

    def _content(self, rng):
        return rng.integers(10, size=self.digits)

    def _lay_out(self, content, rng, length):
        n = self.digits
        key = np.concatenate([[self.pass_id], content + self.first_digit])
        room = length + 1 - 2 * (n + 1)  # filler tokens around the passkey
        depth = rng.random() if self.depth is None else self.depth
        at = int(round(depth * room))
        tokens = np.concatenate([_filler(rng, self.filler, room), [self.query_id], key[1:]])
        tokens = np.concatenate([tokens[:at], key, tokens[at:]]).astype(np.int64)
        return Example(tokens, np.arange(length - n, length))

    def describe(self) -> dict:
        return {"task": self.name, "vocab_size": self.vocab_size, "passkey_digits": self.digits,
                "passkey_depth": "uniform" if self.depth is None else self.depth, "filler": self.filler}


# Each task's own settings: given with another task they are an error, not silently unused.
TASK_SETTINGS = {"mqar": ("task_vocab", "num_kv_pairs", "num_queries"),
                 "passkey": ("passkey_digits", "passkey_depth")}


def check_task_settings(settings) -> None:
    """A task's settings appear only with that task."""
    v = settings.values
    if v["task_filler"] is not None and not v["task"]:
        raise ConfigError("--task-filler is a setting of --task (mqar or passkey), not of text data (--data)")
    for task, names in TASK_SETTINGS.items():
        for name in names:
            if v[name] is not None and v["task"] != task:
                raise ConfigError(f"--{name.replace('_', '-')} is a setting of --task {task}, "
                                  f"not of {'--task ' + v['task'] if v['task'] else 'text data (--data)'}")


def build_task(settings) -> RecallTask:
    """The task ``settings.task`` names, its unset settings at their defaults."""
    check_task_settings(settings)
    v = settings.values
    filler = v["task_filler"] or "random"
    if v["task"] == "mqar":
        pairs = v["num_kv_pairs"] or 8
        return MQAR(v["task_vocab"] or 256, pairs, v["num_queries"] or pairs, filler)
    return Passkey(v["passkey_digits"] or 5, v["passkey_depth"], filler)
