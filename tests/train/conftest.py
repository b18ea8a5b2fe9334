"""Generated corpora and tiny-model flags for the `mka train` tests (CPU, seconds per run)."""

import json
import random
from pathlib import Path

import pytest

TINY = ["--n-layer", "2", "--n-embd", "64", "--n-head", "4", "--seq-len", "32", "--batch-size", "4",
        "--warmup-steps", "2", "--lr", "3e-3", "--log-interval", "1", "--no-plots"]


def generated_text(n_lines: int, seed: int) -> str:
    """Numbered lines of random words: no two blocks of 32+ characters can coincide."""
    r = random.Random(seed)
    words = ["".join(r.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(r.randint(2, 7))) for _ in range(200)]
    return "".join(f"{seed}-{i} " + " ".join(r.choice(words) for _ in range(r.randint(4, 10))) + "\n"
                   for i in range(n_lines))


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    p.write_text(generated_text(400, seed=1))
    return p


@pytest.fixture(scope="session")
def corpus_folder(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("folder")
    for seed, name in ((2, "train.txt"), (3, "valid.txt"), (4, "test.txt")):
        (d / name).write_text(generated_text(300 if name == "train.txt" else 60, seed))
    return d


@pytest.fixture
def run_args(tmp_path):
    """argv builder: tiny model, private cache and output folders."""
    def build(data, *extra, out="out"):
        return ["--data", str(data), "--out", str(tmp_path / out), "--cache-dir", str(tmp_path / "cache"),
                *TINY, *map(str, extra)]
    return build


def results(out: Path) -> list[dict]:
    return json.loads((out / "results.json").read_text())["results"]
