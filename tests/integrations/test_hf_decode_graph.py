"""HFDecodeGraph: a transformers model's decode step replayed from a CUDA graph over a static
PagedCache gives the eager paged decode's logits and tokens (Llama, Qwen2, converted
FastMKA/MKA), keeps the cache's host counts in step, and refuses what it cannot capture."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from conftest import assert_close  # noqa: E402
from hf_cases import VOCAB, tiny  # noqa: E402

from mka.integrations import hf  # noqa: E402
from mka.integrations.hf.decode_graph import HFDecodeGraph  # noqa: E402



def needs_cuda(test):
    return pytest.mark.cuda(pytest.mark.skipif(not torch.cuda.is_available(),
                                               reason="needs a CUDA device")(test))


def _ids(B, T, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, VOCAB, (B, T), generator=g).to(device)


def _model(kind):
    if kind in ("fastmka", "mka"):
        model = hf.convert(tiny("llama"), kind)
        for layer in hf.attention_layers(model):  # routers that mix the levels
            torch.nn.init.normal_(layer.mka_router.out.weight, std=1.0)
    else:
        model = tiny(kind)
        model.set_attn_implementation("mka")
    return model


def _decode(model, cache, ids, steps, graph):
    """Prefill ``ids`` into ``cache`` and decode ``steps`` greedy tokens: (tokens, logits)."""
    with torch.no_grad():
        logits = model(ids, past_key_values=cache, use_cache=True).logits[:, -1]
        step = (HFDecodeGraph(model, cache).step if graph else
                lambda t: model(t, past_key_values=cache, use_cache=True).logits[:, -1])
        tokens, out = [], []
        for _ in range(steps):
            token = logits.argmax(-1, keepdim=True)
            tokens.append(token)
            logits = step(token)
            out.append(logits)
    return torch.cat(tokens, 1), torch.stack(out, 1)


@pytest.mark.parametrize("kind", ["llama", "qwen2", "fastmka", "mka"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@needs_cuda
def test_replayed_steps_equal_eager_steps(kind, dtype):
    torch.manual_seed(0)
    model = _model(kind).to("cuda", dtype)
    ids = _ids(3, 21, device="cuda")
    steps = 12
    runs = {}
    for graph in (False, True):
        cache = hf.PagedCache(model, 3, 21 + steps + 3, page_size=4)  # steps cross pages
        runs[graph] = _decode(model, cache, ids, steps, graph)
        assert cache.get_seq_length() == 21 + steps
        assert cache.pages[0].lengths == [21 + steps] * 3
    (want_tokens, want), (tokens, got) = runs[False], runs[True]
    assert torch.equal(tokens, want_tokens), f"{kind}: greedy tokens differ under the graph"
    assert_close(got.float(), want.float(), dtype, f"{kind} replayed vs eager steps")


@needs_cuda
def test_the_graph_stops_at_its_capacity():
    model = _model("llama").to("cuda")
    cache = hf.PagedCache(model, 1, 8)
    with torch.no_grad():
        model(_ids(1, 6, device="cuda"), past_key_values=cache, use_cache=True)
        graph = HFDecodeGraph(model, cache)
        token = torch.ones(1, 1, dtype=torch.long, device="cuda")
        graph.step(token)  # eager (7 tokens)
        graph.step(token)  # replay (8 tokens)
        with pytest.raises(ValueError, match="^tokens: the cache was made static for 8 tokens"):
            graph.step(token)


def test_what_cannot_be_captured_is_refused():
    model = _model("llama")
    cache = hf.PagedCache(model, 1, 8)
    with pytest.raises(ValueError, match="^cache: a CUDA graph needs a CUDA cache"):
        HFDecodeGraph(model, cache)
    with pytest.raises(ValueError, match="^cache: expected a PagedCache, got DynamicCache"):
        from transformers import DynamicCache
        HFDecodeGraph(model, DynamicCache())
    if torch.cuda.is_available():
        model = model.to("cuda")
        with pytest.raises(ValueError, match="^cache: empty; prefill the prompt"):
            HFDecodeGraph(model, hf.PagedCache(model, 1, 8))
        cache = hf.PagedCache(model, 2, 8)
        ids, mask = _ids(2, 4, device="cuda"), torch.ones(2, 4, dtype=torch.long, device="cuda")
        mask[0, 0] = 0
        with torch.no_grad():
            model(ids, attention_mask=mask, past_key_values=cache, use_cache=True)
        with pytest.raises(ValueError, match="^cache: left-padded sequences"):
            HFDecodeGraph(model, cache)
