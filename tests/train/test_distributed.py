"""torchrun with 2 gloo processes trains the same model as one process on the same global batch."""

import math
import os
import subprocess
import sys

import pytest
import torch

from mka.train import main

from .train_cases import results

FLAGS = ("--max-steps", 8, "--eval-tokens", 256, "--eval-interval", 4, "--attention", "gqa")


CPU_FSDP = pytest.mark.skipif(torch.torch_version.TorchVersion(torch.__version__) < (2, 7),
                              reason="FSDP2 on CPU needs torch 2.7")


@pytest.mark.parametrize("sharding", ["ddp", pytest.param("fsdp", marks=CPU_FSDP)])
def test_two_gloo_processes_match_one(corpus_file, run_args, tmp_path, sharding):
    # one process, batch 8 == two processes, batch 4 each (the global batch is the same 8 blocks)
    single = [*run_args(corpus_file, *FLAGS, out="single")]
    single[single.index("--batch-size") + 1] = "8"
    assert main(single) == 0
    argv = run_args(corpus_file, *FLAGS, *(["--fsdp"] if sharding == "fsdp" else []), out="ranks")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "mka.train", *argv], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (one,), (two,) = results(tmp_path / "single"), results(tmp_path / "ranks")
    assert two["global_batch_blocks"] == one["global_batch_blocks"] == 8
    a, b = one["curves"]["train"], two["curves"]["train"]
    assert [p[0] for p in a] == [p[0] for p in b]
    for (_, la, _), (_, lb, _) in zip(a, b):   # float32 sums in another order: equal to ~1e-6
        assert math.isclose(la, lb, rel_tol=2e-5), (la, lb)
    assert math.isclose(one["heldout_loss"], two["heldout_loss"], rel_tol=2e-5)
    assert two["heldout_tokens"] == one["heldout_tokens"]
