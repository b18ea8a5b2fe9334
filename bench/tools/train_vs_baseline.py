"""`mka train` against the nanoGPT baseline (nanogpt_baseline.py: nanoGPT's model and loop
rewritten with SDPA) on one device, eager against eager and compiled against compiled, in one
process: tokens/s, held-out loss and the ratio to the baseline of the same mode.

Every row trains the same recipe (nanoGPT's Shakespeare-char one unless flags change it) on
the same characters: `mka train --tokenizer char` ids, its train/held-out split and its final
evaluation's held-out batches. Both sides time tokens/s alike: wall time from the start of
step --timing-warmup to the end of the last step, the device synchronized at both ends,
evaluation and checkpoints outside it, the loss read on the host every --log-interval steps
inside it; tokens = timed steps x batch x block. `mka train` runs with --eval-interval 0
(no evaluation until the end) and writes its results to a temporary --out.

Rows (--rows): baseline, baseline.compile, mka (the library's attention kernels),
mka.torch (--attn-backend torch: SDPA), mka.compile, and, not by default,
mka.torch.compile. With --repeats N the rows run N rounds, every other round in reverse
order (drift of clocks and temperature falls on both sides); the table gives medians.

    python bench/tools/train_vs_baseline.py --data data/tinyshakespeare/input.txt --steps 300
"""

from __future__ import annotations

import contextlib
import functools
import gc
import importlib.util
import json
import math
import statistics
import sys
import tempfile
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch


def _load_baseline():
    """nanogpt_baseline.py beside this file (bench/tools is not a package)."""
    path = Path(__file__).resolve().with_name("nanogpt_baseline.py")
    spec = importlib.util.spec_from_file_location("nanogpt_baseline", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["nanogpt_baseline"] = module  # dataclasses look their module up while it loads
    spec.loader.exec_module(module)
    return module


nb = _load_baseline()


@dataclass(frozen=True)
class Row:
    name: str
    label: str
    compiled: bool
    attn_backend: Optional[str] = None   # None: the baseline


ROWS = {r.name: r for r in (
    Row("baseline", "nanoGPT baseline (SDPA)", False),
    Row("baseline.compile", "nanoGPT baseline (SDPA)", True),
    Row("mka", "mka train, mka kernels", False, "mka"),
    Row("mka.torch", "mka train --attn-backend torch", False, "torch"),
    Row("mka.compile", "mka train --compile, mka kernels", True, "mka"),
    Row("mka.torch.compile", "mka train --attn-backend torch --compile", True, "torch"),
)}
DEFAULT_ROWS = "baseline,baseline.compile,mka,mka.torch,mka.compile"


@contextlib.contextmanager
def compile_backend(name: str):
    """`mka train --compile` calls torch.compile(model) with the default backend (inductor);
    another --compile-backend reaches it through this patch, for both sides alike."""
    if name == "inductor":
        yield
        return
    original = torch.compile
    torch.compile = functools.partial(original, backend=name)
    try:
        yield
    finally:
        torch.compile = original


def mka_argv(r, row: Row, data: str, device: torch.device, precision: str, out: Path) -> list[str]:
    """`mka train` flags for the baseline's recipe: every setting given, none left to defaults."""
    flags = {"data": data, "tokenizer": "char", "holdout_fraction": r.holdout_fraction, "attention": "mha",
             "attn_backend": row.attn_backend, "n_layer": r.n_layer, "n_head": r.n_head, "n_embd": r.n_embd,
             "seq_len": r.block_size, "batch_size": r.batch_size, "grad_accum": 1, "dropout": r.dropout,
             "lr": r.lr, "min_lr": r.min_lr, "warmup_steps": r.warmup_steps, "lr_decay_steps": r.steps,
             "weight_decay": r.weight_decay, "beta1": r.beta1, "beta2": r.beta2, "grad_clip": r.grad_clip,
             "precision": precision, "seed": r.seed, "device": device.type, "max_steps": r.steps,
             "eval_interval": 0, "log_interval": r.log_interval, "timing_warmup_steps": r.timing_warmup,
             "out": str(out)}
    argv = [x for k, v in flags.items() for x in ("--" + k.replace("_", "-"), str(v))]
    return argv + ["--bias" if r.bias else "--no-bias", "--compile" if row.compiled else "--no-compile",
                   "--no-plots"]


def run_mka(r, row: Row, data: str, device: torch.device, precision: str, out: Path) -> dict:
    from mka.train import run
    from mka.train.options import parse
    argv = mka_argv(r, row, data, device, precision, out)
    with contextlib.redirect_stdout(sys.stderr):  # its report goes with its progress bar; ours is stdout
        [result] = run(parse(argv), argv)
    if result.get("attn_backend") != row.attn_backend:
        raise RuntimeError(f"mka train used attention kernels {result.get('attn_backend')!r}, "
                           f"not {row.attn_backend!r}")
    return {"tokens_per_s": result["tokens_per_s"], "heldout_loss": result["heldout_loss"]}


def run_row(row: Row, r, data: str, chars, out: Path) -> dict:
    device = r.resolved_device()
    precision = r.resolved_precision(device)
    try:
        with compile_backend(r.compile_backend):
            if row.attn_backend is None:
                got = nb.train(nb.Recipe(**{**vars(r), "compile": row.compiled}), chars)
                return {"tokens_per_s": got["tokens_per_s"], "heldout_loss": got["heldout_loss"]}
            return run_mka(r, row, data, device, precision, out)
    finally:  # the next row starts from a clean device and an empty compile cache
        gc.collect()
        torch._dynamo.reset()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def _median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else math.nan


def table(rows: list[Row], runs: dict[str, list[dict]]) -> list[str]:
    """Markdown: one line per row, the ratio against the baseline of the same mode."""
    def rate(name):
        return _median([x["tokens_per_s"] for x in runs.get(name, []) if "error" not in x])
    lines = ["| implementation | mode | tokens/s | held-out loss | / baseline (same mode) |",
             "|---|---|---:|---:|---:|"]
    for row in rows:
        mode = "compiled" if row.compiled else "eager"
        done = [x for x in runs[row.name] if "error" not in x]
        if not done:
            lines.append(f"| {row.label} | {mode} | error: {runs[row.name][0]['error']} | | |")
            continue
        tps = [x["tokens_per_s"] for x in done]
        spread = f" ({min(tps):,.0f}-{max(tps):,.0f})" if len(tps) > 1 else ""
        base = rate("baseline.compile" if row.compiled else "baseline")
        ratio = f"{rate(row.name) / base:.2f}" if math.isfinite(base) else "n/a"
        loss = _median([x["heldout_loss"] for x in done])
        lines.append(f"| {row.label} | {mode} | {rate(row.name):,.0f}{spread} | {loss:.4f} | {ratio} |")
    return lines


def parse_rows(text: str) -> list[Row]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in ROWS]
    if unknown or not names:
        raise ValueError(f"--rows: unknown {', '.join(unknown) or 'empty list'}; expected a comma list of "
                         f"{', '.join(ROWS)}")
    if len(set(names)) != len(names):
        raise ValueError(f"--rows: a row is listed twice in {text!r}")
    return [ROWS[n] for n in names]


def run_rounds(rows: list[Row], r, repeats: int, data: str, chars, out: Path) -> dict[str, list[dict]]:
    """Every row ``repeats`` times, every other round in reverse order; a failed run is
    recorded as its error and the others go on (not a stop that Ctrl-C or SIGTERM asked of
    `mka train`: that ends the comparison)."""
    from mka.train.loop import Interrupted
    runs: dict[str, list[dict]] = {row.name: [] for row in rows}
    for round_ in range(repeats):
        for row in (rows if round_ % 2 == 0 else rows[::-1]):
            print(f"[{round_ + 1}/{repeats}] {row.name} ...", file=sys.stderr, flush=True)
            try:
                runs[row.name].append(run_row(row, r, data, chars, out / f"{row.name}-{round_}"))
            except Interrupted:
                raise
            except Exception as e:  # one failing row must not cost the others' numbers
                traceback.print_exc()
                first_line = (str(e).splitlines() or [""])[0]
                runs[row.name].append({"error": f"{type(e).__name__}: {first_line}"})
    return runs


def main(argv: Optional[list[str]] = None) -> int:
    p = nb.command_parser(__doc__)
    p.add_argument("--rows", default=DEFAULT_ROWS, help=f"comma list of {', '.join(ROWS)} (default {DEFAULT_ROWS})")
    p.add_argument("--repeats", type=int, default=1, help="rounds over the rows (medians reported)")
    p.add_argument("--out", help="keep `mka train`'s outputs here (default: a temporary folder)")
    p.add_argument("--json", help="also write every run's numbers to this file")
    args = p.parse_args(argv)
    try:
        rows = parse_rows(args.rows)
        if args.repeats < 1:
            raise ValueError(f"--repeats: must be >= 1, got {args.repeats}")
    except ValueError as e:
        p.error(str(e))
    r = nb.recipe_from(args)
    chars = nb.checked_data(p, r, args.data)
    device = r.resolved_device()
    precision = r.resolved_precision(device)
    from mka.train.loop import Interrupted
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    with contextlib.ExitStack() as stack:
        out = Path(args.out) if args.out else Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="tvb-")))
        try:
            runs = run_rounds(rows, r, args.repeats, args.data, chars, out)
        except (KeyboardInterrupt, Interrupted):  # mka train raises Interrupted on a first Ctrl-C
            print("train_vs_baseline.py: interrupted; no table", file=sys.stderr)
            return 130
    print(f"{where}, {precision}; {r.n_layer} layers, {r.n_head} heads, {r.n_embd} wide, block {r.block_size}, "
          f"batch {r.batch_size}, dropout {r.dropout}; {r.steps} steps, tokens/s over the last "
          f"{r.steps - r.timing_warmup}; {args.repeats} round(s)\n")
    print("\n".join(table(rows, runs)))
    if args.json:
        Path(args.json).write_text(json.dumps({"device": where, "precision": precision, "recipe": vars(r),
                                               "runs": runs}, indent=1))
    return 1 if any("error" in x for xs in runs.values() for x in xs) else 0


if __name__ == "__main__":
    sys.exit(main())
