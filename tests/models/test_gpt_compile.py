"""``torch.compile(fullgraph=True)`` of the model's forward runs without graph breaks and
matches eager, for every attention variant (and training through it for one)."""

import pytest
import torch

from conftest import TOL, rel_err
from gpt_cases import tiny_model

# One case per attention name (compiling is the slow part), plus the pure-PyTorch backend.
@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()  # each test compiles a new model: keep under the recompile limit
    yield
    torch._dynamo.reset()


CASES = [("mha", "mka"), ("mqa", "mka"), ("gqa", "mka"), ("mla-absorb", "mka"),
         ("mka-l3-window", "mka"), ("fastmka-l3", "mka"), ("mka", "torch"), ("fastmka", "torch")]


@pytest.mark.parametrize("variant,backend", CASES, ids=[f"{v}-{b}" for v, b in CASES])
def test_compiled_forward_matches_eager(variant, backend):
    m = tiny_model(variant, backend, dtype=torch.float32)
    idx = torch.randint(0, m.config.vocab_size, (2, 16))
    compiled = torch.compile(m, fullgraph=True)
    with torch.no_grad():
        (logits, loss), (want, want_loss) = compiled(idx, idx), m(idx, idx)
    assert rel_err(logits, want) < TOL[torch.float32]
    assert rel_err(loss, want_loss) < TOL[torch.float32]


def test_compiled_training_step_matches_eager():
    """Autograd through the traced graph (the ops' fake kernels and backward registrations);
    aot_eager skips inductor's code generation, the slow part on CPU."""
    m = tiny_model("fastmka", dtype=torch.float32).train()
    idx = torch.randint(0, m.config.vocab_size, (2, 16))
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    grads = []
    for model in (compiled, m):
        m.zero_grad(set_to_none=True)
        model(idx, idx)[1].backward()
        grads.append([p.grad.clone() for p in m.parameters()])
    for got, want in zip(*grads):
        assert rel_err(got, want) < TOL[torch.float32]
