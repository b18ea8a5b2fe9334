"""The CUDA recall kernels (cuda/memory/recall_attention.cu, recall_chunks.cuh,
recall_mma.cuh) against the float64 composite on the CPU for the same ``chosen``: output, lse
and the gradients of q, k, v for every dtype; the tensor-core kernels (d 64, 128) on both
paths, chunk-major and row-major (the ``recall`` kernel option), and the CUDA-core ones (d 80,
float32, unaligned views); GQA groups of 1, 4, 8 and 20 (two row tiles), MQA; chunks of 16,
24, 64, 128 and 200 with keys past the last whole chunk; -1 padding, rows without chunks, a
chunk every row recalls (runs longer than an M tile and a forward stripe), a row recalling a
chunk twice; strided views, empty Tq, invalid entries (NaN rows, no access outside k and v),
the chunk-major scratch in slabs (bit-identical) and over budget (the row-major kernels),
determinism of the backward and torch.compile."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch

import mka
from mka.memory import recall as RC
from mka.memory.recall_ops import _recall_fwd, native, recall_op
from cuda_checks import DTYPES, TOL, assert_close, kernels_for_test, rel_err, requires_cuda

pytestmark = [requires_cuda, pytest.mark.cuda]

PATHS = ("chunks", "rows")  # the tensor-core paths (KernelOptions.recall)


@pytest.fixture(params=PATHS)
def path(request):
    """Runs the test under each tensor-core path."""
    kernels_for_test(request, recall=request.param)
    return request.param


def _fwd(q, k, v, chosen, C, scale):
    """The forward op (out, lse) under the current kernel options."""
    return _recall_fwd(q, k, v, chosen, C, scale, mka.current_kernels().token)


def _tensor_cores(dtype, d) -> bool:
    return dtype != torch.float32 and d in (64, 128)


def _chosen(gen, B, Tq, Tk, G, C, R, shared=True):
    """Distinct random eligible chunks per row (causal, bottom-right), -1 padded; with
    `shared`, chunk 0 first wherever a row may recall it (many rows share a chunk)."""
    counts = RC.eligible(Tq, Tk, C, None)
    out = torch.full((B, Tq, G, R), -1, dtype=torch.int32)
    for b in range(B):
        for t in range(Tq):
            n = int(counts[t])
            for g in range(G):
                pick = torch.randperm(n, generator=gen)[:R]
                if shared and n > 0 and 0 not in pick.tolist():
                    pick[0] = 0
                out[b, t, g, :len(pick)] = pick.to(torch.int32)
    return out


def _lse_ref(q, k, chosen, C, scale):
    """float64 logsumexp (B, H, Tq) of each row's scores over its chosen keys (-inf: none)."""
    B, Tq, H, d = q.shape
    G, R = k.shape[2], chosen.shape[3]
    tok = (chosen.clamp(min=0).long()[..., None] * C + torch.arange(C)).reshape(B, Tq, G, R * C)
    valid = (chosen >= 0)[..., None].expand(B, Tq, G, R, C).reshape(B, Tq, G, R * C)
    s = torch.einsum("btgxd,btgnd->btgxn", q.reshape(B, Tq, G, H // G, d),
                     RC.gather_tokens(k, tok)) * scale
    s = s.masked_fill(~valid[:, :, :, None, :], -math.inf)
    return torch.logsumexp(s, -1).reshape(B, Tq, H).permute(0, 2, 1)


def _inputs(gen, B, Tq, Tk, H, G, d, dtype):
    xs = [(torch.randn(*s, generator=gen, dtype=torch.float64)).to(dtype)
          for s in ((B, Tq, H, d), (B, Tk, G, d), (B, Tk, G, d))]
    return [x.cuda() for x in xs], [x.to(torch.float64) for x in xs]


def _check(qc, kc, vc, qr, kr, vr, chosen, C, dtype, gen, scale=None):
    """Output, lse and gradients of the CUDA op against the float64 composite."""
    scale = 1.0 / math.sqrt(qr.shape[-1]) if scale is None else scale
    ch_c = chosen.cuda()
    out, lse = _fwd(qc, kc, vc, ch_c, C, scale)
    ref_lse = _lse_ref(qr, kr, chosen, C, scale)
    assert lse.dtype == torch.float32
    none = torch.isinf(ref_lse)
    assert torch.equal(torch.isinf(lse.cpu()), none), "lse: -inf rows differ"
    assert (lse.cpu()[none] < 0).all()
    if (~none).any():
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        err = (lse.cpu().double()[~none] - ref_lse[~none]).abs().max().item()
        assert err < tol, f"lse: max error {err:.3e}"
    leaves_c = [t.clone().requires_grad_(True) for t in (qc, kc, vc)]
    leaves_r = [t.clone().requires_grad_(True) for t in (qr, kr, vr)]
    oc = recall_op(*leaves_c, ch_c, C, scale)
    orf = RC._attend_recalled(*leaves_r, chosen.long(), C, scale)
    assert_close(oc, orf, dtype, "output")
    assert (oc.detach().cpu()[none.permute(0, 2, 1)] == 0).all(), "rows without chunks: not 0"
    g = torch.randn(orf.shape, generator=gen, dtype=torch.float64)
    (oc.float() * g.to("cuda", torch.float32)).sum().backward()
    (orf * g).sum().backward()
    for name, c, r in zip("qkv", leaves_c, leaves_r):
        if r.grad.norm() == 0:
            assert (c.grad == 0).all(), f"d{name}: not zero"
        else:
            assert_close(c.grad, r.grad, dtype, f"d{name}")
    return leaves_c


# B, Tq, Tk, H, G, d, C, R
SHAPES = [
    (2, 96, 160, 8, 2, 64, 16, 4),     # GQA 4, B > 1, Tq < Tk
    (1, 70, 200, 8, 1, 128, 24, 5),    # MQA (group 8), an odd chunk, keys past the last chunk
    (1, 64, 256, 4, 4, 128, 64, 3),    # MHA (group 1), chunks of 64
    (1, 40, 130, 40, 2, 64, 16, 3),    # a group of 20: two row tiles per row
    (1, 50, 100, 4, 2, 80, 16, 3),     # a head dim between kernels (CUDA cores)
    (1, 33, 96, 8, 2, 96, 24, 10),     # R past the eligible chunks: -1 padding
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_recall_matches_reference(shape, dtype, path):
    B, Tq, Tk, H, G, d, C, R = shape
    if path == "rows" and not _tensor_cores(dtype, d):
        pytest.skip("the CUDA-core kernels have one path")
    gen = torch.Generator().manual_seed(sum(shape))
    (qc, kc, vc), (qr, kr, vr) = _inputs(gen, B, Tq, Tk, H, G, d, dtype)
    chosen = _chosen(gen, B, Tq, Tk, G, C, R)
    chosen[:, 1] = -1  # a row without chunks
    _check(qc, kc, vc, qr, kr, vr, chosen, C, dtype, gen)


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float32), ids=str)
def test_recall_strided_views(dtype, path):
    """q a slice of wider heads (aligned: tensor cores for 16-bit), k and v views one element
    into a wider last dim (unaligned: the CUDA-core kernels)."""
    gen = torch.Generator().manual_seed(3)
    B, Tq, Tk, H, G, d, C, R = 2, 48, 128, 8, 2, 64, 16, 4
    wide = torch.randn(B, Tq, 2 * H, d, generator=gen, dtype=torch.float64).to(dtype)
    kw, vw = (torch.randn(B, Tk, G, d + 8, generator=gen, dtype=torch.float64).to(dtype)
              for _ in range(2))
    qc, kc, vc = wide.cuda()[:, :, ::2], kw.cuda()[..., 1:d + 1], vw.cuda()[..., 1:d + 1]
    assert not qc.is_contiguous() and not kc.is_contiguous()
    qr, kr, vr = wide[:, :, ::2].double(), kw[..., 1:d + 1].double(), vw[..., 1:d + 1].double()
    _check(qc, kc, vc, qr, kr, vr, _chosen(gen, B, Tq, Tk, G, C, R), C, dtype, gen)
    # aligned strided k, v too (the tensor-core path's strides)
    kw2 = torch.randn(B, Tk, 2 * G, d, generator=gen, dtype=torch.float64).to(dtype)
    _check(qc, kw2.cuda()[:, :, 1::2], kw2.cuda()[:, :, ::2], qr, kw2[:, :, 1::2].double(),
           kw2[:, :, ::2].double(), _chosen(gen, B, Tq, Tk, G, C, R), C, dtype, gen)


def test_recall_duplicate_entry_counts_twice(path):
    """A row recalling a chunk twice sees its keys twice, as the CPU kernel does."""
    gen = torch.Generator().manual_seed(5)
    B, Tq, Tk, H, G, d, C = 1, 20, 64, 4, 1, 64, 16
    (qc, kc, vc), (qr, kr, vr) = _inputs(gen, B, Tq, Tk, H, G, d, torch.float32)
    chosen = torch.tensor([[0, 0, 2], [1, -1, 1], [3, 2, 1]], dtype=torch.int32)
    chosen = chosen[torch.arange(Tq) % 3].reshape(B, Tq, G, 3)
    for dtype in (torch.bfloat16, torch.float32):
        args = [t.to(dtype).clone().requires_grad_(True) for t in (qc, kc, vc)]
        out = recall_op(*args, chosen.cuda(), C)
        ref_args = [t.to(dtype).double().requires_grad_(True) for t in (qr, kr, vr)]
        ref = recall_op(*ref_args, chosen, C)  # the CPU kernel
        assert_close(out, ref, dtype, "output")
        g = torch.randn(ref.shape, generator=gen, dtype=torch.float64)
        (out.float() * g.cuda().float()).sum().backward()
        (ref * g).sum().backward()
        for name, c, r in zip("qkv", args, ref_args):
            assert_close(c.grad, r.grad, dtype, f"d{name}")


def test_recall_empty_and_no_chunks(path):
    """Empty Tq: nothing out, zero dk, dv. No chunk anywhere (R = 0 or all -1): zeros, lse
    -inf, zero gradients."""
    B, Tk, H, G, d, C = 2, 64, 4, 2, 64, 16
    k = torch.randn(B, Tk, G, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(B, Tk, G, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    for Tq, R in ((0, 3), (5, 0), (5, 2)):
        q = torch.randn(B, Tq, H, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        chosen = torch.full((B, Tq, G, R), -1, dtype=torch.int32, device="cuda")
        out, lse = _fwd(q, k, v, chosen, C, 0.125)
        assert out.shape == q.shape and (out == 0).all()
        assert torch.isneginf(lse).all()
        k.grad = v.grad = None
        recall_op(q, k, v, chosen, C).float().sum().backward()
        assert (k.grad == 0).all() and (v.grad == 0).all() and (q.grad == 0).all()


def test_recall_invalid_entry_nan_rows(path):
    """An invalid entry (neither -1 nor a whole chunk) is never followed: its row's output,
    lse and dq are NaN, the other rows as with the entry absent."""
    gen = torch.Generator().manual_seed(7)
    B, Tq, Tk, H, G, d, C, R = 1, 40, 100, 8, 2, 128, 16, 3
    for dtype in (torch.bfloat16, torch.float32):
        (qc, kc, vc), _ = _inputs(gen, B, Tq, Tk, H, G, d, dtype)
        chosen = _chosen(gen, B, Tq, Tk, G, C, R).cuda()
        bad = chosen.clone()
        bad[0, 30, 1, 0] = 10 ** 6
        bad[0, 35, 0, 2] = -7
        bad[0, 38, 1, 1] = Tk // C  # past the last whole chunk
        q = qc.clone().requires_grad_(True)
        out, lse = _fwd(q, kc, vc, bad, C, 0.1)
        ok, ok_lse = _fwd(qc, kc, vc, chosen, C, 0.1)
        nan = torch.zeros(B, Tq, H, dtype=torch.bool, device="cuda")
        nan[0, 30, 4:], nan[0, 35, :4], nan[0, 38, 4:] = True, True, True
        assert torch.isnan(out[nan]).all() and torch.isnan(lse.permute(0, 2, 1)[nan]).all()
        assert_close(out[~nan], ok[~nan], dtype, "rows without invalid entries")
        recall_op(q, kc, vc, bad, C, 0.1).float().sum().backward()
        assert torch.isnan(q.grad[nan]).all() and torch.isfinite(q.grad[~nan]).all()
        torch.cuda.synchronize()


@pytest.mark.parametrize("d", (128, 80))
def test_recall_backward_deterministic(d, path):
    """Two backward passes are bit-identical (no floating-point atomics)."""
    gen = torch.Generator().manual_seed(11)
    B, Tq, Tk, H, G, C, R = 1, 200, 512, 16, 2, 16, 8
    (qc, kc, vc), _ = _inputs(gen, B, Tq, Tk, H, G, d, torch.bfloat16)
    chosen = _chosen(gen, B, Tq, Tk, G, C, R).cuda()
    grads = []
    for _ in range(2):
        args = [t.clone().requires_grad_(True) for t in (qc, kc, vc)]
        out = recall_op(*args, chosen, C)
        out.float().square().sum().backward()
        grads.append([out.detach()] + [t.grad for t in args])
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def test_recall_compile_fullgraph():
    gen = torch.Generator().manual_seed(13)
    B, Tq, Tk, H, G, d, C, R = 1, 64, 128, 8, 2, 64, 16, 4
    (qc, kc, vc), _ = _inputs(gen, B, Tq, Tk, H, G, d, torch.bfloat16)
    chosen = _chosen(gen, B, Tq, Tk, G, C, R).cuda()
    fn = torch.compile(lambda q, k, v: recall_op(q, k, v, chosen, C), fullgraph=True)
    a = [t.clone().requires_grad_(True) for t in (qc, kc, vc)]
    b = [t.clone().requires_grad_(True) for t in (qc, kc, vc)]
    out_c, out_e = fn(*a), recall_op(*b, chosen, C)
    assert torch.equal(out_c, out_e)
    out_c.float().sum().backward()
    out_e.float().sum().backward()
    for x, y in zip(a, b):
        assert torch.equal(x.grad, y.grad)


@pytest.mark.parametrize("score", ["hash", "mean", "bound", "corners"])
def test_recall_attention_runs_native_on_cuda(score):
    """recall_attention (selection by either score + O3) takes the kernels on CUDA and agrees
    with the composite over the same selection."""
    gen = torch.Generator().manual_seed(17)
    B, Tq, Tk, H, G, d = 1, 256, 256, 8, 2, 64
    (qc, kc, vc), _ = _inputs(gen, B, Tq, Tk, H, G, d, torch.bfloat16)
    assert native(qc) and not native(qc.double())
    planes = RC.simhash_planes(d, device="cuda")
    out, chosen = RC.recall_attention(qc, kc, vc, chunk=32, top=3, planes=planes, window=64,
                                       score=score)
    assert (chosen[:, -1] >= 0).all()  # the last rows may recall 3 chunks: they do
    ref = RC._attend_in_blocks(qc.double(), kc.double(), vc.double(), chosen, 32,
                               1 / math.sqrt(d))
    assert rel_err(out, ref) < TOL[torch.bfloat16]


# B, Tq, Tk, H, G, d, C, R: chunks the forward takes in two key tiles (C > 128) or one of two
# 64-key sub-tiles (C = 128), the backward in 64-key tiles (its last one short); chunks of 24
# (row-major tiles span chunks).
CHUNK_SHAPES = [
    (1, 64, 512, 8, 2, 128, 128, 3),
    (1, 48, 700, 8, 2, 64, 200, 3),
    (2, 40, 100, 4, 1, 128, 24, 4),
]


@pytest.mark.parametrize("shape", CHUNK_SHAPES, ids=str)
def test_recall_chunk_sizes(shape, path):
    B, Tq, Tk, H, G, d, C, R = shape
    gen = torch.Generator().manual_seed(sum(shape) + 1)
    (qc, kc, vc), (qr, kr, vr) = _inputs(gen, B, Tq, Tk, H, G, d, torch.bfloat16)
    _check(qc, kc, vc, qr, kr, vr, _chosen(gen, B, Tq, Tk, G, C, R), C, torch.bfloat16, gen)


@pytest.mark.parametrize("H,G", ((8, 2), (2, 2)), ids=("group4", "group1"))
def test_recall_long_runs(H, G, path):
    """Every row recalls chunk 0, some twice: a run of ~1.2 Tq entries, longer than an M tile
    (64 pairs) and than a forward stripe (1024 pairs), so it is split over blocks."""
    gen = torch.Generator().manual_seed(19)
    B, Tq, Tk, d, C, R = 1, 1100, 320, 64, 64, 3
    (qc, kc, vc), (qr, kr, vr) = _inputs(gen, B, Tq, Tk, H, G, d, torch.bfloat16)
    chosen = torch.randint(1, Tk // C, (B, Tq, G, R), generator=gen, dtype=torch.int32)
    chosen[..., 0] = 0
    chosen[:, ::5, :, 2] = 0  # every fifth row chooses chunk 0 twice
    chosen[:, 7] = -1
    _check(qc, kc, vc, qr, kr, vr, chosen, C, torch.bfloat16, gen)


@pytest.mark.parametrize("d", (64, 128))
def test_recall_paths_agree(d):
    """Chunk-major and row-major on a larger random selection (no reuse between neighbouring
    rows): output, lse and gradients agree to bf16 rounding."""
    gen = torch.Generator().manual_seed(23)
    B, Tq, Tk, H, G, C, R = 2, 1024, 2048, 16, 4, 64, 8
    (qc, kc, vc), _ = _inputs(gen, B, Tq, Tk, H, G, d, torch.bfloat16)
    chosen = _chosen(gen, B, Tq, Tk, G, C, R, shared=False).cuda()
    g = torch.randn(qc.shape, generator=gen).to("cuda", torch.bfloat16)
    res = {}
    for p in PATHS:
        with mka.use_kernels(recall=p):
            leaves = [t.clone().requires_grad_(True) for t in (qc, kc, vc)]
            out, lse = _fwd(*leaves, chosen, C, 1 / math.sqrt(d))
            recall_op(*leaves, chosen, C).backward(g)
            res[p] = [out, lse] + [t.grad for t in leaves]
    none = torch.isinf(res["rows"][1])
    assert torch.equal(none, torch.isinf(res["chunks"][1]))
    assert (res["chunks"][1][~none] - res["rows"][1][~none]).abs().max().item() < 1e-4
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), res["chunks"], res["rows"]):
        if name != "lse":
            assert rel_err(a, b) < TOL[torch.bfloat16], name


_SLAB_SCRIPT = """
import sys, torch, mka
from mka.memory.recall_ops import _recall_fwd, recall_op
gen = torch.Generator().manual_seed(29)
B, Tq, Tk, H, G, d, C, R = 3, 200, 640, 8, 2, 64, 64, 5
q, k, v = (torch.randn(B, T, n, d, generator=gen).to("cuda", torch.bfloat16)
           for T, n in ((Tq, H), (Tk, G), (Tk, G)))
chosen = torch.randint(-1, Tk // C, (B, Tq, G, R), generator=gen, dtype=torch.int32).cuda()
chosen[1, 5, 0, 1] = 10 ** 6
g = torch.randn(q.shape, generator=gen).to("cuda", torch.bfloat16)
res = {}
for p in ("chunks", "rows"):
    with mka.use_kernels(recall=p):
        leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
        res[p] = list(_recall_fwd(*leaves, chosen, C, 0.125, mka.current_kernels().token))
        recall_op(*leaves, chosen, C, 0.125).backward(g)
        res[p] += [t.grad for t in leaves]
torch.save(res, sys.argv[1])
"""


@pytest.mark.parametrize("budget,slabs", ((2_500_000, True), (1000, False)),
                         ids=("slabs", "over-budget"))
def test_recall_scratch_budget(tmp_path, budget, slabs):
    """MKA_CUDA_RECALL_SCRATCH: with a unit's partials (~1 MB) within it, the chunk-major
    kernels run slab by slab (two of the 6 (b, kv head) units each) and give the same bits as
    with one slab; over it, the row-major kernels run (the same bits as those)."""
    script, base, small = tmp_path / "slabs.py", tmp_path / "base.pt", tmp_path / "small.pt"
    script.write_text(_SLAB_SCRIPT)
    for env, out in (({}, base), ({"MKA_CUDA_RECALL_SCRATCH": str(budget)}, small)):
        r = subprocess.run([sys.executable, str(script), str(out)], capture_output=True,
                           text=True, timeout=300,
                           env={**os.environ, "MKA_CUDA_RECALL_SCRATCH": "",
                                "MKA_CUDA_RECALL": "", **env})
        assert r.returncode == 0, r.stderr
    want, got = torch.load(base), torch.load(small)
    for a, b in zip(want["chunks" if slabs else "rows"], got["chunks"]):
        assert torch.equal(a.nan_to_num(7.0), b.nan_to_num(7.0))
    for a, b in zip(want["rows"], got["rows"]):
        assert torch.equal(a.nan_to_num(7.0), b.nan_to_num(7.0))
