"""Checkpoints that can be trusted: a damaged, foreign or missing-in-action checkpoint is a
clear error naming the file and the last good one (exit 2, never a traceback, never training
on it); the newest --keep-checkpoints are kept; --out is checked before the first step; a
failed write (disk full, Ctrl-C, SIGKILL) leaves the previous checkpoint intact and no
temporary file behind."""

import errno
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from mka.train import checkpoint, main
from mka.train.checkpoint import checkpoint_files, read

from .train_cases import TINY, generated_text, results

RUN = ("--max-steps", 6, "--checkpoint-interval", 2)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A run stopped at step 4 (checkpoints of steps 2 and 4), the same run straight through,
    and an argv builder sharing their corpus and token cache."""
    root = tmp_path_factory.mktemp("faults")
    (root / "corpus.txt").write_text(generated_text(400, seed=1))

    def argv(out, *extra):
        return ["--data", str(root / "corpus.txt"), "--out", str(out), "--cache-dir", str(root / "cache"),
                *TINY, *map(str, (*RUN, *extra))]

    assert main(argv(root / "straight")) == 0
    assert main(argv(root / "stopped", "--stop-after-steps", 4)) == 130
    return root, argv


def _copy_stopped(base, tmp_path):
    root, _ = base
    shutil.copytree(root / "stopped", tmp_path / "out")
    folder = tmp_path / "out" / "mha"
    assert [s for s, _ in checkpoint_files(folder)] == [4, 2]
    return folder


def _names(folder):
    return sorted(p.name for p in folder.iterdir())


def _flip_middle(p):
    b = bytearray(p.read_bytes())
    mid = len(b) // 2
    b[mid:mid + 64] = bytes(x ^ 0xFF for x in b[mid:mid + 64])
    p.write_bytes(bytes(b))


def _truncate(p):
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def _empty(p):
    p.write_bytes(b"")


def _random_bytes(p):
    p.write_bytes(random.Random(0).randbytes(p.stat().st_size))


def _foreign_torch_file(p):
    p.unlink()
    torch.save({"model": {"w": torch.zeros(3)}, "step": 4}, p)


def _ours_missing_keys(p):
    p.unlink()
    checkpoint.write_file(p, {"model": {"w": torch.zeros(3)}, "step": 4})


def _directory(p):
    p.unlink()
    p.mkdir()
    (p / "inside").write_text("x")


DAMAGE = [
    (_flip_middle, "is corrupted: the SHA-256 of its contents differs"),
    (_truncate, "is truncated: its header records"),
    (_empty, "is empty (0 bytes)"),
    (_random_bytes, "is not an mka train checkpoint"),
    (_foreign_torch_file, "is a PyTorch file without the header of an mka train checkpoint"),
    (_ours_missing_keys, "lacks optimizer, scheduler, scaler, rng, history, trajectory, world"),
    (_directory, "is a directory, not a checkpoint file"),
]


@pytest.mark.parametrize("damage,what", DAMAGE, ids=[d.__name__.strip("_") for d, _ in DAMAGE])
def test_damaged_newest_checkpoint_is_a_clear_error(base, tmp_path, capsys, damage, what):
    _, argv = base
    folder = _copy_stopped(base, tmp_path)
    newest = folder / "checkpoint-00000004.pt"
    damage(newest)
    before = _names(folder)
    assert main(argv(tmp_path / "out", "--resume")) == 2
    err = capsys.readouterr().err
    assert f"mka train: error: --resume: {newest} {what}" in err, err
    assert "the previous checkpoint checkpoint-00000002.pt (step 2) verifies" in err
    assert "Traceback" not in err
    assert _names(folder) == before  # nothing trained, nothing written or removed


def test_moving_the_damaged_one_aside_resumes_exactly_from_the_previous(base, tmp_path, capsys):
    root, argv = base
    folder = _copy_stopped(base, tmp_path)
    _flip_middle(folder / "checkpoint-00000004.pt")
    assert main(argv(tmp_path / "out", "--resume")) == 2
    assert "rename it to checkpoint-00000004.pt.bad" in capsys.readouterr().err
    (folder / "checkpoint-00000004.pt").rename(folder / "checkpoint-00000004.pt.bad")
    assert main(argv(tmp_path / "out", "--resume")) == 0
    assert "resuming from" in capsys.readouterr().out
    [straight], [resumed] = results(root / "straight"), results(tmp_path / "out")
    assert resumed["curves"] == straight["curves"] and resumed["heldout_loss"] == straight["heldout_loss"]


def test_a_damaged_only_checkpoint_says_there_is_no_other(base, tmp_path, capsys):
    _, argv = base
    folder = _copy_stopped(base, tmp_path)
    (folder / "checkpoint-00000002.pt").unlink()
    _truncate(folder / "checkpoint-00000004.pt")
    assert main(argv(tmp_path / "out", "--resume")) == 2
    assert "it is the only checkpoint; to start afresh, choose another --out" in capsys.readouterr().err


def test_the_newest_n_checkpoints_are_kept(base, tmp_path):
    root, argv = base
    assert _names(root / "straight" / "mha") == ["checkpoint-00000004.pt", "checkpoint-00000006.pt",
                                                 "result.json"]  # the default, 2
    assert main(argv(tmp_path / "k1", "--keep-checkpoints", 1)) == 0
    assert _names(tmp_path / "k1" / "mha") == ["checkpoint-00000006.pt", "result.json"]
    assert read(tmp_path / "k1" / "mha" / "checkpoint-00000006.pt")["step"] == 6


def test_out_that_is_a_file_fails_before_anything_runs(base, tmp_path, capsys):
    _, argv = base
    (tmp_path / "out").write_text("not a folder")
    assert main(argv(tmp_path / "out")) == 2
    assert f"--out: {tmp_path / 'out'} exists and is not a folder" in capsys.readouterr().err


def test_read_only_out_fails_before_the_first_step(base, tmp_path, capsys):
    _, argv = base
    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(0o555)
    try:
        if os.access(out, os.W_OK):
            pytest.skip("running as root: a read-only mode does not stop writes "
                        "(the EROFS and file-size limit tests cover it)")
        assert main(argv(out)) == 2
        err = capsys.readouterr().err
        assert f"--out: {out} is not writable" in err or f"cannot create {out / 'mha'}" in err, err
        assert "mha:" not in err  # no progress bar: not one step was taken
    finally:
        out.chmod(0o755)


def test_read_only_filesystem_fails_before_the_first_step(base, tmp_path, capsys, monkeypatch):
    """Root included: the write probe meets EROFS, as on a filesystem mounted read-only."""
    _, argv = base

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))
    monkeypatch.setattr(checkpoint.tempfile, "mkstemp", read_only)
    assert main(argv(tmp_path / "out")) == 2
    err = capsys.readouterr().err
    assert f"--out: {tmp_path / 'out'} is not writable (Read-only file system)" in err, err
    assert "mha:" not in err
    assert not (tmp_path / "out").exists()  # the probe tidies the folders it made


def test_too_little_free_space_fails_before_the_first_step(base, tmp_path, capsys, monkeypatch):
    _, argv = base
    real = shutil.disk_usage
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda p: real(p)._replace(free=4096))
    assert main(argv(tmp_path / "out")) == 2
    err = capsys.readouterr().err
    assert "has 0.0 MiB free; a checkpoint of this model needs about 2.4 MiB" in err, err
    assert not checkpoint_files(tmp_path / "out" / "mha")


class _Failing:
    """A file whose writes raise ``error``: a full disk, or Ctrl-C arriving mid-write."""

    def __init__(self, f, error):
        self.f, self.error = f, error

    def write(self, b):
        raise self.error

    def flush(self):
        self.f.flush()


def _fail_writing(monkeypatch, step, error):
    """The write of checkpoint ``step`` fails after its first 4 KiB."""
    real = checkpoint._HashingWriter.write

    def write(self, b):
        if f"checkpoint-{step:08d}.pt.tmp" in getattr(self.f, "name", "") and self.n > 4096:
            self.f = _Failing(self.f, error)
        return real(self, b)
    monkeypatch.setattr(checkpoint._HashingWriter, "write", write)


def test_disk_full_mid_write_is_said_and_keeps_the_previous(base, tmp_path, capsys, monkeypatch):
    _, argv = base
    folder = _copy_stopped(base, tmp_path)
    _fail_writing(monkeypatch, 6, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
    assert main(argv(tmp_path / "out", "--resume")) == 2
    err = capsys.readouterr().err
    assert f"could not write checkpoint {folder / 'checkpoint-00000006.pt'} (No space left on device [ENOSPC]" in err
    assert f"the previous checkpoint {folder / 'checkpoint-00000004.pt'} is intact" in err
    assert "Traceback" not in err
    assert _names(folder) == ["checkpoint-00000002.pt", "checkpoint-00000004.pt", "result.json"]  # no .tmp
    assert read(folder / "checkpoint-00000004.pt")["step"] == 4


def test_ctrl_c_mid_write_removes_the_temporary_file(base, tmp_path, monkeypatch):
    _, argv = base
    folder = _copy_stopped(base, tmp_path)
    _fail_writing(monkeypatch, 6, KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        main(argv(tmp_path / "out", "--resume"))
    assert _names(folder) == ["checkpoint-00000002.pt", "checkpoint-00000004.pt", "result.json"]


def _limit_file_size(limit):
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def test_file_size_limit_as_a_full_disk_in_a_real_process(base, tmp_path):
    """RLIMIT_FSIZE binds root too: the write of checkpoint 6 fails part-way."""
    _, argv = base
    folder = _copy_stopped(base, tmp_path)
    limit = (folder / "checkpoint-00000004.pt").stat().st_size // 2
    proc = subprocess.run([sys.executable, "-m", "mka.train", *argv(tmp_path / "out", "--resume")],
                          capture_output=True, text=True, timeout=120, preexec_fn=_limit_file_size(limit))
    assert proc.returncode == 2, proc.stderr
    assert "could not write checkpoint" in proc.stderr and "[EFBIG]" in proc.stderr, proc.stderr
    assert "checkpoint-00000004.pt is intact" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert _names(folder) == ["checkpoint-00000002.pt", "checkpoint-00000004.pt", "result.json"]


# Pauses mid-write of checkpoint 4 (after its first 64 KiB) and says so, to be killed there.
PAUSING = """
import sys, time
from mka.train import checkpoint, main
real = checkpoint._HashingWriter.write
def write(self, b):
    n = real(self, b)
    if "checkpoint-00000004.pt.tmp" in self.f.name and self.n > 65536:
        self.f.flush()
        print("MID-WRITE", flush=True)
        time.sleep(120)
    return n
checkpoint._HashingWriter.write = write
sys.exit(main(sys.argv[1:]))
"""


def test_sigkill_mid_write_then_resume_is_exact(base, tmp_path):
    root, argv = base
    folder = tmp_path / "out" / "mha"
    with open(tmp_path / "stderr.txt", "wb") as err:
        proc = subprocess.Popen([sys.executable, "-c", PAUSING, *argv(tmp_path / "out")], stdout=subprocess.PIPE,
                                stderr=err, env=dict(os.environ, PYTHONUNBUFFERED="1"))
        deadline, seen = time.time() + 120, b""
        while b"MID-WRITE" not in seen and time.time() < deadline and proc.poll() is None:
            seen += proc.stdout.readline()
        proc.kill()
        proc.communicate(timeout=60)
    assert b"MID-WRITE" in seen, (tmp_path / "stderr.txt").read_text()
    [tmp] = folder.glob("checkpoint-00000004.pt.tmp*")  # the partial write a SIGKILL leaves
    assert tmp.stat().st_size > 65536
    assert [s for s, _ in checkpoint_files(folder)] == [2]
    assert main(argv(tmp_path / "out", "--resume")) == 0
    assert not list(folder.glob("*.tmp*"))
    [straight], [resumed] = results(root / "straight"), results(tmp_path / "out")
    assert resumed["curves"] == straight["curves"] and resumed["heldout_loss"] == straight["heldout_loss"]
