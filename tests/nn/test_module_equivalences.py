"""Modules against float64 reference formulas (outputs and gradients of the input and of
every weight), the two backends against each other, and the identities between variants:
GQA with G = H is MHA, GQA is MHA with shared heads, MLA naive equals MLA absorb."""

import math

import pytest
import torch

from attn_cases import BACKENDS, config, hidden, make, variant_params
from conftest import rel_err
from mka import reference as R
from mka.nn import build_attention
from mka.nn.rope import apply_rope

EXACT = 1e-10  # SPEC §5, float64


def _outputs_and_grads(m, x, fn=None):
    """``fn(m, x)`` (default: the module's forward) and the gradients of a fixed random
    projection of it with respect to ``x`` and every parameter."""
    x = x.detach().clone().requires_grad_()
    y = m(x) if fn is None else fn(m, x)
    torch.manual_seed(123)
    w = torch.randn_like(y)
    params = [p for p in m.parameters()]
    grads = torch.autograd.grad((y * w).sum(), [x, *params], allow_unused=True)
    return y, grads


def _assert_same(a, b, what):
    (ya, ga), (yb, gb) = a, b
    assert rel_err(ya, yb) < EXACT, f"{what}: output {rel_err(ya, yb):.2e}"
    for i, (p, q) in enumerate(zip(ga, gb)):
        assert (p is None) == (q is None), f"{what}: gradient {i} missing on one side"
        if p is not None:
            assert rel_err(p, q) < EXACT, f"{what}: gradient {i} {rel_err(p, q):.2e}"


# ------------------------------------------------------------------ float64 references

def _ref_qkv(m, x):
    return m._project(x)


def _ref_gqa(m, x):
    q, k, v = _ref_qkv(m, x)
    return m._output(R.attention(q, k, v, True, None, m.window))


def _ref_mka(m, x):
    q, k, v = _ref_qkv(m, x)
    lam = torch.softmax(m.router.out(torch.nn.functional.gelu(m.router.fc(q.flatten(2)))), -1)
    mem_k, mem_v = m._memory(x, None)
    y, _, _ = R.mka(q, k, v, lam, m.beta, mem_k, mem_v, window=m.window)
    return m._output(y)


def _ref_fastmka(m, x):
    q, k, v = _ref_qkv(m, x)
    lam = torch.softmax(m.router.out(torch.nn.functional.gelu(m.router.fc(q.flatten(2)))), -1)
    k3 = v3 = None
    if m.levels == 3:
        mem_k, mem_v = m._memory(x, None)
        k3 = R.attention(k, mem_k, mem_k, causal=False)
        v3 = R.attention(k, mem_k, mem_v, causal=False)
    y, _, _ = R.fastmka(q, k, v, lam, m.beta, k3, v3, window=m.window)
    return m._output(y)


def _ref_mla(m, x):
    """DeepSeek-V2 MLA written out: per-head keys [c W_uk ; RoPE(k_pe)], values c W_uv."""
    B, T, _ = x.shape
    H, r, dn, dr, dv = m.n_head, m.kv_lora_rank, m.nope, m.rope, m.v_dim
    if m.q_lora_rank:
        q = m.q_up(m.q_norm(m.q_down(x)))
    else:
        q = m.q_proj(x)
    q = q.view(B, T, H, dn + dr)
    q = torch.cat((q[..., :dn], apply_rope(q[..., dn:], 0, m.rope_theta)), -1)
    ckv = x @ m.kv_down.weight.T
    c = ckv[..., :r] * torch.rsqrt(ckv[..., :r].pow(2).mean(-1, keepdim=True) + 1e-6) * m.kv_norm.weight
    k_pe = apply_rope(ckv[..., None, r:], 0, m.rope_theta).expand(B, T, H, dr)
    kv = (c @ m.kv_up.weight.T).view(B, T, H, dn + dv)
    k = torch.cat((kv[..., :dn], k_pe), -1)
    s = torch.einsum("bqhe,bkhe->bhqk", q, k) / math.sqrt(dn + dr)
    s = s.masked_fill(~R.visible(T, T, True, m.window), float("-inf"))
    y = torch.einsum("bhqk,bkhv->bqhv", torch.softmax(s, -1), kv[..., dn:])
    return m.proj(y.reshape(B, T, H * dv))


REFERENCES = {"mha": _ref_gqa, "mqa": _ref_gqa, "gqa": _ref_gqa, "mla": _ref_mla,
              "mka": _ref_mka, "fastmka": _ref_fastmka}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", variant_params())
def test_module_matches_reference_formulas(variant, backend):
    m = make(variant, backend)
    x = hidden(T=10)
    ref = REFERENCES[variant.split("-")[0]]
    _assert_same(_outputs_and_grads(m, x), _outputs_and_grads(m, x, ref), variant)


@pytest.mark.parametrize("variant", variant_params())
def test_backends_agree(variant):
    x = hidden(T=10)
    _assert_same(_outputs_and_grads(make(variant, "mka"), x),
                 _outputs_and_grads(make(variant, "torch"), x), variant)


def test_rope_is_relative():
    q, k = torch.randn(1, 1, 1, 8, dtype=torch.float64), torch.randn(1, 1, 1, 8, dtype=torch.float64)
    dot = lambda a, b: (apply_rope(q, a) * apply_rope(k, b)).sum()  # noqa: E731
    assert abs(dot(3, 1) - dot(12, 10)) < 1e-12 and abs(dot(3, 1) - dot(3, 3)) > 1e-6
    assert rel_err(apply_rope(q, 7).norm(), q.norm()) < 1e-14


# ------------------------------------------------------------------ identities

@pytest.mark.parametrize("backend", BACKENDS)
def test_gqa_with_g_equal_h_is_mha(backend):
    torch.manual_seed(0)
    mha = build_attention(config("mha", backend=backend)).double()
    gqa = build_attention(config("gqa", 4, backend)).double()
    gqa.load_state_dict(mha.state_dict())
    x = hidden()
    _assert_same(_outputs_and_grads(gqa, x), _outputs_and_grads(mha, x), "gqa G=H")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("G", [1, 2])
def test_gqa_is_mha_with_shared_kv_heads(backend, G):
    """Query head h reads kv head h // (H / G): MHA whose k/v weights repeat that way."""
    gqa = build_attention(config("gqa", G, backend)).double()
    mha = build_attention(config("mha", backend=backend)).double()
    H, d, D = gqa.n_head, gqa.head_dim, gqa.n_embd
    w, b = gqa.qkv.weight.detach(), gqa.qkv.bias.detach()
    q_rows = slice(0, H * d)

    def repeat_heads(z):  # (G d, ...) -> (H d, ...), kv head g serving queries g*H/G ..
        rest = z.shape[1:]
        return z.view(G, d, *rest).repeat_interleave(H // G, 0).reshape(H * d, *rest)

    def expand(t):
        k, v = t[H * d:H * d + G * d], t[H * d + G * d:]
        return torch.cat((t[q_rows], repeat_heads(k), repeat_heads(v)))

    with torch.no_grad():
        mha.qkv.weight.copy_(expand(w))
        mha.qkv.bias.copy_(expand(b))
        mha.proj.load_state_dict(gqa.proj.state_dict())
    x = hidden()
    assert rel_err(mha(x), gqa(x)) < EXACT
    assert mha.qkv.weight.shape == (3 * D, D)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("q_lora_rank", [0, 10])
def test_mla_naive_equals_absorb_and_caches_less(backend, q_lora_rank):
    torch.manual_seed(0)
    naive = build_attention(config("mla", None, backend, path="naive",
                                   q_lora_rank=q_lora_rank)).double()
    absorb = build_attention(config("mla", None, backend, path="absorb",
                                    q_lora_rank=q_lora_rank)).double()
    absorb.load_state_dict(naive.state_dict())
    x = hidden(T=9)
    _assert_same(_outputs_and_grads(absorb, x), _outputs_and_grads(naive, x), "mla")
    caches = [m.new_cache(2, dtype=torch.float64) for m in (naive, absorb)]
    outs = [torch.cat([m(x[:, :4], c), m(x[:, 4:], c)], 1)
            for m, c in zip((naive, absorb), caches)]
    assert rel_err(outs[1], outs[0]) < EXACT
    assert caches[1].nbytes() < caches[0].nbytes()
    d = naive.n_embd // naive.n_head  # default dims: nope = v = d, rope = d / 2, latent 2 d
    assert naive.cache_bytes_per_token(torch.float64) == 8 * naive.n_head * (d + d // 2 + d)
    assert absorb.cache_bytes_per_token(torch.float64) == 8 * 2 * d


# ------------------------------------------------------------------ MKA and FastMKA state, L3

@pytest.mark.parametrize("backend", BACKENDS)
def test_mka_cache_carries_the_ema_state_of_the_sequence(backend):
    m = make("mka", backend)
    x = hidden(T=9)
    cache = m.new_cache(2, dtype=torch.float64)
    m(x[:, :5], cache)
    m(x[:, 5:6], cache)
    m(x[:, 6:], cache)
    _, k, v = m._project(x)
    for kv, name in ((k, "k"), (v, "v")):
        ema, final = R.ema(kv, m.beta)
        assert rel_err(cache.states[name], final) < EXACT
        # each page's checkpoint: the EMA state before its first token
        states = getattr(cache, f"{name}_page_states")
        S = cache.k_pages.shape[1]
        for b in range(2):
            for i, page in enumerate(cache.parent.table.pages(cache.parent.seqs[b])):
                want = ema[b, i * S - 1] if i else torch.zeros_like(ema[b, 0])
                assert rel_err(states[page], want) < EXACT


@pytest.mark.parametrize("backend", BACKENDS)
def test_fastmka_cache_holds_fused_keys_and_the_running_state(backend):
    m = make("fastmka", backend)
    x = hidden(T=8)
    cache = m.new_cache(2, dtype=torch.float64)
    m(x[:, :3], cache)
    m(x[:, 3:], cache)
    q, k, v = m._project(x)
    lam = m.router(q)
    kf, vf, ks, vs = R.route_fuse(k, v, lam, m.beta)
    table = cache.parent.block_table()
    held_k = torch.stack([R.gather_pages(cache.k_pages, table[b], 8) for b in range(2)])
    held_v = torch.stack([R.gather_pages(cache.v_pages, table[b], 8) for b in range(2)])
    for got, want in ((held_k, kf), (held_v, vf), (cache.states["k"], ks),
                      (cache.states["v"], vs)):
        assert rel_err(got, want) < EXACT


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", ["mka-l3-window", "fastmka-l3-gqa-window"])
def test_recalled_memory_is_used_and_decodes_exactly(variant, backend):
    m = make(variant, backend)
    x = hidden(T=9)
    memory = m.project_memory(hidden(T=5))  # e.g. an older chunk of context, recalled
    assert memory[0].shape == (2, 5, m.n_kv_head, m.head_dim)
    full = m(x, memory=memory)
    assert rel_err(full, m(x)) > 1e-6  # the recalled tokens change the result
    cache = m.new_cache(2, dtype=torch.float64)
    steps = [m(x[:, :4], cache, memory)] + [m(x[:, t:t + 1], cache, memory) for t in range(4, 9)]
    assert rel_err(torch.cat(steps, 1), full) < EXACT


def test_mka_level3_with_no_slots_and_no_recall_is_level1_plus_2():
    """With M = 0 memory tokens O3 = 0 (SPEC): the output is lam0 O1 + lam1 O2."""
    torch.manual_seed(0)
    m = build_attention(config("mka", 2, levels=3, memory_slots=0)).double()
    x = hidden(T=6)
    q, k, v = m._project(x)
    lam = m.router(q)
    o1 = R.attention(q, k, v)
    o2 = R.attention(q, *(R.ema(t, m.beta)[0] for t in (k, v)))
    want = m._output(lam[..., :1, None] * o1 + lam[..., 1:2, None] * o2)
    assert rel_err(m(x), want) < EXACT
