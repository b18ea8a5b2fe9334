"""mka::attention against the float64 reference: outputs and gradients."""

import pytest
import torch

from conftest import dtype_params
from harness import compare, head_dim_for, randn
from mka import reference as R

# (B, Tq, Tk, H, G, d, causal, window)
CASES = [
    (2, 33, 33, 4, 4, 16, True, None),     # MHA
    (2, 33, 33, 4, 2, 64, True, None),     # GQA H/G = 2
    (1, 65, 65, 8, 2, 128, True, None),    # GQA H/G = 4, d = 128
    (1, 7, 7, 4, 1, 256, False, None),     # MQA, not causal, d = 256
    (2, 17, 40, 4, 2, 64, True, None),     # Tq < Tk: new queries see the whole past
    (1, 129, 129, 2, 1, 64, True, 16),     # sliding window
    (2, 20, 45, 2, 1, 32, False, 7),       # window without causality, Tq < Tk
    (1, 10, 4, 2, 1, 16, True, None),      # Tq > Tk: early rows see no key -> zeros
    (1, 1, 1, 2, 2, 16, True, None),       # one token
    (1, 7, 129, 2, 2, 64, True, 3),        # odd lengths, small window
    (1, 9, 40, 4, 2, 48, True, None),      # head dims between the CPU GEMM's strips
    (2, 3, 40, 4, 2, 24, False, 5),
]


@pytest.mark.parametrize("device,dtype", dtype_params())
@pytest.mark.parametrize("B,Tq,Tk,H,G,d,causal,window", CASES)
def test_attention_matches_reference(device, dtype, B, Tq, Tk, H, G, d, causal, window):
    d = head_dim_for(device, d)
    q = randn(B, Tq, H, d, device=device, dtype=dtype)
    k = randn(B, Tk, G, d, device=device, dtype=dtype)
    v = randn(B, Tk, G, d, device=device, dtype=dtype)
    compare(torch.ops.mka.attention, R.attention, dict(q=q, k=k, v=v),
            dict(causal=causal, scale=None, window=window), dtype)


@pytest.mark.parametrize("device,dtype", dtype_params())
def test_attention_custom_scale_and_strided_inputs(device, dtype):
    d = head_dim_for(device, 32)
    qkv = randn(2, 25, 3, 4, d, device=device, dtype=dtype)  # packed: strided views
    q, k, v = qkv.unbind(2)
    compare(torch.ops.mka.attention, R.attention, dict(q=q, k=k, v=v),
            dict(causal=True, scale=0.3, window=None), dtype)


@pytest.mark.parametrize("device,dtype", dtype_params())
def test_rows_without_keys_are_zero_not_nan(device, dtype):
    d = head_dim_for(device, 16)
    q = randn(1, 6, 2, d, device=device, dtype=dtype)
    k = randn(1, 2, 2, d, device=device, dtype=dtype)
    out = torch.ops.mka.attention(q, k, k)
    assert torch.isfinite(out).all()
    assert (out[:, :4] == 0).all()  # rows 0..3 see nothing under bottom-right alignment


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device"))])
@pytest.mark.parametrize("B,Tq,Tk", [(0, 5, 5), (2, 0, 5), (2, 5, 0), (2, 0, 0)])
def test_empty_sizes(device, B, Tq, Tk):
    dt = torch.float32
    q = torch.randn(B, Tq, 4, 64, device=device, dtype=dt, requires_grad=True)
    k = torch.randn(B, Tk, 2, 64, device=device, dtype=dt, requires_grad=True)
    v = torch.randn(B, Tk, 2, 64, device=device, dtype=dt, requires_grad=True)
    out = torch.ops.mka.attention(q, k, v)
    assert out.shape == (B, Tq, 4, 64)
    assert (out == 0).all()
    out.sum().backward()
    assert q.grad.shape == q.shape and k.grad.shape == k.shape and v.grad.shape == v.shape


@pytest.mark.parametrize("device,dtype", dtype_params())
@pytest.mark.parametrize("Tq,Tk", [(40, 40), (0, 9), (9, 0)], ids=["full", "no_query", "no_key"])
def test_backward_overwrites_gradient_buffers(device, dtype, Tq, Tk):
    # The op passes uninitialized gradient buffers with accumulate=False: every element must
    # be written (zeros where nothing flows, e.g. dk/dv without queries), equal to adding
    # into zero-filled buffers.
    from mka import _C, current_kernels
    from mka.ops import _launch
    B, H, G, d = 2, 4, 2, head_dim_for(device, 64)
    q = randn(B, Tq, H, d, device=device, dtype=dtype)
    k = randn(B, Tk, G, d, device=device, dtype=dtype)
    v = randn(B, Tk, G, d, device=device, dtype=dtype)
    token = current_kernels().token
    out, lse = torch.ops.mka._attention_fwd(q, k, v, True, None, None, 0.0, None, token)
    dout = randn(B, Tq, H, d, device=device, dtype=dtype)
    grads = {}
    for accumulate, fill in ((True, 0.0), (False, float("nan"))):
        g = [torch.full_like(t, fill) for t in (q, k, v)]
        _C.attention_backward(q=q, k=k, v=v, causal=True, out=out, lse=lse, dout=dout,
                              dq=g[0], dk=g[1], dv=g[2], accumulate=accumulate,
                              **_launch(q, token))
        grads[accumulate] = g
    for name, a, b in zip("qkv", grads[True], grads[False]):
        # Not bitwise on CUDA: dq's float32 atomics add in any order. NaN never passes.
        torch.testing.assert_close(b, a, rtol=1e-2, atol=1e-2, msg=f"d{name}")
