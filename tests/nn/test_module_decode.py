"""Every attention variant is causal and cache-capable: prefill then token-by-token decode,
and chunked prefill, give exactly one full forward (float64); the cache holds the bytes it
reports."""

import pytest
import torch

from attn_cases import BACKENDS, hidden, make, variant_params
from conftest import rel_err

EXACT = 1e-10  # SPEC §5, float64


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", variant_params())
def test_causal(variant, backend):
    m = make(variant, backend)
    x = hidden(T=12)
    t = 6
    x2 = x.clone()
    x2[:, t + 1:] = torch.randn_like(x2[:, t + 1:])
    y, y2 = m(x), m(x2)
    assert rel_err(y2[:, :t + 1], y[:, :t + 1]) < EXACT
    assert rel_err(y2[:, t + 1:], y[:, t + 1:]) > 1e-3  # the change is seen where it may be


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", variant_params())
def test_prefill_then_decode_equals_full_forward(variant, backend):
    m = make(variant, backend)
    x = hidden(T=11)
    full = m(x)
    cache = m.new_cache(2, dtype=torch.float64)
    steps = [m(x[:, :5], cache)] + [m(x[:, t:t + 1], cache) for t in range(5, 11)]
    assert cache.length == 11
    assert rel_err(torch.cat(steps, 1), full) < EXACT


@pytest.mark.parametrize("variant", variant_params())
def test_a_dropped_module_cache_frees_its_pages_at_once(variant):
    """A module's cache is one layer holding its cache: used, then dropped, both go without a
    garbage collection (no reference cycle keeps the pages)."""
    import gc
    import weakref
    m = make(variant, "mka")
    enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        cache = m.new_cache(2, dtype=torch.float64)
        m(hidden(T=5), cache)
        m(hidden(T=1), cache)
        pages, owner = weakref.ref(cache.k_pages), weakref.ref(cache.owner)
        del cache
        assert pages() is None and owner() is None
    finally:
        if enabled:
            gc.enable()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", variant_params())
def test_chunked_prefill_equals_one_pass(variant, backend):
    m = make(variant, backend)
    x = hidden(T=13)
    full = m(x)
    cache = m.new_cache(2, dtype=torch.float64)
    chunks = [m(x[:, a:b], cache) for a, b in ((0, 4), (4, 9), (9, 13))]
    assert rel_err(torch.cat(chunks, 1), full) < EXACT


@pytest.mark.parametrize("variant, ops", [("mha", ("attention", "paged_attention")),
                                          ("gqa", ("attention", "paged_attention")),
                                          ("fastmka", ("attention", "paged_attention")),
                                          ("mka", ("mka", "paged_mka_attention"))])
def test_a_prompt_into_an_empty_cache_takes_the_attention_op(variant, ops, monkeypatch):
    """Its own keys are all the keys: no decode kernel reading them again per few query rows;
    later steps read the pages."""
    m = make(variant)
    calls = []
    for name in ops:
        op = getattr(m.ops, name)
        monkeypatch.setattr(m.ops, name,
                            lambda *a, _op=op, _n=name, **k: calls.append(_n) or _op(*a, **k))
    x = hidden(T=9)
    cache = m.new_cache(2, dtype=torch.float64)
    y = torch.cat([m(x[:, :6], cache), m(x[:, 6:], cache)], 1)
    assert calls == list(ops)
    assert rel_err(y, m(x)) < EXACT
    # where the attention op does not take the queries (a CUDA head dim only the paged
    # kernels have), the prompt reads the pages too
    import mka.nn.base
    monkeypatch.setattr(mka.nn.base, "attention_takes", lambda q: False)
    calls.clear()
    cache = m.new_cache(2, dtype=torch.float64)
    y = torch.cat([m(x[:, :6], cache), m(x[:, 6:], cache)], 1)
    assert calls == [ops[1], ops[1]]
    assert rel_err(y, m(x)) < EXACT


@pytest.mark.parametrize("variant", variant_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cache_bytes_match_the_tensors_held(variant, dtype):
    """nbytes() is every byte the cache keeps alive (its preallocated pages and states, no
    views into anything else); used_bytes() the pages the sequences hold."""
    m = make(variant, dtype=dtype)
    B, T, S = 3, 7, 4
    cache = m.new_cache(B, dtype=dtype, max_tokens=16, page_size=S)
    m(hidden(B, 4, dtype), cache)
    m(hidden(B, 3, dtype), cache)
    held = [*cache.page_tensors(), *cache.states.values()]
    kv = cache.k_pages._base  # keys and values may be two halves of one tensor
    if kv is not None:
        assert cache.v_pages._base is kv and kv.shape[0] == 2 and kv._base is None
        held = [kv] + [t for t in held if t._base is not kv]
    assert all(t._base is None and t.is_contiguous() for t in held)
    assert cache.nbytes() == sum(t.numel() * t.element_size() for t in held)
    spec = m.cache_spec()
    pool = cache.parent
    assert cache.nbytes() == (pool.table.num_pages * spec.bytes_per_page(S, dtype)
                              + B * m.cache_state_bytes(dtype, 16))
    pages = -(-T // S)
    assert pool.used_bytes() == B * (pages * spec.bytes_per_page(S, dtype)
                                     + m.cache_state_bytes(dtype, 16))
    assert spec.bytes_per_page(S, dtype) >= S * m.cache_bytes_per_token(dtype)
    assert cache.lengths == [T] * B


def test_cache_rejects_a_foreign_dtype_and_batch():
    m = make("mha")
    cache = m.new_cache(2, dtype=torch.float32)
    with pytest.raises(ValueError, match="cache: .*float32"):
        m(hidden(2, 3), cache)
    cache = m.new_cache(3, dtype=torch.float64)
    with pytest.raises(ValueError, match="batch_size 3"):
        m(hidden(2, 3), cache)
    cache = m.new_cache(2, dtype=torch.float64, max_tokens=8)
    m(hidden(2, 6), cache)
    with pytest.raises(ValueError, match="beyond the cache's max_tokens = 8"):
        m(hidden(2, 3), cache)
    with pytest.raises(ValueError, match="a cache belongs to one attention module"):
        make("gqa")(hidden(2, 1), m.new_cache(2, dtype=torch.float64))
