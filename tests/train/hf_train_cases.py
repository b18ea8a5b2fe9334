"""Tiny random transformers decoders for the `mka train --hf-*` tests, built offline: as an
inline config, or saved with weights (and a tokenizer trained on the corpus) to a folder."""

import json
from pathlib import Path

import torch

# The GPT flags of train_cases.TINY that an HF run accepts (its shape comes from its config).
HF_TINY = ["--seq-len", "32", "--batch-size", "4", "--warmup-steps", "2", "--lr", "3e-3", "--log-interval", "1",
           "--no-plots"]


def config(model_type: str = "llama", **overrides) -> dict:
    """Two layers, 4 query heads, 2 key/value heads; a vocabulary that byte ids fit."""
    return {"model_type": model_type, "vocab_size": 256, "hidden_size": 64, "intermediate_size": 96,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "max_position_embeddings": 64, **overrides}


def hf_args(tmp_path: Path, data: Path, *extra, out: str = "out") -> list[str]:
    return ["--data", str(data), "--out", str(tmp_path / out), "--cache-dir", str(tmp_path / "cache"),
            *HF_TINY, *map(str, extra)]


def saved_model(folder: Path, corpus: Path, model_type: str = "qwen2") -> Path:
    """save_pretrained of a random model with a byte-level BPE tokenizer trained on ``corpus``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([corpus.read_text()], trainers.BpeTrainer(
        vocab_size=300, show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    PreTrainedTokenizerFast(tokenizer_object=tok).save_pretrained(str(folder))
    cfg = config(model_type, vocab_size=320)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(AutoConfig.for_model(cfg.pop("model_type"), **cfg)).save_pretrained(str(folder))
    return folder


def inline(cfg: dict) -> str:
    return json.dumps(cfg)
