"""The pure-PyTorch backend (mka.nn.torch_ops: SDPA + chunked EMA) against the float64
reference formulas of SPEC §3: outputs and gradients, float64 and float32."""

import pytest
import torch

from conftest import TOL, rel_err
from mka import reference as R
from mka.nn import torch_ops as T

DTYPES = [torch.float64, torch.float32]


def _leaves(*shapes, dtype):
    return [torch.randn(*s, dtype=dtype, requires_grad=True) for s in shapes]


def _check(fn, ref_fn, inputs, dtype):
    """Outputs and every input gradient of ``fn`` against ``ref_fn`` run in float64."""
    ref_inputs = [t.detach().double().requires_grad_() if t.is_floating_point() else t
                  for t in inputs]
    outs, refs = fn(*inputs), ref_fn(*ref_inputs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    refs = refs if isinstance(refs, tuple) else (refs,)
    for i, (o, r) in enumerate(zip(outs, refs)):
        assert rel_err(o, r) < TOL[dtype], f"output {i}: {rel_err(o, r):.2e}"
    weights = [torch.randn_like(r) for r in refs]
    grads = torch.autograd.grad(sum((o * w.to(o.dtype)).sum() for o, w in zip(outs, weights)),
                                inputs)
    ref_grads = torch.autograd.grad(sum((r * w).sum() for r, w in zip(refs, weights)), ref_inputs)
    for i, (g, r) in enumerate(zip(grads, ref_grads)):
        assert rel_err(g, r) < TOL[dtype], f"grad of input {i}: {rel_err(g, r):.2e}"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("Tq,Tk,H,G,causal,window", [
    (9, 9, 4, 4, True, None), (9, 9, 4, 2, True, 3), (1, 9, 4, 1, True, None),
    (4, 9, 4, 2, True, None), (4, 9, 2, 2, True, 2), (6, 8, 4, 2, False, None),
    (5, 7, 2, 1, False, 3), (6, 3, 2, 2, True, None),  # Tq > Tk: rows that see no key
])
def test_attention(dtype, Tq, Tk, H, G, causal, window):
    q, k, v = _leaves((2, Tq, H, 8), (2, Tk, G, 8), (2, Tk, G, 8), dtype=dtype)
    _check(lambda q, k, v: T.attention(q, k, v, causal, None, window),
           lambda q, k, v: R.attention(q, k, v, causal, None, window), [q, k, v], dtype)


def test_attention_narrow_values_and_no_keys():
    q, k = torch.randn(1, 4, 2, 8, dtype=torch.float64), torch.randn(1, 6, 1, 8, dtype=torch.float64)
    v = torch.randn(1, 6, 1, 5, dtype=torch.float64)
    wide = torch.nn.functional.pad(v, (0, 3))  # the reference needs one head dim
    assert rel_err(T.attention(q, k, v, scale=0.3), R.attention(q, k, wide, scale=0.3)[..., :5]) < 1e-12
    empty = T.attention(q, k[:, :0], v[:, :0])
    assert empty.shape == (1, 4, 2, 5) and not empty.any()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T_len,beta,with_state", [
    (150, 0.9, True), (64, 0.5, False), (1, 0.99, True), (37, 0.0, True), (130, 0.999, False)])
def test_ema(dtype, T_len, beta, with_state):
    z, s = _leaves((2, T_len, 3, 5), (2, 3, 5), dtype=dtype)
    sdt = R.state_dtype(dtype)
    if with_state:
        fn = lambda z, s: T.ema(z, beta, s.to(sdt))  # noqa: E731
        _check(fn, lambda z, s: R.ema(z, beta, s), [z, s], dtype)
    else:
        _check(lambda z: T.ema(z, beta), lambda z: R.ema(z, beta), [z], dtype)


def test_ema_in_pieces_and_empty():
    z = torch.randn(1, 100, 2, 4, dtype=torch.float64)
    y, s = T.ema(z, 0.95)
    y1, s1 = T.ema(z[:, :61], 0.95)
    y2, s2 = T.ema(z[:, 61:], 0.95, s1)
    assert rel_err(torch.cat((y1, y2), 1), y) < 1e-12 and rel_err(s2, s) < 1e-12
    y0, s0 = T.ema(z[:, :0], 0.95, s)
    assert y0.shape == (1, 0, 2, 4) and torch.equal(s0, s)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_ema_one_token_is_the_chunked_forms_first_token(dtype):
    """A decode step's recurrence (the one-token path) rounds as the chunked scan's first
    token does, bit for bit; token by token it follows the whole sequence's scan."""
    z = torch.randn(2, 9, 3, 5).to(dtype)
    s = torch.randn(2, 3, 5, dtype=R.state_dtype(dtype))
    y, _ = T.ema(z, 0.93, s)
    one, s1 = T.ema(z[:, :1], 0.93, s)
    assert torch.equal(one, y[:, :1]) and s1.dtype == s.dtype
    if dtype != torch.bfloat16:
        assert torch.equal(s1, y[:, 0])
    state, steps = s, []
    for t in range(9):
        out, state = T.ema(z[:, t:t + 1], 0.93, state)
        steps.append(out)
    tol = {torch.float64: 1e-12, torch.float32: 1e-6, torch.bfloat16: 1e-2}[dtype]
    assert rel_err(torch.cat(steps, 1).double(), y.double()) < tol


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("L,with_state", [(2, True), (3, False), (3, True)])
def test_route_fuse(dtype, L, with_state):
    k, v, k3, v3, ks, vs = _leaves(*[(2, 70, 2, 6)] * 4, (2, 2, 6), (2, 2, 6), dtype=dtype)
    lam = torch.softmax(torch.randn(2, 70, L, dtype=dtype), -1).requires_grad_()
    sdt = R.state_dtype(dtype)
    inputs = [k, v, lam] + ([k3, v3] if L == 3 else []) + ([ks, vs] if with_state else [])

    def split(args, cast):
        k, v, lam, *rest = args
        k3, v3 = (rest[0], rest[1]) if L == 3 else (None, None)
        ks, vs = (cast(rest[-2]), cast(rest[-1])) if with_state else (None, None)
        return k, v, lam, 0.85, k3, v3, ks, vs

    _check(lambda *a: T.route_fuse(*split(a, lambda s: s.to(sdt))),
           lambda *a: R.route_fuse(*split(a, lambda s: s)), inputs, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("L,window", [(2, None), (3, 4)])
def test_fastmka(dtype, L, window):
    q, k, v, k3, v3 = _leaves((2, 20, 4, 8), *[(2, 20, 2, 8)] * 4, dtype=dtype)
    lam = torch.softmax(torch.randn(2, 20, L, dtype=dtype), -1).requires_grad_()
    extra = [k3, v3] if L == 3 else []
    _check(lambda q, k, v, lam, *e: T.fastmka(q, k, v, lam, 0.7, *e, window=window),
           lambda q, k, v, lam, *e: R.fastmka(q, k, v, lam, 0.7, *e, window=window),
           [q, k, v, lam, *extra], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("Tq,Tk,L,M,window", [(20, 20, 2, 0, None), (20, 20, 3, 5, 3),
                                              (3, 20, 3, 4, None), (6, 6, 3, 0, None)])
def test_mka(dtype, Tq, Tk, L, M, window):
    q, k, v, mk, mv, ks, vs = _leaves((2, Tq, 4, 8), (2, Tk, 2, 8), (2, Tk, 2, 8), (2, M, 2, 8),
                                      (2, M, 2, 8), (2, 2, 8), (2, 2, 8), dtype=dtype)
    lam = torch.softmax(torch.randn(2, Tq, L, dtype=dtype), -1).requires_grad_()
    sdt = R.state_dtype(dtype)
    mem = [mk, mv] if L == 3 and M > 0 else []

    def call(fn, cast):
        def run(q, k, v, lam, ks, vs, *mem):
            mk, mv = mem if mem else ((q.new_zeros(2, 0, 2, 8),) * 2 if L == 3 else (None, None))
            return fn(q, k, v, lam, 0.9, mk, mv, cast(ks), cast(vs), window=window)
        return run

    _check(call(T.mka, lambda s: s.to(sdt)), call(R.mka, lambda s: s),
           [q, k, v, lam, ks, vs, *mem], dtype)


@pytest.mark.parametrize("beta", [0.999, 0.99999])
def test_ema_long_float32_keeps_its_precision(beta):
    """Decay powers are exact to float32 rounding even thousands of tokens back."""
    z, s = torch.randn(1, 3000, 2, 4), torch.randn(1, 2, 4)
    y, final = T.ema(z, beta, s)
    y_ref, final_ref = R.ema(z.double(), beta, s.double())
    assert rel_err(y, y_ref) < TOL[torch.float32] and rel_err(final, final_ref) < TOL[torch.float32]
