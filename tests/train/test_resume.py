"""Checkpoints resume exactly; an interruption (Ctrl-C) leaves a usable checkpoint."""

import os
import signal
import subprocess
import sys
import time

from mka.train import main
from mka.train.checkpoint import checkpoint_files, read

from .train_cases import results

FLAGS = ("--attention", "mha,mka", "--max-steps", 14, "--dropout", 0.1, "--eval-interval", 5, "--eval-tokens", 256)


def test_resume_equals_uninterrupted_run(corpus_file, run_args, tmp_path):
    assert main(run_args(corpus_file, *FLAGS, out="straight")) == 0
    # stop inside mha, then again inside mka, resuming each time
    assert main(run_args(corpus_file, *FLAGS, "--stop-after-steps", 7, out="pieces")) == 130
    assert main(run_args(corpus_file, *FLAGS, "--resume", out="pieces")) == 0
    straight, pieces = results(tmp_path / "straight"), results(tmp_path / "pieces")
    for a, b in zip(straight, pieces, strict=True):
        assert a["variant"] == b["variant"]
        assert a["curves"]["train"] == b["curves"]["train"]      # bit-identical losses and lrs
        assert a["curves"]["evals"] == b["curves"]["evals"]
        assert a["heldout_loss"] == b["heldout_loss"]


def test_resume_refuses_changed_settings(corpus_file, run_args, capsys):
    assert main(run_args(corpus_file, "--max-steps", 6, "--stop-after-steps", 3)) == 130
    assert main(run_args(corpus_file, "--max-steps", 6, "--lr", 1e-3, "--resume")) == 2
    assert "lr: 0.003 -> 0.001" in capsys.readouterr().err


def test_ctrl_c_leaves_a_checkpoint_that_resumes(corpus_file, run_args, tmp_path):
    argv = run_args(corpus_file, "--max-steps", 100000, "--checkpoint-interval", 1000000)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "mka.train", *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env)
    deadline, seen = time.time() + 120, b""
    while b"it/s]" not in seen and time.time() < deadline:  # the progress bar is up: training has begun
        seen += os.read(proc.stderr.fileno(), 4096)
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    err = (seen + err).decode()
    assert proc.returncode == 130, err
    assert "continue with --resume" in err
    [(step, ckpt)] = checkpoint_files(tmp_path / "out" / "mha")
    assert 0 < step < 100000 and read(ckpt)["step"] == step
    # resuming with a budget that ends right after the saved step finishes cleanly
    assert main(run_args(corpus_file, "--max-steps", 100000, "--checkpoint-interval", 1000000,
                         "--stop-after-steps", step + 2, "--resume")) == 130
    assert read(checkpoint_files(tmp_path / "out" / "mha")[0][1])["step"] == step + 2


def test_resume_without_a_checkpoint_fails(corpus_file, run_args, tmp_path, capsys):
    assert main(run_args(corpus_file, "--max-steps", 4, "--resume", out="nothing")) == 2
    assert "holds no checkpoint or result of mha" in capsys.readouterr().err
    assert not (tmp_path / "nothing").exists()
