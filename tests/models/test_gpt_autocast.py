"""Mixed precision as the trainer runs it (autocast, float32 weights, bf16 activations):
every variant trains a step and decodes from caches that take the autocast dtype."""

import pytest
import torch

from conftest import TOL, rel_err
from gpt_cases import tiny_model, variant_params


@pytest.mark.parametrize("backend", ["mka", "torch"])
@pytest.mark.parametrize("variant", variant_params())
def test_autocast_bf16_training_step_and_decode(variant, backend):
    m = tiny_model(variant, backend, dtype=torch.float32).train()
    idx = torch.randint(0, m.config.vocab_size, (2, 12))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, loss = m(idx, idx)
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in m.parameters())
    m.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        full, _ = m(idx)
        caches = m.new_caches(2)
        assert caches[0].dtype == torch.bfloat16
        steps = [m(idx[:, :7], caches=caches)[0]] + [m(idx[:, t:t + 1], caches=caches)[0]
                                                     for t in range(7, 12)]
    assert rel_err(torch.cat(steps, 1), full) < TOL[torch.bfloat16]
