"""torchrun with 2 gloo processes trains a converted HF model as one process does on the same
global batch, with DDP and with FSDP2 (sharded per decoder layer)."""

import pytest
import torch

pytest.importorskip("transformers")

from mka.train import main  # noqa: E402

from .hf_train_cases import config, hf_args, inline  # noqa: E402
from .train_cases import assert_same_training, results, torchrun_train  # noqa: E402

FLAGS = ("--max-steps", 4, "--eval-tokens", 256, "--eval-interval", 2, "--hf-init-gap", 2)

CPU_FSDP = pytest.mark.skipif(torch.torch_version.TorchVersion(torch.__version__) < (2, 7),
                              reason="FSDP2 on CPU needs torch 2.7")


@pytest.mark.parametrize("sharding", ["ddp", pytest.param("fsdp", marks=CPU_FSDP)])
def test_two_gloo_processes_match_one(corpus_file, tmp_path, sharding):
    model = ("--hf-config", inline(config()))
    # one process, batch 8 == two processes, batch 4 each (the global batch is the same 8 blocks)
    single = hf_args(tmp_path, corpus_file, *model, *FLAGS, out="single")
    single[single.index("--batch-size") + 1] = "8"
    assert main(single) == 0
    torchrun_train(hf_args(tmp_path, corpus_file, *model, *FLAGS, *(["--fsdp"] if sharding == "fsdp" else []),
                           out="ranks"))
    (one,), (two,) = results(tmp_path / "single"), results(tmp_path / "ranks")
    assert two["variant"] == one["variant"] == "hf-fastmka"
    assert two["global_batch_blocks"] == 8
    assert_same_training(one, two)
    assert (tmp_path / "ranks" / "hf-fastmka" / "hf" / "model.safetensors").is_file()
