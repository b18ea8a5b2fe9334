"""The CUDA recall kernels (cuda/memory/recall_attention.cu, recall_mma.cuh) against the
float64 composite on the CPU for the same ``chosen``: output, lse and the gradients of q, k, v
for every dtype; the tensor-core kernels (d 64, 128) and the CUDA-core ones (d 80, float32,
unaligned views); GQA groups of 1, 4, 8 and 20 (two row tiles), MQA; chunks of 16, 24 and 64
with keys past the last whole chunk; -1 padding, rows without chunks, a chunk every row
recalls, a row recalling a chunk twice; strided views, empty Tq, invalid entries (NaN rows,
no access outside k and v), determinism of the backward and torch.compile."""

from __future__ import annotations

import math

import pytest
import torch

from mka.memory import recall as RC
from mka.memory.recall_ops import _recall_fwd, native, recall_op
from cuda_checks import DTYPES, TOL, assert_close, rel_err, requires_cuda

pytestmark = [requires_cuda, pytest.mark.cuda]


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
    out, lse = _recall_fwd(qc, kc, vc, ch_c, C, scale)
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
def test_recall_matches_reference(shape, dtype):
    B, Tq, Tk, H, G, d, C, R = shape
    gen = torch.Generator().manual_seed(sum(shape))
    (qc, kc, vc), (qr, kr, vr) = _inputs(gen, B, Tq, Tk, H, G, d, dtype)
    chosen = _chosen(gen, B, Tq, Tk, G, C, R)
    chosen[:, 1] = -1  # a row without chunks
    _check(qc, kc, vc, qr, kr, vr, chosen, C, dtype, gen)


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float32), ids=str)
def test_recall_strided_views(dtype):
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


def test_recall_duplicate_entry_counts_twice():
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


def test_recall_empty_and_no_chunks():
    """Empty Tq: nothing out, zero dk, dv. No chunk anywhere (R = 0 or all -1): zeros, lse
    -inf, zero gradients."""
    B, Tk, H, G, d, C = 2, 64, 4, 2, 64, 16
    k = torch.randn(B, Tk, G, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(B, Tk, G, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    for Tq, R in ((0, 3), (5, 0), (5, 2)):
        q = torch.randn(B, Tq, H, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        chosen = torch.full((B, Tq, G, R), -1, dtype=torch.int32, device="cuda")
        out, lse = _recall_fwd(q, k, v, chosen, C, 0.125)
        assert out.shape == q.shape and (out == 0).all()
        assert torch.isneginf(lse).all()
        k.grad = v.grad = None
        recall_op(q, k, v, chosen, C).float().sum().backward()
        assert (k.grad == 0).all() and (v.grad == 0).all() and (q.grad == 0).all()


def test_recall_invalid_entry_nan_rows():
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
        out, lse = _recall_fwd(q, kc, vc, bad, C, 0.1)
        ok, ok_lse = _recall_fwd(qc, kc, vc, chosen, C, 0.1)
        nan = torch.zeros(B, Tq, H, dtype=torch.bool, device="cuda")
        nan[0, 30, 4:], nan[0, 35, :4], nan[0, 38, 4:] = True, True, True
        assert torch.isnan(out[nan]).all() and torch.isnan(lse.permute(0, 2, 1)[nan]).all()
        assert_close(out[~nan], ok[~nan], dtype, "rows without invalid entries")
        recall_op(q, kc, vc, bad, C, 0.1).float().sum().backward()
        assert torch.isnan(q.grad[nan]).all() and torch.isfinite(q.grad[~nan]).all()
        torch.cuda.synchronize()


@pytest.mark.parametrize("d", (128, 80))
def test_recall_backward_deterministic(d):
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


def test_recall_attention_runs_native_on_cuda():
    """recall_attention (selection + O3) takes the kernels on CUDA and agrees with the
    composite over the same selection."""
    gen = torch.Generator().manual_seed(17)
    B, Tq, Tk, H, G, d = 1, 256, 256, 8, 2, 64
    (qc, kc, vc), _ = _inputs(gen, B, Tq, Tk, H, G, d, torch.bfloat16)
    assert native(qc) and not native(qc.double())
    planes = RC.simhash_planes(d, device="cuda")
    out, chosen = RC.recall_attention(qc, kc, vc, chunk=32, top=3, planes=planes, window=64)
    ref = RC._attend_in_blocks(qc.double(), kc.double(), vc.double(), chosen, 32,
                               1 / math.sqrt(d))
    assert rel_err(out, ref) < TOL[torch.bfloat16]
