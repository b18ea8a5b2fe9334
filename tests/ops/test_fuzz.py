"""A seeded property-based fuzz of the four ops' argument space (hypothesis): shapes down to
zero, GQA, windows from 1 to 2**63 - 1, scales, decays, routing widths, states, level 3 and
mka's memory tokens, with at most one argument made invalid per call. Every call must either
match the float64 reference (valid calls) or raise a one-line ValueError whose message starts
with the name of the argument that was made invalid; nothing crashes or hangs (the native
layer runs in this process)."""

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mka
from mka import reference as R

# The invalid arguments a call may get: (op filter, argument, how it is broken).
FAULTS = [
    ("*", "q", "numpy"), ("*", "k", "none"), ("*", "v", "shape"), ("*", "causal", "str"),
    ("*", "causal", "none"), ("*", "window", 0), ("*", "window", 2.5), ("*", "window", -3),
    ("*", "scale", float("nan")), ("*", "scale", float("inf")), ("*", "scale", "1.0"),
    ("*", "scale", 1e39), ("*", "q", "heads"), ("*", "q", "dtype"),
    ("routed", "beta", 1.0), ("routed", "beta", -0.1), ("routed", "beta", float("nan")),
    ("routed", "beta", "x"), ("routed", "lam", "width"), ("routed", "lam", "tokens"),
    ("routed", "k_state", "dtype"), ("routed", "v_state", "shape"),
    ("keyside", "k3", "unexpected"), ("mka", "mem_k", "unexpected"),
]
OPS = ["attention", "route_fuse", "fastmka", "mka"]


def _applies(where: str, op: str) -> bool:
    return (where == "*" and op != "route_fuse" or where == "routed" and op != "attention"
            or where == "keyside" and op in ("route_fuse", "fastmka") or where == op)


@st.composite
def calls(draw):
    op = draw(st.sampled_from(OPS))
    dtype = draw(st.sampled_from([torch.float64, torch.float32]))
    B, Tq, Tk = draw(st.integers(0, 2)), draw(st.integers(0, 9)), draw(st.integers(0, 9))
    if op in ("route_fuse", "mka"):
        Tq = Tk if op == "route_fuse" else Tq
    G = draw(st.sampled_from([1, 2]))
    H = G * draw(st.sampled_from([1, 2]))
    d = draw(st.sampled_from([1, 3, 8, 16]))
    L = draw(st.sampled_from([2, 3]))
    M = draw(st.integers(0, 4))
    args = dict(
        causal=draw(st.booleans()),
        window=draw(st.one_of(st.none(), st.integers(1, 12), st.just(2**62), st.just(2**63 - 1))),
        scale=draw(st.one_of(st.none(), st.floats(-3, 3, allow_nan=False))),
        beta=draw(st.floats(0, 0.99)), states=draw(st.booleans()))
    faults = [f for f in FAULTS if _applies(f[0], op)]
    fault = draw(st.one_of(st.none(), st.sampled_from(faults)))
    seed = draw(st.integers(0, 2**31 - 1))
    return op, dtype, (B, Tq, Tk, H, G, d, L, M), args, fault, seed


def _build(op, dtype, dims, args, seed):
    B, Tq, Tk, H, G, d, L, M = dims
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(dtype)  # noqa: E731
    lam_t = Tq if op == "mka" else Tk
    x = dict(q=rnd(B, Tq, H, d), k=rnd(B, Tk, G, d), v=rnd(B, Tk, G, d),
             lam=torch.softmax(rnd(B, lam_t, L) * 2, -1))
    sdt = torch.float64 if dtype == torch.float64 else torch.float32
    if args["states"]:
        x["k_state"], x["v_state"] = rnd(B, G, d).to(sdt), rnd(B, G, d).to(sdt)
    if L == 3 and op in ("route_fuse", "fastmka"):
        x["k3"], x["v3"] = rnd(B, Tk, G, d), rnd(B, Tk, G, d)
    if L == 3 and op == "mka":
        x["mem_k"], x["mem_v"] = rnd(B, M, G, d), rnd(B, M, G, d)
    for name in ("causal", "window", "scale"):
        x[name] = args[name]
    x["beta"] = args["beta"]
    return x


def _break(x, fault):
    _, name, how = fault
    if how == "numpy":
        x[name] = np.zeros(tuple(x[name].shape), "f4")
    elif how == "none":
        x[name] = None
    elif how == "str":
        x[name] = "yes"
    elif how == "shape":
        t = x.get(name, x["k"])
        x[name] = torch.zeros(*t.shape[:-1], t.shape[-1] + 1, dtype=t.dtype)
    elif name in ("k_state", "v_state"):
        if name not in x:
            x["k_state"], x["v_state"] = (torch.zeros(x["k"].shape[0], x["k"].shape[2],
                                                      x["k"].shape[3]) for _ in range(2))
        x[name] = (x[name].to(torch.float16) if how == "dtype"
                   else torch.zeros(1, 1, x[name].shape[-1] + 1, dtype=x[name].dtype))
    elif how == "heads":  # H not a multiple of G: three query heads over two kv heads
        B, Tq, _, d = x["q"].shape
        x["q"] = torch.zeros(B, Tq, 3, d, dtype=x["q"].dtype)
        x["k"], x["v"] = (torch.zeros(t.shape[0], t.shape[1], 2, d, dtype=t.dtype)
                          for t in (x["k"], x["v"]))
    elif how == "dtype":
        x[name] = x[name].to(torch.int32) if name == "q" else x[name].to(torch.float16)
    elif how == "width":
        x["lam"] = torch.full((*x["lam"].shape[:2], 4), 0.25, dtype=x["lam"].dtype)
    elif how == "tokens":
        x["lam"] = torch.full((x["lam"].shape[0], x["lam"].shape[1] + 1, x["lam"].shape[2]),
                              0.5, dtype=x["lam"].dtype)
    elif how == "unexpected":
        if name not in x:  # given where lam has L = 2 levels
            t = x["k"]
            x[name] = torch.zeros_like(t)
            x[name.replace("k", "v", 1)] = torch.zeros_like(t)
        else:  # required where lam has L = 3: drop it
            del x[name]
    else:
        x[name] = how
    return name


def _call(op, x, fn):
    kw = {n: x[n] for n in ("k3", "v3", "mem_k", "mem_v", "k_state", "v_state") if n in x}
    attn = dict(causal=x["causal"], scale=x["scale"], window=x["window"])
    if op == "attention":
        return (fn.attention(x["q"], x["k"], x["v"], **attn),)
    if op == "route_fuse":
        return fn.route_fuse(x["k"], x["v"], x["lam"], x["beta"], **kw)
    return getattr(fn, op)(x["q"], x["k"], x["v"], x["lam"], x["beta"], **kw, **attn)


def _reference(op, x):
    x64 = {n: (t.double() if isinstance(t, torch.Tensor) else t) for n, t in x.items()}
    return _call(op, x64, R)


@settings(derandomize=True, max_examples=1000, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(calls())
def test_fuzz_ops(case):
    op, dtype, dims, args, fault, seed = case
    if fault == ("*", "scale", 1e39) and dtype == torch.float64:
        fault, args = None, {**args, "scale": 1e39}  # float64 kernels take it: a valid call
    x = _build(op, dtype, dims, args, seed)
    if fault is None:
        outs = _call(op, x, mka)
        refs = _reference(op, x)
        tol = 1e-10 if dtype == torch.float64 else 1e-5
        for i, (o, r) in enumerate(zip(outs, refs)):
            assert o.shape == r.shape, (op, i)
            assert torch.isfinite(o).all(), (op, i)
            err = (o.double() - r).norm() / max(r.norm(), 1e-30)
            assert err < tol or (o.double() - r).abs().max() < 1e-12, (op, i, float(err))
        return
    name = _break(x, fault)
    with pytest.raises(ValueError) as e:
        _call(op, x, mka)
    message = str(e.value)
    assert "\n" not in message and len(message) < 300, message
    # H % G is reported by q; dtypes of k/v by the tensor; otherwise by the broken argument.
    assert message.split(":")[0] in ({name} | ({"q"} if name == "q" else set())), (fault, message)


@pytest.mark.parametrize("window", [2**62, 2**63 - 1])
def test_huge_window_is_no_window(window):
    # Tq - Tk >= 2 with a window near 2**63 once overflowed the visibility bound (zeros out).
    x = [torch.randn(*s, dtype=torch.float64, requires_grad=True)
         for s in ((1, 6, 2, 8), (1, 3, 1, 8), (1, 3, 1, 8))]
    for causal in (True, False):
        out = mka.attention(*x, causal, None, window)
        ref = R.attention(*x, causal, None, None)
        torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
        seed = torch.randn_like(out)
        for g, g_ref in zip(torch.autograd.grad(out, x, seed), torch.autograd.grad(ref, x, seed)):
            torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_scale_out_of_float32_range_is_an_error(dtype):
    q = torch.randn(1, 4, 2, 8).to(dtype)
    with pytest.raises(ValueError, match="^scale: .* out of float32's range"):
        mka.attention(q, q, q, True, 3e38)
    with pytest.raises(ValueError, match="^scale: .* out of float32's range"):
        mka._C.attention_forward(q=q.float(), k=q.float(), v=q.float(), scale=3e38,
                                 out=torch.empty(1, 4, 2, 8), lse=torch.empty(1, 2, 4))
    q64 = q.double()
    assert torch.isfinite(mka.attention(q64, q64, q64, True, 3e38)).all()  # float64: in range
