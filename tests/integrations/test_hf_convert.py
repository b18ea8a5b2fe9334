"""convert(): outputs equal the original's at conversion, cached generation carries the
router weights and EMA correctly, and save_pretrained / load_converted round-trips."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from conftest import TOL, assert_close, rel_err  # noqa: E402
from hf_cases import logits, tiny  # noqa: E402

from mka.integrations import hf  # noqa: E402

VARIANTS = ["fastmka", "mka"]


def _routing_matters(model) -> None:
    """Random router output layers: lam far from (1, 0), so a wrong EMA or a wrong router
    weight of a cached token shows in the logits."""
    for layer in hf.attention_layers(model):
        torch.nn.init.normal_(layer.mka_router.out.weight, std=1.0)
        torch.nn.init.zeros_(layer.mka_router.out.bias)


def _generate(model, ids, new_tokens, **kwargs):
    out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False, output_logits=True,
                         return_dict_in_generate=True, pad_token_id=0, **kwargs)
    return out.sequences, torch.stack(out.logits, dim=1)


@pytest.mark.parametrize("arch", ["llama", "mistral"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_converted_equals_original(arch, variant):
    model = tiny(arch)
    ids = torch.randint(1, 97, (2, 20))
    want = logits(model, "sdpa", ids)
    hf.convert(model, variant)
    assert model.config._attn_implementation == f"mka_{variant}"
    with torch.no_grad():
        assert_close(model(ids).logits, want, torch.float32, f"converted {variant}")


@pytest.mark.parametrize("variant", VARIANTS)
def test_converted_equals_original_bf16(variant):
    # bf16 weights: the router's lam = (1, 2**-25) is computed in float32, so the converted
    # model differs from the unconverted one only by the ops' bf16 rounding.
    model = tiny("llama").to(torch.bfloat16)
    ids = torch.randint(1, 97, (2, 20))
    want = logits(model, "mka", ids)
    with torch.no_grad():
        got = hf.convert(model, variant)(ids).logits
    assert rel_err(got, want) < TOL[torch.bfloat16]


@pytest.mark.parametrize("variant", VARIANTS)
def test_cached_generation_equals_full_forward(variant):
    model = hf.convert(tiny("llama"), variant)
    _routing_matters(model)
    ids = torch.randint(1, 97, (3, 14))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding: level 2's EMA starts at the first real token
    tokens, steps = _generate(model, ids, 8, attention_mask=mask)
    full_mask = torch.cat((mask, torch.ones_like(tokens[:, 14:])), dim=1)
    positions = (full_mask.cumsum(1) - 1).clamp(min=0)  # as generate() numbers padded rows
    with torch.no_grad():
        full = model(tokens, attention_mask=full_mask, position_ids=positions).logits[:, 13:-1]
    assert_close(steps, full, torch.float32, f"{variant} cached decode vs one full pass")


def test_beam_search_reorders_router_weights():
    model = hf.convert(tiny("llama"), "fastmka")
    _routing_matters(model)
    ids = torch.randint(1, 97, (2, 10))
    cached = model.generate(ids, max_new_tokens=6, num_beams=3, do_sample=False, pad_token_id=0)
    uncached = model.generate(ids, max_new_tokens=6, num_beams=3, do_sample=False, pad_token_id=0,
                              use_cache=False)
    assert torch.equal(cached, uncached)


def test_save_and_load_round_trip(tmp_path):
    model = hf.convert(tiny("qwen2"), "fastmka", beta=0.75, router_hidden=16)
    _routing_matters(model)
    ids = torch.randint(1, 97, (2, 12))
    with torch.no_grad():
        want = model(ids).logits
    model.save_pretrained(tmp_path)
    loaded = hf.load_converted(str(tmp_path))
    assert loaded.config.mka == {"variant": "fastmka", "beta": 0.75, "levels": 2,
                                 "router_hidden": 16}
    assert loaded.config._attn_implementation == "mka_fastmka"
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, want)


def test_load_converted_refuses_an_unconverted_model(tmp_path):
    tiny("llama").save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="^path: .* has no 'mka' entry"):
        hf.load_converted(str(tmp_path))


@pytest.mark.parametrize("variant", VARIANTS)
def test_sliding_window_cache_is_refused_for_converted_models(variant):
    model = hf.convert(tiny("mistral"), variant)
    ids = torch.randint(1, 97, (1, 10))
    with pytest.raises(ValueError, match="^past_key_values: layer 0 is a DynamicSlidingWindowLayer that has seen 11"):
        model.generate(ids, max_new_tokens=2, do_sample=False, pad_token_id=0)
    model.generate(ids, max_new_tokens=2, do_sample=False, pad_token_id=0, use_cache=False)


RECALL = {"chunk": 4, "top": 2, "seed": 5}


@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_level_3_recall_equals_original_and_decodes_as_a_full_pass(arch):
    model = tiny(arch)
    ids = torch.randint(1, 97, (2, 26))
    want = logits(model, "sdpa", ids)
    hf.convert(model, "mka", levels=3, recall=RECALL)
    with torch.no_grad():
        assert_close(model(ids).logits, want, torch.float32, "converted mka with recall")
    if arch == "mistral":  # sliding-window cache layers: refused (tested above)
        return
    _routing_matters(model)  # level 3 now weighs: a wrong recall shows
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # left padding: chunks start at the first real token
    tokens, steps = _generate(model, ids, 9, attention_mask=mask)
    full_mask = torch.cat((mask, torch.ones_like(tokens[:, 26:])), dim=1)
    positions = (full_mask.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        full = model(tokens, attention_mask=full_mask, position_ids=positions).logits[:, 25:-1]
    assert_close(steps, full, torch.float32, "recall: cached decode vs one full pass")


def test_level_3_matters_and_round_trips(tmp_path):
    model = hf.convert(tiny("qwen2"), "mka", levels=3, recall=RECALL)
    _routing_matters(model)
    ids = torch.randint(1, 97, (2, 30))
    with torch.no_grad():
        want = model(ids).logits
        for layer in hf.attention_layers(model):  # level 3 contributes
            layer.mka_recall.top = 1
        assert rel_err(model(ids).logits, want) > 1e-4
        for layer in hf.attention_layers(model):
            layer.mka_recall.top = 2
    model.save_pretrained(tmp_path)
    loaded = hf.load_converted(str(tmp_path))
    assert loaded.config.mka["levels"] == 3
    assert loaded.config.mka["recall"] == {"chunk": 4, "top": 2, "tables": 4, "bits": 16, "seed": 5}
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, want)


@pytest.mark.parametrize("kwargs, name", [({"variant": "mha"}, "variant"), ({"beta": 1.0}, "beta"),
                                          ({"levels": 3}, "levels"),
                                          ({"variant": "mka", "recall": {"chunk": 8}}, "recall"),
                                          ({"variant": "mka", "levels": 3, "recall": {"size": 8}},
                                           "recall"),
                                          ({"init_gap": float("inf")}, "init_gap")])
def test_convert_bad_options(kwargs, name):
    with pytest.raises(ValueError, match=f"^{name}: "):
        hf.convert(tiny("llama"), **kwargs)
    with pytest.raises(ValueError, match="^model: found no attention layers"):
        hf.convert(torch.nn.Linear(2, 2))


def test_dropout_with_level_3_recall_is_refused():
    """The recall op has no attention dropout: training a converted model with level 3 by
    recall and attention_dropout > 0 is a clear error; the same model trains without it."""
    model = hf.convert(tiny("llama", attention_dropout=0.1), "mka", levels=3, recall=RECALL)
    model.train()
    ids = torch.randint(1, 97, (1, 8))
    with pytest.raises(ValueError, match="^dropout: 0.1 with level 3 by recall"):
        model(ids)
    model.eval()
    model(ids)
