"""The backward ops' buffer contract (cpp/include/mka/ops.h): with accumulate=False every
gradient element is overwritten (the Python ops hand in uninitialized buffers), and the
keys/values a forward keeps (SavedKeys: fastmka's fused keys and scan carries, mka's EMA
keys) give the same gradients as remaking them. Both against accumulate=True into zeros
without saved keys; NaN-filled buffers never pass."""

import pytest
import torch

from conftest import dtype_params
from harness import head_dim_for, randn, router, state
from mka import _C, current_kernels
from mka.ops import _cast, _compute_dtype, _lam, _launch

# (B, Tq, T, H, G, d, causal, window)
SHAPES = [(2, 40, 40, 4, 2, 64, True, None), (1, 0, 9, 2, 1, 64, True, None),
          (1, 33, 33, 4, 4, 128, True, 7)]
IDS = ["full", "no_query", "window"]


def _filled(like, fill, dtype=None):
    return None if like is None else torch.full(like.shape, fill, dtype=dtype or like.dtype,
                                                device=like.device)


def _both_ways(backward, likes, names, saved):
    """backward(grad buffers by name, saved keys by name, accumulate) twice: into zeros
    without saved keys, and overwriting NaN-filled buffers with them; the two must agree."""
    runs = {}
    for accumulate, fill, keep in ((True, 0.0, {n: None for n in saved}), (False, float("nan"),
                                                                          saved)):
        g = {n: _filled(t, fill) for n, t in zip(names, likes)}
        backward(g, keep, accumulate)
        runs[accumulate] = g
    _compare(runs[False], runs[True])


def _launch_of(t):
    return _launch(t, current_kernels().token)


def _compare(got, want):
    for name, w in want.items():
        if w is None:
            continue
        # Not bitwise on CUDA: dq's and dlam's float32 atomics add in any order.
        torch.testing.assert_close(got[name], w, rtol=2e-2, atol=2e-2, msg=name)


def _inputs(device, dtype, B, Tq, T, H, G, d, L, key_side):
    d = head_dim_for(device, d)
    cdt = _compute_dtype(torch.empty(0, dtype=dtype, device=device))
    c = lambda t: _cast(t, cdt)  # noqa: E731
    x = dict(q=c(randn(B, Tq, H, d, device=device, dtype=dtype)),
             k=c(randn(B, T, G, d, device=device, dtype=dtype)),
             v=c(randn(B, T, G, d, device=device, dtype=dtype)),
             ks=state(B, G, d, device, dtype), vs=state(B, G, d, device, dtype))
    x["lam"] = _lam(router(B, T if key_side else Tq, L, device, dtype), cdt)
    x["x3"] = c(randn(B, T if key_side else 5, G, d, device=device, dtype=dtype))
    x["v3"] = c(randn(B, T if key_side else 5, G, d, device=device, dtype=dtype))
    x["dout"] = c(randn(B, Tq, H, d, device=device, dtype=dtype))
    return x


@pytest.mark.parametrize("device,dtype", dtype_params())
def test_route_fuse_backward_overwrites(device, dtype):
    x = _inputs(device, dtype, 2, 0, 40, 1, 2, 64, 3, True)
    dkf, dvf = (randn(*x["k"].shape, device=device, dtype=dtype).to(x["k"].dtype)
                for _ in range(2))
    dso = (x["ks"] * 0.5, x["vs"] * 0.5)
    _both_ways(lambda g, saved, acc: _C.route_fuse_backward(
        k=x["k"], v=x["v"], lam=x["lam"], beta=0.8, k3=x["x3"], v3=x["v3"], k_state=x["ks"],
        v_state=x["vs"], dk_fused=dkf, dv_fused=dvf, dk_state_out=dso[0], dv_state_out=dso[1],
        **g, accumulate=acc, **_launch_of(x["k"])),
        [x[n] for n in ("k", "v", "lam", "x3", "v3", "ks", "vs")],
        ["dk", "dv", "dlam", "dk3", "dv3", "dk_state", "dv_state"], {})


# Per op: forward, backward, key-side lam, the names of the level-3 inputs, which forward
# outputs the backward takes (by name, before dout) and the saved keys, the gradient buffers'
# names and the inputs they are like.
GRADS = ["dq", "dk", "dv", "dlam", "dk_state", "dv_state"]
OPS = {
    "fastmka": (torch.ops.mka._fastmka_fwd, _C.fastmka_backward, True, ("k3", "v3"),
                lambda o: ({"out": o[0], "lse": o[1]},
                           {"saved_k": o[4], "saved_v": o[5], "saved_carry": o[6]}),
                GRADS + ["dk3", "dv3"]),
    "mka": (torch.ops.mka._mka_fwd, _C.mka_backward, False, ("mem_k", "mem_v"),
            lambda o: ({"o_levels": o[1], "lse_levels": o[2]},
                       {"saved_k": o[5], "saved_v": o[6]}),
            GRADS + ["dmem_k", "dmem_v"]),
}
LIKES = {"dq": "q", "dk": "k", "dv": "v", "dlam": "lam", "dk_state": "ks", "dv_state": "vs",
         "dk3": "x3", "dv3": "v3", "dmem_k": "x3", "dmem_v": "v3"}


@pytest.mark.parametrize("device,dtype", dtype_params())
@pytest.mark.parametrize("B,Tq,T,H,G,d,causal,window", SHAPES, ids=IDS)
@pytest.mark.parametrize("op", list(OPS))
def test_backward_overwrites_and_uses_saved(op, device, dtype, B, Tq, T, H, G, d, causal,
                                            window):
    fwd, bwd, key_side, level3, split, names = OPS[op]
    x = _inputs(device, dtype, B, Tq, T, H, G, d, 3, key_side)
    token = current_kernels().token
    args = (x["q"], x["k"], x["v"], x["lam"], 0.8, x["x3"], x["v3"], x["ks"], x["vs"], causal,
            None, window, 0.0, None, token)
    kept, saved = split(fwd(*args))  # fastmka: (out, lse), mka: (o_levels, lse_levels)
    inputs = dict(q=x["q"], k=x["k"], v=x["v"], lam=x["lam"], beta=0.8, k_state=x["ks"],
                  v_state=x["vs"], causal=causal, scale=None, window=window)
    inputs.update({level3[0]: x["x3"], level3[1]: x["v3"]})
    dso = dict(dk_state_out=x["ks"] * 0.5, dv_state_out=x["vs"] * 0.5)
    _both_ways(lambda g, keys, acc: bwd(**inputs, **kept, dout=x["dout"], **dso, **g, **keys,
                                        accumulate=acc, **_launch(x["q"], token)),
               [x[LIKES[n]] for n in names], names, saved)
