"""Attention dropout inside the kernels (SPEC §3.5): the CPU kernels' mask is the reference's
bit for bit (outputs and gradients against the float64 reference with the same mask; GQA,
causal or not, windows, Tq != Tk, tiny and odd sizes; fastmka and mka's levels), the same
seed repeats, p = 0 is the plain op, the rate is p, torch.compile traces it, bad p is an
error, and the modules drop in training only."""

import pytest
import torch

import mka
from mka import reference as R
from mka.models import GPT, GPTConfig
from mka.nn import MultiHeadAttention
from conftest import rel_err

CASES = [  # B, Tq, Tk, H, G, d, causal, window
    (2, 37, 37, 4, 2, 16, True, None),
    (1, 9, 40, 4, 4, 8, True, 12),
    (2, 33, 33, 2, 1, 8, False, None),
    (1, 1, 1, 2, 1, 8, True, None),
    (1, 3, 3, 1, 1, 4, True, None),
    (1, 70, 70, 2, 2, 32, True, 20),
]


def _seed_of_next_call() -> int:
    """The seed the next op with dropout draws (mka.ops._seed) after torch.manual_seed(7)."""
    torch.manual_seed(7)
    return int(torch.randint(0, 2 ** 62, (1,), dtype=torch.int64)[0])


def _inputs(B, Tq, Tk, H, G, d, dtype=torch.float64):
    torch.manual_seed(Tq * 100 + Tk)
    q = torch.randn(B, Tq, H, d, dtype=dtype, requires_grad=True)
    k, v = (torch.randn(B, Tk, G, d, dtype=dtype, requires_grad=True) for _ in range(2))
    return q, k, v


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_attention_dropout_equals_the_reference_with_its_mask(case, dtype):
    B, Tq, Tk, H, G, d, causal, W = case
    q, k, v = _inputs(B, Tq, Tk, H, G, d, dtype)
    seed = _seed_of_next_call()
    torch.manual_seed(7)
    out = mka.attention(q, k, v, causal, None, W, dropout_p=0.3)
    ref = R.attention(*(t.double() for t in (q, k, v)), causal, None, W, 0.3, seed)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert rel_err(out, ref) < tol
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), g),
                    torch.autograd.grad(ref, (q, k, v), g.double())):
        assert rel_err(a, b) < tol


def test_fastmka_and_mka_drop_each_attention_with_its_level_mask():
    q, k, v = _inputs(2, 30, 30, 4, 2, 8)
    lam = torch.softmax(torch.randn(2, 30, 3, dtype=torch.float64), -1).requires_grad_()
    mem_k, mem_v = torch.randn(2, 5, 2, 8, dtype=torch.float64), torch.randn(2, 5, 2, 8, dtype=torch.float64)
    seed = _seed_of_next_call()
    torch.manual_seed(7)
    out, _, _ = mka.mka(q, k, v, lam, 0.8, mem_k, mem_v, window=9, dropout_p=0.2)
    ref, _, _ = R.mka(q, k, v, lam, 0.8, mem_k, mem_v, window=9, dropout_p=0.2, seed=seed)
    assert rel_err(out, ref) < 1e-12
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (q, k, v, lam), g),
                    torch.autograd.grad(ref, (q, k, v, lam), g)):
        assert rel_err(a, b) < 1e-12
    lam2 = lam[..., :2].detach()
    torch.manual_seed(7)
    out, _, _ = mka.fastmka(q, k, v, lam2, 0.8, dropout_p=0.2)
    ref, _, _ = R.fastmka(q, k, v, lam2, 0.8, dropout_p=0.2, seed=seed)
    assert rel_err(out, ref) < 1e-12


def test_seed_repeats_p_zero_is_the_plain_op_and_the_rate_is_p():
    q, k, v = _inputs(1, 64, 64, 2, 2, 8)
    torch.manual_seed(3)
    a = mka.attention(q, k, v, dropout_p=0.5)
    torch.manual_seed(3)
    assert torch.equal(mka.attention(q, k, v, dropout_p=0.5), a)
    assert not torch.equal(mka.attention(q, k, v, dropout_p=0.5), a)  # a new seed
    assert torch.equal(mka.attention(q, k, v, dropout_p=0.0), mka.attention(q, k, v))
    kept = R.dropout_mask(12345, 0.3, 2, 4, 128, 128) > 0
    assert abs(kept.double().mean().item() - 0.7) < 0.01


def test_compile_traces_dropout():
    q, k, v = _inputs(1, 16, 16, 2, 1, 8, torch.float32)
    f = torch.compile(lambda q, k, v: mka.attention(q, k, v, dropout_p=0.25), fullgraph=True)
    torch.manual_seed(11)
    got = f(q, k, v)
    got.sum().backward()
    assert torch.isfinite(q.grad).all() and got.shape == q.shape


@pytest.mark.parametrize("p", [-0.1, 1.0, True, "x"])
def test_bad_dropout_is_an_error(p):
    q, k, v = _inputs(1, 4, 4, 1, 1, 4)
    with pytest.raises(ValueError, match="dropout_p"):
        mka.attention(q, k, v, dropout_p=p)


def test_modules_drop_in_training_only():
    torch.manual_seed(0)
    m = MultiHeadAttention(32, 4, dropout=0.5)
    x = torch.randn(2, 10, 32)
    m.resid_dropout.p = 0.0  # the weights' dropout alone
    m.train()
    assert not torch.equal(m(x), m(x))
    m.eval()
    assert torch.equal(m(x), m(x))
    cfg = GPTConfig(n_layer=1, n_embd=32, n_head=4, block_size=16, vocab_size=20, dropout=0.1,
                    attention="mka")
    model = GPT(cfg)
    assert model.blocks[0].attn.attn_dropout == 0.1
    idx = torch.randint(0, 20, (2, 16))
    _, loss = model(idx, idx)
    loss.backward()
