"""mka::fastmka (route fusion + one attention) against the float64 reference."""

import pytest
import torch

from conftest import assert_close, dtype_params
from harness import compare, head_dim_for, randn, router, state
from mka import reference as R

OUTS = ["out", "k_state_out", "v_state_out"]

# (B, Tq, Tk, H, G, d, causal, window, L, with_state)
CASES = [
    (2, 33, 33, 4, 4, 16, True, None, 2, False),
    (2, 33, 33, 4, 2, 64, True, None, 3, True),
    (1, 65, 65, 8, 2, 128, True, 9, 2, True),
    (1, 17, 40, 4, 1, 64, True, None, 3, False),
    (2, 7, 7, 2, 1, 256, False, None, 2, True),
    (1, 1, 1, 2, 2, 32, True, None, 3, True),
    (1, 0, 9, 2, 1, 64, True, None, 2, True),  # no query: gradients only through the states
]


@pytest.mark.parametrize("device,dtype", dtype_params())
@pytest.mark.parametrize("B,Tq,Tk,H,G,d,causal,window,L,with_state", CASES)
def test_fastmka_matches_reference(device, dtype, B, Tq, Tk, H, G, d, causal, window, L,
                                   with_state):
    d = head_dim_for(device, d)
    inp = dict(q=randn(B, Tq, H, d, device=device, dtype=dtype),
               k=randn(B, Tk, G, d, device=device, dtype=dtype),
               v=randn(B, Tk, G, d, device=device, dtype=dtype),
               lam=router(B, Tk, L, device, dtype), beta=0.8)
    if L == 3:
        inp.update(k3=randn(B, Tk, G, d, device=device, dtype=dtype),
                   v3=randn(B, Tk, G, d, device=device, dtype=dtype))
    if with_state:
        inp.update(k_state=state(B, G, d, device, dtype), v_state=state(B, G, d, device, dtype))
    compare(torch.ops.mka.fastmka, R.fastmka, inp,
            dict(causal=causal, scale=None, window=window), dtype, out_names=OUTS)


@pytest.mark.parametrize("device,dtype", dtype_params())
def test_fastmka_equals_route_fuse_then_attention(device, dtype):
    B, T, H, G, d = 2, 40, 4, 2, head_dim_for(device, 64)
    q = randn(B, T, H, d, device=device, dtype=dtype)
    k, v = (randn(B, T, G, d, device=device, dtype=dtype) for _ in range(2))
    lam = router(B, T, 2, device, dtype)
    out, ks, vs = torch.ops.mka.fastmka(q, k, v, lam, 0.7)
    kf, vf, ks2, vs2 = torch.ops.mka.route_fuse(k, v, lam, 0.7)
    assert_close(out, torch.ops.mka.attention(q, kf, vf), dtype, "out")
    assert_close(ks, ks2, dtype, "k_state")


@pytest.mark.parametrize("device,dtype", dtype_params())
def test_decode_with_fused_cache_equals_full(device, dtype):
    """Prefill, then one token at a time: route_fuse the new token with the carried state,
    append to the fused cache, attend — equals one fastmka call over the whole sequence."""
    B, T, H, G, d, T0 = 1, 24, 4, 2, head_dim_for(device, 32), 15
    q = randn(B, T, H, d, device=device, dtype=dtype)
    k, v = (randn(B, T, G, d, device=device, dtype=dtype) for _ in range(2))
    lam = router(B, T, 2, device, dtype)
    full, ks_full, _ = torch.ops.mka.fastmka(q, k, v, lam, 0.9)
    kf, vf, ks, vs = torch.ops.mka.route_fuse(k[:, :T0], v[:, :T0], lam[:, :T0], 0.9)
    outs = [torch.ops.mka.attention(q[:, :T0], kf, vf)]
    for t in range(T0, T):
        nk, nv, ks, vs = torch.ops.mka.route_fuse(k[:, t:t + 1], v[:, t:t + 1], lam[:, t:t + 1],
                                                  0.9, k_state=ks, v_state=vs)
        kf, vf = torch.cat([kf, nk], 1), torch.cat([vf, nv], 1)
        outs.append(torch.ops.mka.attention(q[:, t:t + 1], kf, vf))
    assert_close(torch.cat(outs, 1), full, dtype, "decoded out")
    assert_close(ks, ks_full, dtype, "decoded k_state")


@pytest.mark.parametrize("device,dtype", dtype_params())
@pytest.mark.parametrize("op", ["fastmka", "route_fuse"])
@pytest.mark.parametrize("L", [2, 3])
def test_gradients_without_lam_gradient(device, dtype, op, L):
    # lam without requires_grad: the backward skips dlam (on the GPU, the scan's dlam pass,
    # whose local carries it replaces with its own: another summation order); every other
    # gradient must match the one computed alongside dlam.
    B, T, H, G, d = 2, 70, 4, 2, head_dim_for(device, 64)
    q, k, v = (randn(B, T, n, d, device=device, dtype=dtype) for n in (H, G, G))
    lam = router(B, T, L, device, dtype)
    x3 = [randn(B, T, G, d, device=device, dtype=dtype) for _ in range(2)] if L == 3 else [None] * 2
    states = [state(B, G, d, device, dtype) for _ in range(2)]

    def grads(lam_grad: bool):  # of q (fastmka), k, v, the states and k3, v3 (L = 3)
        ins = [t.detach().requires_grad_(True) for t in (q, k, v, *states)]
        l3 = [None if t is None else t.detach().requires_grad_(True) for t in x3]
        lm = lam.detach().requires_grad_(lam_grad)
        if op == "fastmka":
            out = torch.ops.mka.fastmka(ins[0], ins[1], ins[2], lm, 0.8, *l3, ins[3], ins[4])[0]
        else:
            out = torch.ops.mka.route_fuse(ins[1], ins[2], lm, 0.8, *l3, ins[3], ins[4])
            out = out[0] * 1.5 + out[1]
        wrt = (ins if op == "fastmka" else ins[1:]) + [t for t in l3 if t is not None]
        return torch.autograd.grad(out, wrt, torch.ones_like(out))

    for a, b in zip(grads(False), grads(True)):
        torch.testing.assert_close(a, b)  # the dtype's default tolerance
