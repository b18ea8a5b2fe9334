"""Tiny random transformers decoders built offline from configs, and the comparisons the
integration tests share."""

from __future__ import annotations

import torch
import transformers

VOCAB = 97


def tiny(arch: str, **overrides) -> torch.nn.Module:
    """A float32 two-layer decoder with GQA (4 query heads, 2 key/value heads) in eval mode.
    ``mistral`` has a sliding window of 7 tokens, shorter than the tests' sequences."""
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  pad_token_id=0, eos_token_id=None)
    config_cls, model_cls, extra = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, {}),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, {}),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM,
                    {"sliding_window": 7}),
    }[arch]
    config = config_cls(**{**common, **extra, **overrides})
    return model_cls(config).to(torch.float32).eval()


def logits(model, attn: str, ids, **kwargs) -> torch.Tensor:
    model.set_attn_implementation(attn)
    with torch.no_grad():
        return model(ids, **kwargs).logits


def greedy(model, attn: str, ids, new_tokens: int, **kwargs):
    """Greedy generation with transformers' DynamicCache: (tokens, per-step logits)."""
    model.set_attn_implementation(attn)
    out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False, output_logits=True,
                         return_dict_in_generate=True, pad_token_id=0, **kwargs)
    return out.sequences, torch.stack(out.logits, dim=1)
