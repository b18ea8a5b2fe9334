"""The smallest shapes on CUDA (Tq = Tk = 1, 2, 3): attention, fastmka and mka outputs and
the gradients of every input, lam and the states included, against the float64 reference
within SPEC §5's bounds — a one-token bf16 lam gradient once measured 2.7e-2 relative error
(issue 20). Every kernel path: tensor cores (wgmma, mma.sync) and CUDA cores (float32)."""

import pytest
import torch

import mka  # noqa: F401
from mka import reference as R
from cuda_checks import DTYPES, check_op, kernels_for_test, rand, requires_cuda, softmax_rows

pytestmark = [requires_cuda, pytest.mark.cuda]
BETA = 0.9


@pytest.fixture(autouse=True, params=["pingpong", "tma", "mma"])
def attention_kernel(request):
    kernels_for_test(request, attention=request.param)


@pytest.mark.parametrize("T", [1, 2, 3])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_attention(T, d, dtype):
    gen = torch.Generator().manual_seed(10 * T + d)
    q, q64 = rand(gen, 2, T, 4, d, dtype=dtype)
    k, k64 = rand(gen, 2, T, 2, d, dtype=dtype)
    v, v64 = rand(gen, 2, T, 2, d, dtype=dtype)
    check_op(lambda q, k, v: torch.ops.mka.attention(q, k, v),
             lambda q, k, v: R.attention(q, k, v), (q, k, v), (q64, k64, v64), dtype,
             ("q", "k", "v"), gen)


@pytest.mark.parametrize("T", [1, 2, 3])
@pytest.mark.parametrize("op", ["fastmka", "mka"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_routed_ops(T, op, dtype):
    gen = torch.Generator().manual_seed(20 * T + len(op))
    B, H, G, d = 2, 4, 2, 64
    q, q64 = rand(gen, B, T, H, d, dtype=dtype)
    k, k64 = rand(gen, B, T, G, d, dtype=dtype)
    v, v64 = rand(gen, B, T, G, d, dtype=dtype)
    lam, lam64 = softmax_rows(gen, B, T, 2, dtype)
    ks, ks64 = rand(gen, B, G, d, dtype=torch.float32)
    vs, vs64 = rand(gen, B, G, d, dtype=torch.float32)
    if op == "fastmka":
        fn = lambda q, k, v, lam, ks, vs: torch.ops.mka.fastmka(  # noqa: E731
            q, k, v, lam, BETA, None, None, ks, vs)
        ref = lambda q, k, v, lam, ks, vs: R.fastmka(  # noqa: E731
            q, k, v, lam, BETA, None, None, ks, vs)
    else:
        fn = lambda q, k, v, lam, ks, vs: torch.ops.mka.mka(  # noqa: E731
            q, k, v, lam, BETA, None, None, ks, vs)
        ref = lambda q, k, v, lam, ks, vs: R.mka(  # noqa: E731
            q, k, v, lam, BETA, None, None, ks, vs)
    check_op(fn, ref, (q, k, v, lam, ks, vs), (q64, k64, v64, lam64, ks64, vs64), dtype,
             ("q", "k", "v", "lam", "k_state", "v_state"), gen, n_out=3)
