"""Tokenizers round-trip text; token ids are computed once and read back from the memmap cache."""

import numpy as np
import pytest

from mka.train.text_tokenizers import build_tokenizer
from mka.train.token_cache import cached_tokens

from .train_cases import generated_text

TRAIN, HELDOUT = generated_text(200, seed=7) + "naïve café ∑\n", generated_text(20, seed=8) + "Zq!\n"


@pytest.mark.parametrize("spec", ["bytes", "char", "bpe:400"])
def test_round_trip_and_vocabulary(spec, tmp_path):
    tok = build_tokenizer(spec, TRAIN, HELDOUT, tmp_path)
    ids = tok.encode(TRAIN)
    assert ids.min() >= 0 and ids.max() < tok.vocab_size
    assert tok.decode(ids) == TRAIN
    if spec == "bpe:400":
        assert tok.vocab_size == 400 and len(ids) < 0.75 * len(TRAIN.encode())  # merges compress
        again = build_tokenizer(spec, TRAIN, HELDOUT, tmp_path)                  # cached file
        assert np.array_equal(again.encode(HELDOUT), tok.encode(HELDOUT))


def test_char_vocabulary_comes_from_training_text():
    tok = build_tokenizer("char", TRAIN, HELDOUT, None)
    assert tok.vocab_size == len(set(TRAIN)) + 1        # one shared id for unseen held-out characters
    assert "Z" not in TRAIN and tok.encode("Z")[0] == tok.unk
    assert build_tokenizer("char", TRAIN, "abc", None).vocab_size == len(set(TRAIN))


def test_token_cache_encodes_once(tmp_path):
    tok = build_tokenizer("bytes", TRAIN, HELDOUT, tmp_path)
    first = cached_tokens(TRAIN, tok, tmp_path)
    assert isinstance(first, np.memmap) and first.dtype == np.uint16

    class NoEncode(type(tok)):
        def encode(self, text):
            raise AssertionError("should have been read from the cache")
    again = cached_tokens(TRAIN, NoEncode(), tmp_path)
    assert np.array_equal(first, again) and np.array_equal(np.asarray(again), tok.encode(TRAIN))
    assert len(list(tmp_path.glob("tokens-*"))) == 2   # ids and their metadata
