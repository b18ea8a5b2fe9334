"""mka train --task: metrics on answer positions only, the samplers' streams, an end-to-end
run with accuracy per length, and mka eval recall on its checkpoint."""

import json
import math

import numpy as np
import torch

from mka.cli import main as mka_main
from mka.train import main
from mka.train.distributed import Runtime
from mka.train.options import parse
from mka.train.recall_metrics import answer_counts, heldout_recall, summarize
from mka.train.recall_tasks import HELDOUT, MQAR, TRAIN
from mka.train.task_data import TaskData

from .train_cases import TINY, results

CPU = torch.device("cpu")


def test_accuracy_and_loss_count_answer_positions_only():
    """Two examples: answers at (0, 1), (0, 3), (1, 0); predicted 3, 4 (wrong), 2."""
    targets = torch.tensor([[-1, 3, -1, 5], [2, -1, -1, -1]])
    logits = torch.zeros(2, 4, 6)
    logits[0, 1, 3] = logits[0, 3, 4] = logits[1, 0, 2] = 2.0
    logits[0, 0, 1] = logits[1, 2, 5] = 50.0  # confident elsewhere: must not count
    counts = answer_counts(logits, targets)
    z = math.log(math.exp(2) + 5)
    assert math.isclose(counts[0], (z - 2) + z + (z - 2), rel_tol=1e-6)
    assert counts[1:] == [3, 2, 2, 1]
    s = summarize(counts)
    assert math.isclose(s["token_accuracy"], 2 / 3) and s["example_accuracy"] == 0.5
    assert s["tokens"] == 3 and s["examples"] == 2 and math.isclose(s["loss"], counts[0] / 3)


class LookupModel(torch.nn.Module):
    """Predicts the token that followed the last earlier occurrence of the current token,
    seen within ``window`` positions (key j visible from i iff i - window < j): recall by
    exact lookup, as an induction head would do it."""

    def __init__(self, vocab_size: int, window: int | None = None):
        super().__init__()
        self.vocab_size, self.window = vocab_size, window

    def forward(self, idx, targets=None):
        logits = torch.zeros(*idx.shape, self.vocab_size)
        for b, row in enumerate(idx.numpy()):
            for i in range(len(row)):
                lo = 0 if self.window is None else max(0, i - self.window + 1)
                seen = np.flatnonzero(row[lo:i] == row[i])
                if len(seen):
                    logits[b, i, row[lo + seen[-1] + 1]] = 1.0
        return logits, None


def test_the_task_is_solvable_by_lookup_and_not_within_a_window():
    """Full lookup answers every query at every length; lookup within 16 tokens answers all of
    them at length 16 and none at 64 or 256 (the pairs lie beyond the window): the ceiling
    and the floor that the trained models sit between."""
    task = MQAR(64, 4, 4, "random")
    sets = {n: [task.example(0, HELDOUT, n, i) for i in range(6)] for n in (16, 64, 256)}
    full = heldout_recall(LookupModel(64), sets, 4, Runtime(CPU), "fp32")
    window = heldout_recall(LookupModel(64, window=16), sets, 4, Runtime(CPU), "fp32")
    for n in ("16", "64", "256"):
        assert full["by_length"][n]["token_accuracy"] == full["by_length"][n]["example_accuracy"] == 1.0
        assert full["by_length"][n]["examples"] == 6 and full["by_length"][n]["tokens"] == 24
    assert window["by_length"]["16"]["example_accuracy"] == 1.0
    assert window["by_length"]["64"]["token_accuracy"] == window["by_length"]["256"]["token_accuracy"] == 0.0


def _settings(tmp_path, *extra):
    return parse(["--task", "mqar", "--task-vocab", "64", "--num-kv-pairs", "4", "--seq-len", "64",
                  "--task-lengths", "24,48", "--max-steps", "4", "--out", str(tmp_path), *map(str, extra)])


def test_training_reads_the_training_stream_and_evaluation_the_heldout_one(tmp_path):
    s = _settings(tmp_path, "--batch-size", 2, "--grad-accum", 2, "--eval-examples", 5, "--eval-tokens", 100)
    data = TaskData(s)
    sampler = data.train_sampler(s, world=1)
    for step, n in ((0, 24), (1, 48), (2, 24)):
        rows = [r for m in range(2) for r in sampler.micro_batch(step, m, 0, CPU).x.numpy()]
        assert np.array_equal(rows, [data.task.example(s.seed, TRAIN, n, step * 4 + i).tokens[:-1] for i in range(4)])
    assert sampler.tokens_through(3) == 4 * (24 + 48 + 24) == sum(sampler.step_tokens(i) for i in range(3))
    two_ranks = [data.train_sampler(s, world=2).micro_batch(1, 0, r, CPU).x for r in (0, 1)]
    assert not torch.equal(*two_ranks)  # ranks read different examples
    final, periodic = data.heldout_set(s, periodic=False), data.heldout_set(s, periodic=True)
    assert {n: len(e) for n, e in final.items()} == {24: 5, 48: 5} and {n: len(e) for n, e in periodic.items()} == \
        {24: 4, 48: 2}  # --eval-tokens 100 // length
    for n, examples in final.items():
        assert all(np.array_equal(e.tokens, data.task.example(s.seed, HELDOUT, n, i).tokens)
                   for i, e in enumerate(examples))


def test_train_on_mqar_reports_accuracy_per_length_and_eval_recall_reproduces_it(tmp_path, capsys):
    out = tmp_path / "out"
    argv = [*TINY, "--task", "mqar", "--task-vocab", "64", "--num-kv-pairs", "4", "--num-queries", "2",
            "--seq-len", "64", "--task-lengths", "24,48", "--eval-lengths", "24,48,64", "--eval-examples", "8",
            "--max-steps", "3", "--out", str(out), "--plots"]
    assert main(argv) == 0
    (r,) = results(out)
    assert r["complete"] and r["tokens_trained"] == 4 * (24 + 48 + 24)
    assert r["heldout_tokens"] == 3 * 8 * 2 and r["heldout_examples"] == 3 * 8  # answers only
    assert 0 <= r["heldout_example_accuracy"] <= r["heldout_token_accuracy"] <= 1
    assert sorted(r["accuracy_by_length"], key=int) == ["24", "48", "64"]
    assert math.isfinite(r["heldout_loss"]) and r["heldout_loss"] < 2 * math.log(64)
    printed = capsys.readouterr().out
    assert "answer acc" in printed and "L=64" in printed
    saved = json.loads((out / "accuracy_vs_length.json").read_text())["accuracy_by_length"]
    assert saved == {"mha": r["accuracy_by_length"]}
    assert (out / "accuracy_vs_length.png").stat().st_size > 1000
    assert "answer acc" in (out / "results.md").read_text()

    ev = tmp_path / "eval"
    assert mka_main(["eval", "recall", f"tiny={out / 'mha'}", "--lengths", "24,64", "--examples", "8",
                     "--out", str(ev), "--no-plots"]) == 0
    curve = json.loads((ev / "accuracy_vs_length.json").read_text())["accuracy_by_length"]["tiny"]
    for n in ("24", "64"):  # the same held-out examples and weights as the run's final evaluation
        assert math.isclose(curve[n]["loss"], r["accuracy_by_length"][n]["loss"], rel_tol=1e-5)
        assert curve[n]["token_accuracy"] == r["accuracy_by_length"][n]["token_accuracy"]
    assert mka_main(["eval", "recall", str(out / "mha"), "--lengths", "128", "--out", str(ev)]) == 2
    assert "--lengths: 128 exceeds the block size 64" in capsys.readouterr().err


def test_a_rope_and_key_shift_run_is_evaluated_as_trained(tmp_path):
    """The checkpoint's settings carry --rope and --key-shift: mka eval recall rebuilds the
    same model (no position table, the shift's weights) and reproduces the final evaluation."""
    out = tmp_path / "out"
    argv = [*TINY, "--task", "mqar", "--task-vocab", "64", "--num-kv-pairs", "4", "--seq-len", "48",
            "--task-lengths", "48", "--eval-examples", "8", "--max-steps", "2", "--rope", "100",
            "--key-shift", "--out", str(out), "--no-plots"]
    assert main(argv) == 0
    (r,) = results(out)
    ev = tmp_path / "eval"
    assert mka_main(["eval", "recall", f"tiny={out / 'mha'}", "--lengths", "48", "--examples", "8",
                     "--out", str(ev), "--no-plots"]) == 0
    curve = json.loads((ev / "accuracy_vs_length.json").read_text())["accuracy_by_length"]["tiny"]
    assert math.isclose(curve["48"]["loss"], r["accuracy_by_length"]["48"]["loss"], rel_tol=1e-5)


def test_train_on_passkey(tmp_path):
    out = tmp_path / "out"
    argv = [*TINY, "--task", "passkey", "--passkey-digits", "3", "--task-filler", "repeat", "--seq-len", "40",
            "--task-lengths", "20,40", "--eval-examples", "4", "--max-steps", "2", "--out", str(out)]
    assert main(argv) == 0
    (r,) = results(out)
    assert r["heldout_tokens"] == 2 * 4 * 3 and set(r["accuracy_by_length"]) == {"20", "40"}
