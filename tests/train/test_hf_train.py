"""mka train --hf-config / --hf-model: a converted FastMKA decoder fine-tunes (held-out loss
falls), reports its metrics, exports a folder that load_converted reads back with the
trained weights, and resumes exactly."""

import math

import pytest
import torch

pytest.importorskip("transformers")

from mka.integrations import hf  # noqa: E402
from mka.train import main  # noqa: E402
from mka.train import distributed as D  # noqa: E402
from mka.train.checkpoint import checkpoint_files, read  # noqa: E402
from mka.train.hf_model import CausalLMForTraining  # noqa: E402

from .hf_train_cases import config, hf_args, inline, saved_model  # noqa: E402
from .train_cases import results  # noqa: E402


def _kv_bytes(cfg: dict) -> int:
    """Keys and values of every layer in float32, from the config alone."""
    head_dim = cfg["hidden_size"] // cfg["num_attention_heads"]
    return cfg["num_hidden_layers"] * 2 * cfg["num_key_value_heads"] * head_dim * 4


def test_converted_fastmka_finetunes_and_exports(corpus_file, tmp_path):
    cfg = config()
    # init gap 2: the routers start away from lam = (1, 0), so they learn within 20 steps
    argv = hf_args(tmp_path, corpus_file, "--hf-config", inline(cfg), "--hf-convert", "fastmka", "--hf-init-gap", 2,
                   "--max-steps", 20, "--eval-interval", 10, "--timing-warmup-steps", 2)
    assert main(argv) == 0
    (r,) = results(tmp_path / "out")
    assert r["variant"] == "hf-fastmka" and r["complete"]
    evals = r["curves"]["evals"]
    assert [e[0] for e in evals] == [0, 10, 20]
    assert evals[-1][1] < evals[0][1]  # the held-out loss fell over the 20 steps
    assert r["heldout_loss"] == evals[-1][1] and math.isfinite(r["heldout_ppl"])
    assert r["n_kv_head"] == 2 and r["attn_options"] == {"beta": 0.9, "router_hidden": 64}
    assert r["kv_cache_bytes_per_token"] == _kv_bytes(cfg)
    assert r["tokens_per_s"] > 0 and r["peak_memory_bytes"] > 0 and r["params"] > 0

    # the export holds the last checkpoint's weights, routers included
    export = tmp_path / "out" / "hf-fastmka" / "hf"
    assert r["hf_export"] == str(export)
    loaded = hf.load_converted(str(export)).eval()
    trained = CausalLMForTraining(hf.load_converted(str(export)))
    trained.load_state_dict(read(checkpoint_files(tmp_path / "out" / "hf-fastmka")[0][1])["model"])
    ids = torch.randint(0, cfg["vocab_size"], (2, 32))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, trained.eval()(ids)[0])
    assert any(n.endswith("mka_router.out.bias") and p[0] != 2 for n, p in loaded.named_parameters())

    # fine-tuning the exported folder goes on from there: its held-out loss at step 0 is the run's last
    again = hf_args(tmp_path, corpus_file, "--hf-model", export, "--max-steps", 1, "--eval-interval", 1, out="again")
    assert main(again) == 0
    (r2,) = results(tmp_path / "again")
    assert r2["variant"] == "hf-fastmka"
    assert math.isclose(r2["curves"]["evals"][0][1], r["heldout_loss"], rel_tol=1e-6)


def test_resume_equals_uninterrupted_run(corpus_file, tmp_path):
    folder = saved_model(tmp_path / "qwen2", corpus_file)
    flags = ("--hf-model", folder, "--hf-convert", "none,fastmka", "--max-steps", 6, "--eval-interval", 3,
             "--eval-tokens", 256)
    assert main(hf_args(tmp_path, corpus_file, *flags, out="straight")) == 0
    assert main(hf_args(tmp_path, corpus_file, *flags, "--stop-after-steps", 4, out="pieces")) == 130
    assert main(hf_args(tmp_path, corpus_file, *flags, "--resume", out="pieces")) == 0
    straight, pieces = results(tmp_path / "straight"), results(tmp_path / "pieces")
    assert [r["variant"] for r in straight] == ["hf-none", "hf-fastmka"]
    for a, b in zip(straight, pieces, strict=True):
        assert a["variant"] == b["variant"]
        assert a["curves"]["train"] == b["curves"]["train"]      # bit-identical losses and lrs
        assert a["curves"]["evals"] == b["curves"]["evals"]
        assert a["heldout_loss"] == b["heldout_loss"]
    # the folder's tokenizer tokenized the data and travels with the export
    assert (tmp_path / "pieces" / "hf-none" / "hf" / "tokenizer.json").is_file()


@pytest.mark.parametrize("conversion", ["none", "fastmka", "mka-recall"])
def test_bf16_autocast_trains(corpus_file, tmp_path, conversion):
    # under autocast q and k leave RoPE in float32 while v is bf16: the attention casts them as sdpa does
    argv = hf_args(tmp_path, corpus_file, "--hf-config", inline(config()), "--hf-convert", conversion,
                   "--precision", "bf16", "--max-steps", 2)
    assert main(argv) == 0
    (r,) = results(tmp_path / "out")
    assert math.isfinite(r["heldout_loss"]) and r["kv_cache_dtype"] == "bfloat16"


def test_fsdp_shards_each_decoder_layer():
    from transformers import AutoConfig, AutoModelForCausalLM
    cfg = config()
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(cfg.pop("model_type"), **cfg))
    assert D._blocks(CausalLMForTraining(model)) == list(model.model.layers)
