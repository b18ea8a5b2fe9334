"""The attention modules on CUDA (head dim 64, the kernels' size): each variant in
bf16/fp16/fp32 against the same module in float64 on the CPU (whose float64 results the
other tests pin to the reference formulas), and cached decode equal to one pass.
Skipped without a GPU."""

import pytest
import torch

from attn_cases import BACKENDS, N_HEAD, hidden, make, variant_params
from conftest import TOL, rel_err

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

D = 64 * N_HEAD  # head dim 64
DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def _run(m, x):
    x = x.detach().clone().requires_grad_()
    y = m(x)
    w = torch.randn(y.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    (y * w.to(y)).sum().backward()
    return y, x.grad, [p.grad for p in m.parameters()]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", variant_params())
def test_cuda_module_matches_float64(variant, backend, dtype):
    m = make(variant, backend, dtype=dtype, n_embd=D)
    ref = make(variant, backend, dtype=dtype, n_embd=D).double()  # the same rounded weights
    x = hidden(2, 40, dtype, D)
    y, gx, gp = _run(m.cuda(), x.cuda())
    y_ref, gx_ref, gp_ref = _run(ref, x.double())
    tol = TOL[dtype]
    assert rel_err(y, y_ref) < tol
    assert rel_err(gx, gx_ref) < tol
    if dtype == torch.float32:  # half weight gradients sum many rounded terms: fp32 only
        for g, r in zip(gp, gp_ref):
            assert rel_err(g, r) < tol


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("variant", variant_params())
def test_cuda_decode_equals_full_forward(variant, dtype):
    m = make(variant, "mka", dtype=dtype, n_embd=D).cuda()
    x = hidden(2, 24, dtype, D).cuda()
    with torch.no_grad():
        full = m(x)
        cache = m.new_cache(2, "cuda", dtype)
        steps = [m(x[:, :16], cache)] + [m(x[:, t:t + 1], cache) for t in range(16, 24)]
    assert rel_err(torch.cat(steps, 1), full) < TOL[dtype]
