"""DeepSpeed ZeRO through --deepspeed: runs only where the optional package is installed
(the message when it is missing is checked in test_options.py)."""

import json

import pytest

from mka.train import main

from .train_cases import results

pytest.importorskip("deepspeed", reason="optional: pip install deepspeed")


def test_zero1_trains_and_resumes_exactly(corpus_file, run_args, tmp_path):
    cfg = tmp_path / "zero1.json"
    cfg.write_text(json.dumps({"zero_optimization": {"stage": 1}}))
    flags = ("--attention", "gqa", "--max-steps", 6, "--dropout", 0.1, "--eval-interval", 3,
             "--eval-tokens", 256, "--deepspeed", cfg)
    assert main(run_args(corpus_file, *flags, out="straight")) == 0
    assert main(run_args(corpus_file, *flags, "--stop-after-steps", 3, out="pieces")) == 130
    assert main(run_args(corpus_file, *flags, "--resume", out="pieces")) == 0
    (a,), (b,) = results(tmp_path / "straight"), results(tmp_path / "pieces")
    assert a["curves"] == b["curves"] and a["heldout_loss"] == b["heldout_loss"]
    losses = [p[1] for p in a["curves"]["train"]]
    assert losses[-1] < losses[0]


def test_config_contradicting_flags_is_refused(corpus_file, run_args, tmp_path, capsys):
    cfg = tmp_path / "ds.json"
    cfg.write_text(json.dumps({"train_micro_batch_size_per_gpu": 16}))
    assert main(run_args(corpus_file, "--max-steps", 2, "--deepspeed", cfg)) == 2
    assert "train_micro_batch_size_per_gpu is 16 but the flags give 4" in capsys.readouterr().err
