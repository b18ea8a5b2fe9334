"""``mka train``: train a GPT with each attention variant on the same data and budget, and
compare held-out loss, throughput and memory. ``main(argv)`` is the command line."""

from __future__ import annotations

import datetime
import gc
import json
import shlex
import subprocess
import sys
import traceback
from pathlib import Path
from typing import Optional

import torch

from . import checkpoint, dataset, report
from . import distributed as D
from .loop import Interrupted, NonFinite, StopFlag, VariantRun, check_resumable
from .options import ConfigError, Settings, parse

__all__ = ["main", "run"]


def _git_commit() -> Optional[str]:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                              text=True, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _meta(settings: Settings, rt: D.Runtime, data: dataset.TokenizedData | dataset.TaskData,
          argv: list[str]) -> dict:
    return {"command": "mka train " + shlex.join(argv),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "commit": _git_commit(), "device": rt.describe(), "processes": rt.world,
            "torch": torch.__version__, "precision": settings.precision,
            "data": data.describe(), "settings": settings.values}


def run(settings: Settings, argv: list[str]) -> list[dict]:
    """Train every requested variant in turn; returns their results (rank 0 also writes them)."""
    if settings.resume:  # before the processes start and the data is tokenized
        check_resumable(settings, Path(settings.out))
    rt = D.start(settings)
    try:
        # --out takes files (results, checkpoints) before any tokenizing or training (rank 0's
        # check: the probe makes and removes folders); each variant checks its own folder, and
        # the space for a checkpoint, once its model is built
        checkpoint.on_main(rt, lambda: checkpoint.check_writable(Path(settings.out), keep_created=False))
        if settings.deepspeed:
            D.load_deepspeed(settings.deepspeed)  # fail before tokenizing when it is missing
        data = dataset.prepare(settings, rt)
        out = Path(settings.out)
        meta = _meta(settings, rt, data, argv)
        if rt.is_main:
            print(f"data: {data.summary()}; device {meta['device']}", flush=True)
        results = []
        with StopFlag() as stop:
            for variant in settings.variants():
                job = VariantRun(settings, variant, data, rt, out)
                try:
                    results.append(job.run(stop))
                except Interrupted:
                    if rt.is_main:  # report what was done, the stopped variant marked incomplete
                        partial = json.loads(job.result_path.read_text())
                        report.write_all(out, results + [partial], meta, settings.plots)
                    raise
                except ConfigError:
                    raise
                except NonFinite as e:  # one variant of several diverged: say so, go on
                    if rt.distributed or len(settings.variants()) == 1:
                        raise
                    print(f"mka train: {e}", file=sys.stderr)
                    results.append({"variant": variant, "complete": False, "error": str(e)})
                except Exception as e:  # a crash in one variant of several: record it, go on
                    if rt.distributed or len(settings.variants()) == 1:
                        raise
                    traceback.print_exc()
                    results.append({"variant": variant, "complete": False, "error": f"{type(e).__name__}: {e}"})
                del job  # free this variant's model and optimizer before the next one's peak is taken
                gc.collect()
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
        if rt.is_main:
            notes = report.write_all(out, results, meta, settings.plots)
            print(report.text_table(results))
            print(*notes, f"results written to {out}/results.{{json,csv,md}}", sep="\n")
        return results
    finally:
        D.stop(rt)


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        settings = parse(argv)
        failed = [r["variant"] for r in run(settings, argv) if "error" in r]
    except ConfigError as e:
        print(f"mka train: error: {e}", file=sys.stderr)
        return 2
    except Interrupted as e:
        print(f"mka train: {e}", file=sys.stderr)
        return 130
    except NonFinite as e:
        print(f"mka train: error: {e}", file=sys.stderr)
        return 1
    if failed:
        print(f"mka train: error: variant(s) {', '.join(failed)} failed (see above)", file=sys.stderr)
        return 1
    return 0
