"""The native PageTable (SPEC §7.1): pages handed out and reused, reference counts,
copy-on-write on a shared page, all-or-nothing errors."""

import pytest
import torch

from mka.memory import PageTable


def test_reserve_allocates_whole_pages_and_free_reuses_them():
    t = PageTable(6, 4, 3)
    a, b = t.add_sequence(), t.add_sequence()
    assert t.reserve([a], [5]) == [] and t.pages(a) == [0, 1] and t.length(a) == 5
    assert t.reserve([a], [3]) == [] and t.length(a) == 5  # never shrinks
    t.reserve([b], [4])
    assert t.pages(b) == [2] and t.num_free_pages == 3
    t.free(a)
    assert t.num_free_pages == 5 and t.num_sequences == 1
    c = t.add_sequence()
    assert c == a  # ids are reused
    t.reserve([c], [8])
    assert sorted(t.pages(c)) == [0, 1]  # the freed pages, most recently freed first


def test_fork_shares_pages_and_a_write_into_a_shared_page_copies_it():
    t = PageTable(8, 4, 4)
    a = t.add_sequence()
    t.reserve([a], [6])  # pages 0 (full), 1 (2 of 4 tokens)
    b = t.fork(a)
    assert t.pages(b) == t.pages(a) and t.refcount(0) == 2 and t.refcount(1) == 2
    copies = t.reserve([b], [7])  # b writes token 6 into shared page 1: copied first
    assert copies == [(1, 2)] and t.pages(b) == [0, 2] and t.pages(a) == [0, 1]
    assert t.refcount(1) == 1 and t.refcount(2) == 1 and t.refcount(0) == 2
    assert t.reserve([a], [8]) == []  # page 1 is a's alone now: written in place
    t.free(a)
    assert t.refcount(0) == 1 and t.refcount(1) == 0


def test_a_full_shared_page_is_never_copied():
    t = PageTable(8, 4, 4)
    a = t.add_sequence()
    t.reserve([a], [8])
    b = t.fork(a)
    assert t.reserve([b], [9]) == []  # the new token starts a fresh page
    assert t.pages(b)[:2] == t.pages(a)


def test_out_of_pages_and_table_overflow_change_nothing():
    t = PageTable(4, 4, 3)
    a, b = t.add_sequence(), t.add_sequence()
    t.reserve([a], [8])
    with pytest.raises(ValueError, match="out of pages: 3 more needed, 2 free of 4"):
        t.reserve([a, b], [12, 8])
    assert t.length(a) == 8 and t.length(b) == 0 and t.num_free_pages == 2
    with pytest.raises(ValueError, match="more than max_pages_per_seq = 3"):
        t.reserve([a], [13])
    with pytest.raises(ValueError, match="sequence 1 is listed twice"):
        t.reserve([b, b], [1, 2])


def test_truncate_releases_empty_pages():
    t = PageTable(4, 4, 4)
    a = t.add_sequence()
    t.reserve([a], [10])
    t.truncate(a, 5)
    assert t.length(a) == 5 and len(t.pages(a)) == 2 and t.num_free_pages == 2
    with pytest.raises(ValueError, match=r"tokens: must be in \[0, 5\]"):
        t.truncate(a, 6)


def test_bad_arguments_raise_naming_them():
    with pytest.raises(ValueError, match="num_pages"):
        PageTable(0, 4, 4)
    with pytest.raises(ValueError, match="page_size"):
        PageTable(4, 0, 4)
    t = PageTable(4, 4, 2)
    with pytest.raises(ValueError, match="seq: 3 is not a live sequence"):
        t.reserve([3], [1])
    a = t.add_sequence()
    t.free(a)
    with pytest.raises(ValueError, match="seq: 0 is not a live sequence"):
        t.free(a)
    with pytest.raises(ValueError, match="page: 9 is out of range"):
        t.refcount(9)


def test_fill_block_table_pads_with_minus_one():
    t = PageTable(8, 2, 3)
    a, b = t.add_sequence(), t.add_sequence()
    t.reserve([a, b], [5, 1])
    out = torch.zeros(2, 3, dtype=torch.int32)
    t.fill_block_table([b, a], out)
    assert out.tolist() == [[3, -1, -1], [0, 1, 2]]
    with pytest.raises(ValueError, match="out: unsupported dtype"):
        t.fill_block_table([a], torch.zeros(1, 3, dtype=torch.int64))


def test_every_sharer_writing_a_page_needs_one_copy_fewer():
    """Two sequences share a partial page and both write into it in one call: the first
    copies, the last writes in place — one free page is enough."""
    t = PageTable(3, 4, 2)
    a = t.add_sequence()
    t.reserve([a], [6])  # pages 0, 1 (1 half full)
    b = t.fork(a)
    assert t.num_free_pages == 1
    copies = t.reserve([a, b], [7, 7])
    assert len(copies) == 1 and t.num_free_pages == 0
    assert t.pages(a)[1] != t.pages(b)[1]


def test_block_table_rows_narrower_than_the_table_and_huge_counts_raise():
    t = PageTable(4, 2, 3)
    a = t.add_sequence()
    base = torch.zeros(30, dtype=torch.int32)
    with pytest.raises(ValueError, match="cannot hold max_pages_per_seq = 3"):
        t.fill_block_table([a], base[15:].as_strided((1, 2), (12, 1)))
    assert not base.any()
    with pytest.raises(ValueError, match="more than max_pages_per_seq"):
        t.reserve([a], [2**63 - 1])
    assert t.length(a) == 0


def test_paged_cache_truncate_keeps_a_prefix_in_every_layer():
    from mka.memory import LayerSpec, PagedKVCache
    c = PagedKVCache([LayerSpec(1, 4, 4)] * 2, 2, max_tokens=16, page_size=4)
    c[0].step([9, 5])
    c[1].step([9, 5])
    free = c.table.num_free_pages
    c.truncate([3, 5])
    assert c[0].lengths == c[1].lengths == [3, 5] and c.table.num_free_pages == free + 2
    fresh = torch.empty_like(c.block_table())
    c.table.fill_block_table(c.seqs, fresh)
    assert torch.equal(c.block_table(), fresh) and (fresh[0, 1:] == -1).all()
    with pytest.raises(ValueError, match="lengths: expected one per sequence"):
        c.truncate([1])
    with pytest.raises(ValueError, match="lengths: sequence 0 holds 3 tokens, cannot keep 4"):
        c.truncate([4, 5])
    with pytest.raises(ValueError, match="lengths: sequence 1 holds 5 tokens, cannot keep 6"):
        c.truncate([2, 6])
    assert c[0].lengths == [3, 5]  # nothing changed


def test_tables_a_cache_made_are_known_until_they_die():
    """CUDA writes skip the host check (and its synchronisation) only for the block table and
    lengths a cache made from its page table; the mark goes with the tensor."""
    import gc

    from mka.memory import LayerSpec, PagedKVCache, torch_paged as O  # the registry's home
    cache = PagedKVCache([LayerSpec(2, 8, 8)], batch_size=2, max_tokens=64, page_size=4)
    step = cache[0].step(3)
    assert O._pool_made(step.block_table) and O._pool_made(step.cache_seqlens)
    assert not O._pool_made(step.block_table.clone())
    key = step.block_table.untyped_storage().data_ptr()
    del cache, step
    gc.collect()
    assert key not in O._POOL_MADE


def test_lone_layer_is_taken_once_and_only_from_one_layer():
    from mka.memory import LayerSpec, PagedKVCache
    with pytest.raises(ValueError, match="lone_layer: the cache has 2 layers, not 1"):
        PagedKVCache([LayerSpec(1, 4, 4)] * 2, 1, max_tokens=8, page_size=4).lone_layer()
    cache = PagedKVCache([LayerSpec(1, 4, 4)], 1, max_tokens=8, page_size=4)
    layer = cache.lone_layer()
    assert layer.owner is cache and cache[0].index == layer.index == 0
    with pytest.raises(ValueError, match="lone_layer: the cache's layer was taken already"):
        cache.lone_layer()
