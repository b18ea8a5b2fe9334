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


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", variant_params())
def test_chunked_prefill_equals_one_pass(variant, backend):
    m = make(variant, backend)
    x = hidden(T=13)
    full = m(x)
    cache = m.new_cache(2, dtype=torch.float64)
    chunks = [m(x[:, a:b], cache) for a, b in ((0, 4), (4, 9), (9, 13))]
    assert rel_err(torch.cat(chunks, 1), full) < EXACT


@pytest.mark.parametrize("variant", variant_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cache_bytes_match_the_tensors_held(variant, dtype):
    m = make(variant, dtype=dtype)
    B, T = 3, 7
    cache = m.new_cache(B, dtype=dtype)
    m(hidden(B, 4, dtype), cache)
    m(hidden(B, 3, dtype), cache)
    held = sum(t.numel() * t.element_size()
               for t in (*cache.tokens.values(), *cache.states.values()))
    assert cache.nbytes() == held
    assert held == B * (T * m.cache_bytes_per_token(dtype) + m.cache_state_bytes(dtype))
    assert all(t.shape[:2] == (B, T) for t in cache.tokens.values())


def test_cache_rejects_a_foreign_dtype_and_batch():
    m = make("mha")
    cache = m.new_cache(2, dtype=torch.float32)
    with pytest.raises(ValueError, match="cache: .*float32"):
        m(hidden(2, 3), cache)
    cache = m.new_cache(3, dtype=torch.float64)
    with pytest.raises(ValueError, match="batch_size 3"):
        m(hidden(2, 3), cache)
