"""mka.layers.add_layer_norm (SPEC §3.7): the residual equals the unfused add in its dtype
(bit for bit), the output the float64 LayerNorm of that residual; optional weight and bias,
strided rows, empty and odd sizes, rows longer than 48 KiB of shared memory on CUDA,
torch.compile, the PyTorch path for what the kernels do not take, and clear errors."""

import pytest
import torch
import torch.nn.functional as F

from mka.layers import add_layer_norm
from conftest import TOL, dtype_params, rel_err


def _inputs(shape, dtype, device, affine=(True, True), seed=0):
    g = torch.Generator().manual_seed(seed)
    C = shape[-1]
    make = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(device, dtype)
    x, r = make(*shape), make(*shape) * 3 + 1  # an offset mean: the variance must not cancel
    w = make(C) if affine[0] else None
    b = make(C) if affine[1] else None
    return x, r, w, b


def _expected(x, r, w, b, eps):
    res = r + x  # the unfused add, rounded to the dtype
    ref = F.layer_norm(res.double(), (x.shape[-1],), None if w is None else w.double(),
                       None if b is None else b.double(), eps)
    return res, ref


@pytest.mark.parametrize("device,dtype", dtype_params())
@pytest.mark.parametrize("shape", [(3, 5, 17), (1, 768), (2, 1, 1024), (7, 1), (4, 3000)], ids=str)
@pytest.mark.parametrize("affine", [(True, True), (True, False), (False, False)], ids=str)
def test_matches_the_unfused_pair(device, dtype, shape, affine):
    x, r, w, b = _inputs(shape, dtype, device, affine, seed=sum(shape))
    res, ref = _expected(x, r, w, b, 1e-5)
    out = add_layer_norm(x, r, w, b, 1e-5)
    assert out.dtype == dtype and out.shape == x.shape
    assert torch.equal(r, res)  # in place, rounded as the unfused add
    if shape[-1] == 1:  # every row is its own mean: out is the bias (or 0)
        assert torch.equal(out, torch.zeros_like(out) if b is None else b.expand_as(out))
        return
    assert rel_err(out, ref) < TOL[dtype]


@pytest.mark.parametrize("device,dtype", dtype_params())
def test_strided_rows_and_empty(device, dtype):
    x, r, w, b = _inputs((6, 2 * 96), dtype, device)
    xs = x[:, ::2]  # last dim strided: copied for the kernel
    rs = r[:, :96]  # rows strided: written in place through the view
    before = r[:, 96:].clone()
    res, ref = _expected(xs, rs, w[:96], b[:96], 1e-6)
    out = add_layer_norm(xs, rs, w[:96], b[:96], 1e-6)
    assert torch.equal(rs, res) and torch.equal(r[:, 96:], before)
    assert rel_err(out, ref) < TOL[dtype]
    e = torch.empty(0, 5, 8, dtype=dtype, device=device)
    assert add_layer_norm(e, e.clone(), None, None, 1e-5).shape == (0, 5, 8)


@pytest.mark.parametrize("device,dtype", dtype_params())
def test_long_rows(device, dtype):
    """A row of 20000: past 48 KiB of float32 in shared memory on CUDA."""
    x, r, w, b = _inputs((2, 20000), dtype, device)
    res, ref = _expected(x, r, w, b, 1e-5)
    out = add_layer_norm(x, r, w, b, 1e-5)
    assert torch.equal(r, res)
    assert rel_err(out, ref) < TOL[dtype]


@pytest.mark.parametrize("device,dtype", dtype_params())
def test_pytorch_path_for_rows_that_are_not_a_view(device, dtype):
    """A residual whose rows cannot be viewed as (N, C) is updated in place by PyTorch."""
    x, r, w, b = _inputs((4, 3, 64), dtype, device)
    rt = r.transpose(0, 1)  # (3, 4, 64), not viewable as rows
    res, ref = _expected(x.transpose(0, 1), rt, w, b, 1e-5)
    out = add_layer_norm(x.transpose(0, 1), rt, w, b, 1e-5)
    assert torch.equal(rt, res)
    assert rel_err(out, ref) < TOL[dtype]


def test_pytorch_path_for_other_dtypes():
    """Half precision on the CPU, and float32 weights on half rows, take PyTorch's rules."""
    for dt, wdt in ((torch.bfloat16, torch.bfloat16), (torch.float16, torch.float32)):
        x, r, _, _ = _inputs((3, 64), dt, "cpu")
        w = torch.randn(64, dtype=wdt)
        res = r + x
        out = add_layer_norm(x, r, w, None, 1e-5)
        assert torch.equal(r, res)
        torch.testing.assert_close(out, F.layer_norm(res, (64,), w, None, 1e-5))


def test_compiles_fullgraph():
    x, r, w, b = _inputs((4, 32), torch.float32, "cpu")
    r2 = r.clone()

    @torch.compile(fullgraph=True, backend="aot_eager")
    def f(x, r):
        return add_layer_norm(x, r, w, b, 1e-5) * 2

    out = f(x, r)
    ref = add_layer_norm(x, r2, w, b, 1e-5) * 2
    assert torch.equal(r, r2) and torch.allclose(out, ref)
    assert torch.ops.mka.add_layer_norm.default is not None


def test_errors_name_the_argument():
    x, r, w, b = _inputs((4, 32), torch.float32, "cpu")
    with pytest.raises(ValueError, match="residual"):
        add_layer_norm(x, r[:, :16], w, b, 1e-5)
    with pytest.raises(ValueError, match="weight"):
        add_layer_norm(x, r, w[:16], b, 1e-5)
    with pytest.raises(ValueError, match="bias"):
        add_layer_norm(x, r, w, b[None], 1e-5)
    with pytest.raises(ValueError, match="eps"):
        add_layer_norm(x, r, w, b, -1.0)
    with pytest.raises(ValueError, match="residual"):
        add_layer_norm(r, r, w, b, 1e-5)


def test_inputs_that_require_grad_raise():
    """No backward: a gradient asked for is an error, not a gradient silently missing."""
    x, r = torch.randn(2, 8), torch.randn(2, 8)
    w = torch.ones(8, requires_grad=True)
    with pytest.raises(ValueError, match="inference only"):
        add_layer_norm(x, r, w)
    with torch.no_grad():
        assert add_layer_norm(x, r, w).shape == (2, 8)

