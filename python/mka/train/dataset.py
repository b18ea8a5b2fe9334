"""Corpus -> tokenizer -> cached token ids for the training and held-out splits (or, with
``--task``, a generated recall task: task_data.py)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from . import distributed as D
from . import hf_source
from .blocks import TrainSampler, heldout_blocks
from .corpus import load_corpus
from .evaluation import heldout_loss
from .options import Settings
from .task_data import TaskData
from .text_tokenizers import build_tokenizer
from .token_cache import cached_tokens, default_cache_dir


@dataclass
class TokenizedData:
    tokenizer: object
    train: np.ndarray
    heldout: np.ndarray
    train_source: str
    heldout_source: str

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    def describe(self) -> dict:
        return {"train_source": self.train_source, "heldout_source": self.heldout_source,
                "tokenizer": self.tokenizer.fingerprint, "vocab_size": self.vocab_size,
                "train_tokens": int(len(self.train)), "heldout_tokens": int(len(self.heldout))}

    def summary(self) -> str:
        return (f"{len(self.train):,} training tokens ({self.train_source}), {len(self.heldout):,} held-out "
                f"tokens ({self.heldout_source}); tokenizer {self.tokenizer.fingerprint} ({self.vocab_size} symbols)")

    def train_sampler(self, s: Settings, world: int) -> TrainSampler:
        return TrainSampler(self.train, s.seq_len, s.batch_size, s.grad_accum, world, s.seed)

    def heldout_set(self, s: Settings, periodic: bool) -> list[np.ndarray]:
        """Held-out blocks: periodic evaluations read the first --eval-tokens targets."""
        return heldout_blocks(self.heldout, s.seq_len, s.eval_tokens if periodic else 0)

    def evaluate(self, model, heldout: list[np.ndarray], s: Settings, rt: D.Runtime,
                 stop_requested: Optional[Callable[[], bool]] = None) -> Optional[dict]:
        return heldout_loss(model, heldout, s.batch_size, rt, s.precision, stop_requested)

    @staticmethod
    def result_fields(final: Optional[dict]) -> dict:
        return {}


def _prepare(settings: Settings) -> TokenizedData:
    corpus = load_corpus(settings.data, settings.train_split, settings.eval_split, settings.holdout_fraction)
    cache = Path(settings.cache_dir).expanduser() if settings.cache_dir else default_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    folder = hf_source.tokenizer_folder(settings)
    if folder is not None:
        from .hf_model import PretrainedTextTokenizer
        tok = PretrainedTextTokenizer(folder)
    else:
        tok = build_tokenizer(settings.tokenizer, corpus.train, corpus.heldout, cache)
    return TokenizedData(tok, cached_tokens(corpus.train, tok, cache), cached_tokens(corpus.heldout, tok, cache),
                         corpus.train_source, corpus.heldout_source)


def prepare(settings: Settings, rt: D.Runtime) -> TokenizedData | TaskData:
    """A generated task, or text: rank 0 tokenizes and fills the cache; the other ranks then read it."""
    if settings.task is not None:
        return TaskData(settings)
    if rt.is_main:
        data = _prepare(settings)
    D.barrier(rt)
    if not rt.is_main:
        data = _prepare(settings)
    return data
