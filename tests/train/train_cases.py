"""Generated corpora, tiny-model flags and result reading for the `mka train` tests (CPU,
seconds per run)."""

import json
import random
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
