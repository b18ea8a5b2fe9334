"""Corpus -> tokenizer -> cached token ids for the training and held-out splits."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import distributed as D
from .corpus import load_corpus
from .options import Settings
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


def _prepare(settings: Settings) -> TokenizedData:
    corpus = load_corpus(settings.data, settings.train_split, settings.eval_split, settings.holdout_fraction)
    cache = Path(settings.cache_dir).expanduser() if settings.cache_dir else default_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(settings.tokenizer, corpus.train, corpus.heldout, cache)
    return TokenizedData(tok, cached_tokens(corpus.train, tok, cache), cached_tokens(corpus.heldout, tok, cache),
                         corpus.train_source, corpus.heldout_source)


def prepare(settings: Settings, rt: D.Runtime) -> TokenizedData:
    """Rank 0 tokenizes and fills the cache; the other ranks then read it."""
    if rt.is_main:
        data = _prepare(settings)
    D.barrier(rt)
    if not rt.is_main:
        data = _prepare(settings)
    return data
