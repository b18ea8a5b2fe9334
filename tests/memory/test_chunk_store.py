"""The DRAM tier's ChunkStore (SPEC §7.2): stored bytes come back exactly, the byte budget is
enforced (an error, or the oldest chunk evicted), selection by signature agreement equals
recall's, and insertion and selection can run from several threads at once."""

import threading

import pytest
import torch

from mka import _C
from mka.memory.recall import pack_signatures, select, signatures, simhash_planes


def _store(chunks=8, **kw):
    return _C.ChunkStore(chunk_bytes=256, kv_heads=2, signature_bits=96,
                         budget_bytes=256 * chunks, **kw)


def _sig(g=2, words=2, seed=0):
    return torch.randint(-2**62, 2**62, (g, words), generator=torch.Generator().manual_seed(seed))


def test_round_trip_is_bitwise():
    s = _store()
    payload = torch.randint(0, 256, (256,), dtype=torch.uint8)
    payload[:4] = torch.tensor([0x7F, 0xC0, 0x00, 0x01], dtype=torch.uint8)  # a NaN's bytes
    s.insert(3, 5, payload, _sig())
    out = torch.empty(256, dtype=torch.uint8)
    s.read(3, 5, out)
    assert torch.equal(out, payload) and s.contains(3, 5) and s.size == 1
    halves = torch.randn(64, dtype=torch.float32)  # any dtype: its bytes
    s.insert(3, 6, halves, _sig())
    back = torch.empty(64, dtype=torch.float32)
    s.read(3, 6, back)
    assert torch.equal(back.view(torch.int32), halves.view(torch.int32))


def test_batched_insert_and_read_equal_one_at_a_time():
    s, one = _store(), _store()
    payloads = torch.randint(0, 256, (3, 256), dtype=torch.uint8)
    sigs = torch.stack([_sig(seed=i) for i in range(3)])
    seqs, idx = torch.tensor([4, 4, 9]), torch.tensor([0, 1, 0])
    s.insert_many(seqs, idx, payloads, sigs)
    for i in range(3):
        one.insert(int(seqs[i]), int(idx[i]), payloads[i], sigs[i])
    out = torch.empty(3, 256, dtype=torch.uint8)
    s.read_many(torch.tensor([9, 4, 4]), torch.tensor([0, 1, 0]), out)
    assert torch.equal(out, payloads[[2, 1, 0]])
    query = _sig(seed=7)
    a, b = torch.empty(2, 2, dtype=torch.int64), torch.empty(2, 2, dtype=torch.int64)
    s.select(4, 2, query, 2, a)
    one.select(4, 2, query, 2, b)
    assert torch.equal(a, b)  # the same signatures stored
    s.read_many(torch.tensor([], dtype=torch.int64), torch.tensor([], dtype=torch.int64),
                torch.empty(0, 256, dtype=torch.uint8))  # nothing to read


def test_batched_calls_check_their_arguments():
    s = _store(chunks=2)
    two = torch.zeros(2, 256, dtype=torch.uint8)
    with pytest.raises(ValueError, match="indices: expected 2 entries"):
        s.insert_many(torch.tensor([0, 0]), torch.tensor([0]), two, torch.zeros(2, 2, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match="payloads: expected 2 x 256"):
        s.insert_many(torch.tensor([0, 0]), torch.tensor([0, 1]), two[:, :128], torch.zeros(2, 2, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match="signatures: expected 2 x 2 x 2"):
        s.insert_many(torch.tensor([0, 0]), torch.tensor([0, 1]), two, torch.zeros(2, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match="indices: must be >= 0"):
        s.insert_many(torch.tensor([0]), torch.tensor([-1]), two[:1], torch.zeros(1, 2, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match="chunk store: full"):
        s.insert_many(torch.tensor([0, 0, 0]), torch.tensor([0, 1, 2]), torch.zeros(3, 256, dtype=torch.uint8),
                      torch.zeros(3, 2, 2, dtype=torch.int64))
    assert s.size == 0  # the refused batch stored nothing
    with pytest.raises(ValueError, match="out: expected 1 x 256"):
        s.read_many(torch.tensor([0]), torch.tensor([0]), two)
    with pytest.raises(ValueError, match="no chunk 0 of sequence 0 \\(entry 0\\)"):
        s.read_many(torch.tensor([0]), torch.tensor([0]), two[:1])


def test_the_budget_is_an_error_or_evicts_the_oldest():
    s = _store(chunks=2)
    block = torch.zeros(256, dtype=torch.uint8)
    s.insert(0, 0, block, _sig())
    s.insert(0, 1, block, _sig())
    with pytest.raises(ValueError, match="chunk store: full \\(2 chunks of 256 bytes"):
        s.insert(0, 2, block, _sig())
    s.insert(0, 1, block + 1, _sig())  # replacing takes no room
    e = _store(chunks=2, evict_oldest=True)
    for i in range(3):
        e.insert(0, i, block + i, _sig())
    assert not e.contains(0, 0) and e.contains(0, 1) and e.contains(0, 2) and e.size == 2
    e.drop_sequence(0)
    assert e.size == 0
    with pytest.raises(ValueError, match="no chunk 1 of sequence 0"):
        e.read(0, 1, torch.empty(256, dtype=torch.uint8))


def test_selection_equals_recall_selection():
    torch.manual_seed(1)
    G, d, n = 2, 16, 20
    planes = simhash_planes(d, 3, 32)  # 96 bits: two words, the second half empty
    keys = torch.randn(1, n, G, d)
    query = torch.randn(1, 1, G, d)
    ksig, qsig = signatures(keys, planes), signatures(query, planes)
    s = _C.ChunkStore(chunk_bytes=8, kv_heads=G, signature_bits=96, budget_bytes=8 * n)
    for c in range(n):
        s.insert(7, c, torch.zeros(8, dtype=torch.uint8), pack_signatures(ksig[0, c]).contiguous())
    for limit, top in ((n, 4), (11, 3), (2, 5)):
        out = torch.empty(G, top, dtype=torch.int64)
        s.select(7, limit, pack_signatures(qsig[0, 0]).contiguous(), top, out)
        want = select(qsig, ksig, torch.tensor([limit]), top)[0, 0]  # (G, R)
        assert out[:, :want.shape[1]].tolist() == want.tolist()
        assert (out[:, want.shape[1]:] == -1).all()


def test_concurrent_insertion_and_selection():
    s = _C.ChunkStore(chunk_bytes=64, kv_heads=1, signature_bits=64, budget_bytes=64 * 4000)
    errors = []

    def writer(seq):
        try:
            for i in range(500):
                s.insert(seq, i, torch.full((64,), seq, dtype=torch.uint8), _sig(1, 1, i))
        except Exception as e:  # reported below
            errors.append(e)

    def reader():
        out = torch.empty(1, 4, dtype=torch.int64)
        try:
            for i in range(500):
                s.select(i % 4, 1000, _sig(1, 1, i), 4, out)
        except Exception as e:
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(q,)) for q in range(4)]
    threads += [threading.Thread(target=reader) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and s.size == 2000
    got = torch.empty(64, dtype=torch.uint8)
    for seq in range(4):
        s.read(seq, 499, got)
        assert (got == seq).all()


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="budget_bytes: 10 holds no chunk"):
        _C.ChunkStore(chunk_bytes=64, kv_heads=1, signature_bits=64, budget_bytes=10)
    s = _store()
    with pytest.raises(ValueError, match="payload: expected 256 contiguous bytes"):
        s.insert(0, 0, torch.zeros(8), _sig())
    with pytest.raises(ValueError, match="signatures: expected 2 x 2 int64 words"):
        s.insert(0, 0, torch.zeros(256, dtype=torch.uint8), _sig(1, 2))
    if not _C.built_with_cuda():
        with pytest.raises(ValueError, match="pinned: this build of mka has no CUDA"):
            _store(pinned=True)


def test_outputs_are_never_silently_copied_and_stray_bits_do_not_rank():
    s = _store()
    s.insert(0, 0, torch.zeros(256, dtype=torch.uint8), _sig())
    with pytest.raises(TypeError):
        s.read(0, 0, torch.zeros(512, dtype=torch.uint8)[::2])  # not contiguous: refused
    with pytest.raises(TypeError):
        s.select(0, 1, _sig(), 1, torch.zeros(2, 1, dtype=torch.int32))  # wrong dtype
    t = _C.ChunkStore(chunk_bytes=1, kv_heads=1, signature_bits=10, budget_bytes=2)
    one = torch.zeros(1, dtype=torch.uint8)
    t.insert(0, 0, one, torch.tensor([[1 << 40]]))  # bit 40 is past the 10 bits
    t.insert(0, 1, one, torch.tensor([[1]]))       # differs from the query in bit 0
    out = torch.empty(1, 1, dtype=torch.int64)
    t.select(0, 2, torch.tensor([[0]]), 1, out)
    assert out.item() == 0  # bit 40 ignored: chunk 0 matches all 10 bits
