"""Level 2 over EMA summaries (SPEC §7.3): the attention equals the float64 reference with a
full mask (outputs and gradients, GQA, strides, fewer queries than keys, rows before the
first chunk end), and MKA with ``ema_stride`` decodes from its cache what a full forward
computes."""

import pytest
import torch

from mka import reference as R
from mka.memory.summary import summary_attention
from mka.models import GPT, GPTConfig
from mka.nn import MKAAttention
from conftest import rel_err

CASES = [  # B, Tq, Tk, H, G, d, stride
    (2, 40, 40, 4, 2, 8, 8),
    (1, 33, 33, 2, 1, 16, 4),
    (2, 5, 37, 4, 4, 8, 16),  # a few rows after a cache
    (1, 7, 7, 2, 2, 8, 16),   # no chunk end yet: the row's own EMA only
    (1, 30, 30, 2, 1, 8, 1),  # stride 1: every position, MKA's default level 2
]


@pytest.mark.parametrize("case", CASES, ids=str)
def test_summary_attention_equals_the_reference(case):
    B, Tq, Tk, H, G, d, s = case
    torch.manual_seed(Tk)
    q = torch.randn(B, Tq, H, d, dtype=torch.float64, requires_grad=True)
    ek, ev = (torch.randn(B, Tk, G, d, dtype=torch.float64, requires_grad=True) for _ in range(2))
    out = summary_attention(q, ek, ev, s)
    ref = R.summary_attention(q, ek, ev, s)
    assert rel_err(out, ref) < 1e-12
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (q, ek, ev), g),
                    torch.autograd.grad(ref, (q, ek, ev), g)):
        assert rel_err(a, b) < 1e-12


def test_stride_one_is_level_2_of_mka():
    torch.manual_seed(0)
    q = torch.randn(1, 20, 2, 8, dtype=torch.float64)
    ek, ev = torch.randn(1, 20, 2, 8, dtype=torch.float64), torch.randn(1, 20, 2, 8, dtype=torch.float64)
    assert rel_err(summary_attention(q, ek, ev, 1), R.attention(q, ek, ev)) < 1e-12


def test_bad_stride_is_an_error():
    q = torch.randn(1, 4, 2, 8)
    with pytest.raises(ValueError, match="ema_stride"):
        summary_attention(q, q[:, :, :1], q[:, :, :1], 0)
    with pytest.raises(ValueError, match="ema_stride"):
        MKAAttention(32, 4, ema_stride=0)


def _reference_mka(m: MKAAttention, x: torch.Tensor) -> torch.Tensor:
    """The module's forward from the float64 references: levels 1, 2 (summaries), 3."""
    q, k, v = m._project(x)
    lam = m.router(q)
    o1 = R.attention(q, k, v, True, None, m.window)
    ek, _ = R.ema(k, m.beta)
    ev, _ = R.ema(v, m.beta)
    y = lam[..., 0, None, None] * o1 + lam[..., 1, None, None] * R.summary_attention(q, ek, ev, m.ema_stride)
    if m.recall is not None:
        o3, _ = R.recall_attention(q, k, v, chunk=m.recall.chunk, top=m.recall.top,
                                   planes=m.recall.planes.double(), window=m.window)
        y = y + lam[..., 2, None, None] * o3
    elif m.long_term is not None:  # learned slots
        mem_k, mem_v = m._memory(k, None)
        y = y + lam[..., 2, None, None] * R.attention(q, mem_k, mem_v, False)
    return m.proj(y.reshape(*x.shape[:2], -1))


MODULES = [  # options of MKAAttention(32, 4, 2, ...)
    dict(ema_stride=8),
    dict(ema_stride=8, window=12),
    dict(ema_stride=4, levels=3, recall_chunk=8, recall_top=2, window=9),
    dict(ema_stride=16, levels=3, memory_slots=4),
]


@pytest.mark.parametrize("backend", ["mka", "torch"])
@pytest.mark.parametrize("opts", MODULES, ids=str)
def test_mka_with_summaries_equals_the_reference_and_decodes_the_same(opts, backend):
    torch.manual_seed(1)
    m = MKAAttention(32, 4, 2, backend=backend, **opts).double()
    x = torch.randn(2, 45, 32, dtype=torch.float64)
    full = m(x)
    assert rel_err(full, _reference_mka(m, x)) < 1e-10
    cache = m.new_cache(2, dtype=torch.float64, max_tokens=64, page_size=4)
    steps, outs, t = [7, 1, 1, 13, 1, 5] + [1] * 17, [], 0
    for n in steps:
        outs.append(m(x[:, t:t + n], cache=cache))
        t += n
    assert rel_err(torch.cat(outs, 1), full) < 1e-10
    # the cache keeps one summary per chunk end, no page checkpoints
    assert cache.k_page_states is None
    assert cache.states["summary_k"].shape == (2, 64 // opts["ema_stride"], 2, 8)


def test_gpt_trains_and_generates_with_summaries():
    torch.manual_seed(0)
    cfg = GPTConfig(n_layer=2, n_embd=32, n_head=4, n_kv_head=2, block_size=64, vocab_size=50,
                    attention="mka", attn_options=dict(ema_stride=8, window=16, levels=3,
                                                       recall_chunk=8, recall_top=2))
    model = GPT(cfg)
    idx = torch.randint(0, 50, (2, 40))
    _, loss = model(idx, idx)
    loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters()
               if "router" in n or "qkv" in n)
    model.eval()
    out = model.generate(idx[:, :30], 10, greedy=True)
    with torch.no_grad():  # greedy decoding equals the argmax of full forwards
        for t in range(30, 40):
            logits = model(out[:, :t])[0][:, -1]
            assert torch.equal(logits.argmax(-1), out[:, t])
