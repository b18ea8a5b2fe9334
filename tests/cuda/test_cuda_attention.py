"""mka::attention on CUDA against the float64 reference: outputs and dq, dk, dv, across
dtypes, head dims, GQA, causal / non-causal / window, Tq != Tk (bottom-right), both the
tensor-core path (aligned half inputs) and the CUDA-core path (float32, unaligned views)."""

import os
import subprocess
import sys

import pytest
import torch

import mka  # noqa: F401  (registers torch.ops.mka)
from mka import reference as R
from cuda_checks import (DTYPES, assert_close, check_op, kernel_names, kernels_for_test, rand,
                         requires_cuda)

pytestmark = [requires_cuda, pytest.mark.cuda]

CASES = [  # (B, Tq, Tk, H, G, causal, window)
    (2, 150, 150, 4, 2, True, None),
    (1, 97, 230, 4, 1, True, None),     # KV cache: Tq < Tk, bottom-right
    (2, 130, 130, 2, 2, False, None),
    (1, 200, 200, 4, 4, True, 37),      # sliding window
    (1, 70, 70, 2, 1, False, 20),       # window without causal mask
    (1, 160, 60, 2, 1, True, None),     # Tq > Tk: the first rows see no key -> zeros
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c)))
def test_attention_matches_reference(dtype, d, case):
    _check_attention(dtype, d, case)


def _check_attention(dtype, d, case):
    """Output and q, k, v gradients against the float64 reference on fresh inputs."""
    B, Tq, Tk, H, G, causal, window = case
    gen = torch.Generator().manual_seed(hash((str(dtype), d, case)) % 2**31)
    q, q64 = rand(gen, B, Tq, H, d, dtype=dtype)
    k, k64 = rand(gen, B, Tk, G, d, dtype=dtype)
    v, v64 = rand(gen, B, Tk, G, d, dtype=dtype)
    check_op(lambda q, k, v: torch.ops.mka.attention(q, k, v, causal, None, window),
             lambda q, k, v: R.attention(q, k, v, causal, None, window),
             (q, k, v), (q64, k64, v64), dtype, ("q", "k", "v"), gen)


@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16), ids=str)
def test_unaligned_views_take_the_cuda_core_path(dtype):
    # Rows of a view with an odd head stride are not 16-byte aligned: no tensor cores.
    gen = torch.Generator().manual_seed(7)
    B, T, H, d = 1, 90, 3, 64
    base, base64 = rand(gen, B, T, H * d + 1, dtype=dtype)
    q, q64 = base[..., 1:].view(B, T, H, d), base64[..., 1:].reshape(B, T, H, d)
    k, k64 = rand(gen, B, T, 1, d, dtype=dtype)
    v, v64 = rand(gen, B, T, 1, d, dtype=dtype)
    assert q.stride(-1) == 1 and q.data_ptr() % 16 != 0
    out = torch.ops.mka.attention(q, k, v)
    assert_close(out, R.attention(q64, k64, v64), dtype, "out (unaligned)")


def test_no_visible_key_rows_are_zero_with_finite_grads():
    gen = torch.Generator().manual_seed(3)
    q, _ = rand(gen, 1, 64, 2, 64, dtype=torch.bfloat16)
    k, _ = rand(gen, 1, 16, 2, 64, dtype=torch.bfloat16)
    v, _ = rand(gen, 1, 16, 2, 64, dtype=torch.bfloat16)
    q.requires_grad_(True)
    out = torch.ops.mka.attention(q, k, v, True)  # rows 0..47 see nothing
    assert (out[:, :48] == 0).all()
    out.float().sum().backward()
    assert torch.isfinite(q.grad.float()).all() and (q.grad[:, :48] == 0).all()


def test_empty_sizes():
    q = torch.randn(2, 0, 4, 64, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(2, 5, 2, 64, device="cuda", dtype=torch.bfloat16)
    assert torch.ops.mka.attention(q, k, k).shape == (2, 0, 4, 64)
    q = torch.randn(2, 3, 4, 64, device="cuda", dtype=torch.bfloat16)
    k0 = torch.randn(2, 0, 2, 64, device="cuda", dtype=torch.bfloat16)
    assert (torch.ops.mka.attention(q, k0, k0, False) == 0).all()


def test_long_sequence_tensor_cores_bf16():
    # Several key tiles and query blocks with both masks active, one larger shape.
    gen = torch.Generator().manual_seed(11)
    B, T, H, G, d = 1, 1100, 4, 1, 128
    q, q64 = rand(gen, B, T, H, d, dtype=torch.bfloat16)
    k, k64 = rand(gen, B, T, G, d, dtype=torch.bfloat16)
    v, v64 = rand(gen, B, T, G, d, dtype=torch.bfloat16)
    check_op(lambda q, k, v: torch.ops.mka.attention(q, k, v, True, None, 300),
             lambda q, k, v: R.attention(q, k, v, True, None, 300),
             (q, k, v), (q64, k64, v64), torch.bfloat16, ("q", "k", "v"), gen)


# The attention kernel choice picks the forward kernel on Hopper (by default ping-pong): the
# two-stage wgmma pipeline, the three-stage ping-pong one, the warp-specialised TMA one, or
# the mma.sync kernels of sm_80.
@pytest.mark.parametrize("mode", ["lockstep", "pingpong", "tma", "mma"])
@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16), ids=str)
@pytest.mark.parametrize("case", CASES + [(1, 1100, 1100, 4, 1, True, None),
                                          (1, 700, 1300, 2, 2, True, 300)],
                         ids=lambda c: "x".join(map(str, c)))
def test_other_forward_kernels(mode, dtype, case, request):
    kernels_for_test(request, attention=mode)
    B, Tq, Tk, H, G, causal, window = case
    gen = torch.Generator().manual_seed(hash((mode, str(dtype), case)) % 2**31)
    for d in (64, 128):
        q, q64 = rand(gen, B, Tq, H, d, dtype=dtype)
        k, k64 = rand(gen, B, Tk, G, d, dtype=dtype)
        v, v64 = rand(gen, B, Tk, G, d, dtype=dtype)
        out = torch.ops.mka.attention(q, k, v, causal, None, window)
        assert_close(out, R.attention(q64, k64, v64, causal, None, window), dtype,
                     f"out ({mode}, d={d})")


# The backwards plain attention does not take by default (the tests above run the warp-
# specialised one on Hopper): attention="mma" runs the mma.sync kernels of sm_80 in both
# directions, on Hopper too; "lockstep" the lockstep wgmma backward, which fastmka's
# ScanThrough and mka's weighted levels run. Their gradients against the float64 reference.
@pytest.mark.parametrize("mode", ["mma", "lockstep"])
@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16), ids=str)
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("case", [(2, 300, 300, 4, 2, True, None),
                                  (1, 200, 330, 4, 1, True, 90),
                                  (1, 150, 150, 2, 2, False, None),
                                  (1, 160, 60, 2, 1, True, None)],
                         ids=lambda c: "x".join(map(str, c)))
def test_other_backward_kernels(mode, dtype, d, case, request):
    kernels_for_test(request, attention=mode)
    _check_attention(dtype, d, case)


# The warp-specialised backward's last query block of a head loads the next head's row
# statistics past Tq (and masks those rows): an Inf in one batch element's dO must stay in
# that element's gradients, as with every other kernel.
@pytest.mark.parametrize("mode", ["tma", "lockstep", "mma"])
@pytest.mark.parametrize("d", [64, 128])
def test_nonfinite_dout_stays_in_its_batch_element(mode, d, request):
    kernels_for_test(request, attention=mode)
    gen = torch.Generator().manual_seed(d)
    q, _ = rand(gen, 2, 70, 2, d, dtype=torch.bfloat16)
    k, _ = rand(gen, 2, 90, 1, d, dtype=torch.bfloat16)
    v, _ = rand(gen, 2, 90, 1, d, dtype=torch.bfloat16)
    dout, _ = rand(gen, 2, 70, 2, d, dtype=torch.bfloat16)
    dout[1, :5] = float("inf")
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    grads = torch.autograd.grad(torch.ops.mka.attention(q, k, v, True), (q, k, v), dout)
    for name, g in zip(("dq", "dk", "dv"), grads):
        assert torch.isfinite(g[0]).all(), f"{name} of batch element 0 ({mode})"


# More query blocks (and key blocks in backward) than an H100 has SMs: 1.9-2.3x, so blocks
# run in several waves; Tq > Tk gives query blocks with no key tile.
@pytest.mark.parametrize("mode", ["lockstep", "tma"])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("case", [(2, 1024, 1024, 16, 4, True, None),
                                  (2, 1024, 300, 16, 16, True, None),
                                  (2, 900, 1100, 16, 2, True, 200),
                                  (2, 1024, 1024, 16, 8, False, None)],
                         ids=lambda c: "x".join(map(str, c)))
def test_more_blocks_than_sms(case, d, mode, request):
    kernels_for_test(request, attention=mode)
    B, Tq, Tk, H, G, causal, window = case
    gen = torch.Generator().manual_seed(hash((case, d, mode)) % 2**31)
    q, q64 = rand(gen, B, Tq, H, d, dtype=torch.bfloat16)
    k, k64 = rand(gen, B, Tk, G, d, dtype=torch.bfloat16)
    v, v64 = rand(gen, B, Tk, G, d, dtype=torch.bfloat16)
    check_op(lambda q, k, v: torch.ops.mka.attention(q, k, v, causal, None, window),
             lambda q, k, v: R.attention(q, k, v, causal, None, window),
             (q, k, v), (q64, k64, v64), torch.bfloat16, ("q", "k", "v"), gen)


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0),
                    reason="needs a Hopper (sm_90) GPU")
@pytest.mark.parametrize("T, mode, fwd", [(256, None, "attention_fwd_wgmma_tma_persistent<"),
                                          (4096, None, "attention_fwd_wgmma_tma<"),
                                          (256, "pingpong", "attention_fwd_wgmma_pp<"),
                                          (256, "lockstep", "attention_fwd_wgmma<"),
                                          (256, "tma", "attention_fwd_wgmma_tma_persistent<"),
                                          (4096, "tma", "attention_fwd_wgmma_tma<"),
                                          (256, "mma", "attention_fwd_mma<")])
@pytest.mark.parametrize("p", [0.0, 0.1])
def test_hopper_dispatch(T, mode, fwd, p, request):
    # The default build has sm_90a code: on Hopper the wgmma kernels must run (a silent fall-
    # back to the sm_80 kernels would only show as lost speed); attention="mma" forces mma.sync.
    # The tma forward is its persistent kernel up to 1024 keys (unless MKA_CUDA_FWD_PERSISTENT
    # says otherwise).
    # The backward: warp-specialised with the tma kernels (the default), lockstep otherwise;
    # with dropout (p > 0) the same kernels (their dropout instantiations).
    if mode is not None:
        kernels_for_test(request, attention=mode)
    persistent = os.environ.get("MKA_CUDA_FWD_PERSISTENT")
    if "_tma" in fwd and persistent in ("0", "1"):
        fwd = "attention_fwd_wgmma_tma_persistent<" if persistent == "1" else "attention_fwd_wgmma_tma<"
    q = torch.randn(1, T, 2, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(1, T, 1, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    names = kernel_names(
        lambda: torch.ops.mka.attention(q, k, k, True, None, None, p).float().sum().backward())
    assert any(fwd in n for n in names), sorted(names)
    bwd = {"mma": "attention_bwd_mma<", "pingpong": "attention_bwd_wgmma<",
           "lockstep": "attention_bwd_wgmma<"}.get(mode, "attention_bwd_wgmma_ws<")
    assert any(bwd in n for n in names), sorted(names)



_PERSISTENT_CHILD = """
import sys, torch, mka
g = torch.Generator(device="cuda").manual_seed(5)
q, k, v = (torch.randn(2, 1024, n, 128, device="cuda", dtype=torch.bfloat16, generator=g)
           for n in (16, 4, 4))
with mka.use_kernels(attention="tma"):
    out = torch.ops.mka.attention(q, k, v, True, None, 300)
torch.save(out.cpu(), sys.argv[1])
"""


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0),
                    reason="needs a Hopper (sm_90) GPU")
def test_fwd_persistent_variable(tmp_path):
    # MKA_CUDA_FWD_PERSISTENT=1 runs the warp-specialised forward's persistent kernel, one
    # block per SM taking 128-row query blocks from a counter, 0 one block per query block
    # (unset: persistent up to 1024 keys, as here): each query block's arithmetic is the same,
    # so the outputs are equal bit for bit (256 query blocks: more than the SMs). Other values
    # raise at the first such call, naming the variable.
    outs = []
    for value in ("0", "1"):
        path = tmp_path / f"out{value}.pt"
        env = dict(os.environ, MKA_CUDA_FWD_PERSISTENT=value)
        subprocess.run([sys.executable, "-c", _PERSISTENT_CHILD, str(path)], env=env, check=True)
        outs.append(torch.load(path))
    assert torch.equal(outs[0], outs[1])
    bad = subprocess.run([sys.executable, "-c", _PERSISTENT_CHILD, str(tmp_path / "x.pt")],
                         env=dict(os.environ, MKA_CUDA_FWD_PERSISTENT="2"), capture_output=True,
                         text=True)
    assert bad.returncode != 0 and "MKA_CUDA_FWD_PERSISTENT: expected 0 or 1" in bad.stderr


_BLOCK_M_CHILD = """
import sys, torch, mka
from cuda_checks import kernel_names
g = torch.Generator(device="cuda").manual_seed(7)
cases = [(2, 333, 333, 8, 2, True, None, 0.0), (1, 200, 460, 4, 4, True, 97, 0.0),
         (2, 300, 300, 4, 1, False, None, 0.1), (1, 129, 129, 2, 2, True, None, 0.0)]
saved = []
for B, Tq, Tk, H, G, causal, window, p in cases:
    q = torch.randn(B, Tq, H, 64, device="cuda", dtype=torch.bfloat16, generator=g)
    k, v = (torch.randn(B, Tk, G, 64, device="cuda", dtype=torch.bfloat16, generator=g)
            for _ in range(2))
    dout = torch.randn(B, Tq, H, 64, device="cuda", dtype=torch.bfloat16, generator=g)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    def step():
        torch.manual_seed(11)  # the dropout seed
        with mka.use_kernels(attention="tma"):
            out = torch.ops.mka.attention(q, k, v, causal, None, window, p)
        out.backward(dout)
    names = kernel_names(step)
    saved.append([x.grad.float().cpu() for x in (q, k, v)])
    for x in (q, k, v):
        x.grad = None
    rows = sys.argv[2]
    assert any(f"attention_bwd_wgmma_ws<__nv_bfloat16, 64, {rows}" in n for n in names), names
torch.save(saved, sys.argv[1])
"""


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0),
                    reason="needs a Hopper (sm_90) GPU")
def test_bwd_block_m_variable(tmp_path):
    # MKA_CUDA_BWD_BLOCK_M picks the query rows per step of the d = 64 warp-specialised
    # backward: 128 (the default; dQ split by rows) or 64 (dQ by each warpgroup's own keys).
    # Both are checked against the reference by the tests above under the default; here the
    # two agree within rounding (float32 sums in another order) on GQA, windows, Tq != Tk,
    # dropout and sizes off the block grid, each launching the kernel it names. Other values
    # raise naming the variable.
    here = os.path.dirname(__file__)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([here, os.environ.get("PYTHONPATH", "")]))
    runs = {}
    for value, rows in (("64", "64"), ("128", "128"), ("", "128")):
        path = tmp_path / f"grads{value or 'unset'}.pt"
        e = {k: v for k, v in env.items() if k != "MKA_CUDA_BWD_BLOCK_M"}
        if value:
            e["MKA_CUDA_BWD_BLOCK_M"] = value
        subprocess.run([sys.executable, "-c", _BLOCK_M_CHILD, str(path), rows], env=e, check=True)
        runs[value] = torch.load(path)
    for case64, case128, case_unset in zip(runs["64"], runs["128"], runs[""]):
        for name, a, b, c in zip(("dq", "dk", "dv"), case64, case128, case_unset):
            assert torch.equal(b, c), name
            err = (a - b).norm() / b.norm().clamp_min(1e-12)
            assert err < 1e-2, (name, float(err))
    bad = subprocess.run([sys.executable, "-c", _BLOCK_M_CHILD, str(tmp_path / "x.pt"), "64"],
                         env=dict(env, MKA_CUDA_BWD_BLOCK_M="32"), capture_output=True, text=True)
    assert bad.returncode != 0 and "MKA_CUDA_BWD_BLOCK_M: expected 64 or 128" in bad.stderr
