"""mka::route_fuse (EMA + key-side routing) against the float64 reference."""

import pytest
import torch

from conftest import assert_close, dtype_params
from harness import compare, head_dim_for, randn, router, state
from mka import reference as R

OUTS = ["k_fused", "v_fused", "k_state_out", "v_state_out"]


@pytest.mark.parametrize("device,dtype", dtype_params())
@pytest.mark.parametrize("B,T,G,d", [(2, 33, 2, 16), (1, 129, 4, 64), (3, 1, 1, 128), (1, 7, 1, 256)])
@pytest.mark.parametrize("L", [2, 3])
@pytest.mark.parametrize("with_state", [False, True])
def test_route_fuse_matches_reference(device, dtype, B, T, G, d, L, with_state):
    d = head_dim_for(device, d)
    inp = dict(k=randn(B, T, G, d, device=device, dtype=dtype),
               v=randn(B, T, G, d, device=device, dtype=dtype),
               lam=router(B, T, L, device, dtype), beta=0.9)
    if L == 3:
        inp.update(k3=randn(B, T, G, d, device=device, dtype=dtype),
                   v3=randn(B, T, G, d, device=device, dtype=dtype))
    if with_state:
        inp.update(k_state=state(B, G, d, device, dtype), v_state=state(B, G, d, device, dtype))
    compare(torch.ops.mka.route_fuse, R.route_fuse, inp, {}, dtype, out_names=OUTS)


@pytest.mark.parametrize("device,dtype", dtype_params())
def test_one_state_only_and_float32_lam(device, dtype):
    B, T, G, d = 2, 20, 2, head_dim_for(device, 32)
    inp = dict(k=randn(B, T, G, d, device=device, dtype=dtype),
               v=randn(B, T, G, d, device=device, dtype=dtype),
               lam=router(B, T, 2, device, torch.float32), beta=0.5,
               v_state=state(B, G, d, device, dtype))
    compare(torch.ops.mka.route_fuse, R.route_fuse, inp, {}, dtype, out_names=OUTS)


@pytest.mark.parametrize("device,dtype", dtype_params())
@pytest.mark.parametrize("beta", [0.0, 0.99])
def test_chunked_equals_one_call(device, dtype, beta):
    """[0:T1] then [T1:T] with the carried state == one call on [0:T] (SPEC §2)."""
    B, T, G, d, T1 = 2, 50, 2, head_dim_for(device, 16), 19
    k, v = (randn(B, T, G, d, device=device, dtype=dtype) for _ in range(2))
    lam = router(B, T, 2, device, dtype)
    full = torch.ops.mka.route_fuse(k, v, lam, beta)
    a = torch.ops.mka.route_fuse(k[:, :T1], v[:, :T1], lam[:, :T1], beta)
    b = torch.ops.mka.route_fuse(k[:, T1:], v[:, T1:], lam[:, T1:], beta, k_state=a[2],
                                 v_state=a[3])
    # Token by token, as decode does.
    ks = vs = None
    steps = []
    for t in range(T):
        o = torch.ops.mka.route_fuse(k[:, t:t + 1], v[:, t:t + 1], lam[:, t:t + 1], beta,
                                     k_state=ks, v_state=vs)
        ks, vs = o[2], o[3]
        steps.append(o[0])
    assert_close(torch.cat([a[0], b[0]], 1), full[0], dtype, "chunked k_fused")
    assert_close(torch.cat([a[1], b[1]], 1), full[1], dtype, "chunked v_fused")
    assert_close(b[2], full[2], dtype, "chunked k_state")
    assert_close(torch.cat(steps, 1), full[0], dtype, "token-by-token k_fused")
    assert_close(ks, full[2], dtype, "token-by-token k_state")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device"))])
def test_empty(device):
    k = torch.randn(2, 0, 2, 64, device=device, requires_grad=True)
    lam = torch.softmax(torch.randn(2, 0, 2, device=device), -1)
    ks = torch.randn(2, 2, 64, device=device)
    kf, vf, kso, vso = torch.ops.mka.route_fuse(k, k, lam, 0.9, k_state=ks)
    assert kf.shape == k.shape and kso.shape == (2, 2, 64)
    torch.testing.assert_close(kso, ks)  # no tokens: the state passes through
    assert (vso == 0).all()
