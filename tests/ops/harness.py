"""Runs an op and its float64 reference on the same (rounded) inputs and compares every
output and every input gradient within SPEC §5."""

from __future__ import annotations

from typing import Callable, Optional

import torch

from conftest import TOL, assert_close

CUDA_HEAD_DIMS = (64, 128)


def head_dim_for(device: str, d: int) -> int:
    """The CUDA kernels cover head dims 64 and 128 (SPEC §4); other cases run there at 64."""
    return d if device == "cpu" or d in CUDA_HEAD_DIMS else 64


def randn(*shape, device, dtype, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape, dtype=torch.float64) * scale).to(device=device, dtype=dtype)


def router(B: int, T: int, L: int, device, dtype) -> torch.Tensor:
    """Softmax rows, as the modules produce them."""
    return torch.softmax(torch.randn(B, T, L, dtype=torch.float64) * 2, -1).to(device, dtype)


def state(B: int, G: int, d: int, device, dtype) -> torch.Tensor:
    sdt = torch.float64 if dtype == torch.float64 else torch.float32
    return torch.randn(B, G, d, dtype=torch.float64).to(device, sdt)


def compare(op: Callable, ref: Callable, inputs: dict, kwargs: dict, dtype: torch.dtype,
            grads: bool = True, out_names: Optional[list[str]] = None) -> None:
    """op(**inputs, **kwargs) vs ref(**float64 cpu copies, **kwargs): outputs, then the
    gradient of a random weighting of every floating output w.r.t. every tensor input."""
    dev_in = {n: (t.detach().clone().requires_grad_(grads) if isinstance(t, torch.Tensor) else t)
              for n, t in inputs.items()}
    ref_in = {n: (t.detach().double().cpu().requires_grad_(grads)
                  if isinstance(t, torch.Tensor) else t) for n, t in inputs.items()}
    outs = op(**dev_in, **kwargs)
    refs = ref(**ref_in, **kwargs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    refs = refs if isinstance(refs, tuple) else (refs,)
    names = out_names or [f"output {i}" for i in range(len(outs))]
    assert len(outs) == len(refs)
    for o, r, n in zip(outs, refs, names):
        assert o.device.type == next(iter(t for t in inputs.values()
                                           if isinstance(t, torch.Tensor))).device.type
        assert_close(o, r, dtype, n)
    if not grads:
        return
    weights = [torch.randn(r.shape, dtype=torch.float64) for r in refs]
    loss = sum((o.double().cpu() * w).sum() for o, w in zip(outs, weights))
    loss_ref = sum((r * w).sum() for r, w in zip(refs, weights))
    tensors = [n for n, t in dev_in.items() if isinstance(t, torch.Tensor)]
    got = torch.autograd.grad(loss, [dev_in[n] for n in tensors], allow_unused=True)
    want = torch.autograd.grad(loss_ref, [ref_in[n] for n in tensors], allow_unused=True)
    for n, g, w in zip(tensors, got, want):
        if w is None:
            continue
        assert g is not None, f"grad of {n}: missing"
        assert g.shape == dev_in[n].shape and g.dtype == dev_in[n].dtype, f"grad of {n}: shape/dtype"
        # A float32 input of a float64 op (lam, say) gets a float32 gradient: its own bound.
        coarser = max((dtype, g.dtype), key=lambda dt: TOL[dt])
        assert_close(g, w, coarser, f"grad of {n}")
