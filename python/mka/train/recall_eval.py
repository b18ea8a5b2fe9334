"""``mka eval recall``: held-out accuracy against sequence length of ``mka train --task``
checkpoints. Each checkpoint rebuilds its model and task from the settings it was trained
with (its trajectory) and is scored on that task's held-out stream at every ``--lengths``;
the models' curves go into one accuracy_vs_length.{json,png} under ``--out``.

The models have learned absolute positions up to their ``--seq-len`` (block size): a length
beyond it is refused, not extrapolated. Train with ``--seq-len`` at least the longest
length to be evaluated.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import Optional

import torch

from . import checkpoint, recall_report
from . import distributed as D
from .model_factory import choose_attn_backend, gpt_config, model_head_dim
from .options import BY_NAME, OPTIONS, ConfigError, Settings, parse_lengths
from .recall_metrics import heldout_recall
from .recall_tasks import HELDOUT
from .task_data import TaskData


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mka eval recall",
        description="Held-out accuracy of mka train --task checkpoints at several sequence lengths.")
    p.add_argument("models", nargs="+", metavar="[LABEL=]PATH",
                   help="a checkpoint file, or a variant's folder of them (mka train's --out/VARIANT: its "
                        "newest checkpoint); LABEL names the curve (default: the folder's name)")
    p.add_argument("--lengths", required=True, help="comma list of lengths, e.g. 64,256 or 1k,4k,16k; each at "
                   "most the model's --seq-len (its learned positions end there)")
    p.add_argument("--examples", type=int, default=256, help="held-out examples per length (default 256)")
    p.add_argument("--batch-size", type=int, default=8, help="examples per forward (default 8)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32")
    p.add_argument("--attn-backend", choices=("auto", "mka", "torch"), default="auto")
    p.add_argument("--out", required=True, help="folder for accuracy_vs_length.{json,png}")
    p.add_argument("--plots", action=argparse.BooleanOptionalAction, default=True, help="write the PNG")
    return p


def _label_and_path(spec: str) -> tuple[str, Path]:
    label, sep, path = spec.partition("=")
    p = Path(path if sep else spec).expanduser()
    return (label if sep else (p.parent.name if p.is_file() else p.name)), p


def read_checkpoint(path: Path) -> tuple[Path, dict]:
    """The verified state of a checkpoint file, or of the newest one in a folder."""
    if path.is_file():
        return path, checkpoint.read(path)
    found = checkpoint.read_newest(path) if path.is_dir() else None
    if found is None:
        raise ConfigError(f"{path}: no mka train checkpoint there (pass a checkpoint-*.pt file or the folder "
                          "--out/VARIANT of a run)")
    return found


def settings_of(state: dict, path: Path) -> Settings:
    """The training settings recorded in the checkpoint (the rest at their defaults)."""
    t = state["trajectory"]
    if not t.get("task"):
        raise ConfigError(f"{path}: trained on text data, not on a --task: nothing to score recall on")
    values = {o.name: o.default for o in OPTIONS}
    values.update({k: v for k, v in t.items() if k in BY_NAME})
    return Settings(values, set(t))


def model_of(state: dict, settings: Settings, vocab_size: int, device: torch.device, requested_backend: str):
    from mka.models import GPT
    backend, _ = choose_attn_backend(requested_backend, device, model_head_dim(settings))
    model = GPT(gpt_config(settings, settings.attention, vocab_size, backend))
    model.load_state_dict(state["model"])
    return model.to(device).eval()


def evaluate(path: Path, lengths: list[int], examples: int, batch_size: int, rt: D.Runtime, precision: str,
             backend: str) -> tuple[dict, dict]:
    """(by length metrics, what was evaluated) of one checkpoint."""
    file, state = read_checkpoint(path)
    s = settings_of(state, file)
    data = TaskData(s)
    for n in lengths:
        if n > s.seq_len:
            raise ConfigError(f"--lengths: {n} exceeds the block size {s.seq_len} of {file} (--seq-len it was "
                              "trained with; its learned positions end there)")
        if n < data.task.min_length:
            raise ConfigError(f"--lengths: {n} is shorter than one {data.task.name} example of {file} "
                              f"({data.task.min_length} tokens)")
    model = model_of(state, s, data.vocab_size, rt.device, backend)
    sets = {n: [data.task.example(s.seed, HELDOUT, n, i) for i in range(examples)] for n in lengths}
    ev = heldout_recall(model, sets, batch_size, rt, precision)
    info = {"checkpoint": str(file), "step": state["step"], "attention": s.attention,
            "attn_options": s.attn_options.get(s.attention, {}), "task": data.task.describe(),
            "trained_lengths": s.task_lengths_list(), "block_size": s.seq_len, "seed": s.seed}
    return ev["by_length"], info


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = _parser().parse_args(argv)
    try:
        lengths = parse_lengths(args.lengths, "lengths")
        for name in ("examples", "batch_size"):
            if getattr(args, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')}: must be > 0, got {getattr(args, name)}")
        if args.device == "cuda" and not torch.cuda.is_available():
            raise ConfigError("--device cuda: no CUDA device is available")
        use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
        rt = D.Runtime(torch.device("cuda" if use_cuda else "cpu"))
        specs = [_label_and_path(m) for m in args.models]
        labels = [label for label, _ in specs]
        if len(set(labels)) != len(labels):
            raise ConfigError(f"models: labels must differ, got {', '.join(labels)} (name them LABEL=PATH)")
        curves, models = {}, {}
        for label, path in specs:
            curves[label], models[label] = evaluate(path, lengths, args.examples, args.batch_size, rt,
                                                    args.precision, args.attn_backend)
    except ConfigError as e:
        print(f"mka eval recall: error: {e}", file=sys.stderr)
        return 2
    command = "mka eval recall " + shlex.join(argv)
    meta = {"command": command, "title": command, "device": rt.describe(), "examples_per_length": args.examples,
            "precision": args.precision, "models": models}
    notes = recall_report.write(Path(args.out), curves, meta, args.plots)
    print(recall_report.text_table(curves), *notes, f"written to {args.out}/accuracy_vs_length.json"
          + (" and .png" if args.plots and not notes else ""), sep="\n")
    return 0
