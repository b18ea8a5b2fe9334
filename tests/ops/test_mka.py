"""mka::mka (one attention per memory level, query-side routing) against the reference."""

import pytest
import torch

from conftest import assert_close, dtype_params
from harness import compare, head_dim_for, randn, router, state
from mka import reference as R

OUTS = ["out", "k_state_out", "v_state_out"]

# (B, Tq, Tk, H, G, d, causal, window, L, M, with_state)
CASES = [
    (2, 33, 33, 4, 4, 16, True, None, 2, 0, False),
    (2, 33, 33, 4, 2, 64, True, None, 3, 12, True),
    (1, 65, 65, 8, 2, 128, True, 9, 3, 5, False),
    (1, 17, 40, 4, 1, 64, True, None, 2, 0, True),
    (2, 7, 7, 2, 1, 256, False, None, 3, 0, True),   # L = 3 with no recalled token: O3 = 0
    (1, 1, 1, 2, 2, 32, True, None, 3, 1, False),
]


@pytest.mark.parametrize("device,dtype", dtype_params())
@pytest.mark.parametrize("B,Tq,Tk,H,G,d,causal,window,L,M,with_state", CASES)
def test_mka_matches_reference(device, dtype, B, Tq, Tk, H, G, d, causal, window, L, M,
                               with_state):
    d = head_dim_for(device, d)
    inp = dict(q=randn(B, Tq, H, d, device=device, dtype=dtype),
               k=randn(B, Tk, G, d, device=device, dtype=dtype),
               v=randn(B, Tk, G, d, device=device, dtype=dtype),
               lam=router(B, Tq, L, device, dtype), beta=0.8)
    if L == 3:
        inp.update(mem_k=randn(B, M, G, d, device=device, dtype=dtype),
                   mem_v=randn(B, M, G, d, device=device, dtype=dtype))
    if with_state:
        inp.update(k_state=state(B, G, d, device, dtype), v_state=state(B, G, d, device, dtype))
    compare(torch.ops.mka.mka, R.mka, inp, dict(causal=causal, scale=None, window=window),
            dtype, out_names=OUTS)


@pytest.mark.parametrize("device,dtype", dtype_params())
def test_mka_states_chunk(device, dtype):
    """The returned EMA state continues the sequence: two calls == one call."""
    B, T, H, G, d, T1 = 2, 30, 2, 1, head_dim_for(device, 16), 11
    q = randn(B, T, H, d, device=device, dtype=dtype)
    k, v = (randn(B, T, G, d, device=device, dtype=dtype) for _ in range(2))
    lam = router(B, T, 2, device, dtype)
    _, ks, vs = torch.ops.mka.mka(q, k, v, lam, 0.95)
    _, ks1, vs1 = torch.ops.mka.mka(q[:, :T1], k[:, :T1], v[:, :T1], lam[:, :T1], 0.95)
    _, ks2, vs2 = torch.ops.mka.mka(q[:, T1:], k[:, T1:], v[:, T1:], lam[:, T1:], 0.95,
                                    k_state=ks1, v_state=vs1)
    assert_close(ks2, ks, dtype, "k_state")
    assert_close(vs2, vs, dtype, "v_state")


@pytest.mark.parametrize("device,dtype", dtype_params())
def test_mka_decode_from_raw_cache_equals_full(device, dtype):
    """A decode step passes the cached raw k/v with the sequence's initial state: level 2's
    EMA keys are rebuilt inside the op, so the cache holds only k/v (SPEC §3)."""
    B, T, H, G, d = 1, 20, 4, 2, head_dim_for(device, 32)
    q = randn(B, T, H, d, device=device, dtype=dtype)
    k, v = (randn(B, T, G, d, device=device, dtype=dtype) for _ in range(2))
    lam = router(B, T, 2, device, dtype)
    full, _, _ = torch.ops.mka.mka(q, k, v, lam, 0.9)
    for t in (0, 7, T - 1):
        step, _, _ = torch.ops.mka.mka(q[:, t:t + 1], k[:, :t + 1], v[:, :t + 1],
                                       lam[:, t:t + 1], 0.9)
        assert_close(step, full[:, t:t + 1], dtype, f"decode step {t}")
