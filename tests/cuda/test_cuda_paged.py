"""The CUDA paged kernels (cuda/memory/) against the float64 reference on the CPU: the head
dims of each kernel (64, 128, 256 and widths between), decode-sized GQA groups, long
sequences split over keys, windows, MKA's level 2 from page checkpoints, strided queries,
prefill writes with EMA checkpoints, bad tables (NaN rows, never an access outside the
pages) and equality with the PyTorch path. tests/memory/test_paged_ops.py runs its shapes on
CUDA too."""

from __future__ import annotations

import math

import pytest
import torch

from mka import reference as R
from mka.memory import paged_attention, paged_mka_attention, paged_write, paged_write_ema
from mka.memory import torch_paged as TP
from conftest import shuffled_block_table
from cuda_checks import DTYPES, TOL, rel_err, requires_cuda

pytestmark = [requires_cuda, pytest.mark.cuda]


def _case(lens, S, H, G, dk, dv, Tq, seed=0):
    """float64 CPU tensors: q, k_pages, v_pages, block table, lengths, random states (P, G, d;
    the first B rows: states before each sequence), lam."""
    gen = torch.Generator().manual_seed(seed)
    W = max(1, max(math.ceil(n / S) for n in lens)) + 1
    P = sum(math.ceil(n / S) for n in lens) + 3
    bt = shuffled_block_table(lens, S, W, P, gen)
    kp = torch.randn(P, S, G, dk, generator=gen, dtype=torch.float64)
    vp = torch.randn(P, S, G, dv, generator=gen, dtype=torch.float64)
    q = torch.randn(len(lens), Tq, H, dk, generator=gen, dtype=torch.float64)
    n = torch.tensor(lens, dtype=torch.int32)
    states = [torch.randn(P, G, dk, generator=gen, dtype=torch.float64) for _ in range(2)]
    lam = torch.softmax(torch.randn(len(lens), Tq, 3, generator=gen, dtype=torch.float64), -1)
    return q, kp, vp, bt, n, states, lam


def _cuda(t, dtype):
    return t.to("cuda", dtype if t.is_floating_point() else t.dtype)


# lens, page size, H, G, dk, dv, Tq
SHAPES = [
    ((4096,), 16, 32, 8, 128, 128, 1),        # decode, GQA 4
    ((3000, 17, 0, 1025), 64, 8, 8, 64, 64, 1),  # MHA, ragged batch with an empty sequence
    ((777, 1300), 32, 16, 2, 128, 128, 3),     # speculative verification, GQA 8
    ((500,), 16, 4, 1, 256, 256, 2),           # MQA, the widest kernel
    ((300, 45), 8, 4, 2, 96, 96, 5),           # a width between kernels
    ((257,), 16, 40, 2, 64, 64, 1),            # a group of 20: two row blocks per head
    ((600,), 16, 4, 4, 80, 48, 2),             # dv != dk (MLA's absorbed path shapes)
    ((90,), 16, 2, 1, 64, 64, 70),             # a prefill chunk
    ((33, 70), 4, 2, 1, 20, 20, 1),            # rows too narrow for 16-byte loads
    ((2000, 3), 64, 8, 2, 128, 128, 16),       # 64 rows per kv head: four m16 row blocks
]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("window", [None, 100])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_paged_attention_matches_the_reference(shape, window, causal, dtype):
    lens, S, H, G, dk, dv, Tq = shape
    q, kp, vp, bt, n, _, _ = _case(lens, S, H, G, dk, dv, Tq)
    q, kp, vp = (_cuda(t, dtype).double().cpu() for t in (q, kp, vp))  # rounded inputs
    out = paged_attention(*(_cuda(t, dtype) for t in (q, kp, vp, bt, n)), causal=causal,
                          window=window)
    ref = R.paged_attention(q, kp, vp, bt, n, causal=causal, window=window)
    assert out.dtype == dtype and torch.isfinite(out.float()).all()
    assert rel_err(out, ref) < TOL[dtype]


# Level 2 on tensor cores takes pages of a multiple of 16 tokens; 48 and 128 also carry the
# EMA across tile boundaries (tiles of 64 keys), 8 and 4 take the serial walk.
MKA_SHAPES = [s for s in SHAPES if s[4] == s[5]] + [
    ((1000, 130), 128, 8, 2, 128, 128, 1),
    ((700, 300), 48, 8, 2, 64, 64, 2),
]


@pytest.mark.parametrize("shape", MKA_SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_paged_mka_attention_matches_the_reference(shape, dtype):
    lens, S, H, G, dk, dv, Tq = shape
    q, kp, vp, bt, n, starts, lam = _case(lens, S, H, G, dk, dv, Tq, seed=1)
    q, kp, vp, lam = (_cuda(t, dtype).double().cpu() for t in (q, kp, vp, lam))
    # the checkpoints paged_write_ema leaves (from a nonzero state before each sequence)
    states = [s.float().double() for s in R.page_checkpoints(kp, vp, bt, n, 0.9, *(x[:len(lens)] for x in starts))]
    out = paged_mka_attention(*(_cuda(t, dtype) for t in (q, kp, vp)),
                              *(s.to("cuda", torch.float32) for s in states),
                              _cuda(bt, dtype), _cuda(n, dtype), _cuda(lam, dtype), 0.9, window=50)
    ref = R.paged_attention(q, kp, vp, bt, n, window=50, lam=lam, beta=0.9,
                            k_page_states=states[0], v_page_states=states[1])
    assert rel_err(out, ref) < TOL[dtype]


def test_equals_the_torch_path_and_takes_strided_queries():
    """q as a view into a fused projection (B, Tq, 3H, d): the kernel reads its strides."""
    q, kp, vp, bt, n, states, lam = _case((700, 1500), 16, 8, 2, 64, 64, 2, seed=3)
    fused = torch.randn(2, 2, 3 * 8, 64, dtype=torch.float64)
    fused[:, :, 8:16] = q
    args = [_cuda(t, torch.bfloat16) for t in (fused, kp, vp, bt, n)]
    qv = args[0][:, :, 8:16]
    out = paged_attention(qv, *args[1:], window=300)
    want = TP.paged_attention(qv, *args[1:], window=300)
    assert rel_err(out, want) < 1e-2
    assert rel_err(out, paged_attention(qv.contiguous(), *args[1:], window=300)) == 0


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("S", [1, 16, 64])
def test_prefill_then_decode_equals_the_contiguous_reference(dtype, S):
    """A long prefill write (chunked EMA), then token-by-token writes and attention: pages,
    page checkpoints, running states and outputs equal the float64 reference."""
    torch.manual_seed(S)
    B, T, T0, H, G, d, beta, window = 2, 330, 300, 8, 2, 64, 0.9, 40
    q = torch.randn(B, T, H, d, dtype=torch.float64)
    k, v = (torch.randn(B, T, G, d, dtype=torch.float64) for _ in range(2))
    q, k, v = (t.to(dtype).double() for t in (q, k, v))
    lam = torch.softmax(torch.randn(B, T, 2, dtype=torch.float64), -1).to(dtype).double()
    W = math.ceil(T / S)
    P = B * W + 2
    bt = shuffled_block_table([T] * B, S, W, P, torch.Generator().manual_seed(0)).cuda()
    kp, vp = (torch.zeros(P, S, G, d, device="cuda", dtype=dtype) for _ in range(2))
    sdt = torch.float32
    kst, vst = (torch.zeros(P, G, d, device="cuda", dtype=sdt) for _ in range(2))
    ks = vs = None
    full_mka, k_end, v_end = R.mka(q, k, v, lam, beta, window=window)
    full = R.attention(q, k, v, window=window)
    c = lambda t: t.to("cuda", dtype)  # noqa: E731
    # A prefill (several chunks of the write), single tokens, then 16 tokens at once (the
    # write's one-pass case, across page boundaries).
    steps = [(0, T0)] + [(t, t + 1) for t in range(T0, T - 16)] + [(T - 16, T)]
    for a, b in steps:
        start = torch.full((B,), a, dtype=torch.int32, device="cuda")
        ks, vs = paged_write_ema(c(k[:, a:b]), c(v[:, a:b]), kp, vp, bt, start, beta, kst, vst,
                                 ks, vs)
        end = start + (b - a)
        out = paged_attention(c(q[:, a:b]), kp, vp, bt, end, window=window)
        out_mka = paged_mka_attention(c(q[:, a:b]), kp, vp, kst, vst, bt, end, c(lam[:, a:b]),
                                      beta, window=window)
        assert rel_err(out, full[:, a:b]) < TOL[dtype]
        assert rel_err(out_mka, full_mka[:, a:b]) < TOL[dtype]
    for pages, x in ((kp, k), (vp, v)):
        got = torch.stack([R.gather_pages(pages.cpu(), bt[b].cpu(), T) for b in range(B)])
        assert torch.equal(got.double(), x)
    assert rel_err(ks, k_end) < 1e-5 and rel_err(vs, v_end) < 1e-5


def test_write_without_ema_and_values_as_keys():
    q, kp, vp, bt, n, _, _ = _case((43, 12), 4, 4, 1, 16, 16, 1)  # pages for 3 more tokens
    n = n - 3
    q, kp = q.float(), kp.float()
    kpc, btc, nc = kp.cuda(), bt.cuda(), n.cuda()
    new = torch.randn(2, 3, 1, 16)
    paged_write(new.cuda(), None, kpc, None, btc, nc)
    for b in range(2):
        for t in range(3):
            pos = int(n[b]) + t
            kp[int(bt[b, pos // 4]), pos % 4] = new[b, t]
    assert torch.equal(kpc.cpu(), kp)
    out = paged_attention(q.cuda(), kpc, None, btc, nc + 3)
    ref = R.paged_attention(q.double(), kp.double(), kp.double(), bt, n + 3)
    assert rel_err(out, ref) < 1e-5


def test_bad_tables_give_nan_rows_not_crashes():
    """Entries and lengths stay on the device: an invalid one gives NaN for the rows that
    needed it (the others are exact), never an access outside the pages (compute-sanitizer
    runs this case: sanitize_cases.py)."""
    q, kp, vp, bt, n, _, _ = _case((50, 60), 16, 4, 2, 64, 64, 1)
    args = [_cuda(t, torch.float32) for t in (q, kp, vp, bt, n)]
    good = paged_attention(*args)
    for entry in (-1, 10**6):
        broken = args[3].clone()
        broken[0, 1] = entry
        out = paged_attention(args[0], args[1], args[2], broken, args[4])
        assert torch.isnan(out[0]).all() and torch.equal(out[1], good[1])
    out = paged_attention(*args[:4], torch.tensor([50, 10**6], dtype=torch.int32, device="cuda"))
    assert torch.isnan(out[1]).all() and torch.equal(out[0], good[0])
    with pytest.raises(ValueError, match="block_table: entry"):  # writes are checked on the host
        broken = args[3].clone()
        broken[0, 3] = -1
        paged_write(args[0][:, :, :2], None, args[1], None, broken, args[4])


@pytest.mark.parametrize("Tq,Tk,H,G,d", [(1, 4096, 32, 8, 128), (3, 1000, 8, 2, 64),
                                         (1, 300, 4, 4, 64), (2, 2000, 16, 1, 128)])
@pytest.mark.parametrize("window", [None, 200])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dense_decode_shapes_take_the_decode_kernel(Tq, Tk, H, G, d, window, causal, dtype):
    """mka.attention with few query rows per kv head over a long cache runs the decode kernel
    (the cache as one page per sequence): outputs, and gradients through its logsumexp."""
    import mka
    gen = torch.Generator().manual_seed(Tk)
    q, k, v = (torch.randn(2, T, h, d, generator=gen, dtype=torch.float64).to(dtype)
               for T, h in ((Tq, H), (Tk, G), (Tk, G)))
    ref_in = [t.double().requires_grad_() for t in (q, k, v)]
    x = [t.cuda().requires_grad_() for t in (q, k, v)]
    out = mka.attention(*x, causal=causal, window=window)
    ref = R.attention(*ref_in, causal=causal, window=window)
    assert rel_err(out, ref) < TOL[dtype]
    g = torch.randn(ref.shape, dtype=torch.float64)
    got = torch.autograd.grad(out, x, g.to("cuda", dtype))
    want = torch.autograd.grad(ref, ref_in, g)
    for a, b in zip(got, want):
        assert rel_err(a, b) < TOL[dtype]


# Runs the decode cases below in a fresh process (MKA_CUDA_DECODE_CLUSTER is read once) and
# saves their inputs, outputs and whether a combine kernel ran.
_CLUSTER_CHILD = r"""
import sys, torch
from mka import reference as R
from mka.memory import paged_attention, paged_mka_attention
from cuda_checks import kernel_names

def case(lens, S, H, G, d, Tq, seed):
    gen = torch.Generator().manual_seed(seed)
    pages = [-(-n // S) for n in lens]
    P, W = sum(pages) + 2, max(pages) + 1
    order = torch.randperm(P, generator=gen).int()
    bt = torch.full((len(lens), W), -1, dtype=torch.int32)
    at = 0
    for b, n in enumerate(pages):
        bt[b, :n] = order[at:at + n]
        at += n
    x = [torch.randn(*s, generator=gen).to(torch.bfloat16)
         for s in ((len(lens), Tq, H, d), (P, S, G, d), (P, S, G, d))]
    # the checkpoints paged_write_ema would leave: the kernel carries a split's EMA on from
    # the checkpoint of its first page, so the checkpoints must be the EMA along the sequence
    starts = [torch.randn(len(lens), G, d, generator=gen) for _ in range(2)]
    states = [s.float() for s in R.page_checkpoints(x[1].double(), x[2].double(), bt,
                                                   torch.tensor(lens), 0.9, *starts)]
    lam = torch.softmax(torch.randn(len(lens), Tq, 3, generator=gen), -1).to(torch.bfloat16)
    return x + [bt, torch.tensor(lens, dtype=torch.int32)] + states + [lam]

# (lens, page size, H, G, d, Tq, MKA): on 114-132 SMs the first four split 4-8 ways
# (clusters at 8: MHA at d 128 fills ~2 blocks per SM, MKA's level 2 stacked and
# not, a ragged batch with an empty sequence); the last, with a broken table entry, 10-11 ways
# (clusters at 16).
CASES = [((4096,), 16, 32, 32, 128, 1, False), ((2000, 1500, 100, 0), 16, 32, 8, 128, 1, False),
         ((1000,) * 12, 16, 16, 8, 64, 1, True), ((900, 700), 32, 16, 4, 128, 3, True),
         ((2500, 1800), 16, 24, 12, 128, 1, False)]
saved, combine = [], []
for i, (lens, S, H, G, d, Tq, mka) in enumerate(CASES):
    q, kp, vp, bt, n, ks, vs, lam = case(lens, S, H, G, d, Tq, i)
    if i == len(CASES) - 1:
        bt[0, 140] = -1  # a broken entry in a late split: sequence 0's rows NaN, 1's exact
    c = [t.cuda() for t in (q, kp, vp, bt, n, ks, vs, lam)]
    run = ((lambda: paged_mka_attention(c[0], c[1], c[2], c[5], c[6], c[3], c[4], c[7], 0.9, window=50))
           if mka else (lambda: paged_attention(*c[:5])))
    out = run()
    combine.append(any("paged_combine" in k for k in kernel_names(run)))
    saved.append(dict(q=q, kp=kp, vp=vp, bt=bt, n=n, ks=ks, vs=vs, lam=lam, out=out.cpu()))
# mka.attention over a contiguous cache takes the same kernel; its backward reads the lse.
import mka
gen = torch.Generator().manual_seed(7)
x = [torch.randn(1, T, 32, 128, generator=gen).to(torch.bfloat16) for T in (1, 4096, 4096)]
xc = [t.cuda().requires_grad_() for t in x]
out = mka.attention(*xc)
grads = torch.autograd.grad(out, xc, torch.ones_like(out))
dense = dict(x=x, out=out.detach().cpu(), grads=[g.cpu() for g in grads])
torch.save(dict(cases=saved, combine=combine, dense=dense), sys.argv[1])
"""


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0),
                    reason="needs a Hopper (sm_90) GPU")
def test_decode_cluster_variable(tmp_path):
    """MKA_CUDA_DECODE_CLUSTER: the splits of a decode call merged inside the tensor-core kernel
    by a thread-block cluster (2, 8, 16) or by the combine kernel (0 or unset, the default), at
    the plan's split counts and at counts forced by MKA_CUDA_DECODE_SPLITS (1: no merge at
    all) — the same outputs within rounding, no combine kernel where no merge or the
    cluster holds the splits, NaN rows for a broken table entry either way; bad values raise
    naming the variable."""
    import os
    import subprocess
    import sys
    here = os.path.dirname(os.path.abspath(__file__))
    pythonpath = os.pathsep.join([here, os.environ.get("PYTHONPATH", "")])
    # (cluster, forced splits) -> whether each case ran a combine kernel
    combos = {("0", "0"): [True] * 5, ("8", "0"): [False] * 4 + [True],
              ("16", "0"): [False] * 5, ("16", "3"): [False] * 5, ("16", "16"): [False] * 5,
              ("0", "16"): [True] * 5, ("16", "1"): [False] * 5, ("2", "2"): [False] * 5,
              ("", "0"): [True] * 5}
    runs = {}
    for (cluster, splits), combine in combos.items():
        path = tmp_path / f"out{cluster}_{splits}.pt"
        env = dict(os.environ, MKA_CUDA_DECODE_CLUSTER=cluster, MKA_CUDA_DECODE_SPLITS=splits,
                   PYTHONPATH=pythonpath)
        subprocess.run([sys.executable, "-c", _CLUSTER_CHILD, str(path)], env=env, check=True)
        runs[cluster, splits] = run = torch.load(path)
        assert run["combine"] == combine, (cluster, splits)
    first = runs["0", "0"]["cases"]
    for i, c in enumerate(first):
        x = {k: v.double() if v.is_floating_point() else v for k, v in c.items()}
        if i in (2, 3):  # the MKA cases
            ref = R.paged_attention(x["q"], x["kp"], x["vp"], x["bt"], x["n"], window=50,
                                    lam=x["lam"], beta=0.9, k_page_states=x["ks"],
                                    v_page_states=x["vs"])
        elif i == len(first) - 1:  # the broken entry: sequence 1 alone
            ref = R.paged_attention(x["q"][1:], x["kp"], x["vp"], x["bt"][1:], x["n"][1:])
        else:
            ref = R.paged_attention(x["q"], x["kp"], x["vp"], x["bt"], x["n"])
        for combo, run in runs.items():
            out = run["cases"][i]["out"]
            if i == len(first) - 1:
                assert torch.isnan(out[0]).all(), combo
                assert rel_err(out[1:], ref) < TOL[torch.bfloat16], combo
            else:
                assert rel_err(out, ref) < TOL[torch.bfloat16], (i, combo)
    x = [t.double().requires_grad_() for t in runs["0", "0"]["dense"]["x"]]
    ref = R.attention(*x)
    want = torch.autograd.grad(ref, x, torch.ones_like(ref))
    for combo, run in runs.items():
        assert rel_err(run["dense"]["out"], ref) < TOL[torch.bfloat16], combo
        for got, w in zip(run["dense"]["grads"], want):
            assert rel_err(got, w) < TOL[torch.bfloat16], combo
    for name, value in (("MKA_CUDA_DECODE_CLUSTER", "9x"), ("MKA_CUDA_DECODE_SPLITS", "-2")):
        bad = subprocess.run([sys.executable, "-c", _CLUSTER_CHILD, str(tmp_path / "x.pt")],
                             env=dict(os.environ, PYTHONPATH=pythonpath, **{name: value}),
                             capture_output=True, text=True)
        assert bad.returncode != 0 and f"{name}: expected 0 or" in bad.stderr
