"""Fixtures of the `mka train` tests: generated corpora and an argv builder with private
cache and output folders. tests/train is a package, so this conftest does not replace the
top-level ``conftest`` module that the other test folders import helpers from."""

from pathlib import Path

import pytest

from .train_cases import TINY, generated_text


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
