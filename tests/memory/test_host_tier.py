"""The DRAM tier in generation (SPEC §7.3): chunks outside the window move to host memory
and come back when recalled; decoding gives bit for bit what the all-resident cache gives,
pages return to the pool (device memory bounded by the window, not the context), and every
misuse is a clear error."""

import pytest
import torch

from mka.memory import HostTier, LayerSpec, PagedKVCache
from mka.models import GPT, GPTConfig
from mka.nn import MKAAttention
from conftest import rel_err

OPTS = dict(levels=3, recall_chunk=8, recall_top=2, window=8, ema_stride=8)


def _run(m, x, steps, host, *, page_size=4, max_tokens=160, layers=1):
    cache = PagedKVCache([m.cache_spec()] * layers, x.shape[0], max_tokens=max_tokens,
                         page_size=page_size, dtype=x.dtype, host=host)
    outs, t = [], 0
    for n in steps:
        outs.append(m(x[:, t:t + n], cache=cache[0]))
        t += n
    return torch.cat(outs, 1), cache


@pytest.mark.parametrize("score", ["hash", "mean", "bound", "corners"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("top", [2, 100])  # 100: R covers every chunk
def test_spilled_decoding_equals_resident_decoding_bit_for_bit(dtype, top, score):
    torch.manual_seed(0)
    m = MKAAttention(32, 4, 2, **{**OPTS, "recall_top": top, "recall_score": score}).to(dtype)
    x = torch.randn(2, 120, 32, dtype=dtype)
    steps = [5] + [1] * 20 + [13] + [1] * 40 + [16] + [1] * 26  # prefill pieces and decoding
    resident, _ = _run(m, x, steps, None)
    spilled, cache = _run(m, x, steps, HostTier(1 << 20, step_tokens=16))
    assert torch.equal(spilled, resident)
    assert rel_err(resident, m(x)) < (1e-10 if dtype == torch.float64 else 1e-5)
    # everything before the last window's chunk lives on the host, its pages are free
    host_chunks = (120 - 8 + 1) // 8
    assert cache.host_bytes() == 2 * host_chunks * 2 * 8 * (8 + 8) * dtype.itemsize
    row = cache.table.pages(cache.seqs[0])
    assert row[:host_chunks * 2] == [-1] * (host_chunks * 2)
    assert all(p >= 0 for p in row[host_chunks * 2:])


def test_device_pages_stay_bounded_as_the_context_grows():
    torch.manual_seed(1)
    m = MKAAttention(32, 4, 2, **OPTS)
    x = torch.randn(1, 400, 32)
    host = HostTier(1 << 22, step_tokens=8)
    cache = PagedKVCache([m.cache_spec()], 1, max_tokens=400, page_size=4, host=host)
    held = []
    for t in range(0, 400, 8):
        m(x[:, t:t + 8], cache=cache[0])
        held.append(sum(p >= 0 for p in cache.table.pages(cache.seqs[0])))
    # the default pool: the window, two chunks and a step per sequence, whatever the length
    assert cache.table.num_pages == (8 + 16 + 8) // 4 + 1
    assert max(held) <= cache.table.num_pages and held[-1] == held[len(held) // 2]
    page_bytes = m.cache_spec().bytes_per_page(4, torch.float32)
    assert held[-1] * page_bytes < cache.host_bytes() / 10


def test_gpt_generation_with_a_host_tier_equals_resident_generation():
    torch.manual_seed(2)
    cfg = GPTConfig(n_layer=2, n_embd=32, n_head=4, n_kv_head=2, block_size=128, vocab_size=40,
                    attention="mka", attn_options={**OPTS, "recall_chunk": 16, "window": 16})
    model = GPT(cfg).eval()  # its caches' pages hold 16 tokens: chunks of 16
    prompts = [torch.randint(0, 40, (n,)) for n in (50, 37)]  # ragged: one row at a time
    want = model.generate(prompts, 30, greedy=True)
    got = model.generate(prompts, 30, greedy=True, host=HostTier(1 << 20, step_tokens=16))
    assert all(torch.equal(a, b) for a, b in zip(want, got))


def test_misuse_is_a_clear_error():
    plain = MKAAttention(32, 4, 2, levels=3, recall_chunk=8, window=8)  # level 2 reads all
    with pytest.raises(ValueError, match="host: layer 0 reads pages outside its window"):
        PagedKVCache([plain.cache_spec()], 1, max_tokens=64, host=HostTier(1 << 16))
    m = MKAAttention(32, 4, 2, **OPTS)
    with pytest.raises(ValueError, match="multiple of page_size"):
        PagedKVCache([m.cache_spec()], 1, max_tokens=64, page_size=16, host=HostTier(1 << 16))
    with pytest.raises(ValueError, match="budget_bytes"):
        HostTier(0)
    with pytest.raises(ValueError, match="step_tokens"):
        HostTier(1 << 16, step_tokens=0)
    cache = PagedKVCache([m.cache_spec()], 2, max_tokens=128, page_size=4,
                         host=HostTier(1 << 16, step_tokens=8))
    with pytest.raises(ValueError, match="step_tokens = 8"):
        m(torch.randn(2, 9, 32), cache=cache[0])
    x = torch.randn(2, 40, 32)
    for t in range(0, 40, 8):
        m(x[:, t:t + 8], cache=cache[0])
    with pytest.raises(ValueError, match="reorder: a cache with a host tier"):
        cache.reorder([0, 0])
    with pytest.raises(ValueError, match=r"of them in host memory\), cannot keep 3"):
        cache.truncate([3, 40])
    cache.truncate([39, 38])  # the tail, after the spilled chunks: fine
    with pytest.raises(ValueError, match="make_static: the DRAM tier"):
        cache.make_static(64)


@pytest.mark.parametrize("score", ["hash", "mean", "bound", "corners"])
def test_static_cache_with_summaries_and_recall_decodes_like_the_dynamic_one(score):
    """A static cache (what a CUDA graph of a step needs) keeps the summaries and the chunk
    signatures by masked one-token writes at device positions and scores every stored chunk
    with R fixed: the same outputs as the ordinary cache across chunk ends; steps of more
    than one token are refused before anything changes."""
    torch.manual_seed(3)
    m = MKAAttention(32, 4, 2, **OPTS, recall_score=score).double()
    x = torch.randn(2, 70, 32, dtype=torch.float64)
    a, b = (PagedKVCache([m.cache_spec()], 2, max_tokens=80, page_size=4, dtype=x.dtype)
            for _ in range(2))
    m(x[:, :29], cache=a[0])
    m(x[:, :29], cache=b[0])
    b.make_static(70)
    with pytest.raises(ValueError, match="takes steps of one token, got 2"):
        m(x[:, 29:31], cache=b[0])
    for t in range(29, 70):
        want = m(x[:, t:t + 1], cache=a[0])
        got = m(x[:, t:t + 1], cache=b[0])
        b.advance(1)
        assert rel_err(got, want) < 1e-12, t
    for name in ("summary_k", "chunk_signs") + (("chunk_keys",) if score != "hash" else ()):
        assert torch.equal(a[0].states[name], b[0].states[name]), name


def test_a_full_host_store_is_an_error():
    m = MKAAttention(32, 4, 2, **OPTS)
    chunk_bytes = 8 * (8 + 8) * 4
    cache = PagedKVCache([m.cache_spec()], 1, max_tokens=128, page_size=4,
                         host=HostTier(3 * chunk_bytes, step_tokens=8))
    x = torch.randn(1, 64, 32)
    with pytest.raises(ValueError, match="budget"):
        for t in range(0, 64, 8):
            m(x[:, t:t + 8], cache=cache[0])


def test_spillable_spec():
    assert LayerSpec(2, 8, 8, recall_chunk=8, summary_stride=8, window=8).spillable
    assert not LayerSpec(2, 8, 8, recall_chunk=8, summary_stride=8).spillable  # no window
    assert not LayerSpec(2, 8, 8, page_states=True, recall_chunk=8, window=8).spillable
