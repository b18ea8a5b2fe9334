"""bench/tools/train_vs_baseline.py and nanogpt_baseline.py on the CPU at a tiny size: every
row of the table with finite numbers, the baseline reading `mka train`'s own ids, and one-line
errors for bad settings."""

from __future__ import annotations

import importlib.util
import math
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

TOOLS = Path(__file__).resolve().parents[2] / "bench" / "tools"
TINY = ["--device", "cpu", "--steps", "6", "--timing-warmup", "2", "--log-interval", "2", "--n-layer", "1",
        "--n-head", "2", "--n-embd", "32", "--block-size", "32", "--batch-size", "2"]


def _tool(name: str):
    spec = importlib.util.spec_from_file_location(name, TOOLS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while it loads
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def text_file(tmp_path) -> Path:
    """A few thousand characters of made-up verse (tests make their own data)."""
    rng = random.Random(0)
    words = "the king queen lord shall thou art not what good my love night day speak come".split()
    lines = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 9))).capitalize() + "." for _ in range(300)]
    path = tmp_path / "verse.txt"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


@pytest.fixture
def one_thread():
    """On a busy two-core runner each op of a tiny model waits for a descheduled second thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_table_has_every_row(text_file, tmp_path, monkeypatch, capsys, one_thread):
    """All six rows, compiled ones through the 'eager' compile backend (inductor's C++ build
    takes half a minute per model here): finite tokens/s, losses and ratios; the baselines'
    ratio is 1."""
    monkeypatch.setenv("MKA_CACHE", str(tmp_path / "cache"))  # mka train's token cache
    tvb = _tool("train_vs_baseline")
    rows = list(tvb.ROWS.values())
    argv = ["--data", str(text_file), *TINY, "--compile-backend", "eager", "--rows", ",".join(tvb.ROWS)]
    assert tvb.main(argv) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert lines[0].startswith("| implementation | mode | tokens/s | held-out loss |")
    assert len(lines) == 1 + len(rows)
    for line, row in zip(lines[1:], rows):
        label, mode, tps, loss, ratio = (c.strip() for c in line.strip().strip("|").split("|"))
        assert (label, mode) == (row.label, "compiled" if row.compiled else "eager")
        numbers = float(tps.replace(",", "")), float(loss), float(ratio)
        assert all(math.isfinite(x) and x > 0 for x in numbers), line
        if row.attn_backend is None:
            assert ratio == "1.00"


def test_baseline_reads_mka_train_ids(text_file, tmp_path):
    """The same characters, vocabulary and train/held-out cut as `mka train --tokenizer char`."""
    from mka.train import dataset
    from mka.train import distributed as D
    from mka.train.options import parse
    nb = _tool("nanogpt_baseline")
    ours = nb.load_char_data(str(text_file), 0.1)
    settings = parse(["--data", str(text_file), "--tokenizer", "char", "--holdout-fraction", "0.1",
                      "--cache-dir", str(tmp_path / "cache")])
    theirs = dataset.prepare(settings, D.Runtime(torch.device("cpu")))
    assert ours.vocab_size == theirs.vocab_size
    assert np.array_equal(ours.train, theirs.train) and np.array_equal(ours.heldout, theirs.heldout)
    assert ours.train.dtype == np.uint16


@pytest.mark.parametrize("argv, message", [
    (["--rows", "baseline,nope"], "--rows: unknown nope"),
    (["--repeats", "0"], "--repeats: must be >= 1"),
    (["--steps", "2"], "timing_warmup 2: must be >= 0 and below steps 2"),
    (["--n-head", "3"], "n_embd 32 must be divisible by n_head 3"),
])
def test_bad_settings_are_one_line(argv, message, text_file, capsys):
    tvb = _tool("train_vs_baseline")
    with pytest.raises(SystemExit) as e:
        tvb.main(["--data", str(text_file), *TINY, *argv])
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_baseline_evaluates_every_interval(text_file, tmp_path, monkeypatch, one_thread):
    """--eval-interval: a held-out loss every N steps and at the end; the best of them and
    its step; the JSON holds the curve; a negative interval is a one-line error."""
    import json
    monkeypatch.setenv("MKA_CACHE", str(tmp_path / "cache"))
    nb = _tool("nanogpt_baseline")
    out = tmp_path / "baseline.json"
    nb.main(["--data", str(text_file), *TINY, "--eval-interval", "2", "--json", str(out)])
    got = json.loads(out.read_text())
    curve = got["heldout_curve"]
    assert [step for step, _ in curve] == [2, 4, 6]
    assert all(math.isfinite(loss) for _, loss in curve)
    assert got["heldout_loss"] == curve[-1][1]
    assert (got["best_step"], got["best_heldout_loss"]) == tuple(min(curve, key=lambda c: c[1]))
    assert got["recipe"]["eval_interval"] == 2
    with pytest.raises(SystemExit):
        nb.main(["--data", str(text_file), *TINY, "--eval-interval", "-1"])
