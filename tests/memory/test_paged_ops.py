"""The paged ops (SPEC §7.1) against the float64 reference and against the contiguous ops:
shuffled page tables, every page size, variable lengths (empty too), GQA, windows, splits
over long sequences, MKA's level 2 from page checkpoints, and both implementations (native
kernels, the PyTorch path)."""

import math

import pytest
import torch

import mka
from mka import reference as R
from mka.memory import paged_attention, paged_mka_attention, paged_write, paged_write_ema
from mka.memory import torch_paged as TP
from conftest import TOL, dtype_params, rel_err, shuffled_block_table

IMPLS = {
    "ops": (paged_attention, paged_mka_attention, paged_write, paged_write_ema),
    "torch": (lambda q, kp, vp, bt, n, causal=True, scale=None, window=None:
              TP.paged_attention(q, kp, vp, bt, n, causal, scale, window),
              lambda q, kp, vp, ks, vs, bt, n, lam, beta, causal=True, scale=None, window=None:
              TP.paged_mka_attention(q, kp, vp, ks, vs, bt, n, lam, beta, causal, scale, window),
              TP.paged_write, TP.paged_write_ema),
}


def _case(lens, S, H, G, d, Tq, dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    W = max(1, max(math.ceil(n / S) for n in lens)) + 1
    P = sum(math.ceil(n / S) for n in lens) + 3
    bt = shuffled_block_table(lens, S, W, P, gen)
    kp = torch.randn(P, S, G, d, generator=gen, dtype=torch.float64)
    vp = torch.randn(P, S, G, d, generator=gen, dtype=torch.float64)
    q = torch.randn(len(lens), Tq, H, d, generator=gen, dtype=torch.float64)
    n = torch.tensor(lens, dtype=torch.int32)
    to = lambda t: t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)  # noqa: E731
    return [to(t) for t in (q, kp, vp, bt, n)], (q, kp, vp, bt, n)


SHAPES = [  # lens, page size, H, G, d, Tq
    ((5, 0, 11), 4, 4, 2, 16, 1),
    ((7, 16, 3), 1, 6, 3, 8, 3),
    ((33, 64), 16, 8, 1, 32, 2),
    ((20,), 64, 2, 2, 24, 5),
    ((2000,), 16, 4, 1, 16, 1),  # long: split over keys
    ((1500, 700), 32, 8, 2, 64, 2),
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("device,dtype", dtype_params())
def test_paged_attention_equals_the_reference(impl, shape, window, causal, device, dtype):
    lens, S, H, G, d, Tq = shape
    args, ref_args = _case(lens, S, H, G, d, Tq, dtype, device)
    out = IMPLS[impl][0](*args, causal=causal, window=window)
    ref = R.paged_attention(*ref_args, causal=causal, window=window)
    assert out.dtype == dtype and out.shape == ref.shape
    assert rel_err(out, ref) < TOL[dtype]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("device,dtype", dtype_params())
def test_paged_mka_attention_equals_the_reference(impl, shape, device, dtype):
    lens, S, H, G, d, Tq = shape
    args, ref_args = _case(lens, S, H, G, d, Tq, dtype, device, seed=1)
    gen = torch.Generator().manual_seed(2)
    starts = [torch.randn(len(lens), G, d, generator=gen, dtype=torch.float64) for _ in range(2)]
    states = R.page_checkpoints(*ref_args[1:5], 0.85, *starts)  # as paged_write_ema leaves them
    lam = torch.softmax(torch.randn(len(lens), Tq, 3, generator=gen, dtype=torch.float64), -1)
    sdt = R.state_dtype(dtype)
    q, kp, vp, bt, n = args
    out = IMPLS[impl][1](q, kp, vp, *(s.to(device, sdt) for s in states), bt, n,
                         lam.to(device, dtype), 0.85, window=3)
    ref = R.paged_attention(*ref_args, window=3, lam=lam, beta=0.85, k_page_states=states[0],
                            v_page_states=states[1])
    assert rel_err(out, ref) < TOL[dtype]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("S", [1, 3, 16, 64])
def test_write_then_decode_equals_the_contiguous_ops(impl, S):
    """Prefill in one write, then token-by-token writes and attention: each step equals
    mka.attention / mka.mka over the whole contiguous sequence (float64), and the pages hold
    exactly the tokens written."""
    attend, attend_mka, write, write_ema = IMPLS[impl]
    torch.manual_seed(S)
    B, T, T0, H, G, d, beta, window = 3, 37, 20, 4, 2, 16, 0.9, 7
    q = torch.randn(B, T, H, d, dtype=torch.float64)
    k, v = (torch.randn(B, T, G, d, dtype=torch.float64) for _ in range(2))
    lam = torch.softmax(torch.randn(B, T, 2, dtype=torch.float64), -1)
    W = math.ceil(T / S)
    P = B * W + 2
    bt = shuffled_block_table([T] * B, S, W, P, torch.Generator().manual_seed(0))
    kp, vp = (torch.zeros(P, S, G, d, dtype=torch.float64) for _ in range(2))
    kp2, vp2 = kp.clone(), vp.clone()
    kst, vst = (torch.zeros(P, G, d, dtype=torch.float64) for _ in range(2))
    ks = vs = None
    full = mka.attention(q, k, v, window=window)
    full_mka, k_end, v_end = mka.mka(q, k, v, lam, beta, window=window)
    for a, b in [(0, T0)] + [(t, t + 1) for t in range(T0, T)]:
        start = torch.full((B,), a, dtype=torch.int32)
        write(k[:, a:b], v[:, a:b], kp, vp, bt, start)
        ks, vs = write_ema(k[:, a:b], v[:, a:b], kp2, vp2, bt, start, beta, kst, vst, ks, vs)
        end = start + (b - a)
        out = attend(q[:, a:b], kp, vp, bt, end, window=window)
        out_mka = attend_mka(q[:, a:b], kp2, vp2, kst, vst, bt, end, lam[:, a:b], beta,
                             window=window)
        assert rel_err(out, full[:, a:b]) < 1e-10
        assert rel_err(out_mka, full_mka[:, a:b]) < 1e-10
    for pages, x in ((kp, k), (vp, v), (kp2, k), (vp2, v)):
        assert torch.equal(torch.stack([R.gather_pages(pages, bt[b], T) for b in range(B)]), x)
    assert rel_err(ks, k_end) < 1e-10 and rel_err(vs, v_end) < 1e-10


def test_values_may_be_the_keys():
    """v_pages=None: one latent serves as keys and values (MLA's absorbed path)."""
    args, (q, kp, _, bt, n) = _case((9, 3), 4, 4, 1, 16, 2, torch.float64, "cpu")
    out = paged_attention(args[0], args[1], None, args[3], args[4])
    assert rel_err(out, R.paged_attention(q, kp, kp, bt, n)) < 1e-10
    new = torch.randn(2, 1, 1, 16, dtype=torch.float64)
    paged_write(new, None, args[1], None, args[3], args[4])
    assert torch.equal(args[1][int(bt[0, 2]), 1], new[0, 0])


def test_empty_batch_queries_and_sequences():
    args, _ = _case((0, 0), 4, 2, 1, 8, 3, torch.float32, "cpu")
    assert not paged_attention(*args).any()  # no visible key: zeros
    q, kp, vp, bt, n = args
    assert paged_attention(q[:, :0], kp, vp, bt, n).shape == (2, 0, 2, 8)
    assert paged_attention(q[:0], kp, vp, bt[:0], n[:0]).shape == (0, 3, 2, 8)
    paged_write(q[:, :0, :1], q[:, :0, :1], kp, vp, bt, n)  # nothing to write


def test_half_pages_on_the_cpu_take_the_torch_path():
    args, ref_args = _case((9, 17), 8, 4, 2, 16, 2, torch.bfloat16, "cpu")
    assert rel_err(paged_attention(*args), R.paged_attention(*ref_args)) < TOL[torch.bfloat16]


def test_compiles_without_graph_breaks():
    args, ref_args = _case((9, 17), 8, 4, 2, 16, 1, torch.float32, "cpu")
    q, kp, vp, bt, n = args
    new = torch.randn(2, 1, 2, 16)

    def step(q, new, kp, vp, bt, start):
        paged_write(new, new, kp, vp, bt, start)
        return paged_attention(q, kp, vp, bt, start + 1)

    eager_kp, eager_vp = kp.clone(), vp.clone()
    want = step(q, new, eager_kp, eager_vp, bt, n - 1)
    got = torch.compile(step, fullgraph=True)(q, new, kp, vp, bt, n - 1)
    assert rel_err(got, want) < 1e-6 and torch.equal(kp, eager_kp)


# ------------------------------------------------------------------ errors

def _bad(impl, **change):
    args, _ = _case((9, 6), 4, 4, 2, 8, 1, torch.float32, "cpu")
    q, kp, vp, bt, n = args
    kw = {**dict(q=q, kp=kp, vp=vp, bt=bt, n=n), **change}
    return IMPLS[impl][0](kw["q"], kw["kp"], kw["vp"], kw["bt"], kw["n"])


@pytest.mark.parametrize("impl", IMPLS)
def test_bad_page_tables_raise(impl):
    args, _ = _case((9, 6), 4, 4, 2, 8, 1, torch.float32, "cpu")
    bt, n = args[3], args[4]
    for entry in (-1, 99):
        broken = bt.clone()
        broken[0, 1] = entry
        with pytest.raises(ValueError, match=rf"block_table: entry \[0, 1\] = {entry} is not"):
            _bad(impl, bt=broken)
    with pytest.raises(ValueError, match="seqlens: sequence 1 needs 40 token slots"):
        _bad(impl, n=torch.tensor([9, 40], dtype=torch.int32))
    with pytest.raises(ValueError, match="seqlens"):
        _bad(impl, n=torch.tensor([9, -1], dtype=torch.int32))
    if impl == "ops":
        with pytest.raises(ValueError, match="block_table: expected an int32 tensor"):
            _bad(impl, bt=bt.long())
        with pytest.raises(ValueError, match="seqlens: expected shape"):
            _bad(impl, n=n[:1])


def test_fuzzed_tables_never_crash():
    """Random garbage tables and lengths: a result or a ValueError, nothing else."""
    gen = torch.Generator().manual_seed(7)
    args, _ = _case((9, 6), 4, 4, 2, 8, 2, torch.float32, "cpu")
    q, kp, vp, bt, n = args
    for _ in range(200):
        bt = torch.randint(-3, kp.shape[0] + 3, bt.shape, generator=gen, dtype=torch.int32)
        n = torch.randint(-2, 30, (2,), generator=gen, dtype=torch.int32)
        try:
            out = paged_attention(q, kp, vp, bt, n)
            assert torch.isfinite(out).all()
        except ValueError:
            pass
        try:
            paged_write(q[:, :, :2], q[:, :, :2], kp, vp, bt, n)
        except ValueError:
            pass


def test_a_page_written_by_two_sequences_raises():
    args, _ = _case((4, 4), 4, 4, 2, 8, 1, torch.float32, "cpu")
    q, kp, vp, bt, n = args
    spare = next(p for p in range(kp.shape[0]) if p not in bt[:, 0].tolist())
    bt[0, 1] = bt[1, 1] = spare
    new = torch.randn(2, 1, 2, 8)
    with pytest.raises(ValueError, match="is written by sequences 0 and 1"):
        paged_write(new, new, kp, vp, bt, n)


def test_mismatched_shapes_and_dtypes_raise():
    args, _ = _case((4, 4), 4, 4, 2, 8, 1, torch.float32, "cpu")
    q, kp, vp, bt, n = args
    with pytest.raises(ValueError, match="q: dtype torch.float64 does not match k_pages"):
        paged_attention(q.double(), kp, vp, bt, n)
    with pytest.raises(ValueError, match="q: the number of query heads H = 3"):
        paged_attention(q[:, :, :3], kp, vp, bt, n)
    with pytest.raises(ValueError, match="v_pages: expected"):
        paged_attention(q, kp, vp[:, :2], bt, n)
    with pytest.raises(ValueError, match="k_page_states"):
        paged_mka_attention(q, kp, vp, kp[:, 0], kp[:, 0], bt, n, q[..., 0, :2], 0.9)
    with pytest.raises(ValueError, match="window: must be at least 1"):
        paged_attention(q, kp, vp, bt, n, window=0)


# ------------------------------------------------------------------ contiguous decode

@pytest.mark.parametrize("Tq,Tk,H,G,d", [(1, 256, 4, 2, 32), (2, 1000, 8, 8, 32),
                                         (4, 3000, 4, 1, 32), (1, 5000, 16, 1, 32),
                                         (1, 1, 4, 2, 16), (3, 70, 8, 2, 24), (4, 3, 4, 1, 16),
                                         (1, 200, 16, 2, 48)])
@pytest.mark.parametrize("window", [None, 300])
@pytest.mark.parametrize("causal", [True, False])
def test_few_queries_over_a_contiguous_cache(Tq, Tk, H, G, d, window, causal):
    """mka.attention with few query rows (Tq x H / G <= 16) runs the split decode kernel on
    the CPU (SPEC §7.1), over long caches and short ones (a cache of 1 to 255 keys, queries
    that see no key): its outputs, logsumexp (the backward's input) and gradients equal the
    reference."""
    torch.manual_seed(Tk)
    q = torch.randn(2, Tq, H, d, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(2, Tk, G, d, dtype=torch.float64, requires_grad=True) for _ in range(2))
    out = mka.attention(q, k, v, causal=causal, window=window)
    ref = R.attention(q, k, v, causal=causal, window=window)
    assert rel_err(out, ref) < 1e-10
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), g)
    want = torch.autograd.grad(ref, (q, k, v), g)
    for a, b in zip(grads, want):
        assert rel_err(a, b) < 1e-10


def test_mka_decode_step_over_a_long_contiguous_cache():
    torch.manual_seed(0)
    B, Tq, Tk, H, G, d = 2, 1, 700, 4, 2, 16
    q = torch.randn(B, Tq, H, d, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(B, Tk, G, d, dtype=torch.float64, requires_grad=True) for _ in range(2))
    lam = torch.softmax(torch.randn(B, Tq, 2, dtype=torch.float64), -1)
    out, _, _ = mka.mka(q, k, v, lam, 0.9, window=50)
    ref, _, _ = R.mka(q, k, v, lam, 0.9, window=50)
    assert rel_err(out, ref) < 1e-10
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    want = torch.autograd.grad(ref.sum(), (q, k, v))
    for a, b in zip(grads, want):
        assert rel_err(a, b) < 1e-10


def test_torch_path_ignores_garbage_past_the_lengths_and_refuses_shared_writes():
    """Unwritten slots may hold NaN (a pool never zeroed, a recycled page): they must not
    reach the output; a page written by two sequences raises on this path too."""
    args, ref_args = _case((6, 3), 4, 4, 2, 16, 2, torch.float64, "cpu")
    q, kp, vp, bt, n = ref_args
    kp2, vp2 = kp.clone(), vp.clone()
    for b, L in enumerate((6, 3)):  # NaN in every slot past each length of its last page
        for pos in range(L, -(-L // 4) * 4):
            kp2[int(bt[b, pos // 4]), pos % 4] = float("nan")
            vp2[int(bt[b, pos // 4]), pos % 4] = float("nan")
    states = [torch.randn(kp.shape[0], 2, 16, dtype=torch.float64) for _ in range(2)]
    lam = torch.softmax(torch.randn(2, 2, 2, dtype=torch.float64), -1)
    out = TP.paged_attention(q, kp2, vp2, bt, n)
    assert rel_err(out, R.paged_attention(q, kp, vp, bt, n)) < 1e-10
    out = TP.paged_mka_attention(q, kp2, vp2, *states, bt, n, lam, 0.9)
    want = R.paged_attention(q, kp, vp, bt, n, lam=lam, beta=0.9, k_page_states=states[0],
                             v_page_states=states[1])
    assert rel_err(out, want) < 1e-10
    bt2 = bt.clone()
    spare = next(p for p in range(kp.shape[0]) if p not in bt[:, :2].flatten().tolist())
    bt2[0, 1] = bt2[1, 0] = spare
    new = torch.randn(2, 1, 2, 16, dtype=torch.float64).to(torch.bfloat16)
    with pytest.raises(ValueError, match="is written by sequences 0 and 1"):
        TP.paged_write(new, new, kp.to(torch.bfloat16), vp.to(torch.bfloat16), bt2,
                       torch.tensor([5, 2], dtype=torch.int32))


@pytest.mark.parametrize("lens", [(8,), (8, 3)])
def test_torch_path_ignores_table_entries_past_each_sequences_pages(lens):
    """Entries past a sequence's pages may hold anything (SPEC §7.1), out-of-range page
    numbers included — a single sequence (whose spare zero slots reach past its pages) and the
    shorter sequence of a ragged batch; an empty pool with a table of no columns reads zeros."""
    torch.manual_seed(0)
    P, S, G, d = 6, 4, 2, 8
    kp, vp = torch.randn(P, S, G, d, dtype=torch.float64), torch.randn(P, S, G, d, dtype=torch.float64)
    bt = torch.tensor([[2, 1, 999, -7], [4, 999, 123, 5]][:len(lens)], dtype=torch.int32)
    n = torch.tensor(lens, dtype=torch.int32)
    q = torch.randn(len(lens), 2, 4, d, dtype=torch.float64)
    clean = torch.where(torch.arange(4)[None] * S < n[:, None].long(), bt, -1).int()
    assert rel_err(TP.paged_attention(q, kp, vp, bt, n), R.paged_attention(q, kp, vp, clean, n)) < 1e-12
    states = [torch.randn(P, G, d, dtype=torch.float64) for _ in range(2)]
    lam = torch.softmax(torch.randn(len(lens), 2, 2, dtype=torch.float64), -1)
    want = R.paged_attention(q, kp, vp, clean, n, lam=lam, beta=0.9, k_page_states=states[0],
                             v_page_states=states[1])
    assert rel_err(TP.paged_mka_attention(q, kp, vp, *states, bt, n, lam, 0.9), want) < 1e-12
    empty = torch.empty(0, S, G, d, dtype=torch.float64)
    out = TP.paged_attention(q, empty, empty, bt[:, :0], torch.zeros_like(n))
    assert out.shape == q.shape and not out.abs().sum()


def test_torch_path_window_start_and_spare_slots_past_the_table():
    """The CPU path gathers from the first page any row's window reaches (``first`` > 0) and
    a page of spare zero slots past a full table, in one call; NaN in every page no token of
    the call is read from."""
    torch.manual_seed(0)
    P, S, G, d = 12, 4, 2, 8
    kp, vp = torch.randn(P, S, G, d, dtype=torch.float64), torch.randn(P, S, G, d, dtype=torch.float64)
    bt = torch.tensor([[3, 7, 1, 4, 6], [5, 2, 9, 11, 0]], dtype=torch.int32)
    n = torch.tensor([20, 14], dtype=torch.int32)
    kp2, vp2 = kp.clone(), vp.clone()
    for page in (3, 7, 5, 0, 8, 10):  # before each sequence's window start, past its pages, unused
        kp2[page], vp2[page] = float("nan"), float("nan")
    q = torch.randn(2, 2, 4, d, dtype=torch.float64)
    out = TP.paged_attention(q, kp2, vp2, bt, n, True, None, 3)
    assert rel_err(out, R.paged_attention(q, kp, vp, bt, n, window=3)) < 1e-12


@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("full", [False, True])
def test_torch_path_without_host_reads_equals_the_checked_path(monkeypatch, window, full):
    """A CUDA cache's own table and lengths skip the host reads in the PyTorch path: every
    page of the table is gathered and masked (entries of -1 read as zeros, even if the pool
    holds NaN there). Same outputs as the path that reads the lengths; forced on the CPU.
    ``full``: one sequence fills its table to the last slot and the other is shorter than
    the query rows — its first rows see no key and read exactly zero (they attend to the
    spare zero slots gathered past the table, which must stay zeros: page 0 holds NaN)."""
    from mka.memory import torch_paged
    torch.manual_seed(0)
    P, S, G, d, B, W = 12, 4, 2, 8, 2, 5
    kp, vp = torch.randn(P, S, G, d, dtype=torch.float64), torch.randn(P, S, G, d, dtype=torch.float64)
    kp[0], vp[0] = float("nan"), float("nan")  # a page no sequence holds
    if full:
        table = torch.tensor([[3, 7, 1, 4, 6], [5, -1, -1, -1, -1]], dtype=torch.int32)
        lens, Tq = torch.tensor([20, 2], dtype=torch.int32), 3
    else:
        table = torch.tensor([[3, 7, 1, -1, -1], [5, 2, 9, 11, -1]], dtype=torch.int32)
        lens, Tq = torch.tensor([10, 15], dtype=torch.int32), 2
    q = torch.randn(B, Tq, 4, d, dtype=torch.float64)
    ref = torch_paged.paged_attention(q, kp, vp, table, lens, True, None, window)
    monkeypatch.setattr(torch_paged, "_reads_whole_table", lambda *a: True)
    out = torch_paged.paged_attention(q, kp, vp, table, lens, True, None, window)
    assert torch.allclose(out, ref, rtol=0, atol=1e-12)
    if full:
        assert torch.equal(out[1, 0], torch.zeros_like(out[1, 0])) and out[1, 1:].abs().sum() > 0
        want = R.paged_attention(q[:, -2:], kp, vp, table, lens, window=window)
        assert rel_err(out[:, -2:], want) < 1e-10


def test_a_caches_own_tables_skip_the_host_checks_on_the_cpu(monkeypatch):
    """Tables and lengths a PagedKVCache made are valid by construction: the PyTorch path
    does not check them again (the check was ~50 µs of a tiny model's decode step per call),
    while tables a caller made are still checked."""
    from mka.memory import torch_paged
    from mka.models import GPT, GPTConfig
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_embd=32, n_head=2, block_size=64, vocab_size=50,
                          attn_backend="torch")).eval()
    ids = torch.randint(0, 50, (1, 9))
    with torch.no_grad():
        want = model(ids)[0][:, -1]
        caches = model.new_caches(1)
        model(ids[:, :8], caches=caches)

        def refuse(*args, **kwargs):
            raise AssertionError("a cache's own table was checked again")
        monkeypatch.setattr(torch_paged, "check_slots", refuse)
        got = model(ids[:, 8:], caches=caches)[0][:, -1]
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-5)
    kp, vp = torch.randn(4, 4, 1, 8), torch.randn(4, 4, 1, 8)
    with pytest.raises(AssertionError, match="checked again"):
        torch_paged.paged_attention(torch.randn(1, 1, 1, 8), kp, vp,
                                    torch.tensor([[0, 1]], dtype=torch.int32),
                                    torch.tensor([5], dtype=torch.int32))


def test_the_layers_of_a_step_share_its_index_tensors():
    """The PyTorch path makes a step's masks and gather indices once for all layers: the same
    tensors while the table and lengths are unchanged, new ones after an in-place update of
    the lengths, none kept for lengths that move inside CUDA graphs (a static cache's)."""
    from mka.memory import torch_paged
    table = torch.tensor([[3, 7, 1], [5, 2, 0]], dtype=torch.int32)
    lens = torch.tensor([5, 9], dtype=torch.int32)
    first = torch_paged._attend_mask(1, 12, lens, True, None, torch.float32)
    assert torch_paged._attend_mask(1, 12, lens, True, None, torch.float32) is first
    assert torch_paged._gather_index(table, lens, 4, 12, 0) is torch_paged._gather_index(table, lens, 4, 12, 0)
    lens += 1
    moved = torch_paged._attend_mask(1, 12, lens, True, None, torch.float32)
    assert moved is not first and not torch.equal(moved[0], first[0])
    assert torch.equal(moved[0] == 0, torch_paged._mask(1, 12, lens, True, None)[:, None])
    static = torch.tensor([5, 9], dtype=torch.int32)
    torch_paged.mark_static(static)
    assert torch_paged._attend_mask(1, 12, static, True, None, torch.float32) is not \
        torch_paged._attend_mask(1, 12, static, True, None, torch.float32)


def test_eager_calls_skip_the_dispatcher_with_the_same_results():
    """A plain call runs the op's implementation directly (no dispatcher hop); under a
    dispatch mode, or with an input asking for a gradient in grad mode, it goes through
    torch.ops as before. Both give the same outputs, and bad input the same errors."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Seen(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    (q, kp, vp, bt, n), _ = _case((5, 9), 4, 4, 2, 16, 1, torch.float32, "cpu")
    k, v = torch.randn(2, 1, 2, 16), torch.randn(2, 1, 2, 16)
    want = torch.ops.mka.paged_attention(q, kp, vp, bt, n, True, 0.5, None)
    assert torch.equal(paged_attention(q, kp, vp, bt, n, scale=0.5), want)
    with Seen() as seen:
        got = paged_attention(q, kp, vp, bt, n, scale=0.5)
    assert "mka.paged_attention.default" in seen.ops and torch.equal(got, want)
    kp2, vp2 = kp.clone(), vp.clone()
    torch.ops.mka.paged_write(k, v, kp2, vp2, bt, n)
    paged_write(k, v, kp, vp, bt, n)
    assert torch.equal(kp, kp2) and torch.equal(vp, vp2)
    with torch.enable_grad():  # a query asking for a gradient: the dispatcher's path
        out = paged_attention(q.clone().requires_grad_(), kp, vp, bt, n, scale=0.5)
    assert torch.equal(out.detach(), want)
    with pytest.raises(ValueError, match="^q: dtype torch.float64 does not match k_pages'"):
        paged_attention(q.double(), kp, vp, bt, n)
    with pytest.raises(ValueError, match="^block_table: expected an int32 tensor"):
        paged_write(k, v, kp, vp, bt.long(), n)


@pytest.mark.parametrize("grow", [[5, 2], 3])
def test_torch_paged_rows_of_a_partial_step_see_nothing_and_read_zero(grow):
    """A step through a cache's own table that gives some sequence fewer tokens than the call
    has query rows (left padding, as the HF cache writes; or a count below the rows): the
    padding rows see no key and read zeros on the torch path too, as through copies of the
    table (which take no shortcut); rows of whole steps are unchanged."""
    from mka.memory import LayerSpec, PagedKVCache
    from mka.memory import torch_paged as tp
    torch.manual_seed(0)
    G, d, H, T = 2, 8, 4, 5
    cache = PagedKVCache([LayerSpec(G, d, d)], 2, max_tokens=16, page_size=4)
    layer = cache[0]
    step = layer.step(grow)
    layer.k_pages.normal_()
    layer.v_pages.normal_()
    q = torch.randn(2, T, H, d)
    own = tp.paged_attention(q, layer.k_pages, layer.v_pages, step.block_table, step.seqlens)
    copy = tp.paged_attention(q, layer.k_pages, layer.v_pages, step.block_table.clone(),
                              step.seqlens.clone())
    assert torch.equal(own, copy)
    short = 3 if grow == [5, 2] else 2  # padding rows of the shorter (or every) sequence
    assert not own[1, :short].abs().sum()
    whole = layer.step(1)
    q1 = torch.randn(2, 1, H, d)
    assert torch.equal(tp.paged_attention(q1, layer.k_pages, layer.v_pages, whole.block_table,
                                          whole.seqlens),
                       tp.paged_attention(q1, layer.k_pages, layer.v_pages,
                                          whole.block_table.clone(), whole.seqlens.clone()))
