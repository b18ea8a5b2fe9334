"""The native recall kernels (SPEC §7.2, mka.memory.recall_ops): outputs and gradients equal
the PyTorch composite and the float64 reference on the same chunks (GQA, chunk edges, -1
padding, rows with no chunk, Tq < Tk), gradcheck in float64, torch.compile, bad indices."""

import pytest
import torch

from mka import reference as R
from mka.memory.recall import Recall, _attend_in_blocks, recall_attention, simhash_planes
from mka.memory.recall_ops import recall_op
from conftest import rel_err

CASES = [  # B, Tq, Tk, H, G, d, chunk, top, window
    (2, 50, 50, 4, 2, 16, 8, 3, 9),
    (1, 70, 75, 2, 1, 8, 16, 10, None),   # Tk not a multiple of the chunk; R above the chunks
    (2, 1, 64, 4, 4, 8, 8, 2, 8),         # one decoding row
    (1, 6, 6, 2, 1, 8, 16, 4, None),      # no whole chunk: O3 = 0
    (1, 40, 64, 12, 1, 64, 8, 3, None),   # a group of 12 heads: the micro-kernels' row blocks
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_native_equals_composite_and_reference(case, dtype):
    B, Tq, Tk, H, G, d, C, top, W = case
    torch.manual_seed(Tq + Tk)
    q = torch.randn(B, Tq, H, d, dtype=dtype, requires_grad=True)
    k, v = (torch.randn(B, Tk, G, d, dtype=dtype, requires_grad=True) for _ in range(2))
    planes = simhash_planes(d, 2, 16, seed=1)
    out, chosen = recall_attention(q, k, v, chunk=C, top=top, planes=planes, window=W)
    ref, ref_chosen = R.recall_attention(*(t.double() for t in (q, k, v)), chunk=C, top=top,
                                         planes=planes, window=W)
    assert torch.equal(chosen, ref_chosen)
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    assert rel_err(out, ref) < tol
    if chosen.shape[-1] == 0:
        return
    composite = _attend_in_blocks(q, k, v, chosen, C, d ** -0.5)
    assert rel_err(out, composite) < tol
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), g),
                    torch.autograd.grad(ref, (q, k, v), g.double())):
        assert rel_err(a, b) < tol


def test_rows_without_chunks_and_gradcheck():
    torch.manual_seed(0)
    q = torch.randn(1, 5, 2, 4, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(1, 12, 1, 4, dtype=torch.float64, requires_grad=True) for _ in range(2))
    chosen = torch.tensor([[[[-1, -1]], [[0, -1]], [[2, 0]], [[-1, 1]], [[-1, -1]]]])
    out = recall_op(q, k, v, chosen, 4)
    assert not out[0, 0].any() and not out[0, 4].any()
    out.sum().backward()
    assert not q.grad[0, 0].any() and torch.isfinite(k.grad).all()
    assert torch.autograd.gradcheck(lambda q, k, v: recall_op(q, k, v, chosen, 4), (q, k, v))


def test_compile_traces_the_module():
    torch.manual_seed(0)
    rec = Recall(8, chunk=4, top=2)
    q, k, v = torch.randn(1, 20, 2, 8), torch.randn(1, 20, 1, 8), torch.randn(1, 20, 1, 8)
    want = rec(q, k, v, 4)
    got = torch.compile(lambda q, k, v: rec(q, k, v, 4), fullgraph=False)(q, k, v)
    assert rel_err(got, want) < 1e-6


@pytest.mark.parametrize("bad, message", [(3, "is neither -1 nor a whole chunk"),
                                          (-2, "is neither -1 nor a whole chunk")])
def test_bad_chunk_index_is_an_error(bad, message):
    q, k, v = torch.randn(1, 2, 2, 4), torch.randn(1, 11, 1, 4), torch.randn(1, 11, 1, 4)
    chosen = torch.tensor([[[[0]], [[bad]]]])
    with pytest.raises(ValueError, match=message):
        recall_op(q, k, v, chosen, 4)
    with pytest.raises(ValueError, match="chosen: expected shape"):
        recall_op(q, k, v, torch.zeros(1, 2, 2, 1, dtype=torch.long), 4)
