"""route_fuse, fastmka and mka on CUDA against the float64 reference: outputs, returned EMA
states and the gradients of every differentiable input (states included), for L = 2 and 3,
with and without initial states, T not a multiple of the scan's chunk."""

import pytest
import torch

import mka  # noqa: F401
from mka import reference as R
from cuda_checks import (DTYPES, assert_close, check_op, kernel_names, kernels_for_test, rand,
                         requires_cuda, softmax_rows)

pytestmark = [requires_cuda, pytest.mark.cuda]
BETA = 0.9


@pytest.fixture(autouse=True, params=["1pass", "3pass"])
def scan(request):
    """Every test runs on both EMA scans: the default (single-pass forward, 3-pass backward
    on its 32-token chunks) and the 3-pass scan throughout."""
    kernels_for_test(request, scan=request.param)
    return request.param


def _states(gen, B, G, d, given):
    if not given:
        return (None, None), (None, None)
    ks, ks64 = rand(gen, B, G, d, dtype=torch.float32)
    vs, vs64 = rand(gen, B, G, d, dtype=torch.float32)
    return (ks, vs), (ks64, vs64)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("L", [2, 3])
@pytest.mark.parametrize("states", [False, True], ids=["zero_state", "given_state"])
def test_route_fuse(dtype, L, states):
    gen = torch.Generator().manual_seed(100 + L + 10 * states)
    B, T, G, d = 2, 150, 2, 64
    k, k64 = rand(gen, B, T, G, d, dtype=dtype)
    v, v64 = rand(gen, B, T, G, d, dtype=dtype)
    lam, lam64 = softmax_rows(gen, B, T, L, dtype)
    (k3, k364), (v3, v364) = ((rand(gen, B, T, G, d, dtype=dtype), rand(gen, B, T, G, d, dtype=dtype))
                              if L == 3 else ((None, None), (None, None)))
    (ks, vs), (ks64, vs64) = _states(gen, B, G, d, states)
    check_op(lambda *a: torch.ops.mka.route_fuse(a[0], a[1], a[2], BETA, *a[3:]),
             lambda *a: R.route_fuse(a[0], a[1], a[2], BETA, *a[3:]),
             (k, v, lam, k3, v3, ks, vs), (k64, v64, lam64, k364, v364, ks64, vs64), dtype,
             ("k", "v", "lam", "k3", "v3", "k_state", "v_state"), gen, n_out=4)


@pytest.mark.parametrize("beta", [0.0, 0.999, 1 - 1e-9], ids=["0", "0.999", "rounds_to_1"])
def test_route_fuse_beta_edges(beta):
    """The single-pass forward scans in sigma form (s = (1 - beta) sigma): beta = 0, beta near 1
    (sigma ~ 1000 x), and a beta that rounds to 1 in float (the host sends it to the 3-pass
    scan), against the float64 reference, L = 3 with states, a short last block."""
    gen = torch.Generator().manual_seed(7)
    B, T, G, d, L = 2, 150, 2, 64, 3
    dtype = torch.bfloat16
    k, k64 = rand(gen, B, T, G, d, dtype=dtype)
    v, v64 = rand(gen, B, T, G, d, dtype=dtype)
    lam, lam64 = softmax_rows(gen, B, T, L, dtype)
    k3, k364 = rand(gen, B, T, G, d, dtype=dtype)
    v3, v364 = rand(gen, B, T, G, d, dtype=dtype)
    (ks, vs), (ks64, vs64) = _states(gen, B, G, d, True)
    check_op(lambda *a: torch.ops.mka.route_fuse(a[0], a[1], a[2], beta, *a[3:]),
             lambda *a: R.route_fuse(a[0], a[1], a[2], beta, *a[3:]),
             (k, v, lam, k3, v3, ks, vs), (k64, v64, lam64, k364, v364, ks64, vs64), dtype,
             ("k", "v", "lam", "k3", "v3", "k_state", "v_state"), gen, n_out=4)


def test_route_fuse_in_pieces_equals_one_call():
    # Chunked prefill: [0:T1] then [T1:T] from the returned state == one call over [0:T].
    gen = torch.Generator().manual_seed(5)
    B, T, T1, G, d = 1, 300, 113, 2, 64
    k, _ = rand(gen, B, T, G, d, dtype=torch.float32)
    v, _ = rand(gen, B, T, G, d, dtype=torch.float32)
    lam, _ = softmax_rows(gen, B, T, 2, torch.float32)
    kf, vf, ks, vs = torch.ops.mka.route_fuse(k, v, lam, BETA)
    a = torch.ops.mka.route_fuse(k[:, :T1], v[:, :T1], lam[:, :T1], BETA)
    b = torch.ops.mka.route_fuse(k[:, T1:], v[:, T1:], lam[:, T1:], BETA, None, None, a[2], a[3])
    assert_close(torch.cat([a[0], b[0]], 1), kf, torch.float32, "k_fused in pieces")
    assert_close(torch.cat([a[1], b[1]], 1), vf, torch.float32, "v_fused in pieces")
    assert_close(b[2], ks, torch.float32, "k_state in pieces")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("L", [2, 3])
@pytest.mark.parametrize("d", [64, 128])
def test_fastmka(dtype, L, d):
    gen = torch.Generator().manual_seed(200 + L + d)
    B, Tq, Tk, H, G = 2, 120, 140, 4, 2
    q, q64 = rand(gen, B, Tq, H, d, dtype=dtype)
    k, k64 = rand(gen, B, Tk, G, d, dtype=dtype)
    v, v64 = rand(gen, B, Tk, G, d, dtype=dtype)
    lam, lam64 = softmax_rows(gen, B, Tk, L, dtype)
    (k3, k364), (v3, v364) = ((rand(gen, B, Tk, G, d, dtype=dtype), rand(gen, B, Tk, G, d, dtype=dtype))
                              if L == 3 else ((None, None), (None, None)))
    (ks, vs), (ks64, vs64) = _states(gen, B, G, d, L == 3)
    window = 50 if L == 2 else None
    check_op(lambda q, k, v, lam, k3, v3, ks, vs: torch.ops.mka.fastmka(
                 q, k, v, lam, BETA, k3, v3, ks, vs, True, None, window),
             lambda q, k, v, lam, k3, v3, ks, vs: R.fastmka(
                 q, k, v, lam, BETA, k3, v3, ks, vs, True, None, window),
             (q, k, v, lam, k3, v3, ks, vs), (q64, k64, v64, lam64, k364, v364, ks64, vs64),
             dtype, ("q", "k", "v", "lam", "k3", "v3", "k_state", "v_state"), gen, n_out=3)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("L", [2, 3])
@pytest.mark.parametrize("d", [64, 128])
def test_mka(dtype, L, d):
    gen = torch.Generator().manual_seed(300 + L + d)
    B, Tq, Tk, H, G, M = 2, 110, 130, 4, 2, 40
    q, q64 = rand(gen, B, Tq, H, d, dtype=dtype)
    k, k64 = rand(gen, B, Tk, G, d, dtype=dtype)
    v, v64 = rand(gen, B, Tk, G, d, dtype=dtype)
    lam, lam64 = softmax_rows(gen, B, Tq, L, dtype)
    (mk, mk64), (mv, mv64) = ((rand(gen, B, M, G, d, dtype=dtype), rand(gen, B, M, G, d, dtype=dtype))
                              if L == 3 else ((None, None), (None, None)))
    (ks, vs), (ks64, vs64) = _states(gen, B, G, d, L == 2)
    window = 45 if L == 3 else None
    check_op(lambda q, k, v, lam, mk, mv, ks, vs: torch.ops.mka.mka(
                 q, k, v, lam, BETA, mk, mv, ks, vs, True, None, window),
             lambda q, k, v, lam, mk, mv, ks, vs: R.mka(
                 q, k, v, lam, BETA, mk, mv, ks, vs, True, None, window),
             (q, k, v, lam, mk, mv, ks, vs), (q64, k64, v64, lam64, mk64, mv64, ks64, vs64),
             dtype, ("q", "k", "v", "lam", "mem_k", "mem_v", "k_state", "v_state"), gen, n_out=3)


# The attention backward makes the backward scan's chunk sums from the dK, dV it holds (8-token
# chunks here at T = 150, 16 past 2k tokens) in both tensor-core kernels (attention="mma":
# mma.sync); with lam, the scan's last pass also makes dlam.
@pytest.mark.parametrize("wgmma", ["default", "mma"])
@pytest.mark.parametrize("T", [150, 2100])
@pytest.mark.parametrize("op", ["fastmka", "mka"])
def test_scan_sums_from_attention_backward(op, T, wgmma, request):
    if wgmma != "default":
        kernels_for_test(request, attention=wgmma)
    gen = torch.Generator().manual_seed(T + len(op))
    dtype, B, H, G, d, L = torch.bfloat16, 1, 2, 1, 64, 3 if op == "fastmka" else 2
    q, q64 = rand(gen, B, T, H, d, dtype=dtype)
    k, k64 = rand(gen, B, T, G, d, dtype=dtype)
    v, v64 = rand(gen, B, T, G, d, dtype=dtype)
    lam, lam64 = softmax_rows(gen, B, T, L, dtype)
    (ks, vs), (ks64, vs64) = _states(gen, B, G, d, True)
    if op == "fastmka":
        (k3, k364), (v3, v364) = (rand(gen, B, T, G, d, dtype=dtype),
                                  rand(gen, B, T, G, d, dtype=dtype))
    else:
        (k3, k364), (v3, v364) = (None, None), (None, None)
    fn, ref = getattr(torch.ops.mka, op), getattr(R, op)
    check_op(lambda q, k, v, lam, x3, y3, ks, vs: fn(q, k, v, lam, BETA, x3, y3, ks, vs),
             lambda q, k, v, lam, x3, y3, ks, vs: ref(q, k, v, lam, BETA, x3, y3, ks, vs),
             (q, k, v, lam, k3, v3, ks, vs), (q64, k64, v64, lam64, k364, v364, ks64, vs64),
             dtype, ("q", "k", "v", "lam", "x3", "y3", "k_state", "v_state"), gen, n_out=3)


# Without lam's gradient the final pass makes no dlam, but still level 3's gradients.
@pytest.mark.parametrize("T", [150, 2100])
def test_fastmka_level3_gradients_without_lam_gradient(T):
    gen = torch.Generator().manual_seed(T + 3)
    dtype, B, H, G, d = torch.bfloat16, 1, 2, 1, 64
    q, q64 = rand(gen, B, T, H, d, dtype=dtype)
    k, k64 = rand(gen, B, T, G, d, dtype=dtype)
    v, v64 = rand(gen, B, T, G, d, dtype=dtype)
    k3, k364 = rand(gen, B, T, G, d, dtype=dtype)
    v3, v364 = rand(gen, B, T, G, d, dtype=dtype)
    lam, lam64 = softmax_rows(gen, B, T, 3, dtype)  # a constant: no grad
    check_op(lambda q, k, v, k3, v3: torch.ops.mka.fastmka(q, k, v, lam, BETA, k3, v3),
             lambda q, k, v, k3, v3: R.fastmka(q, k, v, lam64, BETA, k3, v3),
             (q, k, v, k3, v3), (q64, k64, v64, k364, v364), dtype,
             ("q", "k", "v", "k3", "v3"), gen, n_out=3)


# Without level 3's gradients the scan's backward runs through the Hopper attention
# backward's write-out (ScanThrough: fastmka, with lam a constant or with its gradient
# (fastmka_dlam), and mka's level 2), its key blocks chained by a look-back;
# scan_through=False (and attention="mma") take the separate passes. Several key
# blocks with a short last one, GQA, a window, Tq < Tk, and the states' gradients both ways;
# in the warp-specialised backward (tma: mka's row weights, fastmka's ScanThrough, its dlam
# at d = 64) and the lockstep one.
@pytest.mark.parametrize("kernel", ["tma", "lockstep"])
@pytest.mark.parametrize("through", [True, False])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("op", ["fastmka", "fastmka_dlam", "mka"])
def test_scan_through_attention_backward(op, d, dtype, through, kernel, request):
    kernels_for_test(request, scan_through=through, attention=kernel)
    gen = torch.Generator().manual_seed(d + len(op) + (dtype == torch.float16))
    B, Tq, Tk, H, G = 2, 1000, 1100, 4, 2
    q, q64 = rand(gen, B, Tq, H, d, dtype=dtype)
    k, k64 = rand(gen, B, Tk, G, d, dtype=dtype)
    v, v64 = rand(gen, B, Tk, G, d, dtype=dtype)
    lam, lam64 = softmax_rows(gen, B, Tq if op == "mka" else Tk, 2, dtype)
    (ks, vs), (ks64, vs64) = _states(gen, B, G, d, True)
    window = 300 if op != "mka" else None
    name = "mka" if op == "mka" else "fastmka"
    fn, ref = getattr(torch.ops.mka, name), getattr(R, name)
    if op == "fastmka_dlam":  # lam an input with a gradient
        check_op(lambda q, k, v, lam, ks, vs: fn(q, k, v, lam, BETA, None, None, ks, vs, True,
                                                 None, window),
                 lambda q, k, v, lam, ks, vs: ref(q, k, v, lam, BETA, None, None, ks, vs, True,
                                                  None, window),
                 (q, k, v, lam, ks, vs), (q64, k64, v64, lam64, ks64, vs64), dtype,
                 ("q", "k", "v", "lam", "k_state", "v_state"), gen, n_out=3)
        return
    check_op(lambda q, k, v, ks, vs: fn(q, k, v, lam, BETA, None, None, ks, vs, True, None, window),
             lambda q, k, v, ks, vs: ref(q, k, v, lam64, BETA, None, None, ks, vs, True, None,
                                         window),
             (q, k, v, ks, vs), (q64, k64, v64, ks64, vs64), dtype,
             ("q", "k", "v", "k_state", "v_state"), gen, n_out=3)


# One key block, and sequences whose last block is short: 1 key (T = 129), exactly its lower
# half (192: the upper half empty), one key past it (193), 72 keys (200); with lam a constant
# and with its gradient.
@pytest.mark.parametrize("dlam", [False, True], ids=["lam_const", "dlam"])
@pytest.mark.parametrize("T", [1, 100, 128, 129, 192, 193, 200])
def test_scan_through_short_sequences(T, dlam):
    gen = torch.Generator().manual_seed(T)
    dtype, B, H, G, d = torch.bfloat16, 3, 2, 2, 64
    q, q64 = rand(gen, B, T, H, d, dtype=dtype)
    k, k64 = rand(gen, B, T, G, d, dtype=dtype)
    v, v64 = rand(gen, B, T, G, d, dtype=dtype)
    lam, lam64 = softmax_rows(gen, B, T, 2, dtype)
    (ks, vs), (ks64, vs64) = _states(gen, B, G, d, True)
    if dlam:
        check_op(lambda q, k, v, lam, ks, vs: torch.ops.mka.fastmka(q, k, v, lam, BETA, None,
                                                                    None, ks, vs),
                 lambda q, k, v, lam, ks, vs: R.fastmka(q, k, v, lam, BETA, None, None, ks, vs),
                 (q, k, v, lam, ks, vs), (q64, k64, v64, lam64, ks64, vs64), dtype,
                 ("q", "k", "v", "lam", "k_state", "v_state"), gen, n_out=3)
        return
    check_op(lambda q, k, v, ks, vs: torch.ops.mka.fastmka(q, k, v, lam, BETA, None, None, ks, vs),
             lambda q, k, v, ks, vs: R.fastmka(q, k, v, lam64, BETA, None, None, ks, vs),
             (q, k, v, ks, vs), (q64, k64, v64, ks64, vs64), dtype,
             ("q", "k", "v", "k_state", "v_state"), gen, n_out=3)


def test_mka_empty_memory():
    gen = torch.Generator().manual_seed(9)
    B, T, H, G, d = 1, 64, 2, 1, 64
    q, q64 = rand(gen, B, T, H, d, dtype=torch.bfloat16)
    k, k64 = rand(gen, B, T, G, d, dtype=torch.bfloat16)
    lam, lam64 = softmax_rows(gen, B, T, 3, torch.bfloat16)
    m = torch.zeros(B, 0, G, d, device="cuda", dtype=torch.bfloat16)
    out, _, _ = torch.ops.mka.mka(q, k, k, lam, BETA, m, m)
    ref, _, _ = R.mka(q64, k64, k64, lam64, BETA, m.cpu().double(), m.cpu().double())
    assert_close(out, ref, torch.bfloat16, "mka with M = 0")


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float32), ids=str)
@pytest.mark.parametrize("d", [20, 21, 24])
def test_route_fuse_odd_head_dims(dtype, d):
    # Not a multiple of 8: the 3-pass scan takes its scalar path (one channel per thread), and
    # so does the forward (the single pass moves 16-byte pieces within a head); d = 24 takes
    # the single pass in float32 and bfloat16 (pieces of 4 and 8 channels).
    _check_route_fuse_l2_states(torch.Generator().manual_seed(21), 2, 133, 3, d, dtype)


def test_route_fuse_many_blocks_in_flight():
    # Several channel blocks per chunk, both memories, 32 chunks with a short last one: the
    # single pass's blocks look back over many predecessors publishing at once.
    _check_route_fuse_l2_states(torch.Generator().manual_seed(22), 4, 1001, 8, 128,
                                torch.bfloat16)


def _check_route_fuse_l2_states(gen, B, T, G, d, dtype):
    """route_fuse with L = 2 and given states against the reference, every gradient."""
    k, k64 = rand(gen, B, T, G, d, dtype=dtype)
    v, v64 = rand(gen, B, T, G, d, dtype=dtype)
    lam, lam64 = softmax_rows(gen, B, T, 2, dtype)
    (ks, vs), (ks64, vs64) = _states(gen, B, G, d, True)
    check_op(lambda *a: torch.ops.mka.route_fuse(a[0], a[1], a[2], BETA, None, None, *a[3:]),
             lambda *a: R.route_fuse(a[0], a[1], a[2], BETA, None, None, *a[3:]),
             (k, v, lam, ks, vs), (k64, v64, lam64, ks64, vs64), dtype,
             ("k", "v", "lam", "k_state", "v_state"), gen, n_out=4)


# Long scans: the 3-pass scan's chunk follows the problem's size (mka/problem.h:
# ema_scan_chunk; 16 to 64 tokens here), the single pass's look-back crosses up to 282 chunks.
@pytest.mark.parametrize("T", [3000, 5000, 9000])
def test_route_fuse_long_sequences(T):
    _check_route_fuse_l2_states(torch.Generator().manual_seed(T), 1, T, 1, 64, torch.bfloat16)


# On Hopper fastmka's ScanThrough and mka's weighted levels run in the warp-specialised
# backward, but for fastmka's dlam at d = 128 (its staging does not fit beside the stages).
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0),
                    reason="needs a Hopper (sm_90) GPU")
@pytest.mark.parametrize("op, d, dlam, kernel", [("fastmka", 64, False, "attention_bwd_wgmma_ws<"),
                                                 ("fastmka", 64, True, "attention_bwd_wgmma_ws<"),
                                                 ("fastmka", 128, False, "attention_bwd_wgmma_ws<"),
                                                 ("fastmka", 128, True, "attention_bwd_wgmma<"),
                                                 ("mka", 64, True, "attention_bwd_wgmma_ws<"),
                                                 ("mka", 128, True, "attention_bwd_wgmma_ws<")])
def test_weighted_backward_dispatch(op, d, dlam, kernel):
    B, T, H, G = 1, 300, 2, 1
    q, k, v = (torch.randn(B, T, n, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for n in (H, G, G))
    lam = torch.softmax(torch.randn(B, T, 2, device="cuda"), -1).bfloat16().requires_grad_(dlam)
    fn = getattr(torch.ops.mka, op)
    names = kernel_names(lambda: fn(q, k, v, lam, BETA)[0].float().sum().backward())
    assert any(kernel in n for n in names), sorted(names)
    if kernel == "attention_bwd_wgmma<":
        assert not any("attention_bwd_wgmma_ws<" in n for n in names), sorted(names)
