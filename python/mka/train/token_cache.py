"""Tokenize once, keep the ids in a memory-mapped file keyed by text and tokenizer."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from .text_tokenizers import sha256_text


def default_cache_dir() -> Path:
    return Path(os.environ.get("MKA_CACHE", Path.home() / ".cache" / "mka" / "train"))


def cached_tokens(text: str, tokenizer, cache_dir: Path) -> np.memmap:
    """Read-only memmap of `text`'s ids; written (atomically) on the first call."""
    key = hashlib.sha256(f"{tokenizer.fingerprint}|{sha256_text(text)}".encode()).hexdigest()[:24]
    dtype = np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.uint32
    path = cache_dir / f"tokens-{key}.{np.dtype(dtype).name}"
    meta = path.with_suffix(path.suffix + ".json")
    if not (path.is_file() and meta.is_file()):
        ids = tokenizer.encode(text)
        if ids.size and (ids.min() < 0 or ids.max() >= tokenizer.vocab_size):
            raise RuntimeError(f"tokenizer {tokenizer.fingerprint} produced ids outside [0, {tokenizer.vocab_size})")
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        ids.astype(dtype).tofile(tmp)
        os.replace(tmp, path)
        meta.write_text(json.dumps({"tokens": int(ids.size), "tokenizer": tokenizer.fingerprint}))
    n = json.loads(meta.read_text())["tokens"]
    if n == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", shape=(n,))
