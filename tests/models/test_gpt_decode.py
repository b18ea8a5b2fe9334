"""The GPT model per attention variant (float64): causal logits, cached decoding equal to
one full forward, the loss's ignore_index, generate() with and without the cache, and the
cache bytes it reports."""

import pytest
import torch
import torch.nn.functional as F

from conftest import rel_err
from gpt_cases import tiny_model, variant_params

EXACT = 1e-10  # SPEC §5, float64
V = 19


def _tokens(B=2, T=16):
    return torch.randint(0, V, (B, T))


@pytest.mark.parametrize("variant", variant_params())
def test_logits_are_causal(variant):
    m = tiny_model(variant)
    idx = _tokens()
    changed = idx.clone()
    changed[:, 9:] = (changed[:, 9:] + 1 + torch.randint(0, V - 1, changed[:, 9:].shape)) % V
    a, b = m(idx)[0], m(changed)[0]
    assert rel_err(b[:, :9], a[:, :9]) < EXACT
    assert rel_err(b[:, 9:], a[:, 9:]) > 1e-6


@pytest.mark.parametrize("backend", ["mka", "torch"])
@pytest.mark.parametrize("variant", variant_params())
def test_prefill_decode_and_chunked_prefill_equal_one_pass(variant, backend):
    m = tiny_model(variant, backend)
    idx = _tokens(T=14)
    full, _ = m(idx)
    caches = m.new_caches(2)
    decoded = [m(idx[:, :6], caches=caches)[0]]
    decoded += [m(idx[:, t:t + 1], caches=caches)[0] for t in range(6, 14)]
    assert rel_err(torch.cat(decoded, 1), full) < EXACT
    caches = m.new_caches(2)
    chunks = [m(idx[:, a:b], caches=caches)[0] for a, b in ((0, 5), (5, 11), (11, 14))]
    assert rel_err(torch.cat(chunks, 1), full) < EXACT


@pytest.mark.parametrize("backend", ["mka", "torch"])
@pytest.mark.parametrize("variant", variant_params())
def test_inference_path_with_fused_norms_equals_the_blocks(variant, backend):
    """Without gradients an eval model runs its residual adds fused with the next LayerNorm
    (mka.layers.add_layer_norm): the same logits as the blocks, in one pass and decoding."""
    m = tiny_model(variant, backend)
    idx = _tokens(T=14)
    full, _ = m(idx)  # gradients enabled: the blocks as written
    with torch.no_grad():
        assert rel_err(m(idx)[0], full) < EXACT
        caches = m.new_caches(2)
        decoded = [m(idx[:, :6], caches=caches)[0]]
        decoded += [m(idx[:, t:t + 1], caches=caches)[0] for t in range(6, 14)]
    assert rel_err(torch.cat(decoded, 1), full) < EXACT


@pytest.mark.parametrize("variant", variant_params())
def test_cache_bytes_per_token_match_the_caches(variant):
    m = tiny_model(variant)
    caches = m.new_caches(3)
    m(_tokens(3, 10), caches=caches)
    dt = torch.float64
    S = caches.page_size
    per_page = sum(layer.spec.bytes_per_page(S, dt) for layer in caches)
    assert caches.nbytes() == sum(c.nbytes() for c in caches)
    assert caches.nbytes() == caches.table.num_pages * per_page + 3 * m.kv_cache_state_bytes(dt)
    assert caches.used_bytes() == 3 * (-(-10 // S) * per_page + m.kv_cache_state_bytes(dt))
    assert per_page >= S * m.kv_cache_bytes_per_token(dt)


def test_loss_is_mean_cross_entropy_ignoring_minus_one():
    m = tiny_model("mka")
    idx, targets = _tokens(), _tokens()
    targets[0, :5] = -1
    logits, loss = m(idx, targets)
    keep = targets != -1
    want = F.cross_entropy(logits[keep], targets[keep])
    assert abs(loss.item() - want.item()) < 1e-12
    assert m(idx)[1] is None


def _generate_without_cache(m, idx, n, greedy):
    for _ in range(n):
        logits, _ = m(idx[:, -m.config.block_size:])
        idx = torch.cat((idx, m._pick(logits[:, -1], 1.0, None, greedy)), 1)
    return idx


@pytest.mark.parametrize("greedy", [True, False], ids=["greedy", "sampled"])
@pytest.mark.parametrize("variant", variant_params())
def test_generate_with_cache_equals_full_recompute(variant, greedy):
    """Same tokens as recomputing every step without a cache (sampling: same RNG draws),
    running past block_size, where the context slides."""
    m = tiny_model(variant, block_size=12)
    prompt = _tokens(2, 5)
    torch.manual_seed(7)
    out = m.generate(prompt, 16, greedy=greedy)
    torch.manual_seed(7)
    want = _generate_without_cache(m, prompt, 16, greedy)
    assert out.shape == (2, 21) and torch.equal(out[:, :5], prompt)
    assert torch.equal(out, want)
    if not greedy:
        assert len(out[:, 5:].unique()) > 3  # sampling, not a collapsed sequence


@pytest.mark.parametrize("backend", ["mka", "torch"])
@pytest.mark.parametrize("variant", variant_params())
def test_prompts_of_different_lengths_decode_together(variant, backend):
    """A list of prompts of different lengths: prefilled one at a time into one paged cache,
    then decoded in one batch, each sequence at its own position — the same tokens as
    generating each prompt alone (greedy), past block_size too; on both backends (the torch
    backend's causal steps through the cache's own lengths zero no rows: each sees itself)."""
    m = tiny_model(variant, backend, block_size=12)
    prompts = [torch.randint(0, V, (n,)) for n in (3, 7, 1)]
    out = m.generate(prompts, 10, greedy=True)
    for p, o in zip(prompts, out):
        assert torch.equal(o, m.generate(p[None], 10, greedy=True)[0])


@pytest.mark.parametrize("variant", variant_params())
def test_dropped_caches_free_their_pages_at_once(variant):
    """No reference cycle holds a PagedKVCache (its page pools) after its last reference
    goes, also after a forward and a row selection: freed without a garbage collection."""
    import gc
    import weakref
    m = tiny_model(variant)
    enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        caches = m.new_caches(2)
        m(_tokens(2, 5), caches=caches)
        with caches.select([1]) as one:
            m(_tokens(1, 1), caches=one)
        pages = weakref.ref(caches[0].k_pages)
        cache = weakref.ref(caches)
        del caches, one
        assert cache() is None and pages() is None
    finally:
        if enabled:
            gc.enable()


@pytest.mark.parametrize("variant", variant_params())
def test_select_extends_only_the_chosen_rows(variant):
    """cache.select(rows): a forward on a row subset equals the batched forward for those
    rows, and leaves the other rows' lengths, states and pages alone."""
    m = tiny_model(variant)
    idx = _tokens(3, 6)
    batched = m.new_caches(3)
    want = m(idx, caches=batched)[0]
    caches = m.new_caches(3)
    for b in (2, 0, 1):
        with caches.select([b]) as one:
            got = m(idx[b:b + 1], caches=one)[0]
        assert rel_err(got, want[b:b + 1]) < EXACT
        assert caches[0].lengths[b] == 6
    nxt = _tokens(3, 1)
    assert rel_err(m(nxt, caches=caches)[0], m(nxt, caches=batched)[0]) < EXACT
    with pytest.raises(ValueError, match="rows: expected distinct indices"):
        with caches.select([1, 1]):
            pass


def test_sampling_respects_top_k_and_temperature():
    m = tiny_model("fastmka")
    prompt = _tokens(2, 4)
    assert torch.equal(m.generate(prompt, 8, top_k=1), m.generate(prompt, 8, greedy=True))
    out = m.generate(prompt, 10, temperature=0.7, top_k=3)
    logits, _ = m(out[:, :-1])
    top3 = logits[:, 3:].topk(3, -1).indices
    assert (top3 == out[:, 4:, None]).any(-1).all()
    with pytest.raises(ValueError, match="temperature"):
        m.generate(prompt, 2, temperature=0.0)


def test_level3_memory_per_layer():
    m = tiny_model("mka-l3-window")
    idx = _tokens(2, 8)
    recalled = [b.attn.project_memory(torch.randn(2, 3, 32, dtype=torch.float64))
                for b in m.blocks]
    full, _ = m(idx, memory=recalled)
    assert rel_err(full, m(idx)[0]) > 1e-6
    caches = m.new_caches(2)
    parts = [m(idx[:, :5], caches=caches, memory=recalled)[0],
             m(idx[:, 5:], caches=caches, memory=recalled)[0]]
    assert rel_err(torch.cat(parts, 1), full) < EXACT


def test_bad_forward_inputs():
    m = tiny_model("mha")
    with pytest.raises(ValueError, match="idx: expected token ids"):
        m(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="beyond block_size 24"):
        m(_tokens(1, 25))
    caches = m.new_caches(1)
    m(_tokens(1, 20), caches=caches)
    with pytest.raises(ValueError, match="reaches position 25"):
        m(_tokens(1, 5), caches=caches)
    with pytest.raises(ValueError, match="caches: expected one per layer"):
        m(_tokens(1, 2), caches=caches[:1])


@pytest.mark.parametrize("variant", variant_params())
def test_static_cache_decodes_like_the_dynamic_one(variant):
    """make_static: pages reserved up front, lengths and positions in device tensors moved
    in place, states written in place (what a CUDA graph of the step needs) — the same logits
    as the ordinary cache, step after step."""
    m = tiny_model(variant, block_size=16)
    idx = _tokens(2, 12)
    a, b = m.new_caches(2), m.new_caches(2)
    m(idx[:, :5], caches=a)
    m(idx[:, :5], caches=b)
    b.make_static(12)
    table = b.block_table()
    states = {n: s.data_ptr() for layer in b for n, s in layer.states.items()}
    for t in range(5, 12):
        want = m(idx[:, t:t + 1], caches=a)[0]
        got = m(idx[:, t:t + 1], caches=b)[0]
        assert rel_err(got, want) < EXACT
    assert b.block_table() is table and b[0].lengths == [12, 12]
    assert states == {n: s.data_ptr() for layer in b for n, s in layer.states.items()}
    with pytest.raises(ValueError, match="beyond the 12 made static"):
        m(idx[:, :1], caches=b)
    with pytest.raises(ValueError, match="a static cache keeps its rows"):
        b.reorder([0, 0])


def test_host_counts_kept_undoes_a_blocks_length_changes():
    """What a graph capture relies on: the host lengths a step moved inside the block are
    put back at its end, also when the block raises; the device lengths are the block's."""
    m = tiny_model("mha", block_size=16)
    idx = _tokens(2, 8)
    caches = m.new_caches(2)
    m(idx[:, :5], caches=caches)
    caches.make_static(12)
    with caches.host_counts_kept():
        caches.advance(1)
        assert caches[0].lengths == [6, 6]
    assert caches[0].lengths == [5, 5] and caches._static_before.tolist() == [6, 6]
    with pytest.raises(RuntimeError, match="boom"):
        with caches.host_counts_kept():
            caches.advance(2, host_only=True)
            raise RuntimeError("boom")
    assert all(layer.lengths == [5, 5] for layer in caches)


def test_block_table_rows_are_refreshed_in_place():
    """As sequences take pages the device table keeps its storage and only their rows change;
    it always equals a fresh fill of the page table."""
    m = tiny_model("mha", block_size=40)
    caches = m.new_caches(3, page_size=4)
    for b, n in enumerate((5, 9, 2)):
        with caches.select([b]) as one:
            m(_tokens(1, n), caches=one)
    table = caches.block_table()
    for _ in range(12):
        m(_tokens(3, 1), caches=caches)
        assert caches.block_table().data_ptr() == table.data_ptr()
        fresh = torch.empty_like(table)
        caches.table.fill_block_table(caches.seqs, fresh)
        assert torch.equal(caches.block_table(), fresh)


def test_cuda_graph_generation_refuses_what_cannot_be_captured():
    m = tiny_model("mha", block_size=16)
    with pytest.raises(ValueError, match="cuda_graph: needs a CUDA cache"):
        m.generate(_tokens(1, 3), 4, greedy=True, cuda_graph=True)
    from mka.memory import HostTier
    with pytest.raises(ValueError, match="cuda_graph: the DRAM tier"):
        m.generate(_tokens(1, 3), 4, greedy=True, cuda_graph=True, host=HostTier(1 << 20))
    assert m.generate(_tokens(1, 3), 1, greedy=True, cuda_graph=True).shape == (1, 4)


def test_inference_path_keeps_hooks_and_replaced_layers():
    """The fused inference path reads parameters only of plain nn.Linear / nn.LayerNorm
    layers: a forward hook on a projection still fires, and a replaced LayerNorm or a
    hooked one sends the model through its blocks as written."""
    m = tiny_model("mha")
    idx = _tokens()
    full, _ = m(idx)
    seen = []
    h = m.blocks[0].attn.qkv.register_forward_hook(lambda mod, i, o: seen.append(o.shape))
    with torch.no_grad():
        out = m(idx)[0]
    h.remove()
    assert seen and rel_err(out, full) < EXACT
    scaled = []
    h = m.blocks[1].ln_2.register_forward_hook(lambda mod, i, o: scaled.append(1) or o * 2)
    with torch.no_grad():
        hooked = m(idx)[0]
    with torch.enable_grad():
        ref = m(idx)[0]
    h.remove()
    assert len(scaled) == 2 and rel_err(hooked, ref) < EXACT and rel_err(hooked, full) > 1e-6
