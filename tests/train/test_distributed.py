"""torchrun with 2 gloo processes trains the same model as one process on the same global batch."""

import pytest
import torch

from mka.train import main

from .train_cases import assert_same_training, results, torchrun_train

FLAGS = ("--max-steps", 8, "--eval-tokens", 256, "--eval-interval", 4, "--attention", "gqa")


CPU_FSDP = pytest.mark.skipif(torch.torch_version.TorchVersion(torch.__version__) < (2, 7),
                              reason="FSDP2 on CPU needs torch 2.7")


@pytest.mark.parametrize("sharding", ["ddp", pytest.param("fsdp", marks=CPU_FSDP)])
def test_two_gloo_processes_match_one(corpus_file, run_args, tmp_path, sharding):
    # one process, batch 8 == two processes, batch 4 each (the global batch is the same 8 blocks)
    single = [*run_args(corpus_file, *FLAGS, out="single")]
    single[single.index("--batch-size") + 1] = "8"
    assert main(single) == 0
    torchrun_train(run_args(corpus_file, *FLAGS, *(["--fsdp"] if sharding == "fsdp" else []), out="ranks"))
    (one,), (two,) = results(tmp_path / "single"), results(tmp_path / "ranks")
    assert two["global_batch_blocks"] == 8
    assert_same_training(one, two)


def test_gradient_accumulation_matches_one_batch(run_args, corpus_file, tmp_path):
    """Batch 8 == batch 4 x --grad-accum 2 in one process: the same curve (each step's loss is
    the mean of its micro-batches') and held-out loss."""
    one = [*run_args(corpus_file, *FLAGS, out="one")]
    one[one.index("--batch-size") + 1] = "8"
    assert main(one) == 0
    assert main(run_args(corpus_file, *FLAGS, "--grad-accum", 2, out="accum")) == 0
    (a,), (b,) = results(tmp_path / "one"), results(tmp_path / "accum")
    assert b["global_batch_blocks"] == 8
    assert_same_training(a, b)
