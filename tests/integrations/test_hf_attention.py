"""attn_implementation="mka" against transformers' sdpa on tiny random decoders: prefill,
cached decode, greedy generation, the sliding window, padding, and the options it refuses."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from conftest import assert_close  # noqa: E402
from hf_cases import greedy, logits, tiny  # noqa: E402
from transformers import AttentionInterface  # noqa: E402
from transformers.masking_utils import (AttentionMaskInterface, sdpa_mask,  # noqa: E402
                                        sliding_window_causal_mask_function)

from mka.integrations import hf  # noqa: E402
from mka.integrations.hf.masks import MaskSpec, spec_mask  # noqa: E402

ARCHS = ["llama", "qwen2", "mistral"]


@pytest.mark.parametrize("arch", ARCHS)
def test_prefill_logits_match_sdpa(arch):
    model = tiny(arch)
    ids = torch.randint(1, 97, (2, 24))
    assert_close(logits(model, "mka", ids), logits(model, "sdpa", ids), torch.float32, arch)


@pytest.mark.parametrize("arch", ARCHS)
def test_cached_decode_matches_sdpa(arch):
    # 24 prompt + 10 new tokens: past mistral's window of 7, so its cache layers slide.
    model = tiny(arch)
    ids = torch.randint(1, 97, (2, 24))
    tokens, steps = greedy(model, "mka", ids, 10)
    want_tokens, want_steps = greedy(model, "sdpa", ids, 10)
    assert torch.equal(tokens, want_tokens)
    assert_close(steps, want_steps, torch.float32, f"{arch} decode logits")


def test_window_convention_is_transformers_sliding_window():
    # transformers' sliding_window w: key j visible from i iff i - w < j <= i, SPEC §1's window.
    w, T = 5, 12
    want = sdpa_mask(batch_size=1, q_length=T, kv_length=T,
                     mask_function=sliding_window_causal_mask_function(w),
                     allow_is_causal_skip=False)
    assert torch.equal(spec_mask(MaskSpec(w, None), 1, T, T), want)
    assert not torch.equal(spec_mask(MaskSpec(w - 1, None), 1, T, T), want)
    assert not torch.equal(spec_mask(MaskSpec(w + 1, None), 1, T, T), want)


def test_sliding_window_off_by_one_against_sdpa():
    # The model-level check: one token more or less of window changes the logits.
    model = tiny("mistral")
    ids = torch.randint(1, 97, (1, 20))
    want = logits(model, "sdpa", ids)
    assert_close(logits(model, "mka", ids), want, torch.float32)
    for w in (6, 8):
        model.config.sliding_window = w
        assert (logits(model, "mka", ids) - want).abs().max() > 1e-4
    model.config.sliding_window = 7


def test_left_padding_matches_sdpa_and_unpadded():
    model = tiny("llama")
    ids = torch.randint(1, 97, (3, 16))
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    mask[2, :2] = 0
    got = logits(model, "mka", ids, attention_mask=mask)
    want = logits(model, "sdpa", ids, attention_mask=mask)
    real = mask.bool()
    assert_close(got[real], want[real], torch.float32, "real tokens")
    assert torch.isfinite(got).all()  # padding queries attend to nothing: zero rows, no NaN
    tokens, steps = greedy(model, "mka", ids, 6, attention_mask=mask)
    want_tokens, want_steps = greedy(model, "sdpa", ids, 6, attention_mask=mask)
    assert torch.equal(tokens, want_tokens)
    assert_close(steps, want_steps, torch.float32, "padded decode logits")


def test_right_padding_and_gaps_raise():
    model = tiny("llama")
    model.set_attn_implementation("mka")
    ids = torch.randint(1, 97, (2, 10))
    for bad in ([1] * 7 + [0] * 3, [0, 1, 1, 0, 1, 1, 1, 1, 1, 1]):
        mask = torch.ones_like(ids)
        mask[1] = torch.tensor(bad)
        with pytest.raises(ValueError, match="^attention_mask: sequence 1 has padding after"):
            model(ids, attention_mask=mask)


def test_training_drops_attention_weights():
    """attention_dropout in training reaches the op (SPEC §3.5): a seed of torch's generator
    repeats the output, eval mode has none."""
    model = tiny("llama", attention_dropout=0.3)
    model.set_attn_implementation("mka")
    ids = torch.randint(1, 97, (1, 8))
    model.train()
    torch.manual_seed(0)
    a = model(ids).logits
    torch.manual_seed(0)
    assert torch.equal(a, model(ids).logits)
    model.eval()
    plain = model(ids).logits
    assert not torch.allclose(a, plain)
    model.set_attn_implementation("sdpa")
    torch.testing.assert_close(model(ids).logits, plain, rtol=1e-4, atol=1e-5)


def test_unsupported_options_raise():
    model = tiny("llama")
    model.set_attn_implementation("mka")
    ids = torch.randint(1, 97, (1, 8))
    with pytest.raises(ValueError, match="^attention_mask: a 4-d mask tensor"):
        model(ids, attention_mask=torch.ones(1, 1, 8, 8, dtype=torch.bool))
    layer = model.model.layers[0].self_attn
    q, kv = torch.randn(1, 4, 8, 16), torch.randn(1, 2, 8, 16)
    for name, value in (("softcap", 30.0), ("s_aux", torch.zeros(4)), ("is_causal", False),
                        ("output_attentions", True), ("position_bias", torch.zeros(1))):
        with pytest.raises(ValueError, match=f"^{name}: "):
            hf.mka_attention_forward(layer, q, kv, kv, None, **{name: value})


def test_training_gradients_match_sdpa():
    model = tiny("qwen2")
    ids = torch.randint(1, 97, (2, 12))
    grads = {}
    for attn in ("sdpa", "mka"):
        model.zero_grad()
        model.set_attn_implementation(attn)
        model(ids, labels=ids).loss.backward()
        grads[attn] = model.model.layers[0].self_attn.q_proj.weight.grad.clone()
    assert_close(grads["mka"], grads["sdpa"], torch.float32, "q_proj gradient")


def test_register_is_idempotent():
    before = dict(AttentionInterface._global_mapping)
    hf.register()
    hf.register()
    assert AttentionInterface._global_mapping == before
    for name in hf.IMPLEMENTATIONS:
        assert AttentionMaskInterface._global_mapping[name] is hf.mka_mask
