"""PagedCache: transformers generation on the library's page pool equals sdpa with
DynamicCache (prefill + decode logits, greedy, beam search, left padding, prompt-lookup
decoding's crops), converted FastMKA/MKA models on pages equal their full forward, and the
cache reports its bytes."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from conftest import assert_close  # noqa: E402
from hf_cases import VOCAB, greedy, logits, tiny  # noqa: E402

from mka.integrations import hf  # noqa: E402

ARCHS = ["llama", "qwen2", "mistral"]
VARIANTS = ["fastmka", "mka"]
PAGE = 4  # small pages: every sequence spans several, shared ones are copied


def _ids(B, T, seed=0):
    return torch.randint(1, VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))


def _converted(variant):
    """A converted model whose routers mix the levels, so a wrong EMA state shows."""
    model = hf.convert(tiny("llama"), variant)
    for layer in hf.attention_layers(model):
        torch.nn.init.normal_(layer.mka_router.out.weight, std=1.0)
        torch.nn.init.zeros_(layer.mka_router.out.bias)
    return model


def _chunks(model, ids, cache, bounds, **kwargs):
    """Logits of ``ids`` fed into ``cache`` in the pieces ``ids[:, a:b]``."""
    with torch.no_grad():
        return torch.cat([model(ids[:, a:b], past_key_values=cache, use_cache=True, **kwargs).logits
                          for a, b in zip(bounds, bounds[1:])], dim=1)


@pytest.mark.parametrize("arch", ARCHS)
def test_prefill_and_decode_on_pages_equal_the_full_forward(arch):
    model = tiny(arch)
    ids = _ids(3, 21)
    want = logits(model, "sdpa", ids)
    model.set_attn_implementation("mka")
    cache = hf.PagedCache(model, 3, 32, page_size=PAGE)
    got = _chunks(model, ids, cache, [0, 11, 14] + list(range(15, 22)))  # prefill, a chunk, steps
    assert_close(got, want, torch.float32, f"{arch} paged prefill + decode vs sdpa")
    assert cache.get_seq_length() == 21 and cache.pages[0].lengths == [21] * 3


# paged_cache's name of the paged attention: _cache_attention (paged_attention through the
# cache's own table and lengths)
@pytest.mark.parametrize("variant, ops", [(None, ("attention", "_cache_attention")),
                                          ("fastmka", ("attention", "_cache_attention")),
                                          ("mka", ("mka", "paged_mka_attention"))])
def test_a_prompt_into_an_empty_cache_takes_the_attention_op(variant, ops, monkeypatch):
    """The prompt's own keys are all the keys: the attention op (FastMKA: over its fused
    keys; MKA: the mka op from the cache's states), not the decode kernel, which would read
    them again per few query rows; the steps after read the pages."""
    import mka
    from mka.integrations.hf import paged_cache
    calls = []
    for owner, name in ((mka, ops[0]), (paged_cache, ops[1])):
        op = getattr(owner, name)
        monkeypatch.setattr(owner, name,
                            lambda *a, _op=op, _n=name, **k: calls.append(_n) or _op(*a, **k))
    model = tiny("llama") if variant is None else _converted(variant)
    ids = _ids(2, 9, seed=5)
    with torch.no_grad():
        want = model(ids).logits
    if variant is None:
        model.set_attn_implementation("mka")
    cache = hf.PagedCache(model, 2, 16, page_size=PAGE)
    calls.clear()
    got = _chunks(model, ids, cache, [0, 7, 8, 9])
    layers = len(hf.attention_layers(model))
    assert calls == [ops[0]] * layers + [ops[1]] * 2 * layers
    assert_close(got, want, torch.float32, f"{variant}: prefill by the op, then pages")
    # queries the attention op does not take (a CUDA head dim only the paged kernels have)
    monkeypatch.setattr(paged_cache, "attention_takes", lambda q: False)
    cache = hf.PagedCache(model, 2, 16, page_size=PAGE)
    calls.clear()
    got = _chunks(model, ids, cache, [0, 7, 8, 9])
    assert calls == [ops[1]] * 3 * layers
    assert_close(got, want, torch.float32, f"{variant}: all on pages")


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_generate_equals_dynamic_cache(arch):
    model = tiny(arch)
    ids = _ids(2, 12, seed=1)
    want, want_logits = greedy(model, "sdpa", ids, 10)
    model.set_attn_implementation("mka")
    out = hf.paged_generate(model, ids, max_new_tokens=10, do_sample=False, pad_token_id=0,
                            output_logits=True, return_dict_in_generate=True, page_size=PAGE)
    assert torch.equal(out.sequences, want)
    assert_close(torch.stack(out.logits, dim=1), want_logits, torch.float32, f"{arch} greedy")
    assert isinstance(out.past_key_values, hf.PagedCache)


def test_beam_search_equals_dynamic_cache():
    model = tiny("qwen2")
    ids = _ids(2, 10, seed=2)
    model.set_attn_implementation("sdpa")
    kwargs = dict(max_new_tokens=7, num_beams=3, do_sample=False, pad_token_id=0)
    want = model.generate(ids, **kwargs)
    model.set_attn_implementation("mka")
    assert torch.equal(hf.paged_generate(model, ids, page_size=PAGE, **kwargs), want)


def test_a_dropped_cache_frees_its_pages_at_once():
    """No reference cycle holds a PagedCache (its whole page pool) after its last reference
    goes, also after generation and beam search reordered it: freed without a collection."""
    import gc
    import weakref
    model = tiny("qwen2")
    model.set_attn_implementation("mka")
    ids = _ids(2, 10, seed=2)
    enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        for kwargs in (dict(), dict(num_beams=2)):
            out = hf.paged_generate(model, ids, max_new_tokens=4, do_sample=False, pad_token_id=0,
                                    return_dict_in_generate=True, page_size=PAGE, **kwargs)
            cache = weakref.ref(out.past_key_values)
            pool = weakref.ref(out.past_key_values.pages)
            del out
            assert cache() is None and pool() is None, kwargs
    finally:
        if enabled:
            gc.enable()


def test_left_padding_keeps_padding_out_of_the_pages():
    model = tiny("mistral")
    ids = _ids(3, 14, seed=3)
    mask = torch.ones_like(ids)
    mask[1, :5] = mask[2, :2] = 0
    ids[mask == 0] = 0
    want, want_logits = greedy(model, "sdpa", ids, 8, attention_mask=mask)
    model.set_attn_implementation("mka")
    cache = hf.PagedCache(model, 3, 22, page_size=PAGE)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False,
                         pad_token_id=0, output_logits=True, return_dict_in_generate=True,
                         past_key_values=cache)
    assert torch.equal(out.sequences, want)
    assert_close(torch.stack(out.logits, dim=1), want_logits, torch.float32, "left padding")
    # transformers counts the padded length; each sequence's pages hold its real tokens
    assert cache.get_seq_length() == 21
    assert cache.pages[1].lengths == [21, 16, 19]


def test_a_changed_padding_mask_raises():
    model = tiny("llama")
    model.set_attn_implementation("mka")
    ids = _ids(2, 8, seed=4)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    cache = hf.PagedCache(model, 2, 16)
    with torch.no_grad():
        model(ids, attention_mask=mask, past_key_values=cache)
        with pytest.raises(ValueError, match="^attention_mask: sequence 0 has 0 leading padding"):
            model(ids[:, :1], past_key_values=cache)


def test_prompt_lookup_decoding_crops_the_pages(monkeypatch):
    """Prompt-lookup (speculative) decoding verifies drafted tokens and crops the rejected
    ones: the result is greedy decoding's."""
    model = tiny("llama")
    ids = _ids(1, 6, seed=5).repeat(1, 4)  # repeats: the lookup finds drafts
    want, _ = greedy(model, "sdpa", ids, 12)
    crops, crop = [], hf.PagedCache.crop

    def counted(cache, n):
        crops.append(int(n))
        return crop(cache, n)
    monkeypatch.setattr(hf.PagedCache, "crop", counted)
    model.set_attn_implementation("mka")
    got = hf.paged_generate(model, ids, max_new_tokens=12, do_sample=False, pad_token_id=0,
                            prompt_lookup_num_tokens=3, page_size=PAGE)
    assert torch.equal(got, want)
    assert any(n < 0 for n in crops)


@pytest.mark.parametrize("variant", [None, "mka"])
def test_crop_then_continue_equals_the_full_forward(variant):
    """Cropping to the middle of a page and feeding the tokens again gives the full forward's
    logits (MKA: the running EMA states are rebuilt from the page checkpoints)."""
    model = tiny("llama") if variant is None else _converted(variant)
    if variant is None:
        model.set_attn_implementation("mka")
    ids = _ids(2, 19, seed=6)
    with torch.no_grad():
        want = model(ids).logits
    cache = hf.PagedCache(model, 2, 24, page_size=PAGE)
    _chunks(model, ids, cache, [0, 17])
    free = cache.pages.table.num_free_pages
    cache.crop(-7)  # 17 -> 10 tokens: two of five pages go back to the pool
    assert cache.get_seq_length() == 10 and cache.pages.table.num_free_pages == free + 2 * 2
    got = _chunks(model, ids, cache, [10, 14, 15, 16, 17, 18, 19])
    assert_close(got, want[:, 10:], torch.float32, f"crop, {variant or 'attention'}")


def test_fastmka_pages_refuse_a_crop():
    model = _converted("fastmka")
    cache = hf.PagedCache(model, 1, 16)
    _chunks(model, _ids(1, 6), cache, [0, 6])
    assert not cache.is_croppable
    cache.crop(0)  # generate's no-op crop is fine
    with pytest.raises(ValueError, match="^past_key_values: a FastMKA PagedCache cannot be crop"):
        cache.crop(-2)


def test_batch_changes_follow_the_rows():
    model = tiny("llama")
    model.set_attn_implementation("mka")
    ids = _ids(2, 9, seed=7)
    want = logits(model, "mka", ids[[1, 1, 0]])
    cache = hf.PagedCache(model, 2, 16, page_size=PAGE, num_pages=12)
    _chunks(model, ids, cache, [0, 7])
    cache.batch_repeat_interleave(2)  # rows 0 0 1 1
    cache.batch_select_indices(torch.tensor([3, 2, 0]))  # rows 1 1 0: forked pages, copy-on-write
    assert cache.batch_size == 3 and cache.padding == [0, 0, 0]
    assert_close(_chunks(model, ids[[1, 1, 0]], cache, [7, 8, 9]), want[:, 7:], torch.float32,
                 "reordered rows")
    cache.reset()
    assert cache.get_seq_length() == 0 and cache.pages[0].lengths == [0] * 3
    assert_close(_chunks(model, ids[[1, 1, 0]], cache, [0, 9]), want, torch.float32, "after reset")


def test_bytes_are_read_from_the_pages():
    model = tiny("qwen2")  # 2 layers, 2 key/value heads of 16
    cache = hf.PagedCache(model, 2, 30, page_size=PAGE)
    per_token = 2 * 2 * 2 * 16 * 4  # layers, keys and values, heads, dim, float32
    assert cache.kv_bytes_per_token() == per_token
    pages = 2 * (8 + 1)  # per sequence: ceil(30 / 4) pages, one spare for copy-on-write
    assert cache.nbytes() == pages * PAGE * per_token
    model.set_attn_implementation("mka")
    _chunks(model, _ids(2, 10), cache, [0, 10])
    assert cache.used_bytes() == 2 * 3 * PAGE * per_token  # 10 tokens: 3 pages each


@pytest.mark.parametrize("variant", VARIANTS)
def test_converted_on_pages_equal_the_full_forward(variant):
    model = _converted(variant)
    ids = _ids(3, 14, seed=8)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # level 2's EMA starts at the first real token
    cache = hf.PagedCache(model, 3, 22, page_size=PAGE)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False,
                         pad_token_id=0, output_logits=True, return_dict_in_generate=True,
                         past_key_values=cache)
    tokens = out.sequences
    full_mask = torch.cat((mask, torch.ones_like(tokens[:, 14:])), dim=1)
    positions = (full_mask.cumsum(1) - 1).clamp(min=0)  # as generate() numbers padded rows
    with torch.no_grad():
        full = model(tokens, attention_mask=full_mask, position_ids=positions).logits[:, 13:-1]
    assert_close(torch.stack(out.logits, dim=1), full, torch.float32, f"{variant} on pages")
    uncached = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False,
                              pad_token_id=0, use_cache=False)
    assert torch.equal(tokens, uncached)


@pytest.mark.parametrize("variant", VARIANTS)
def test_converted_beam_search_on_pages(variant):
    model = _converted(variant)
    ids = _ids(2, 9, seed=9)
    kwargs = dict(max_new_tokens=5, num_beams=3, do_sample=False, pad_token_id=0)
    assert torch.equal(hf.paged_generate(model, ids, page_size=PAGE, **kwargs),
                       model.generate(ids, use_cache=False, **kwargs))


def test_bad_uses_raise():
    model = tiny("llama")
    ids = _ids(1, 5)
    model.set_attn_implementation("sdpa")
    with pytest.raises(ValueError, match="^past_key_values: a PagedCache hands its pages to the "
                                         "library's attention 'mka'; the model runs 'sdpa'"):
        model(ids, past_key_values=hf.PagedCache(model, 1, 8))
    model.set_attn_implementation("mka")
    with pytest.raises(ValueError, match="^cache: a sequence would hold 9 tokens, beyond the "
                                         "cache's max_tokens = 8"):
        model(_ids(1, 9), past_key_values=hf.PagedCache(model, 1, 8))
    with pytest.raises(ValueError, match="^cache: key_states has batch 1, the cache was made for "
                                         "batch_size 2"):
        model(ids, past_key_values=hf.PagedCache(model, 2, 8))
    with pytest.raises(ValueError, match="^past_key_values: paged_generate makes the PagedCache"):
        hf.paged_generate(model, ids, max_new_tokens=2, past_key_values=hf.PagedCache(model, 1, 8))
    with pytest.raises(ValueError, match="^page_size: must be a positive integer"):
        hf.PagedCache(model, 1, 8, page_size=0)


def test_dropout_in_training_is_refused_on_pages():
    """The paged cache decodes; attention dropout on it is a clear error, not a silent skip."""
    model = tiny("llama", attention_dropout=0.1)
    model.set_attn_implementation("mka")
    model.train()
    cache = hf.PagedCache(model, 1, 8, page_size=PAGE)
    with pytest.raises(ValueError, match="^dropout: 0.1 with the paged cache"):
        model(_ids(1, 5), past_key_values=cache, use_cache=True)


def _decode(model, ids, cache, steps):
    """Logits of a prefill of ``ids`` then ``steps`` greedy decode steps on ``cache``."""
    out = []
    with torch.no_grad():
        x = model(ids, past_key_values=cache, use_cache=True).logits
        out.append(x)
        for _ in range(steps):
            x = model(x[:, -1:].argmax(-1), past_key_values=cache, use_cache=True).logits
            out.append(x)
    return torch.cat(out, dim=1)


def test_the_lean_decode_path_equals_the_general_one(monkeypatch):
    """Decode steps without padding take attend's lean path (no _new_tokens bookkeeping) and
    give the general path's logits exactly; a prompt into the empty cache does not take it."""
    from mka.integrations.hf import paged_cache
    model = tiny("llama")
    model.set_attn_implementation("mka")
    ids = _ids(2, 6, seed=3)
    general = []
    monkeypatch.setattr(paged_cache.PagedLayer, "_new_tokens", lambda self, *a, _f=paged_cache
                        .PagedLayer._new_tokens: general.append(self.index) or _f(self, *a))
    got = _decode(model, ids, hf.PagedCache(model, 2, 16, page_size=PAGE), 5)
    assert general == [0, 1]  # the prefill only
    monkeypatch.setattr(paged_cache.PagedLayer, "_lean", lambda self, *a: False)
    general.clear()
    cache = hf.PagedCache(model, 2, 16, page_size=PAGE)
    want = _decode(model, ids, cache, 5)
    assert general == [0, 1] * 6
    assert torch.equal(got, want)
    assert cache.get_seq_length() == 11 and cache.pages[0].lengths == [11, 11]


def test_a_static_cache_decodes_on_the_lean_path():
    """A static cache (what HFDecodeGraph captures; here on the CPU, advanced by hand) decodes
    through the same lean path, reading its lengths from the device tensors."""
    model = tiny("llama")
    model.set_attn_implementation("mka")
    ids = _ids(1, 5, seed=4)
    want = _decode(model, ids, hf.PagedCache(model, 1, 16, page_size=PAGE), 4)
    cache = hf.PagedCache(model, 1, 16, page_size=PAGE)
    with torch.no_grad():
        x = model(ids, past_key_values=cache, use_cache=True).logits
        got = [x]
        cache.pages.make_static(12)
        for _ in range(4):
            x = model(x[:, -1:].argmax(-1), past_key_values=cache, use_cache=True).logits
            cache.pages.advance(1)
            got.append(x)
    assert torch.equal(torch.cat(got, dim=1), want)
    assert cache.pages[0].lengths == [9] and int(cache.pages._static_before) == 9


def test_bad_inputs_on_the_lean_path_raise_naming_the_argument():
    """The lean path leaves the Python checks of the paged ops to the native layer's; what
    reaches it still raises a ValueError naming the argument, before any page is read."""
    from mka.integrations.hf.masks import MaskSpec
    model = tiny("llama")
    model.set_attn_implementation("mka")
    cache = hf.PagedCache(model, 1, 16, page_size=PAGE)
    _decode(model, _ids(1, 5), cache, 0)
    layer, spec = cache.layers[0], MaskSpec(None, None)
    k = v = torch.randn(1, 1, 2, 16)
    q = torch.randn(1, 1, 4, 16)
    assert layer._lean("attention", spec, 1)
    bad = [(q.double(), k, v, "^q: dtype float64, expected float32"),
           (q[:, :, :3], k, v, "^q: the number of query heads H = 3 must be a multiple"),
           (torch.randn(1, 1, 4, 32)[..., ::2], k, v, "^q: the last dimension must be contiguous"),
           (q, k.double(), v, "^k: dtype float64, expected float32"),
           (q, k, torch.randn(1, 1, 2, 8), "^v: expected shape"),
           (q, torch.randn(1, 1, 3, 16), v, "^k: expected shape")]
    for q_, k_, v_, match in bad:
        with pytest.raises(ValueError, match=match):
            layer.attend("attention", q_, k_, v_, spec, None)
    with pytest.raises(ValueError, match="^window: must be at least 1"):
        layer.attend("attention", q, k, v, MaskSpec(0, None), None)
    with pytest.raises(ValueError, match="^key_states: expected \\(B, 2, T, 16\\) for layer 1"):
        cache.update(torch.randn(1, 3, 1, 16), torch.randn(1, 3, 1, 16), 1)
    with pytest.raises(ValueError, match="^cache: value_states is torch.float64"):
        cache.update(torch.randn(1, 2, 1, 16), torch.randn(1, 2, 1, 16).double(), 1)
