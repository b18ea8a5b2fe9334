"""Text -> token ids. ``bytes`` and ``char`` need nothing; ``bpe:N`` trains a byte-level BPE
on the training split with the ``tokenizers`` package and caches it; ``gpt2`` is GPT-2's
BPE through tiktoken (its vocabulary file must be cached or downloadable)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

from .options import ConfigError


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class ByteTokenizer:
    vocab_size = 256
    fingerprint = "bytes"

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64)

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


class CharTokenizer:
    """One id per character of the training text; held-out characters it never saw share one
    extra id (added only when the held-out text has such characters)."""

    def __init__(self, train_text: str, heldout_text: str):
        self.chars = sorted(set(train_text))
        unseen = set(heldout_text) - set(self.chars)
        self.unk = len(self.chars) if unseen else None
        self.vocab_size = len(self.chars) + (1 if unseen else 0)
        self.index = {c: i for i, c in enumerate(self.chars)}
        self.fingerprint = "char:" + hashlib.sha256("".join(self.chars).encode()).hexdigest()[:16] + \
            (":unk" if unseen else "")

    def encode(self, text: str) -> np.ndarray:
        get, unk = self.index.get, self.unk
        return np.fromiter((get(c, unk) for c in text), dtype=np.int64, count=len(text))

    def decode(self, ids) -> str:
        return "".join(self.chars[i] if i < len(self.chars) else "\ufffd" for i in ids)


class BPETokenizer:
    def __init__(self, vocab_size: int, train_text: str, cache_dir: Path):
        try:
            from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
        except ImportError as e:
            raise ConfigError("--tokenizer bpe:N needs the 'tokenizers' package: pip install tokenizers") from e
        key = f"bpe-{vocab_size}-{sha256_text(train_text)[:20]}"
        path = cache_dir / f"{key}.json"
        if path.is_file():
            tok = Tokenizer.from_file(str(path))
        else:
            tok = Tokenizer(models.BPE())
            tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
            tok.decoder = decoders.ByteLevel()
            trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                          initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
            tok.train_from_iterator(_lines(train_text), trainer)
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            tok.save(str(tmp))
            os.replace(tmp, path)  # atomic: concurrent ranks never read half a file
        self._tok = tok
        self.vocab_size = tok.get_vocab_size()
        self.fingerprint = key

    def encode(self, text: str) -> np.ndarray:
        encs = self._tok.encode_batch(_lines(text))
        return np.fromiter((i for e in encs for i in e.ids), dtype=np.int64)

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids])


class TiktokenGPT2:
    fingerprint = "tiktoken-gpt2"

    def __init__(self):
        try:
            import tiktoken
            self._enc = tiktoken.get_encoding("gpt2")
        except ImportError as e:
            raise ConfigError("--tokenizer gpt2 needs tiktoken: pip install tiktoken "
                              "(offline, use bpe:N or bytes)") from e
        except Exception as e:  # the vocabulary file is downloaded on first use
            raise ConfigError(f"--tokenizer gpt2: tiktoken could not load the GPT-2 vocabulary ({e}); "
                              "it needs network once (or TIKTOKEN_CACHE_DIR); offline, use bpe:N or bytes") from e
        self.vocab_size = self._enc.n_vocab

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._enc.encode_ordinary(text), dtype=np.int64)

    def decode(self, ids) -> str:
        return self._enc.decode([int(i) for i in ids])


def _lines(text: str, chunk: int = 1 << 16) -> list[str]:
    """Pieces of about `chunk` characters, cut after a newline that a non-space follows: a
    pre-token boundary of byte-level BPE, so the pieces' encodings concatenate exactly."""
    out, start = [], 0
    while start < len(text):
        end = start + chunk
        while True:
            end = text.find("\n", end)
            if end < 0 or end + 1 >= len(text) or not text[end + 1].isspace():
                break
            end += 1
        end = len(text) if end < 0 else end + 1
        out.append(text[start:end])
        start = end
    return out


def build_tokenizer(spec: str, train_text: str, heldout_text: str, cache_dir: Path):
    if spec == "bytes":
        return ByteTokenizer()
    if spec == "char":
        return CharTokenizer(train_text, heldout_text)
    if spec == "gpt2":
        return TiktokenGPT2()
    if spec.startswith("bpe:"):
        return BPETokenizer(int(spec[4:]), train_text, cache_dir)
    raise ConfigError(f"--tokenizer: expected bytes, char, gpt2 or bpe:N, got {spec!r}")
