"""Checkpoints that resume exactly: model, optimizer, scheduler, grad scaler, every rank's
RNG states, the step (which fixes the data position) and the metrics so far.

And that can be trusted. A variant's folder holds ``checkpoint-<step, 8 digits>.pt`` files,
the newest ``--keep-checkpoints`` of them. Each file is a 48-byte header (``MAGIC``, the
SHA-256 of the payload, the payload's length) followed by the ``torch.save`` payload, so the
digest is checked before anything is unpickled. A checkpoint is written to a temporary file,
fsynced and renamed into place: a crash, a full disk or Ctrl-C never leaves a partial file
under a checkpoint's name, and the temporary file is removed on every exit path we can catch
(one a SIGKILL leaves is removed when the run starts again). Weights that are not finite are
never written.

``--resume`` reads the newest checkpoint. If it fails verification, resume stops with an
error that names it, says what is wrong and names the newest older checkpoint that verifies:
it does not fall back silently, because a damaged newest file means the storage deserves a
look and quietly losing steps is worse than being asked to move one file aside.
"""

from __future__ import annotations

import errno
import hashlib
import io
import os
import random
import re
import shutil
import struct
import tempfile
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from . import distributed as D
from .options import ConfigError

# Settings that change the trajectory: resuming with any of them changed is refused.
TRAJECTORY_KEYS = ("attention", "num_kv_heads", "model", "n_layer", "n_head", "n_embd", "dropout", "bias",
                   "rope", "key_shift", "attn_options", "data", "tokenizer", "train_split", "eval_split", "holdout_fraction",
                   "seq_len", "batch_size", "grad_accum", "epochs", "max_steps", "max_tokens", "lr", "min_lr",
                   "warmup_steps", "lr_decay_steps", "weight_decay", "beta1", "beta2", "grad_clip",
                   "precision", "seed", "fsdp", "task", "task_lengths", "task_filler", "task_vocab", "num_kv_pairs",
                   "num_queries", "passkey_digits", "passkey_depth", "hf_model", "hf_config", "hf_convert", "hf_beta",
                   "hf_init_gap")

MAGIC = b"MKACKPT1"
HEADER = struct.Struct("<8s32sQ")  # magic, SHA-256 of the payload, payload bytes
REQUIRED_KEYS = ("model", "optimizer", "scheduler", "scaler", "rng", "step", "history", "trajectory", "world")
NAME = re.compile(r"checkpoint-(\d+)\.pt")
LEGACY_NAME = "checkpoint.pt"  # one unchecked file, as written before checksums
_CHUNK = 1 << 22


class CheckpointError(ConfigError):
    """A checkpoint that cannot be trusted, or one that could not be written; the message
    names the file, says what is wrong and where the last good checkpoint is."""


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_path(folder: Path, step: int) -> Path:
    return folder / f"checkpoint-{step:08d}.pt"


def checkpoint_files(folder: Path) -> list[tuple[int, Path]]:
    """(step, path) of every entry named like a checkpoint, newest first; whether each is a
    sound file is for ``read`` to say. A legacy ``checkpoint.pt`` counts as the oldest."""
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), e) for e in folder.iterdir() if (m := NAME.fullmatch(e.name))]
    if (folder / LEGACY_NAME).exists():
        found.append((-1, folder / LEGACY_NAME))
    return sorted(found, key=lambda sp: sp[0], reverse=True)


def remove_temporaries(folder: Path) -> None:
    """Partial writes that a SIGKILL (or power loss) left behind."""
    if folder.is_dir():
        for e in folder.glob("checkpoint-*.pt.tmp*"):
            if e.is_file():
                e.unlink(missing_ok=True)


def _model_and_optim_state(model, optimizer, rt) -> tuple[dict, dict]:
    if rt.distributed:  # works for DDP and FSDP2 alike: full, unsharded tensors on CPU
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
        return get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return D.unwrap(model).state_dict(), optimizer.state_dict()


def first_nonfinite(tensors: dict) -> Optional[str]:
    """The name of the first floating-point tensor with a NaN or infinity, or None."""
    for name, t in tensors.items():
        if torch.is_tensor(t) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            return name
    return None


def on_main(rt: D.Runtime, work: Callable[[], Optional[str]]) -> None:
    """Run ``work`` on rank 0; a message it returns is raised as CheckpointError on every rank
    (so that under torchrun no rank waits on a collective that rank 0 has left)."""
    message = work() if rt.is_main else None
    failed = D.all_reduce(rt, [float(message is not None)], "max")[0] > 0
    if failed:
        raise CheckpointError(message or "rank 0 could not write or check its checkpoint folder (its message says why)")


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


def check_writable(folder: Path, need_bytes: int = 0, keep_created: bool = True) -> Optional[str]:
    """What is wrong with ``folder`` as the place of a checkpoint of about ``need_bytes``, or
    None: it must be (or become) a folder that takes a file, on a filesystem with room for
    one more checkpoint. Folders made here are removed again unless ``keep_created``."""
    missing = []
    p = folder
    while not p.exists() and p != p.parent:
        missing.append(p)
        p = p.parent
    try:
        if folder.exists() and not folder.is_dir():
            return f"--out: {folder} exists and is not a folder"
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            return f"--out: cannot create {folder} ({e.strerror or e})"
        try:
            fd, probe = tempfile.mkstemp(dir=folder, prefix=".mka-write-probe-")
            try:
                os.write(fd, b"mka")
            finally:
                os.close(fd)
                os.unlink(probe)
        except OSError as e:
            return f"--out: {folder} is not writable ({e.strerror or e})"
        free = shutil.disk_usage(folder).free
        if free < need_bytes:
            return (f"--out: {folder} has {_mib(free)} free; a checkpoint of this model needs about "
                    f"{_mib(need_bytes)}: free some space or choose another --out")
        return None
    finally:
        if not keep_created:
            for d in missing:  # deepest first
                try:
                    d.rmdir()
                except OSError:
                    pass


def estimated_bytes(model) -> int:
    """About one checkpoint of ``model`` trained with AdamW: weights and two moments."""
    return 3 * sum(p.numel() * p.element_size() for p in model.parameters()) + (1 << 20)


class _HashingWriter:
    """What ``torch.save`` writes to (it only writes, in order): hashed, counted, passed on.
    torch turns an exception raised here into an opaque RuntimeError ("unexpected pos"), a
    KeyboardInterrupt included, so the first one is kept to be raised again."""

    def __init__(self, f):
        self.f, self.sha, self.n, self.error = f, hashlib.sha256(), 0, None

    def write(self, b) -> int:
        try:
            n = self.f.write(b)
            self.sha.update(b)
            self.n += len(b)
            return n
        except BaseException as e:
            self.error = self.error or e
            raise

    def flush(self) -> None:
        self.f.flush()


def write_file(path: Path, state: dict) -> None:
    """Header + payload to a temporary file, fsynced, then renamed to ``path``. The temporary
    file is removed on any exception, KeyboardInterrupt included."""
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    writer = None
    try:
        with open(tmp, "wb") as f:
            f.write(HEADER.pack(b"\0" * 8, b"\0" * 32, 0))  # the real header once the digest is known
            writer = _HashingWriter(f)
            torch.save(state, writer)
            f.seek(0)
            f.write(HEADER.pack(MAGIC, writer.sha.digest(), writer.n))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if writer is not None and writer.error is not None and writer.error is not e:
            raise writer.error from None
        raise
    try:  # the rename itself survives a power loss once the folder is synced
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


class _Payload(io.RawIOBase):
    """The payload of an open checkpoint file, seen as a file of its own (torch.load seeks)."""

    def __init__(self, f, offset: int):
        self.f, self.offset = f, offset
        f.seek(offset)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        return self.f.readinto(b)

    def seek(self, pos: int, whence: int = 0) -> int:
        return self.f.seek(pos + self.offset if whence == 0 else pos, whence) - self.offset

    def tell(self) -> int:
        return self.f.tell() - self.offset


def _problem(path: Path) -> tuple[Optional[str], Optional[dict]]:
    """(what is wrong with ``path``, None) or (None, its state)."""
    if path.is_dir():
        return "is a directory, not a checkpoint file", None
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(HEADER.size)
            if size == 0:
                return "is empty (0 bytes)", None
            if len(head) < HEADER.size or head[:8] != MAGIC:
                if head.startswith(b"PK\x03\x04"):
                    return ("is a PyTorch file without the header of an mka train checkpoint: not written by "
                            "mka train, or written before checkpoints carried a checksum"), None
                return "is not an mka train checkpoint (its first bytes are not the mka checkpoint header)", None
            _, digest, length = HEADER.unpack(head)
            if size - HEADER.size != length:
                what = "truncated" if size - HEADER.size < length else "longer than written"
                return (f"is {what}: its header records {length:,} payload bytes, the file holds "
                        f"{size - HEADER.size:,}"), None
            sha = hashlib.sha256()
            while chunk := f.read(_CHUNK):
                sha.update(chunk)
            if sha.digest() != digest:
                return ("is corrupted: the SHA-256 of its contents differs from the one recorded when it was "
                        "written"), None
            try:
                state = torch.load(_Payload(f, HEADER.size), map_location="cpu", weights_only=False)
            except Exception as e:  # noqa: BLE001 - a payload that verifies but does not load
                return f"could not be unpickled ({type(e).__name__}: {e})", None
    except OSError as e:
        return f"cannot be read ({e.strerror or e})", None
    if not isinstance(state, dict):
        return f"holds a {type(state).__name__}, not the state of an mka train run", None
    missing = [k for k in REQUIRED_KEYS if k not in state]
    if missing:
        return f"lacks {', '.join(missing)}: not the state of an mka train run", None
    bad = first_nonfinite(state["model"])
    if bad is not None:
        return f"holds non-finite weights ({bad})", None
    return None, state


def read(path: Path) -> dict:
    """The verified state in ``path``; CheckpointError naming the file and what is wrong."""
    problem, state = _problem(path)
    if problem is not None:
        raise CheckpointError(f"{path} {problem}")
    return state


def _step_of(path: Path) -> str:
    m = NAME.fullmatch(path.name)
    return f"step {int(m.group(1))}" if m else "step unknown"


def read_newest(folder: Path) -> Optional[tuple[Path, dict]]:
    """The newest checkpoint in ``folder`` and its state, or None when there is none. A newest
    checkpoint that fails verification is an error naming the newest older one that verifies."""
    files = checkpoint_files(folder)
    if not files:
        return None
    newest = files[0][1]
    problem, state = _problem(newest)
    if problem is None:
        return newest, state
    good = next((p for _, p in files[1:] if _problem(p)[0] is None), None)
    if good is not None:
        hint = (f"the previous checkpoint {good.name} ({_step_of(good)}) verifies: move {newest.name} out of "
                f"the folder (or rename it to {newest.name}.bad) and --resume again to continue from it")
    else:
        hint = ("no older checkpoint in the folder verifies" if len(files) > 1 else "it is the only checkpoint") + \
               "; to start afresh, choose another --out"
    raise CheckpointError(f"--resume: {newest} {problem}; {hint}")


def save(folder: Path, *, keep: int, model, optimizer, scheduler, scaler, rt: D.Runtime, step: int,
         history: dict, trajectory: dict, variant: str) -> Path:
    """Collective under torchrun (every rank calls it); rank 0 writes ``checkpoint-<step>.pt``
    and then removes all but the newest ``keep``. A failure is a CheckpointError on every
    rank; the checkpoints already there stay as they were."""
    model_sd, optim_sd = _model_and_optim_state(model, optimizer, rt)
    rngs = D.gather_objects(rt, rng_state())
    path = checkpoint_path(folder, step)

    def work() -> Optional[str]:
        bad = first_nonfinite(model_sd)
        if bad is not None:
            return f"refusing to write {path}: weight {bad} is not finite"
        state = {"model": model_sd, "optimizer": optim_sd, "scheduler": scheduler.state_dict(),
                 "scaler": scaler.state_dict(), "rng": rngs, "step": step, "history": history,
                 "trajectory": trajectory, "variant": variant, "world": rt.world}
        try:
            folder.mkdir(parents=True, exist_ok=True)
            write_file(path, state)
        except Exception as e:  # noqa: BLE001 - disk full, read-only, quota, ...: said, not a traceback
            return _write_failure(folder, path, e)
        _prune(folder, path, keep)
        return None

    on_main(rt, work)
    return path


def _write_failure(folder: Path, path: Path, e: Exception) -> str:
    reason = f"{e.strerror} [{errno.errorcode.get(e.errno, e.errno)}]" if isinstance(e, OSError) and e.strerror \
        else f"{type(e).__name__}: {e}"
    try:
        space = f"; {_mib(shutil.disk_usage(folder).free)} free there"
    except OSError:
        space = ""
    prev = next((p for _, p in checkpoint_files(folder) if p != path and p.is_file()), None)
    kept = f"the previous checkpoint {prev} is intact" if prev else "no earlier checkpoint exists"
    return (f"could not write checkpoint {path} ({reason}{space}); {kept}; "
            "make room (or choose a writable --out) and continue with --resume")


def _prune(folder: Path, written: Path, keep: int) -> None:
    """Keep ``written`` and the newest ``keep - 1`` other checkpoint files; never a folder."""
    others = [p for s, p in checkpoint_files(folder) if s >= 0 and p != written and p.is_file()]
    for p in others[keep - 1:]:
        p.unlink(missing_ok=True)


def _check_same_run(path: Path, state: dict, rt: D.Runtime, trajectory: dict) -> None:
    changed = [k for k in TRAJECTORY_KEYS if state["trajectory"].get(k) != trajectory.get(k)]
    if changed:
        diffs = ", ".join(f"{k}: {state['trajectory'].get(k)!r} -> {trajectory.get(k)!r}" for k in changed)
        raise ConfigError(f"--resume: {path} was made with other settings ({diffs}); "
                          "resume with the same settings or choose another --out")
    if state["world"] != rt.world:
        raise ConfigError(f"--resume: {path} was written by {state['world']} processes, now {rt.world}; "
                          "resume with the same number of processes")


def load(folder: Path, *, model, optimizer, scheduler, scaler, rt: D.Runtime,
         trajectory: dict) -> Optional[tuple[Path, int, dict]]:
    """Restore the newest checkpoint in ``folder``: (its path, step, history), or None when
    there is none. Every rank reads the file (as written by rank 0)."""
    found = read_newest(folder)
    if found is None:
        return None
    path, state = found
    _check_same_run(path, state, rt, trajectory)
    if rt.distributed:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                       options=StateDictOptions(full_state_dict=True))
    else:
        D.unwrap(model).load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    scaler.load_state_dict(state["scaler"])
    set_rng_state(state["rng"][rt.rank])
    return path, state["step"], state["history"]


def save_deepspeed(path: Path, *, engine, rt: D.Runtime, step: int, history: dict, trajectory: dict,
                   variant: str) -> None:
    """DeepSpeed writes its own (sharded) model and optimizer states; ours ride along."""
    client = {"rng": D.gather_objects(rt, rng_state()), "step": step, "history": history,
              "trajectory": trajectory, "variant": variant, "world": rt.world}
    engine.save_checkpoint(str(path), tag="state", client_state=client)


def load_deepspeed(path: Path, *, engine, rt: D.Runtime, trajectory: dict) -> tuple[int, dict]:
    _, client = engine.load_checkpoint(str(path), tag="state")
    _check_same_run(path, client, rt, trajectory)
    set_rng_state(client["rng"][rt.rank])
    return client["step"], client["history"]
