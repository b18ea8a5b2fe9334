"""GPTConfig validates itself; GPT at GPT-2-small size has GPT-2's parameter count and the
KV-cache bytes each variant's design implies."""

import pytest
import torch

from mka.models import GPT, GPTConfig

SMALL = dict(n_layer=12, n_embd=768, n_head=12, block_size=1024, vocab_size=50257)


@pytest.mark.parametrize("fields,match", [
    (dict(n_head=5), "n_head: must divide n_embd = 768, got 5"),
    (dict(attention="gqa", n_kv_head=5), "n_kv_head: must divide n_head = 12, got 5"),
    (dict(attention="mha", n_kv_head=4), "n_kv_head: MHA"),
    (dict(attention="linear"), "attention: unknown variant 'linear'"),
    (dict(attn_backend="cuda"), "attn_backend: expected one of"),
    (dict(attention="mka", attn_options={"betta": 0.9}), r"attn_options: \['betta'\]"),
    (dict(attention="mla", attn_options={"path": "both"}), "path: expected one of"),
    (dict(n_layer=0), "n_layer: must be a positive integer"),
    (dict(vocab_size=2.5), "vocab_size: must be a positive integer"),
    (dict(dropout=1.0), r"dropout: must be in \[0, 1\)"),
    (dict(attn_options=[("beta", 0.9)]), "attn_options: expected a dict"),
])
def test_invalid_configs_raise_value_error(fields, match):
    with pytest.raises(ValueError, match=match):
        GPTConfig(**{**SMALL, **fields})


def test_gpt2_small_parameter_count():
    """The "mha" model is GPT-2 small: 124,439,808 parameters with its 50257-token vocab."""
    with torch.device("meta"):
        m = GPT(GPTConfig(**SMALL))
    assert m.num_params(non_embedding=False) == 124_439_808
    assert m.num_params() == 124_439_808 - 1024 * 768


@pytest.mark.parametrize("attention,n_kv_head,options,per_layer", [
    ("mha", None, {}, 2 * 768),
    ("mqa", None, {}, 2 * 64),
    ("gqa", 4, {}, 2 * 4 * 64),
    ("mla", None, {"path": "naive"}, 12 * (64 + 32 + 64)),
    ("mla", None, {}, 96 + 32),                           # absorb: latent + shared RoPE key
    ("mka", None, {}, 2 * 768),                           # raw k, v: level 2 is recomputed
    ("fastmka", 4, {}, 2 * 4 * 64),                       # fused k, v
])
def test_kv_cache_bytes_per_token_at_gpt2_small(attention, n_kv_head, options, per_layer):
    with torch.device("meta"):
        m = GPT(GPTConfig(**SMALL, attention=attention, n_kv_head=n_kv_head,
                          attn_options=options))
    assert m.kv_cache_bytes_per_token(torch.bfloat16) == 12 * 2 * per_layer
    assert m.kv_cache_bytes_per_token(torch.float32) == 12 * 4 * per_layer
