"""Shared test fixtures: devices (CUDA cases skip cleanly without a GPU), dtypes per device,
SPEC §5 tolerances and the relative-error check used by every kernel test."""

from __future__ import annotations

import zlib

import pytest
import torch

DEVICES = ["cpu", pytest.param("cuda", marks=[
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")])]

# SPEC §5: relative error bounds against the float64 reference.
TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}
DTYPES = {"cpu": (torch.float64, torch.float32), "cuda": (torch.bfloat16, torch.float16, torch.float32)}


def dtype_params(device_dtypes=DTYPES):
    """(device, dtype) pairs, the CUDA ones skipped without a GPU."""
    out = []
    for dev in DEVICES:
        name = dev if isinstance(dev, str) else dev.values[0]
        marks = () if isinstance(dev, str) else dev.marks
        out += [pytest.param(name, dt, marks=marks, id=f"{name}-{str(dt)[6:]}")
                for dt in device_dtypes[name]]
    return out


def shuffled_block_table(lens, S: int, W: int, P: int, gen: torch.Generator) -> torch.Tensor:
    """A (B, W) int32 block table giving each sequence of ``lens`` tokens distinct pages of a
    pool of ``P`` in shuffled order (-1 past its pages)."""
    import math
    perm = torch.randperm(P, generator=gen).int()
    bt = torch.full((len(lens), W), -1, dtype=torch.int32)
    used = 0
    for b, n in enumerate(lens):
        k = math.ceil(n / S)
        bt[b, :k] = perm[used:used + k]
        used += k
    assert used <= P
    return bt


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref||, in float64; absolute error where the reference is zero."""
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    assert out.shape == ref.shape, f"shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    if not torch.isfinite(out).all():
        return float("inf")  # NaN never passes
    diff = (out - ref).norm().item()
    scale = ref.norm().item()
    return diff / scale if scale > 0 else diff


def assert_close(out, ref, dtype: torch.dtype, what: str = "output") -> None:
    err = rel_err(out, ref)
    assert err < TOL[dtype], f"{what}: relative error {err:.3e} >= {TOL[dtype]:.0e} ({dtype})"


@pytest.fixture(autouse=True)
def _seed(request):
    # Fresh inputs per test, reproducible per test id (crc32: str hash() is salted per process).
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
