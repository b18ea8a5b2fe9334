"""Bad inputs on CUDA tensors raise a ValueError naming the argument (SPEC §4)."""

import pytest
import torch

import mka  # noqa: F401
from cuda_checks import requires_cuda

pytestmark = [requires_cuda, pytest.mark.cuda]


def _t(*shape, dtype=torch.bfloat16, device="cuda"):
    return torch.randn(*shape, dtype=dtype, device=device)


@pytest.mark.parametrize("make, name", [
    (lambda: (_t(1, 8, 2, 32), _t(1, 8, 2, 32), _t(1, 8, 2, 32)), "head dim"),
    (lambda: (_t(1, 8, 2, 64, dtype=torch.float64),) * 3, "dtype"),
    (lambda: (_t(1, 8, 3, 64), _t(1, 8, 2, 64), _t(1, 8, 2, 64)), "multiple"),
    (lambda: (_t(1, 8, 2, 64), _t(1, 8, 2, 64, device="cpu"), _t(1, 8, 2, 64)), "k:"),
    (lambda: (_t(1, 8, 2, 64), _t(1, 8, 2, 64, dtype=torch.float16), _t(1, 8, 2, 64)), "k:"),
    (lambda: (_t(1, 8, 2, 128)[..., ::2], _t(1, 8, 2, 64), _t(1, 8, 2, 64)), "contiguous"),
])
def test_attention_rejects(make, name):
    with pytest.raises(ValueError, match=name):
        torch.ops.mka.attention(*make())


def test_route_rejects_bad_lam_and_beta():
    k = _t(1, 8, 2, 64)
    with pytest.raises(ValueError, match="lam"):
        torch.ops.mka.route_fuse(k, k, _t(1, 8, 4), 0.5)
    with pytest.raises(ValueError, match="beta"):
        torch.ops.mka.route_fuse(k, k, _t(1, 8, 2), 1.5)
    with pytest.raises(ValueError, match="k3"):
        torch.ops.mka.fastmka(_t(1, 8, 2, 64), k, k, _t(1, 8, 3), 0.5)
    with pytest.raises(ValueError, match="mem_k"):
        torch.ops.mka.mka(_t(1, 8, 2, 64), k, k, _t(1, 8, 3), 0.5)
