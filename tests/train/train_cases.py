"""Generated corpora, tiny-model flags and result reading for the `mka train` tests (CPU,
seconds per run)."""

import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

TINY = ["--n-layer", "2", "--n-embd", "64", "--n-head", "4", "--seq-len", "32", "--batch-size", "4",
        "--warmup-steps", "2", "--lr", "3e-3", "--log-interval", "1", "--no-plots"]


def generated_text(n_lines: int, seed: int) -> str:
    """Numbered lines of random words: no two blocks of 32+ characters can coincide."""
    r = random.Random(seed)
    words = ["".join(r.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(r.randint(2, 7))) for _ in range(200)]
    return "".join(f"{seed}-{i} " + " ".join(r.choice(words) for _ in range(r.randint(4, 10))) + "\n"
                   for i in range(n_lines))


def results(out: Path) -> list[dict]:
    return json.loads((out / "results.json").read_text())["results"]


def torchrun_train(argv: list[str], processes: int = 2) -> None:
    """``mka train argv`` under torchrun with gloo processes of one thread each."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                           str(processes), "-m", "mka.train", *argv], capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


def assert_same_training(one: dict, two: dict) -> None:
    """Two results of one global batch split differently: the same curve and held-out loss."""
    assert two["global_batch_blocks"] == one["global_batch_blocks"]
    a, b = one["curves"]["train"], two["curves"]["train"]
    assert [p[0] for p in a] == [p[0] for p in b]
    for (_, la, _), (_, lb, _) in zip(a, b):   # float32 sums in another order: equal to ~1e-6
        assert math.isclose(la, lb, rel_tol=2e-5), (la, lb)
    assert math.isclose(one["heldout_loss"], two["heldout_loss"], rel_tol=2e-5)
    assert two["heldout_tokens"] == one["heldout_tokens"]
