"""paged_write_fused (SPEC §7.1): FastMKA's write — route_fuse of the new tokens from the held
EMA states, the fused rows written into the pages, the states replaced in place — against
the float64 reference (route_fuse, then the rows placed by position), on the native ops and
the torch path, CPU and CUDA."""

from __future__ import annotations

import math

import pytest
import torch

from mka import reference as R
from mka.memory import paged_write_fused
from mka.memory import torch_paged as TP
from conftest import TOL, dtype_params, rel_err, shuffled_block_table

IMPLS = {"ops": paged_write_fused, "torch": TP.paged_write_fused}
BETA = 0.85


def _case(starts, T, S, G, d, L, seed=0):
    """float64 inputs: new tokens after ``starts[b]`` held tokens, a shuffled table with room
    for them, pages of noise (the slots not written must keep it), held states."""
    gen = torch.Generator().manual_seed(seed)
    ends = [n + T for n in starts]
    W = max(1, max(math.ceil(n / S) for n in ends)) + 1
    P = sum(math.ceil(n / S) for n in ends) + 2
    B = len(starts)
    bt = shuffled_block_table(ends, S, W, P, gen)
    rnd = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64)  # noqa: E731
    k, v = rnd(B, T, G, d), rnd(B, T, G, d)
    lam = torch.softmax(rnd(B, T, L), -1)
    k3, v3 = (rnd(B, T, G, d), rnd(B, T, G, d)) if L == 3 else (None, None)
    return dict(k=k, v=v, lam=lam, k3=k3, v3=v3, kp=rnd(P, S, G, d), vp=rnd(P, S, G, d),
                bt=bt, start=torch.tensor(starts, dtype=torch.int32),
                ks=rnd(B, G, d) * 0.5, vs=rnd(B, G, d) * 0.5)


def _reference(c):
    """The pages and states paged_write_fused must leave, in float64."""
    kf, vf, ks, vs = R.route_fuse(c["k"], c["v"], c["lam"], BETA, c["k3"], c["v3"], c["ks"], c["vs"])
    kp, vp = c["kp"].clone(), c["vp"].clone()
    S = kp.shape[1]
    for b, n in enumerate(c["start"].tolist()):
        for t in range(c["k"].shape[1]):
            page = int(c["bt"][b, (n + t) // S])
            kp[page, (n + t) % S], vp[page, (n + t) % S] = kf[b, t], vf[b, t]
    return kp, vp, ks, vs


def _run(impl, c, device, dtype, lam_dtype=None):
    sdt = torch.float64 if dtype == torch.float64 else torch.float32
    to = lambda t, dt=dtype: None if t is None else t.to(device=device, dtype=dt)  # noqa: E731
    kp, vp, ks, vs = to(c["kp"]), to(c["vp"]), to(c["ks"], sdt), to(c["vs"], sdt)
    IMPLS[impl](to(c["k"]), to(c["v"]), to(c["lam"], lam_dtype or dtype), BETA, kp, vp,
                c["bt"].to(device), c["start"].to(device), ks, vs, to(c["k3"]), to(c["v3"]))
    return kp, vp, ks, vs


CASES = [  # starts (held tokens per sequence), new tokens T, page size, G, d
    ((0,), 1, 16, 1, 64),
    ((5, 0, 17), 1, 4, 2, 16),       # a decode step, sequences of different lengths
    ((3, 9), 5, 4, 3, 8),            # a few tokens across page boundaries
    ((9, 2), 16, 4, 2, 64),          # the most tokens the CUDA write takes in one pass
    ((0, 30), 40, 16, 2, 128),       # a prefill chunk: several chunks of the CUDA scan
    ((7,), 70, 1, 1, 32),            # pages of one token
    ((2,), 600, 16, 1, 8),           # 32 chunks of the CUDA scan, the last ones empty
    ((5, 1), 3, 8, 2, 40),           # a head dim that is not a multiple of 32 columns
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("L", [2, 3])
@pytest.mark.parametrize("device,dtype", dtype_params())
def test_equals_route_fuse_then_write(impl, case, L, device, dtype):
    c = _case(*case, L=L)
    want = _reference(c)
    got = _run(impl, c, device, dtype)
    for name, g, w in zip(("k_pages", "v_pages", "k_state", "v_state"), got, want):
        assert rel_err(g, w) < TOL[dtype], name


@pytest.mark.parametrize("device,dtype", [p for p in dtype_params() if p.values[1] != torch.float64])
def test_float32_routing_weights(device, dtype):
    """lam may be float32 whatever the inputs' dtype (a router's softmax in float32)."""
    c = _case((2, 11), 3, 4, 2, 16, L=2)
    want = _reference(c)
    got = _run("ops", c, device, dtype, lam_dtype=torch.float32)
    for g, w in zip(got, want):
        assert rel_err(g, w) < TOL[dtype]


@pytest.mark.parametrize("impl", IMPLS)
def test_no_new_tokens_changes_nothing(impl):
    c = _case((4, 6), 0, 4, 2, 8, L=2)
    got = _run(impl, c, "cpu", torch.float64)
    for g, w in zip(got, (c["kp"], c["vp"], c["ks"], c["vs"])):
        assert torch.equal(g, w)


def test_a_decode_step_equals_fastmka_over_the_whole_sequence():
    """Prefill through route_fuse, then decode steps through the fused write and paged
    attention, equal FastMKA over the whole sequence (the states carried between steps)."""
    import mka
    from mka.memory import paged_attention, paged_write
    gen = torch.Generator().manual_seed(3)
    B, T, H, G, d, S, n0 = 2, 12, 4, 2, 16, 4, 7
    q, k, v = (torch.randn(B, T, n, d, generator=gen, dtype=torch.float64) for n in (H, G, G))
    lam = torch.softmax(torch.randn(B, T, 2, generator=gen, dtype=torch.float64), -1)
    want, _, _ = R.fastmka(q, k, v, lam, BETA)
    P = B * math.ceil(T / S)
    kp, vp = torch.zeros(P, S, G, d, dtype=torch.float64), torch.zeros(P, S, G, d, dtype=torch.float64)
    bt = torch.arange(P, dtype=torch.int32).view(B, -1)
    kf, vf, ks, vs = mka.route_fuse(k[:, :n0], v[:, :n0], lam[:, :n0], BETA)
    paged_write(kf, vf, kp, vp, bt, torch.zeros(B, dtype=torch.int32))
    for t in range(n0, T):
        start = torch.full((B,), t, dtype=torch.int32)
        paged_write_fused(k[:, t:t + 1], v[:, t:t + 1], lam[:, t:t + 1], BETA, kp, vp, bt, start, ks, vs)
        out = paged_attention(q[:, t:t + 1], kp, vp, bt, start + 1)
        assert rel_err(out, want[:, t:t + 1]) < 1e-10


def test_compiles_without_graph_breaks():
    c = _case((3, 8), 1, 4, 2, 8, L=2)
    f32 = {n: (t.float() if t is not None and t.is_floating_point() else t) for n, t in c.items()}

    def step(k, v, lam, kp, vp, bt, start, ks, vs):
        paged_write_fused(k, v, lam, BETA, kp, vp, bt, start, ks, vs)
        return ks * 2

    args = [f32[n] for n in ("k", "v", "lam", "kp", "vp", "bt", "start", "ks", "vs")]
    eager = [a.clone() for a in args]
    want = step(*eager)
    got = torch.compile(step, fullgraph=True)(*args)
    assert torch.equal(got, want) and torch.equal(args[3], eager[3]) and torch.equal(args[7], eager[7])


# ------------------------------------------------------------------ errors

def _call(**change):
    c = {n: (t.float() if t is not None and t.is_floating_point() else t)
         for n, t in _case((3, 8), 2, 4, 2, 8, L=2).items()}
    c.update(change)
    paged_write_fused(c["k"], c["v"], c["lam"], c.get("beta", BETA), c["kp"], c["vp"], c["bt"],
                      c["start"], c["ks"], c["vs"], c["k3"], c["v3"])


@pytest.mark.parametrize("change,match", [
    (dict(ks=None), "k_state: required"),
    (dict(ks=torch.zeros(2, 2, 8, dtype=torch.float64)), "k_state: dtype"),
    (dict(vs=torch.zeros(2, 3, 8)), "v_state: expected shape"),
    (dict(lam=torch.full((2, 2, 4), 0.25)), "lam: expected L = 2 or 3"),
    (dict(lam=torch.full((2, 3, 2), 0.5)), "lam: expected shape"),
    (dict(k3=torch.zeros(2, 2, 2, 8)), "k3: given, but lam has L = 2"),
    (dict(beta=1.0), "beta: must be"),
    (dict(v=torch.zeros(2, 2, 2, 4)), "v: expected shape"),
    (dict(start=torch.tensor([3, 30], dtype=torch.int32)), "cache_seqlens"),
    (dict(bt=torch.full((2, 4), -1, dtype=torch.int32)), "block_table"),
])
def test_bad_inputs_raise_naming_the_argument(change, match):
    with pytest.raises(ValueError, match=match):
        _call(**change)


def test_states_that_share_memory_raise():
    """Both states are overwritten in place: one tensor for both, or an expanded view, would
    lose values silently — refused by the op, the torch path and the native layer (which the
    caches' lean path calls directly)."""
    from mka import _C
    from mka.kernels import _State
    from mka.ops import _launch, _native
    c = {n: (t.float() if t is not None and t.is_floating_point() else t)
         for n, t in _case((3, 8), 2, 4, 2, 8, L=2).items()}
    expanded = c["ks"][:1].expand(2, -1, -1)
    for ks, vs, match in ((c["ks"], c["ks"], "the same memory as k_state"),
                          (expanded, c["vs"], "expanded")):
        with pytest.raises(ValueError, match=match):
            paged_write_fused(c["k"], c["v"], c["lam"], BETA, c["kp"], c["vp"], c["bt"],
                              c["start"], ks, vs)
        with pytest.raises(ValueError, match=match):
            TP.paged_write_fused(c["k"], c["v"], c["lam"], BETA, c["kp"], c["vp"], c["bt"],
                                 c["start"], ks, vs)
        with pytest.raises(ValueError, match=match):
            _native(_C.paged_write_fused, k=c["k"], v=c["v"], k_pages=c["kp"], v_pages=c["vp"],
                    block_table=c["bt"], cache_seqlens=c["start"], lam=c["lam"], beta=BETA,
                    k_state=ks, v_state=vs, **_launch(c["k"], _State.token))


def test_a_page_written_by_two_sequences_raises():
    c = _case((3, 8), 2, 4, 2, 8, L=2)
    bt = c["bt"].clone()
    bt[1, 2] = bt[0, 0]  # sequence 1's slots 8.. land in sequence 0's first page
    with pytest.raises(ValueError, match="written by sequences"):
        _call(bt=bt)
