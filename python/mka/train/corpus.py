"""Raw text of a training split and a disjoint held-out split.

Sources: a folder of split files (``train.txt``, ``valid.txt``, ``test.txt``; WikiText's
``wiki.*.tokens`` names work too), a single file cut deterministically into a leading
training part and a trailing held-out part, or a named set through Hugging Face
``datasets`` when it is installed and online.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .options import ConfigError

# name -> (datasets path, config, {our split: their split}, text column)
_HUB_SPLITS = {"train": "train", "valid": "validation", "test": "test"}
NAMED_SETS = {
    "wikitext-2": ("wikitext", "wikitext-2-raw-v1", _HUB_SPLITS, "text"),
    "wikitext-103": ("wikitext", "wikitext-103-raw-v1", _HUB_SPLITS, "text"),
    "tinyshakespeare": ("karpathy/tiny_shakespeare", None, _HUB_SPLITS, "text"),
}
_SPLIT_ALIASES = {"train": ("train",), "valid": ("valid", "validation", "val"), "test": ("test",)}


@dataclass(frozen=True)
class Corpus:
    train: str
    heldout: str
    train_source: str     # where each part came from, for the results
    heldout_source: str


def _split_file(folder: Path, split: str) -> Path | None:
    for name in _SPLIT_ALIASES.get(split, (split,)):
        for candidate in (f"{name}.txt", name, f"wiki.{name}.tokens", f"{name}.tokens"):
            if (folder / candidate).is_file():
                return folder / candidate
    return None


def _from_folder(folder: Path, train_split: str, eval_split: str) -> Corpus:
    if train_split == eval_split:
        raise ConfigError(f"--train-split and --eval-split are both {train_split!r}: "
                          "evaluation must read held-out text, never the training text")
    files = {}
    for flag, split in (("--train-split", train_split), ("--eval-split", eval_split)):
        f = _split_file(folder, split)
        if f is None:
            present = ", ".join(sorted(p.name for p in folder.iterdir() if p.is_file())) or "nothing"
            raise ConfigError(f"{flag} {split!r}: no such split file in {folder} (it holds {present}); "
                              f"choose another {flag}")
        files[split] = f
    a, b = files[train_split], files[eval_split]
    if a.resolve() == b.resolve():
        raise ConfigError(f"--train-split and --eval-split resolve to the same file {a}")
    return Corpus(a.read_text(encoding="utf-8"), b.read_text(encoding="utf-8"), str(a), str(b))


def split_text(text: str, holdout_fraction: float) -> tuple[str, str]:
    """Leading (1 - f) characters train, the rest is held out (nanoGPT's shakespeare_char cut)."""
    cut = int(len(text) * (1.0 - holdout_fraction))
    return text[:cut], text[cut:]


def _from_file(path: Path, holdout_fraction: float) -> Corpus:
    train, heldout = split_text(path.read_text(encoding="utf-8"), holdout_fraction)
    pct = f"{100 * (1 - holdout_fraction):g}%"
    return Corpus(train, heldout, f"{path} (first {pct} of characters)",
                  f"{path} (last {100 * holdout_fraction:g}% of characters)")


def _from_hub(name: str, train_split: str, eval_split: str) -> Corpus:
    try:
        import datasets
    except ImportError as e:
        raise ConfigError(
            f"--data {name} loads through the Hugging Face 'datasets' package, which is not installed "
            "(pip install datasets, and be online); offline, pass a folder of train/valid/test text files "
            "or a single text file as --data PATH") from e
    path, config, splits, column = NAMED_SETS[name]
    parts = []
    for flag, split in (("--train-split", train_split), ("--eval-split", eval_split)):
        if split not in splits:
            raise ConfigError(f"{flag} {split!r}: {name} has splits {', '.join(splits)}")
        try:
            ds = datasets.load_dataset(path, config, split=splits[split])
        except Exception as e:  # network, hub or cache failure: say what to do instead
            raise ConfigError(f"--data {name}: could not load {path} ({e}); offline, pass --data PATH") from e
        parts.append("".join(ds[column]) if name.startswith("wikitext") else "\n".join(ds[column]))
    return Corpus(parts[0], parts[1], f"{path}:{config}:{splits[train_split]}",
                  f"{path}:{config}:{splits[eval_split]}")


def load_corpus(data: str, train_split: str, eval_split: str, holdout_fraction: float) -> Corpus:
    p = Path(data).expanduser()
    if p.is_dir():
        corpus = _from_folder(p, train_split, eval_split)
    elif p.is_file():
        corpus = _from_file(p, holdout_fraction)
    elif data in NAMED_SETS:
        corpus = _from_hub(data, train_split, eval_split)
    else:
        raise ConfigError(f"--data {data!r}: not a folder, a file, or one of {', '.join(NAMED_SETS)}")
    for part, text in (("training", corpus.train), ("held-out", corpus.heldout)):
        if not text:
            raise ConfigError(f"--data {data!r}: the {part} text is empty")
    return corpus
