"""mka.layers.linear (SPEC §3.7): the decode-size linear layer against the float64 reference
(F.linear, then F.gelu of the product in the dtype) for 1-8 rows, with and without bias and
GELU, K in whole 16-byte vectors or not, strided rows; more rows, other dtypes and the CPU's
half precision through PyTorch; torch.compile; clear errors."""

import pytest
import torch
import torch.nn.functional as F

import mka.layers
from mka.layers import linear
from conftest import TOL, dtype_params, rel_err


def _case(M, K, N, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    make = lambda *s: (torch.randn(*s, generator=g, dtype=torch.float64) / 8).to(device, dtype)
    return make(M, K), make(N, K), make(N)


def _ref(x, w, b, act):
    y = F.linear(x.double(), w.double(), None if b is None else b.double())
    if act == "gelu":  # of the product as the dtype holds it
        y = F.gelu(y.to(x.dtype).double())
    return y


@pytest.mark.parametrize("device,dtype", dtype_params())
@pytest.mark.parametrize("M", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("K,N", [(768, 257), (64, 33), (20, 7), (3072, 48)], ids=str)
@pytest.mark.parametrize("act,bias", [("none", True), ("gelu", True), ("none", False)], ids=str)
def test_matches_the_reference(device, dtype, M, K, N, act, bias, monkeypatch):
    monkeypatch.setattr(mka.layers, "MAX_ROWS", 8)  # the kernel's own limit: all rows native
    x, w, b = _case(M, K, N, dtype, device, seed=M + K + N)
    b = b if bias else None
    out = linear(x, w, b, act)
    assert out.shape == (M, N) and out.dtype == dtype
    assert rel_err(out, _ref(x, w, b, act)) < TOL[dtype]


@pytest.mark.parametrize("device,dtype", dtype_params())
def test_strided_rows_batch_dims_and_more_rows(device, dtype, monkeypatch):
    monkeypatch.setattr(mka.layers, "MAX_ROWS", 8)
    x, w, b = _case(24, 128, 40, dtype, device)
    xs = x.view(2, 12, 128)[:, 3:5]  # (2, 2, 128), rows 12 apart: 4 rows, strided
    out = linear(xs, w, b, "gelu")
    assert out.shape == (2, 2, 40)
    assert rel_err(out, _ref(xs, w, b, "gelu")) < TOL[dtype]
    out = linear(x, w, b)  # 24 rows: torch's GEMM
    assert rel_err(out, _ref(x, w, b, "none")) < TOL[dtype]
    assert linear(x[:0], w, b).shape == (0, 40)


@pytest.mark.parametrize("device,dtype", dtype_params())
def test_rows_past_max_rows_take_torch(device, dtype):
    x, w, b = _case(mka.layers.MAX_ROWS + 1, 64, 9, dtype, device)
    assert torch.equal(linear(x, w, b, "gelu"), F.gelu(F.linear(x, w, b)))


@pytest.mark.parametrize("M", [1, 3, 8])
def test_the_cpu_kernel_matches_the_reference(M):
    """CPU tensors take F.linear; the C++ op's own CPU loop (framework-free) computes the
    same, K past its vector blocks included."""
    from mka import _C
    from mka.ops import _launch, _native
    from mka.kernels import _State
    x, w, b = _case(M, 99, 17, torch.float64, "cpu")
    for act, code in (("none", 0), ("gelu", 1)):
        out = torch.empty(M, 17, dtype=torch.float64)
        _native(_C.linear_small, x=x, weight=w, bias=b, out=out, activation=code,
                **_launch(x, _State.token))
        assert rel_err(out, _ref(x, w, b, act)) < TOL[torch.float64]


def test_pytorch_path_for_other_dtypes():
    x, w, b = _case(2, 64, 9, torch.bfloat16, "cpu")
    torch.testing.assert_close(linear(x, w, b, "gelu"), F.gelu(F.linear(x, w, b)))
    x32 = x.float()
    torch.testing.assert_close(linear(x32, w.float(), b.float()), F.linear(x32, w.float(), b.float()))


def test_compiles_fullgraph():
    x, w, b = _case(2, 32, 8, torch.float32, "cpu")
    f = torch.compile(lambda x: linear(x, w, b, "gelu") * 2, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(f(x), linear(x, w, b, "gelu") * 2)


def test_errors_name_the_argument():
    x, w, b = _case(2, 32, 8, torch.float32, "cpu")
    with pytest.raises(ValueError, match="weight"):
        linear(x, w[:, :16], b)
    with pytest.raises(ValueError, match="bias"):
        linear(x, w, b[:3])
    with pytest.raises(ValueError, match="activation"):
        linear(x, w, b, "relu")


def test_inputs_that_require_grad_raise():
    """No backward: a gradient asked for is an error, not a gradient silently missing."""
    x, w, b = _case(1, 16, 4, torch.float32, "cpu")
    with pytest.raises(ValueError, match="inference only"):
        linear(x.requires_grad_(), w, b)
    with torch.no_grad():
        assert linear(x, w, b).shape == (1, 4)

