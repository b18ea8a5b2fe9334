"""Shared pieces of the CUDA kernel tests: the skip marker, SPEC §5 tolerances, fresh random
inputs rounded to the tested dtype, and the comparison of outputs and gradients against
the float64 reference run on the CPU."""

from __future__ import annotations

import pytest
import torch

import mka

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def kernels_for_test(request, **changes) -> None:
    """Changes the kernel options (mka.set_kernels) for the rest of one test."""
    previous = mka.set_kernels(**changes)
    request.addfinalizer(lambda: mka.set_kernels(**vars(previous)))

# SPEC §5: relative error bounds per input dtype.
TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}
DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def kernel_names(fn) -> set[str]:
    """The names of the CUDA kernels fn launches (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return {e.key for e in prof.key_averages()}


def rel_err(x: torch.Tensor, ref: torch.Tensor, zero_scale: float | None = None) -> float:
    """‖x − ref‖ / ‖ref‖; where the reference is exactly zero, relative to `zero_scale` if
    given (the size of the terms that cancel to that zero), else the absolute error."""
    x = x.detach().to("cpu", torch.float64)
    ref = ref.detach().to("cpu", torch.float64)
    den = ref.norm().item()
    err = (x - ref).norm().item()
    if den == 0 and zero_scale:
        den = zero_scale
    return err / den if den > 0 else err


def assert_close(x: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, what: str,
                 zero_scale: float | None = None) -> None:
    assert x.shape == ref.shape, f"{what}: shape {tuple(x.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(x.detach().float()).all(), f"{what}: non-finite values"
    e = rel_err(x, ref, zero_scale)
    assert e < TOL[dtype], f"{what}: relative error {e:.3e} >= {TOL[dtype]:.0e} ({dtype})"


def rand(gen: torch.Generator, *shape: int, dtype: torch.dtype, scale: float = 1.0):
    """A (cuda tensor in dtype, cpu float64 copy of the same rounded values) pair."""
    x = (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype)
    return x.cuda(), x.to(torch.float64)


def softmax_rows(gen: torch.Generator, B: int, T: int, L: int, dtype: torch.dtype):
    lam = torch.softmax(torch.randn(B, T, L, generator=gen, dtype=torch.float64), -1).to(dtype)
    return lam.cuda(), lam.to(torch.float64)


def leaves(*ts):
    """Marks tensors (or None) as autograd leaves."""
    return [None if t is None else t.clone().requires_grad_(True) for t in ts]


def check_op(fn_cuda, fn_ref, cuda_in, ref_in, dtype, names, gen, n_out=1, term_scales=None):
    """Runs fn on both sides, compares the first n_out outputs and the gradients of every
    input named in `names` (None entries are skipped) under random incoming gradients.
    `term_scales(ref_inputs, incoming_grads) -> {name: norm}` gives, for a gradient whose
    exact value is a sum that cancels to zero, the size of its terms: a zero reference is
    then held to the same relative bound against that size (rounding of each term is all a
    kernel can be asked to match) instead of an absolute one."""
    cin, rin = leaves(*cuda_in), leaves(*ref_in)
    outs_c, outs_r = fn_cuda(*cin), fn_ref(*rin)
    if not isinstance(outs_c, (tuple, list)):
        outs_c, outs_r = (outs_c,), (outs_r,)
    loss_c = loss_r = 0.0
    incoming = []
    for i in range(n_out):
        assert_close(outs_c[i], outs_r[i], dtype, f"output {i}")
        g = torch.randn(outs_r[i].shape, generator=gen, dtype=torch.float64)
        incoming.append(g)
        loss_c = loss_c + (outs_c[i].float() * g.to(outs_c[i].device, torch.float32)).sum()
        loss_r = loss_r + (outs_r[i] * g).sum()
    loss_c.backward()
    loss_r.backward()
    zero_scales = term_scales(rin, incoming) if term_scales else {}
    for name, c, r in zip(names, cin, rin):
        if name is None or c is None:
            continue
        assert c.grad is not None, f"d{name}: no gradient"
        assert_close(c.grad, r.grad, dtype, f"d{name}", zero_scales.get(name))
