"""Attention dropout in the CUDA kernels (SPEC §3.5) against the float64 reference with the
same mask (a pure function of the seed, so only rounding differs): outputs and gradients of
attention, fastmka and mka (each level with its own mask), every dtype and head dim, both
attention paths (tensor cores: the mma.sync kernels, on Hopper too; CUDA cores: float32 and
unaligned views), causal or not, windows, GQA, MQA, odd sizes, Tq != Tk. The kernels' masks,
forward and backward, are the reference's bit for bit at a large size, where the kept fraction
is 1 - p; the same seed repeats, another differs, every kernel choice runs the same kernels,
p = 0 is the plain op, and the modules drop the weights on CUDA in training."""

import warnings
import zlib

import pytest
import torch

import mka
from mka import reference as R
from mka.nn import MultiHeadAttention
from cuda_checks import DTYPES, assert_close, check_op, rand, requires_cuda, softmax_rows

pytestmark = [requires_cuda, pytest.mark.cuda]
BETA = 0.9
PS = (0.1, 0.5)

CASES = [  # (B, Tq, Tk, H, G, causal, window)
    (2, 129, 129, 8, 2, True, None),    # GQA; two query blocks, partial key tiles
    (1, 70, 70, 4, 1, False, None),     # MQA, no causal mask
    (1, 200, 200, 8, 2, False, 50),     # window without causal mask
    (1, 97, 230, 4, 2, True, 37),       # Tq < Tk (bottom-right) with a window
    (1, 160, 60, 2, 1, True, None),     # Tq > Tk: rows that see no key
    (1, 3, 3, 2, 1, True, None),
    (1, 1, 1, 2, 2, True, None),
]


def _gen(*key) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def _cuda_qkv(key, dtype, B, T, H, G, d):
    """Fresh leaf q, k, v on the GPU (no float64 copies) and an incoming gradient of out."""
    gen = _gen(*key)
    q, k, v = (rand(gen, B, T, n, d, dtype=dtype)[0].requires_grad_(True) for n in (H, G, G))
    return q, k, v, torch.randn(q.shape, generator=gen).to(dtype).cuda()


def seed_of(s: int) -> int:
    """The seed an op with dropout draws (mka.ops._seed) right after torch.manual_seed(s)."""
    torch.manual_seed(s)
    return int(torch.randint(0, 2 ** 62, (1,), dtype=torch.int64)[0])


def seeded(s: int, fn):
    """fn, run right after torch.manual_seed(s): the op in it draws seed_of(s)."""
    def run(*args):
        torch.manual_seed(s)
        return fn(*args)
    return run


def attention_term_scales(causal, window, p, seed):
    """Sizes of the terms of dq and dk, `scale Σ |dS| |k|` and `scale Σ |dS| |q|` with each
    dS = P (Z dP - delta) taken as |P Z dP| + |P delta|: a row that sees one key has dS = 0
    exactly (delta = Z dP), while a kernel's delta comes from the rounded output, so its
    dq, dk there are that rounding times these sizes (FlashAttention's delta does the same)."""
    def scales(rin, incoming):
        q, k, v = (t.detach() for t in rin)
        g = incoming[0]
        B, Tq, H, d = q.shape
        Tk, G = k.shape[1], k.shape[2]
        sc = d ** -0.5
        kr, vr = (t.repeat_interleave(H // G, dim=2) for t in (k, v))
        s = torch.einsum("bqhd,bkhd->bhqk", q, kr) * sc
        vis = R.visible(Tq, Tk, causal, window)
        w = torch.softmax(s.masked_fill(~vis, float("-inf")), -1)
        w = torch.where(vis.any(-1, keepdim=True), w, torch.zeros_like(w))
        z = R.dropout_mask(seed, p, B, H, Tq, Tk)
        out = R.attention(q, k, v, causal, None, window, p, seed)
        delta = (g * out).sum(-1).permute(0, 2, 1)[..., None]        # (B, H, Tq, 1)
        dp = torch.einsum("bqhd,bkhd->bhqk", g, vr)
        a = w * ((z * dp).abs() + delta.abs())
        dq = sc * torch.einsum("bhqk,bkhd->bqhd", a, kr.abs())
        dk = sc * torch.einsum("bhqk,bqhd->bkhd", a, q.abs())
        dk = dk.reshape(B, Tk, G, H // G, d).sum(3)
        return {"q": dq.norm().item(), "k": dk.norm().item()}
    return scales


@pytest.mark.parametrize("p", PS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c)))
def test_attention_dropout_matches_reference(case, d, dtype, p):
    B, Tq, Tk, H, G, causal, window = case
    gen = _gen(case, d, str(dtype), p)
    q, q64 = rand(gen, B, Tq, H, d, dtype=dtype)
    k, k64 = rand(gen, B, Tk, G, d, dtype=dtype)
    v, v64 = rand(gen, B, Tk, G, d, dtype=dtype)
    check_op(seeded(11, lambda q, k, v: torch.ops.mka.attention(q, k, v, causal, None, window, p)),
             lambda q, k, v: R.attention(q, k, v, causal, None, window, p, seed_of(11)),
             (q, k, v), (q64, k64, v64), dtype, ("q", "k", "v"), gen,
             term_scales=attention_term_scales(causal, window, p, seed_of(11)))


@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16), ids=str)
def test_unaligned_views_drop_on_the_cuda_core_path(dtype):
    # Rows of a view with an odd head stride are not 16-byte aligned: no tensor cores.
    gen = _gen("unaligned", str(dtype))
    B, T, H, d, p = 1, 90, 3, 64, 0.3
    base, base64 = rand(gen, B, T, H * d + 1, dtype=dtype)
    k, k64 = rand(gen, B, T, 1, d, dtype=dtype)
    v, v64 = rand(gen, B, T, 1, d, dtype=dtype)
    base.requires_grad_(True)
    q = base[..., 1:].view(B, T, H, d)
    assert q.data_ptr() % 16 != 0
    q64 = base64[..., 1:].reshape(B, T, H, d).requires_grad_(True)
    k, v, k64, v64 = (t.requires_grad_(True) for t in (k, v, k64, v64))
    torch.manual_seed(3)
    out = torch.ops.mka.attention(q, k, v, True, None, None, p)
    ref = R.attention(q64, k64, v64, True, None, None, p, seed_of(3))
    assert_close(out, ref, dtype, "out (unaligned)")
    g = torch.randn(ref.shape, generator=gen, dtype=torch.float64)
    (out.float() * g.cuda().float()).sum().backward()
    (ref * g).sum().backward()
    assert_close(base.grad[..., 1:].reshape(B, T, H, d), q64.grad, dtype, "dq (unaligned)")
    assert_close(k.grad, k64.grad, dtype, "dk (unaligned)")
    assert_close(v.grad, v64.grad, dtype, "dv (unaligned)")


@pytest.mark.parametrize("p", PS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("L", [2, 3])
@pytest.mark.parametrize("op", ["fastmka", "mka"])
def test_fastmka_and_mka_dropout_match_reference(op, L, d, dtype, p):
    # fastmka drops its one attention with level 0's mask, mka each level's with its own
    # (0, 1, 2). On Hopper fastmka's L = 2 backward and mka's level 2 run the scan through
    # the attention backward (ScanThrough) with the mask.
    gen = _gen(op, L, d, str(dtype), p)
    B, Tq, Tk, H, G, M = 2, 110, 130, 8, 2, 40
    q, q64 = rand(gen, B, Tq, H, d, dtype=dtype)
    k, k64 = rand(gen, B, Tk, G, d, dtype=dtype)
    v, v64 = rand(gen, B, Tk, G, d, dtype=dtype)
    lam, lam64 = softmax_rows(gen, B, Tk if op == "fastmka" else Tq, L, dtype)
    T3 = Tk if op == "fastmka" else M  # level 3: k3, v3 (fastmka) or mem_k, mem_v (mka)
    none = (None, None)
    (x3, x364), (y3, y364) = ((rand(gen, B, T3, G, d, dtype=dtype),
                               rand(gen, B, T3, G, d, dtype=dtype)) if L == 3 else (none, none))
    ks, ks64 = rand(gen, B, G, d, dtype=torch.float32)
    vs, vs64 = rand(gen, B, G, d, dtype=torch.float32)
    window = 45 if L == 3 else None
    fn, ref = getattr(torch.ops.mka, op), getattr(R, op)
    check_op(seeded(12, lambda q, k, v, lam, x3, y3, ks, vs: fn(
                 q, k, v, lam, BETA, x3, y3, ks, vs, True, None, window, p)),
             lambda q, k, v, lam, x3, y3, ks, vs: ref(
                 q, k, v, lam, BETA, x3, y3, ks, vs, True, None, window, p, seed_of(12)),
             (q, k, v, lam, x3, y3, ks, vs), (q64, k64, v64, lam64, x364, y364, ks64, vs64),
             dtype, ("q", "k", "v", "lam", "x3", "y3", "k_state", "v_state"), gen, n_out=3)


def test_fastmka_dropout_with_lam_a_constant():
    # lam without a gradient, several key blocks: ScanThrough's case on Hopper.
    gen = _gen("fastmka_const")
    dtype, B, T, H, G, d, p = torch.bfloat16, 1, 1000, 4, 2, 64, 0.2
    q, q64 = rand(gen, B, T, H, d, dtype=dtype)
    k, k64 = rand(gen, B, T, G, d, dtype=dtype)
    v, v64 = rand(gen, B, T, G, d, dtype=dtype)
    lam, lam64 = softmax_rows(gen, B, T, 2, dtype)
    check_op(seeded(13, lambda q, k, v: torch.ops.mka.fastmka(q, k, v, lam, BETA, None, None,
                                                              None, None, True, None, 300, p)),
             lambda q, k, v: R.fastmka(q, k, v, lam64, BETA, None, None, None, None, True, None,
                                       300, p, seed_of(13)),
             (q, k, v), (q64, k64, v64), dtype, ("q", "k", "v"), gen, n_out=3)


@pytest.mark.parametrize("kernels", ["tma", "lockstep", "mma"])
@pytest.mark.parametrize("p", PS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_kernel_masks_are_the_reference_bit_for_bit(dtype, p, kernels):
    """With q = 0 every visible weight is 1 / Tk, so v = the identity (Tk = d) makes out[i, j]
    = Z[i, j] / Tk: the forward's mask itself; dout = the identity (Tq = d) makes dv[j, i] =
    Z[i, j] / Tk: the backward's. Both must equal the reference's, and keep 1 - p of 2M, for
    every kernel choice (on Hopper: tma the warp-specialised forward and backward, lockstep
    its own forward and the lockstep backward; mma the sm_80 kernels). 256 query blocks: more
    than an H100 or H200 has SMs."""
    B, H, T, d = 16, 16, 128, 128
    q = torch.zeros(B, T, H, d, device="cuda", dtype=dtype)
    k = torch.randn(B, T, H, d, device="cuda", dtype=dtype)
    eye = torch.eye(T, device="cuda", dtype=dtype)[None, :, None, :]
    v = eye.expand(B, T, H, d).contiguous().requires_grad_(True)
    torch.manual_seed(21)
    with mka.use_kernels(attention=kernels):
        out = torch.ops.mka.attention(q, k, v, False, None, None, p)
        (dv,) = torch.autograd.grad(out, v, eye.expand(B, T, H, d))
    want = R.dropout_mask(seed_of(21), p, B, H, T, T).cuda() > 0  # (B, H, Tq, Tk)
    assert torch.equal(out.permute(0, 2, 1, 3) != 0, want), "forward mask"
    assert torch.equal(dv.permute(0, 2, 3, 1) != 0, want), "backward mask"
    assert abs(want.double().mean().item() - (1 - p)) < 0.002


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_same_seed_repeats_another_differs(dtype):
    q, k, v, _ = _cuda_qkv(("repeat", str(dtype)), dtype, 2, 150, 4, 2, 64)
    torch.manual_seed(5)
    a = torch.ops.mka.attention(q, k, v, True, None, None, 0.3)
    torch.manual_seed(5)
    assert torch.equal(torch.ops.mka.attention(q, k, v, True, None, None, 0.3), a)
    assert not torch.equal(torch.ops.mka.attention(q, k, v, True, None, None, 0.3), a)


@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16), ids=str)
def test_every_kernel_choice_drops_alike(dtype, d):
    # The wgmma kernels (tma's warp-specialised ones, pingpong, lockstep) and the mma.sync ones
    # drop the same weights: their outputs and gradients agree to rounding (the sums run in
    # other orders); ping-pong and lockstep share the per-tile math: the same output bits.
    q, k, v, dout = _cuda_qkv(("choice", str(dtype), d), dtype, 1, 300, 4, 2, d)
    results = {}
    for mode in ("tma", "pingpong", "lockstep", "mma"):
        with mka.use_kernels(attention=mode):
            torch.manual_seed(9)
            out = torch.ops.mka.attention(q, k, v, True, None, None, 0.25)
            results[mode] = (out, *torch.autograd.grad(out, (q, k, v), dout))
    assert torch.equal(results["pingpong"][0], results["lockstep"][0])
    for mode in ("tma", "pingpong", "lockstep"):
        for what, x, ref in zip(("out", "dq", "dk", "dv"), results[mode], results["mma"]):
            assert_close(x, ref, dtype, f"{what} ({mode} against mma)")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_p_zero_is_the_plain_op(dtype):
    q, k, v, dout = _cuda_qkv(("p0", str(dtype)), dtype, 1, 200, 4, 2, 64)
    plain = torch.ops.mka.attention(q, k, v, True, None, 90)
    zero = torch.ops.mka.attention(q, k, v, True, None, 90, 0.0)
    assert torch.equal(plain, zero)
    grads = [torch.autograd.grad(out, (k, v), dout) for out in (plain, zero)]
    assert all(torch.equal(a, b) for a, b in zip(*grads))


def test_modules_drop_the_weights_on_cuda_in_training():
    torch.manual_seed(0)
    m = MultiHeadAttention(256, 4, dropout=0.5).cuda()
    m.resid_dropout.p = 0.0  # the weights' dropout alone
    x = torch.randn(2, 40, 256, device="cuda")
    m.train()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not torch.equal(m(x), m(x))
    m.eval()
    assert torch.equal(m(x), m(x))
