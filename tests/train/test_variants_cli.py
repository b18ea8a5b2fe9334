"""Every attention variant trains end to end through the command line."""

import csv
import math
import subprocess
import sys

from mka.train import main
from mka.train.options import VARIANTS

from .train_cases import results


def test_all_variants_train_and_report(corpus_file, run_args, tmp_path):
    argv = run_args(corpus_file, "--attention", "all", "--max-steps", 12, "--eval-interval", 6,
                    "--eval-tokens", 256, "--plots")
    assert main(argv) == 0
    out = tmp_path / "out"
    res = results(out)
    assert [r["variant"] for r in res] == list(VARIANTS)
    heldout_targets = len(corpus_file.read_bytes()) - int(len(corpus_file.read_text()) * 0.9) - 1
    for r in res:
        losses = [p[1] for p in r["curves"]["train"]]
        assert len(losses) == 12 and all(math.isfinite(x) for x in losses)
        assert losses[0] > math.log(256) - 0.5          # starts near uniform over 256 bytes
        assert sum(losses[-3:]) / 3 < losses[0] - 1.0    # and learns
        assert r["heldout_loss"] < math.log(256) and math.isfinite(r["heldout_ppl"])
        assert r["heldout_tokens"] == heldout_targets    # every held-out target, once
        assert [e[0] for e in r["curves"]["evals"]] == [0, 6, 12]
        assert r["params"] > 0 and r["kv_cache_bytes_per_token"] > 0 and r["peak_memory_bytes"] > 0
        assert r["tokens_per_s"] > 0 and r["complete"]
    kv = {r["variant"]: r["kv_cache_bytes_per_token"] for r in res}
    assert kv["mqa"] < kv["gqa"] < kv["mha"]
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert [row["variant"] for row in rows] == list(VARIANTS)
    md = (out / "results.md").read_text()
    assert all(f"| {v} |" in md for v in VARIANTS)
    assert (out / "loss_curves.png").stat().st_size > 1000
    assert (out / "throughput_memory.png").stat().st_size > 1000


def test_python_dash_m_entry_point(corpus_folder, run_args, tmp_path):
    argv = run_args(corpus_folder, "--attention", "gqa", "--num-groups", 2, "--max-steps", 3, "--eval-split", "test")
    proc = subprocess.run([sys.executable, "-m", "mka.train", *argv], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    (r,) = results(tmp_path / "out")
    assert r["n_kv_head"] == 2 and r["steps"] == 3
    assert "gqa" in proc.stdout and "held-out loss" in proc.stdout


def test_mixed_precision_on_cpu(corpus_file, run_args, tmp_path):
    """bf16 autocast, and fp16 autocast with a GradScaler, train and report their KV bytes."""
    for precision in ("bf16", "fp16"):
        argv = run_args(corpus_file, "--attention", "fastmka", "--max-steps", 4, "--precision", precision,
                        "--eval-tokens", 128, out=precision)
        assert main(argv) == 0
        (r,) = results(tmp_path / precision)
        losses = [p[1] for p in r["curves"]["train"]]
        assert all(math.isfinite(x) for x in losses) and math.isfinite(r["heldout_loss"])
        assert r["kv_cache_dtype"] == {"bf16": "bfloat16", "fp16": "float16"}[precision]


def test_a_crashing_variant_is_recorded_and_the_others_still_run(corpus_file, run_args, tmp_path, monkeypatch):
    from mka.train.loop import VariantRun
    real_build = VariantRun._build

    def build(self):
        if self.variant == "mqa":
            raise RuntimeError("kernel exploded")
        real_build(self)
    monkeypatch.setattr(VariantRun, "_build", build)
    argv = run_args(corpus_file, "--attention", "mqa,gqa", "--max-steps", 2, "--eval-tokens", 64, "--plots")
    assert main(argv) == 1
    failed, ok = results(tmp_path / "out")
    assert failed == {"variant": "mqa", "complete": False, "error": "RuntimeError: kernel exploded"}
    assert ok["variant"] == "gqa" and ok["complete"]
    assert "**mqa FAILED**: RuntimeError: kernel exploded" in (tmp_path / "out" / "results.md").read_text()
    assert (tmp_path / "out" / "loss_curves.png").is_file()


def test_library_kernels_train_like_pytorch(corpus_file, run_args, tmp_path):
    """Same seed and data: the native ops (forward and backward) give PyTorch's loss curve
    (gqa: attention with head sharing; mka, fastmka: the memory ops)."""
    curves = {}
    for backend in ("mka", "torch"):
        argv = run_args(corpus_file, "--attention", "gqa,mka,fastmka", "--max-steps", 3, "--eval-tokens", 64,
                        "--attn-backend", backend, out=backend)
        assert main(argv) == 0
        curves[backend] = {r["variant"]: r["curves"]["train"] for r in results(tmp_path / backend)}
    for variant, native in curves["mka"].items():
        for (_, a, _), (_, b, _) in zip(native, curves["torch"][variant]):
            assert math.isclose(a, b, rel_tol=1e-4), (variant, a, b)
