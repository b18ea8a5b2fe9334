"""Rotary positions (``rope``) and the key shift (``key_shift``) of the q/k/v attention
modules against a float64 reference written out here; their errors."""

import copy
from types import SimpleNamespace

import pytest
import torch

from conftest import rel_err
from mka import reference
from mka.models import GPTConfig
from mka.nn import build_attention
from mka.nn.rope import apply_rope

EXACT = 1e-10
D, H = 32, 4


def _module(name, n_kv_head=None, backend="mka", **kw):
    torch.manual_seed(0)
    options = kw.pop("options", {})
    cfg = SimpleNamespace(attention=name, n_embd=D, n_head=H, n_kv_head=n_kv_head, bias=True,
                          dropout=0.0, attn_backend=backend, attn_options=options, **kw)
    m = build_attention(cfg).double()
    if m.shift_mix is not None:  # away from the initial 0.5 everywhere: per-channel
        m.shift_mix.data = torch.rand(D, dtype=torch.float64)
    return m


def _reference_qkv(m, x, start=0):
    """q, k, v as written: k_t = W_k (x_t + s x_{t-1}), then both rotated at their position."""
    G, d = m.n_kv_head, m.head_dim
    w, b = m.qkv.weight, m.qkv.bias
    q, k, v = (x @ w.T + b).split((H * d, G * d, G * d), -1)
    if m.shift_mix is not None:
        prev = torch.cat((torch.zeros_like(x[:, :1]), x[:, :-1]), 1)
        k = k + (m.shift_mix * prev) @ w[H * d:(H + G) * d].T
    B, T = x.shape[:2]
    q, k, v = q.view(B, T, H, d), k.view(B, T, G, d), v.view(B, T, G, d)
    if m.rope is not None:
        q, k = apply_rope(q, start, m.rope), apply_rope(k, start, m.rope)
    return q, k, v


@pytest.mark.parametrize("backend", ["mka", "torch"])
@pytest.mark.parametrize("rope,shift", [(100.0, False), (None, True), (500.0, True)],
                         ids=["rope", "shift", "rope-shift"])
@pytest.mark.parametrize("name,n_kv_head", [("mha", None), ("gqa", 2)])
def test_attention_matches_the_written_out_reference(name, n_kv_head, rope, shift, backend):
    m = _module(name, n_kv_head, backend, rope=rope, key_shift=shift)
    x = torch.randn(2, 13, D, dtype=torch.float64, requires_grad=True)
    q, k, v = _reference_qkv(m, x)
    want = m.proj(reference.attention(q, k, v, causal=True).reshape(2, 13, D))
    got = m(x)
    assert rel_err(got, want) < EXACT
    g = torch.randn_like(got)  # gradients into the input and every weight, the shift's too
    wrt = (x, *m.parameters())
    for a, b in zip(torch.autograd.grad(got, wrt, g), torch.autograd.grad(want, wrt, g)):
        assert rel_err(a, b) < EXACT


@pytest.mark.parametrize("name", ["mka", "fastmka"])
def test_routed_variants_project_with_rope_and_shift(name):
    """MKA and FastMKA take both through their own constructor (RoutedAttention): the
    projection is the reference's, and the output differs from the module without them."""
    m = _module(name, 2, rope=100.0, key_shift=True)
    plain = _module(name, 2)
    x = torch.randn(2, 11, D, dtype=torch.float64)
    for got, want in zip(m._project(x), _reference_qkv(m, x)):
        assert rel_err(got, want) < EXACT
    assert rel_err(m(x), plain(x)) > 1e-3


def test_cached_steps_continue_positions_and_the_shift():
    """A cache: rotation starts after the cached tokens, and the first new key reads the last
    cached token's hidden state — the same q, k as one pass over the whole sequence."""
    m = _module("mha", rope=100.0, key_shift=True)
    x = torch.randn(3, 12, D, dtype=torch.float64)
    want = _reference_qkv(m, x)
    cache = m.new_cache(3, dtype=torch.float64)
    parts = []
    for a, b in ((0, 5), (5, 6), (6, 12)):
        parts.append(m._project(x[:, a:b], cache))
        m(x[:, a:b], cache)  # the forward moves the cache (its own projection: same values)
    for i in range(3):
        assert rel_err(torch.cat([p[i] for p in parts], 1), want[i]) < EXACT
    assert rel_err(cache.states["shift"], x[:, -1]) == 0


@pytest.mark.parametrize("name,n_kv_head", [("mha", None), ("mka", 2), ("fastmka", 2)])
def test_a_refused_step_leaves_the_shift_state(name, n_kv_head):
    """The last token's state moves only with a step the cache grants: after a refusal (too
    long for max_tokens, a wrong dtype) the next steps continue as if it never came."""
    m = _module(name, n_kv_head, key_shift=True)
    x = torch.randn(2, 8, D, dtype=torch.float64)
    want = m(x)
    cache = m.new_cache(2, dtype=torch.float64, max_tokens=8)
    first = m(x[:, :5], cache)
    kept = cache.states["shift"].clone()
    with pytest.raises(ValueError, match="beyond the cache's max_tokens = 8"):
        m(torch.randn(2, 4, D, dtype=torch.float64), cache)
    with pytest.raises(ValueError, match="cache: k is torch.float32"):
        copy.deepcopy(m).float()(torch.randn(2, 1, D), cache)
    assert torch.equal(cache.states["shift"], kept)
    assert rel_err(torch.cat((first, m(x[:, 5:], cache)), 1), want) < EXACT


def test_no_tokens_and_truncate():
    m = _module("mha", key_shift=True)
    assert m(torch.randn(2, 0, D, dtype=torch.float64)).shape == (2, 0, D)
    cache = m.new_cache(2, dtype=torch.float64)
    m(torch.randn(2, 3, D, dtype=torch.float64), cache)
    assert m(torch.randn(2, 0, D, dtype=torch.float64), cache).shape == (2, 0, D)
    with pytest.raises(ValueError, match="truncate: a layer with the key shift"):
        cache.parent.truncate([2, 2])


def test_memory_keys_are_neither_rotated_nor_shifted():
    m = _module("mka", 2, rope=100.0, key_shift=True, options={"levels": 3})
    h = torch.randn(2, 5, D, dtype=torch.float64)
    k, v = m.project_memory(h)
    plain = m._split(h)
    assert torch.equal(k, plain[1]) and torch.equal(v, plain[2])


def test_errors_name_the_argument():
    for bad in (1.0, 0.5, True, "10000"):
        with pytest.raises(ValueError, match="rope: the rotary base"):
            _module("mha", rope=bad)
    with pytest.raises(ValueError, match="rope: rotates pairs of dims"):
        build_attention(SimpleNamespace(attention="mha", n_embd=12, n_head=4, n_kv_head=None,
                                        bias=True, dropout=0.0, attn_backend="mka",
                                        attn_options={}, rope=100.0))
    with pytest.raises(ValueError, match="key_shift: expected True or False"):
        _module("mha", key_shift=1)
    cfg = dict(n_layer=1, n_embd=D, n_head=H, block_size=8, vocab_size=11)
    with pytest.raises(ValueError, match="rope: the rotary base"):  # 0 is not "off"
        GPTConfig(**cfg, rope=0)
    with pytest.raises(ValueError, match="key_shift: expected True or False"):
        GPTConfig(**cfg, key_shift=0)
    for field in ({"rope": 1e4}, {"key_shift": True}):
        with pytest.raises(ValueError, match=f"{next(iter(field))}: attention 'mla' does not"):
            GPTConfig(n_layer=1, n_embd=D, n_head=H, block_size=8, vocab_size=11,
                      attention="mla", **field)


def test_a_rope_model_has_no_position_table():
    from mka.models import GPT
    cfg = dict(n_layer=1, n_embd=D, n_head=H, block_size=8, vocab_size=11)
    with_table, rotary = GPT(GPTConfig(**cfg)), GPT(GPTConfig(**cfg, rope=1e4))
    assert rotary.wpe is None and with_table.wpe is not None
    assert rotary.num_params() == rotary.num_params(non_embedding=False)
    assert with_table.num_params(non_embedding=False) - rotary.num_params(non_embedding=False) \
        == 8 * D
