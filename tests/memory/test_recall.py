"""Level 3 by recall (SPEC §7.2): selection equals a brute-force reference, outputs and
gradients equal the float64 reference (GQA, windows, chunk edges, R above the chunks there
are, no chunk yet, fewer queries than keys), recall is causal per token, deterministic per
seed, and MKA/FastMKA train with it on both backends."""

import math

import pytest
import torch

from mka import reference as R
from mka.memory.recall import Recall, recall_attention, select, simhash_planes
from mka.models import GPT, GPTConfig
from conftest import rel_err

CASES = [  # B, Tq, Tk, H, G, d, chunk, top, window
    (2, 150, 150, 4, 2, 16, 16, 3, 40),
    (1, 100, 100, 2, 1, 8, 16, 10, None),  # R above the chunks there are
    (2, 70, 70, 4, 4, 8, 16, 2, 1),
    (1, 5, 90, 4, 2, 8, 8, 3, 20),         # a few new queries after a cache
    (2, 12, 12, 2, 1, 8, 16, 4, None),     # no whole chunk yet: O3 = 0
]


@pytest.mark.parametrize("score", ["hash", "mean", "bound", "corners"])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_recall_equals_the_reference(case, score):
    B, Tq, Tk, H, G, d, C, top, W = case
    torch.manual_seed(Tq)
    q = torch.randn(B, Tq, H, d, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(B, Tk, G, d, dtype=torch.float64, requires_grad=True) for _ in range(2))
    planes = simhash_planes(d, 4, 16, seed=3)
    out, chosen = recall_attention(q, k, v, chunk=C, top=top, planes=planes, window=W,
                                   score=score)
    ref, ref_chosen = R.recall_attention(q, k, v, chunk=C, top=top, planes=planes, window=W,
                                         score=score)
    assert torch.equal(chosen, ref_chosen)
    assert rel_err(out, ref) < 1e-10
    if not ref.requires_grad or not ref.abs().sum():
        assert not out.abs().sum()
        return
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(ref, (q, k, v), g)):
        assert rel_err(a, b) < 1e-10


def test_exact_ties_go_to_the_later_chunk_however_many_are_scored():
    """Equal scores (zero keys): the latest eligible chunks, as the reference picks them, and
    the same when a cached step scores fewer chunks than a full pass."""
    B, T, H, G, d, C = 1, 96, 2, 1, 8, 8
    q = torch.randn(B, T, H, d, dtype=torch.float64)
    k = torch.zeros(B, T, G, d, dtype=torch.float64)
    planes = simhash_planes(d)
    _, chosen = recall_attention(q, k, k, chunk=C, top=3, planes=planes, window=16, score="mean")
    _, ref = R.recall_attention(q, k, k, chunk=C, top=3, planes=planes, window=16, score="mean")
    assert torch.equal(chosen, ref)
    last = chosen[0, -1, 0].tolist()
    assert last == [9, 8, 7]  # row 95: chunks 0..9 eligible
    q_rep, k_rep = torch.randn(1, 1, 1, d), torch.zeros(1, 64, 1, d)  # every score 0
    for scored in (10, 11, 20, 64):  # a cached step scores only the chunks its rows may see
        got = select(q_rep, k_rep[:, :scored], torch.tensor([10]), 4)
        assert got[0, 0, 0].tolist() == [9, 8, 7, 6]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_selection_never_returns_an_ineligible_chunk(dtype):
    """Scores of -inf (infinite mean keys) on eligible chunks: the chosen are still eligible
    ones, in both selection paths (float32 keys, float64 sort)."""
    q_rep = torch.ones(1, 1, 1, 4, dtype=dtype)
    k_rep = torch.zeros(1, 8, 1, 4, dtype=dtype)
    k_rep[:, :3] = -math.inf  # the three eligible chunks score -inf, the others 0
    got = select(q_rep, k_rep, torch.tensor([3]), 3)
    assert sorted(got[0, 0, 0].tolist()) == [0, 1, 2]


@pytest.mark.parametrize("score", ["hash", "mean", "bound", "corners"])
def test_selection_ignores_autocast(score):
    """Signatures and scores in float32 under bf16 autocast: the choice of float32 inputs."""
    torch.manual_seed(4)
    q, k = torch.randn(2, 200, 4, 16), torch.randn(2, 200, 2, 16)
    planes = simhash_planes(16)
    _, want = recall_attention(q, k, k, chunk=8, top=4, planes=planes, window=16, score=score)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, got = recall_attention(q, k, k, chunk=8, top=4, planes=planes, window=16, score=score)
    assert torch.equal(got, want)


def test_selection_only_sees_chunks_before_the_window_and_is_per_token():
    """Row i recalls only chunks ending before its window; changing later tokens changes
    nothing at earlier rows (no block of queries steers another row's choice)."""
    torch.manual_seed(0)
    B, T, H, G, d, C, W = 1, 96, 2, 1, 8, 8, 17
    q, k, v = torch.randn(B, T, H, d), torch.randn(B, T, G, d), torch.randn(B, T, G, d)
    planes = simhash_planes(d)
    out, chosen = recall_attention(q, k, v, chunk=C, top=3, planes=planes, window=W)
    for i in range(T):
        for c in chosen[0, i, 0].tolist():
            if c >= 0:
                assert (c + 1) * C <= i - W + 1
    q2, k2, v2 = q.clone(), k.clone(), v.clone()
    for t in (q2, k2, v2):
        t[:, 60:] = torch.randn_like(t[:, 60:])
    out2, chosen2 = recall_attention(q2, k2, v2, chunk=C, top=3, planes=planes, window=W)
    assert torch.equal(chosen2[:, :60], chosen[:, :60])
    assert rel_err(out2[:, :60], out[:, :60]) < 1e-6


def test_recall_is_deterministic_per_seed_and_saved_with_the_model():
    a, b = Recall(16, chunk=8, seed=0), Recall(16, chunk=8, seed=0)
    assert torch.equal(a.planes, b.planes)
    assert not torch.equal(a.planes, Recall(16, chunk=8, seed=1).planes)
    assert "planes" in a.state_dict()
    with pytest.raises(ValueError, match="recall_chunk: must be a positive integer"):
        Recall(16, chunk=0)


def _gpt(attention, backend, **options):
    torch.manual_seed(0)
    cfg = GPTConfig(n_layer=2, n_embd=32, n_head=4, block_size=128, vocab_size=23,
                    attention=attention, attn_backend=backend,
                    attn_options={"levels": 3, "recall_chunk": 8, "recall_top": 2, "window": 16,
                                  **options})
    return GPT(cfg).double()


@pytest.mark.parametrize("attention", ["mka", "fastmka"])
def test_models_train_with_recall_on_both_backends(attention):
    idx = torch.randint(0, 23, (2, 100))
    native, torch_ = _gpt(attention, "mka"), _gpt(attention, "torch")
    torch_.load_state_dict(native.state_dict())
    (a, la), (b, lb) = native(idx, idx), torch_(idx, idx)
    assert rel_err(a, b) < 1e-10
    la.backward()
    router = native.blocks[0].attn.router
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in router.parameters())
    changed = idx.clone()
    changed[:, 70:] = (changed[:, 70:] + 1) % 23
    assert rel_err(native(changed)[0][:, :70], a[:, :70]) < 1e-10  # causal


def test_recall_options_are_checked():
    with pytest.raises(ValueError, match="recall_score: expected one of"):
        _gpt("mka", "mka", recall_score="exact")
    with pytest.raises(ValueError, match="recall_chunk: recall is level 3"):
        GPT(GPTConfig(n_layer=1, n_embd=32, n_head=4, vocab_size=11, attention="mka",
                      attn_options={"recall_chunk": 8}))
    m = _gpt("fastmka", "mka")
    with pytest.raises(ValueError, match="cache: FastMKAAttention has no cached decoding"):
        m(torch.randint(0, 23, (1, 4)), caches=m.new_caches(1))


@pytest.mark.parametrize("score", ["hash", "mean", "bound", "corners"])
@pytest.mark.parametrize("backend", ["mka", "torch"])
def test_mka_with_recall_decodes_as_one_full_pass(backend, score):
    """Prefill, a chunk, then token by token over the paged cache: the chunk signatures (and
    exact keys) kept in the cache and the recalled tokens read from the pages give the full
    forward's logits."""
    m = _gpt("mka", backend, recall_score=score)
    idx = torch.randint(0, 23, (2, 90))
    full = m(idx)[0]
    caches = m.new_caches(2, page_size=4)
    steps = [m(idx[:, :37], caches=caches)[0], m(idx[:, 37:60], caches=caches)[0]]
    steps += [m(idx[:, t:t + 1], caches=caches)[0] for t in range(60, 90)]
    assert rel_err(torch.cat(steps, 1), full) < 1e-10
    held = caches[0].states["chunk_signs"]
    assert held.shape == (2, 128 // 8, 4, 64)  # one signature per whole chunk, up to block_size
    means = caches[0].states.get("chunk_keys")
    assert (means is not None) == (score != "hash")
    if means is not None:  # the exact ranking's mean (max and min) keys, beside the signatures
        width = 16 if score in ("bound", "corners") else 8
        assert means.shape == (2, 128 // 8, 4, width) and means[:, :90 // 8].abs().sum() > 0


def test_prompts_of_different_lengths_generate_with_recall():
    m = _gpt("mka", "mka")
    prompts = [torch.randint(0, 23, (n,)) for n in (40, 13)]
    out = m.generate(prompts, 12, greedy=True)
    for p, o in zip(prompts, out):
        assert torch.equal(o, m.generate(p[None], 12, greedy=True)[0])


@pytest.mark.parametrize("rows_per_block", [None, 1, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_direct_page_gather_equals_the_distinct_chunk_path(dtype, rows_per_block, monkeypatch):
    """Decoding's gather of each row's chunks (no host read of the choice) and prefill's
    distinct chunks give the same O3: GQA, several rows, -1 padding, a chunk chosen by
    several rows, pages out of order; also with the rows gathered in blocks (a budget of
    gathered bytes for 1 or 4 rows: blocks across sequences, a short last one)."""
    from mka.memory import recall as RC
    if rows_per_block is not None:
        per_row = 3 * 4 * 2 * (8 + 8) * dtype.itemsize  # R C G (dk + dv) bytes
        monkeypatch.setattr(RC, "GATHER_BYTES", rows_per_block * per_row)
    gen = torch.Generator().manual_seed(5)
    B, T, H, G, d, C, S, R = 2, 3, 4, 2, 8, 4, 2, 3
    pages = 40
    kp = torch.randn(pages, S, G, d, generator=gen, dtype=dtype)
    vp = torch.randn(pages, S, G, d, generator=gen, dtype=dtype)
    table = torch.stack([torch.randperm(pages, generator=gen)[:16] for _ in range(B)]).int()
    q = torch.randn(B, T, H, d, generator=gen, dtype=dtype)
    chosen = torch.randint(0, 6, (B, T, G, R), generator=gen)
    chosen[0, 1, 1, 2] = -1
    chosen[1, 2, :, 1:] = -1
    direct = RC._attend_chosen_pages(q, kp, vp, table, chosen, C, 0.3)
    dist = RC.distinct_chunks(chosen, G, 8)
    keys, vals = RC.page_chunks(kp, vp, table, dist, C)
    composite = RC.attend_distinct(q, keys, vals, chosen, dist, C, 0.3)
    assert rel_err(direct, composite) < (1e-12 if dtype == torch.float64 else 1e-5)


def test_corner_score_is_the_mean_over_the_key_box_corners():
    """``score="corners"``: per query head the log of the mean of ``exp(scale q.k)`` over all
    ``2^d`` corners of a chunk's min/max key box (enumerated here), the group's heads summed
    as masses; in blocks of rows it is the same."""
    import itertools
    import mka.memory.recall as rc
    B, T, G, x, d, nC, scale = 2, 5, 2, 3, 4, 6, 0.7
    q = torch.randn(B, T, G, x, d, dtype=torch.float64)
    keys = torch.randn(B, nC, 8, G, d, dtype=torch.float64)
    hi, lo = keys.amax(2), keys.amin(2)
    got = rc.corner_scores(q, torch.cat((hi, lo), -1), scale)
    want = torch.empty(B, T, G, nC, dtype=torch.float64)
    for b, t, g, c in itertools.product(range(B), range(T), range(G), range(nC)):
        corners = torch.stack([torch.where(torch.tensor(bits, dtype=torch.bool), hi[b, c, g],
                                           lo[b, c, g])
                               for bits in itertools.product((0, 1), repeat=d)])  # (2^d, d)
        logits = scale * q[b, t, g] @ corners.t()  # (x, 2^d)
        per_head = torch.logsumexp(logits, -1) - d * math.log(2)
        want[b, t, g, c] = torch.logsumexp(per_head, 0) + d * math.log(2)  # without -d log 2
    assert torch.allclose(got, want, rtol=0, atol=1e-12)
    blocks = rc.CORNER_ELEMENTS
    try:
        rc.CORNER_ELEMENTS = G * x * nC * d * B * 2  # two rows a block
        assert torch.equal(rc.corner_scores(q, torch.cat((hi, lo), -1), scale), got)
        seen = torch.tensor([0, 1, 1, 3, 6])  # each row's eligible chunks: only those scored
        part = rc.corner_scores(q, torch.cat((hi, lo), -1), scale, seen)
        for t, n in enumerate(seen.tolist()):
            assert torch.equal(part[:, t, :, :n], got[:, t, :, :n])
    finally:
        rc.CORNER_ELEMENTS = blocks


@pytest.mark.parametrize("score", ["mean", "bound", "corners"])
def test_a_cache_keeps_the_extremes_in_the_keys_dtype_and_counts_them(score):
    """Max and min keys are stored keys: a bf16 cache keeps them in bf16 (nothing lost); the
    mean key stays in the state dtype. ``cache_state_bytes`` counts what is held."""
    from mka.nn import MKAAttention
    m = MKAAttention(32, 4, 2, levels=3, recall_chunk=4, recall_top=2, window=8,
                     recall_score=score).to(torch.bfloat16)
    B = 2
    cache = m.new_cache(B, dtype=torch.bfloat16, max_tokens=16, page_size=4)
    m(torch.randn(B, 9, 32, dtype=torch.bfloat16), cache)
    kept = cache.states["chunk_keys"]
    assert kept.dtype == (torch.float32 if score == "mean" else torch.bfloat16)
    assert sum(t.numel() * t.element_size() for t in cache.states.values()) \
        == B * m.cache_state_bytes(torch.bfloat16, 16)
    if score != "mean":  # chunk 0's max and min keys, exactly as the pages hold its keys
        keys = cache.k_pages[cache.parent.block_table()[:, 0].long()]  # (B, 4, G, d)
        assert torch.equal(kept[:, 0], torch.cat((keys.amax(1), keys.amin(1)), -1))


def test_a_cached_step_chooses_by_corners_per_sequence_at_its_scale(monkeypatch):
    """``choose_for_step`` with ``score="corners"``: sequences at different positions (eligible
    counts per sequence and row) in blocks of rows choose as each does alone, and as the
    corner scores at the given scale rank the eligible chunks."""
    import mka.memory.recall as rc
    monkeypatch.setattr(rc, "CORNER_ROWS", 3)
    torch.manual_seed(5)
    B, T, H, G, d, C, top, W, scale = 2, 7, 4, 2, 8, 4, 3, 4, 0.3
    keys = torch.randn(B, 64, G, d, dtype=torch.float64)
    exact = rc.chunk_keys(keys, C, "corners")  # (B, 16, G, 2d)
    signs = rc.signatures(rc.chunk_means(keys, C), rc.simhash_planes(d)).to(torch.int8)
    q = torch.randn(B, T, H, d, dtype=torch.float64)
    before = [5, 40]
    kw = dict(chunk=C, top=top, planes=rc.simhash_planes(d), window=W, score="corners",
              scale=scale)
    chosen, _ = rc.choose_for_step(q, signs, before, exact=exact, **kw)
    for b in range(B):
        alone, _ = rc.choose_for_step(q[b:b + 1], signs[b:b + 1], [before[b]],
                                      exact=exact[b:b + 1], **kw)
        assert torch.equal(chosen[b:b + 1, :, :, :alone.shape[-1]], alone)
        scores = rc.corner_scores(q[b:b + 1].reshape(1, T, G, H // G, d), exact[b:b + 1], scale)
        for t in range(T):
            n = int(rc.eligible(1, before[b] + t + 1, C, W)[0])
            want = scores[0, t, :, :n].argsort(-1, descending=True)[:, :top]
            assert torch.equal(chosen[b, t, :, :want.shape[-1]], want)
    with pytest.raises(ValueError, match="does not serve recall_score='corners'"):
        rc.choose_for_step(q, signs, before, exact=exact[..., :d], **kw)
