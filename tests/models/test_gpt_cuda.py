"""The GPT model on CUDA as the trainer runs it (bf16 autocast, native kernels): every
variant trains a step with finite gradients, decodes from its caches as one full pass
does, and generates; torch.compile traces it. Skipped without a GPU."""

import pytest
import torch

from conftest import TOL, rel_err
from gpt_cases import tiny_model, variant_params

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
HEAD64 = dict(n_embd=128, n_head=2)  # head dim 64: a CUDA kernel size


@pytest.mark.parametrize("variant", variant_params())
def test_cuda_autocast_train_step_decode_and_generate(variant):
    m = tiny_model(variant, dtype=torch.float32, **HEAD64).cuda().train()
    idx = torch.randint(0, m.config.vocab_size, (4, 20), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        _, loss = m(idx, idx)
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in m.parameters())
    m.eval()
    for dtype in (torch.float32, torch.bfloat16):
        with torch.no_grad(), torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
            full, _ = m(idx)
            caches = m.new_caches(4)
            steps = [m(idx[:, :12], caches=caches)[0]] + [m(idx[:, t:t + 1], caches=caches)[0]
                                                          for t in range(12, 20)]
        # Recall picks chunks by the signs of bf16 keys that a prompt pass and a decode step
        # round differently: a near tie may flip a choice (float32 decodes exactly: checked
        # first), so bf16 gets twice the tolerance where level 3 is recall (seen: up to 1.4e-2).
        tol = TOL[dtype] * (2 if dtype == torch.bfloat16 and "recall" in variant else 1)
        assert rel_err(torch.cat(steps, 1), full) < tol
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        out = m.generate(idx[:, :5], 30, temperature=0.8, top_k=5)  # past block_size 24
    assert out.shape == (4, 35) and out.max() < m.config.vocab_size


@pytest.mark.parametrize("variant", ["mla-absorb", "mka-l3-window", "fastmka"])
def test_cuda_compiled_forward_matches_eager(variant):
    torch._dynamo.reset()
    m = tiny_model(variant, dtype=torch.float32, **HEAD64).cuda()
    idx = torch.randint(0, m.config.vocab_size, (2, 16), device="cuda")
    with torch.no_grad():
        got, want = torch.compile(m, fullgraph=True)(idx)[0], m(idx)[0]
    assert rel_err(got, want) < TOL[torch.float32]
