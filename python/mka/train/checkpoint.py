"""Checkpoints that resume exactly: model, optimizer, scheduler, grad scaler, every rank's
RNG states, the step (which fixes the data position) and the metrics so far."""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import distributed as D
from .options import ConfigError

# Settings that change the trajectory: resuming with any of them changed is refused.
TRAJECTORY_KEYS = ("attention", "num_kv_heads", "model", "n_layer", "n_head", "n_embd", "dropout", "bias",
                   "attn_options", "data", "tokenizer", "train_split", "eval_split", "holdout_fraction",
                   "seq_len", "batch_size", "grad_accum", "epochs", "max_steps", "max_tokens", "lr", "min_lr",
                   "warmup_steps", "lr_decay_steps", "weight_decay", "beta1", "beta2", "grad_clip",
                   "precision", "seed", "fsdp")


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


def _model_and_optim_state(model, optimizer, rt) -> tuple[dict, dict]:
    if rt.distributed:  # works for DDP and FSDP2 alike: full, unsharded tensors on CPU
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
        return get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return D.unwrap(model).state_dict(), optimizer.state_dict()


def save(path: Path, *, model, optimizer, scheduler, scaler, rt: D.Runtime, step: int,
         history: dict, trajectory: dict, variant: str) -> None:
    """Collective under torchrun (every rank calls it); rank 0 writes."""
    model_sd, optim_sd = _model_and_optim_state(model, optimizer, rt)
    rngs = D.gather_objects(rt, rng_state())
    if not rt.is_main:
        return
    state = {"model": model_sd, "optimizer": optim_sd, "scheduler": scheduler.state_dict(),
             "scaler": scaler.state_dict(), "rng": rngs, "step": step, "history": history,
             "trajectory": trajectory, "variant": variant, "world": rt.world}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save(state, tmp)
    os.replace(tmp, path)  # a Ctrl-C mid-write leaves the previous checkpoint intact


def _check_same_run(path: Path, state: dict, rt: D.Runtime, trajectory: dict) -> None:
    changed = [k for k in TRAJECTORY_KEYS if state["trajectory"].get(k) != trajectory.get(k)]
    if changed:
        diffs = ", ".join(f"{k}: {state['trajectory'].get(k)!r} -> {trajectory.get(k)!r}" for k in changed)
        raise ConfigError(f"--resume: {path} was made with other settings ({diffs}); "
                          "resume with the same settings or choose another --out")
    if state["world"] != rt.world:
        raise ConfigError(f"--resume: {path} was written by {state['world']} processes, now {rt.world}; "
                          "resume with the same number of processes")


def load(path: Path, *, model, optimizer, scheduler, scaler, rt: D.Runtime, trajectory: dict) -> tuple[int, dict]:
    state: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=False)
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
    return state["step"], state["history"]


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
