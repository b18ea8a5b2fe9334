"""Generation on CUDA with the decode step in a CUDA graph (GPT.generate(cuda_graph=True)):
the same greedy tokens as the eager decode for every variant that can be captured, prompts of
different lengths too, and up to the context's slide."""

from __future__ import annotations

import pytest
import torch

from mka.models import GPT, GPTConfig
from cuda_checks import requires_cuda

pytestmark = [requires_cuda, pytest.mark.cuda]


def _model(variant: str, block_size: int = 64, n_embd: int = 64, **options) -> GPT:
    torch.manual_seed(0)
    cfg = GPTConfig(n_layer=2, n_embd=n_embd, n_head=4, block_size=block_size, vocab_size=97,
                    attention=variant, attn_options=options)
    return GPT(cfg).cuda().eval()


@pytest.mark.parametrize("variant", ["mha", "gqa", "mla", "mka", "fastmka"])
def test_graphed_decode_equals_eager(variant):
    m = _model(variant)
    idx = torch.randint(0, 97, (3, 11), device="cuda")
    want = m.generate(idx, 20, greedy=True)
    got = m.generate(idx, 20, greedy=True, cuda_graph=True)
    assert torch.equal(got, want)


@pytest.mark.parametrize("options", [
    dict(levels=3, window=8, recall_chunk=4, recall_top=2),
    dict(levels=3, window=8, recall_chunk=4, recall_top=2, ema_stride=4, recall_score="mean"),
    dict(levels=3, window=8, recall_chunk=4, recall_top=2, recall_score="bound"),
    dict(levels=3, window=8, recall_chunk=4, recall_top=2, recall_score="corners")],
    ids=["recall", "summaries-recall-mean", "recall-bound", "recall-corners"])
def test_graphed_decode_with_recall_equals_eager(options):
    """MKA with recall (and level 2 over summaries): signatures, means and summaries kept by
    masked writes at device positions, every stored chunk scored — captured and replayed."""
    m = _model("mka", **options)
    idx = torch.randint(0, 97, (2, 11), device="cuda")
    want = m.generate(idx, 40, greedy=True)
    got = m.generate(idx, 40, greedy=True, cuda_graph=True)
    assert torch.equal(got, want)


def test_graphed_decode_with_ragged_prompts_and_a_sliding_context():
    m = _model("mha", block_size=24)
    prompts = [torch.randint(0, 97, (n,), device="cuda") for n in (5, 13)]
    want = m.generate(prompts, 20, greedy=True)
    got = m.generate(prompts, 20, greedy=True, cuda_graph=True)
    assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_cuda_graph_needs_the_native_backend():
    m = _model("mha")
    m_torch = GPT(GPTConfig(n_layer=1, n_embd=64, n_head=4, block_size=32, vocab_size=97,
                            attn_backend="torch")).cuda().eval()
    idx = torch.randint(0, 97, (1, 4), device="cuda")
    with pytest.raises(ValueError, match="cuda_graph: needs attn_backend='mka'"):
        m_torch.generate(idx, 3, greedy=True, cuda_graph=True)
    assert m.generate(idx, 1, greedy=True, cuda_graph=True).shape == (1, 5)


@pytest.mark.parametrize("options", [
    dict(levels=2, window=8, ema_stride=4),
    dict(levels=3, window=8, recall_chunk=4, recall_top=2, ema_stride=4, recall_score="bound")],
    ids=["summaries", "summaries-recall-bound"])
def test_decode_with_summaries_equals_one_full_pass(options):
    """One-token steps attend to level 2 through the summary slots (the row's own term in
    its chunk's slot, one paged attention): a prefill and 21 such steps give the logits of
    one full pass (float32; heads of 64: the full pass runs the CUDA attention kernel)."""
    from conftest import rel_err
    m = _model("mka", n_embd=256, **options)
    idx = torch.randint(0, 97, (2, 30), device="cuda")
    with torch.no_grad():
        full = m(idx)[0]
        caches = m.new_caches(2)
        steps = [m(idx[:, :9], caches=caches)[0]]
        steps += [m(idx[:, t:t + 1], caches=caches)[0] for t in range(9, 30)]
    assert rel_err(torch.cat(steps, 1), full) < 1e-4
