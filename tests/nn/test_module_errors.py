"""Invalid configurations and inputs raise a ValueError that names the argument."""

import pytest
import torch

from attn_cases import config, hidden, make
from mka.nn import attention_options, build_attention, check_attention_config


@pytest.mark.parametrize("name,n_kv_head,options,match", [
    ("unknown", None, {}, "attention: unknown variant 'unknown'"),
    ("mha", 3, {}, "n_kv_head: MHA"),
    ("mqa", 2, {}, "n_kv_head: MQA"),
    ("gqa", 3, {}, "n_kv_head: must divide n_head = 4"),
    ("gqa", 0, {}, "n_kv_head: must be a positive integer"),
    ("gqa", 2, {"window": 0}, "window: must be a positive integer"),
    ("gqa", 2, {"beta": 0.5}, r"attn_options: \['beta'\] not options of attention 'gqa'"),
    ("mka", 2, {"beta": 1.0}, r"beta: the EMA decay must be a float in \[0, 1\)"),
    ("fastmka", 2, {"levels": 4}, "levels: must be 2"),
    ("mka", 2, {"router_hidden": 0}, "router_hidden: must be a positive integer"),
    ("mka", 2, {"levels": 3, "memory_slots": -1}, "memory_slots"),
    ("mla", 2, {}, "n_kv_head: MLA"),
    ("mla", None, {"path": "fast"}, "path: expected one of"),
    ("mla", None, {"qk_rope_head_dim": 7}, "qk_rope_head_dim: RoPE rotates pairs"),
    ("mla", None, {"kv_lora_rank": 0}, "kv_lora_rank: must be a positive integer"),
    ("mla", None, {"q_lora_rank": -1}, "q_lora_rank"),
    ("mla", None, {"kv_lora_rank": 253}, "kv_lora_rank: the absorb path attends with head dim"),
])
def test_invalid_options_raise(name, n_kv_head, options, match):
    with pytest.raises(ValueError, match=match):
        check_attention_config(config(name, n_kv_head, **options))


def test_heads_must_divide_width():
    cfg = config("mha")
    cfg.n_head = 5
    with pytest.raises(ValueError, match="n_head: must divide n_embd = 32, got 5"):
        build_attention(cfg)


def test_unknown_backend():
    with pytest.raises(ValueError, match="backend: expected one of"):
        build_attention(config("gqa", 2, "triton"))


def test_wide_mla_runs_on_the_torch_backend():
    check_attention_config(config("mla", None, "torch", kv_lora_rank=253))


def test_every_variant_lists_its_options():
    assert attention_options("mha") == ("window",)
    assert {"levels", "beta", "memory_slots", "window"} <= set(attention_options("fastmka"))
    assert {"q_lora_rank", "kv_lora_rank", "path"} <= set(attention_options("mla"))


def test_bad_inputs():
    m = make("mha")
    with pytest.raises(ValueError, match=r"x: expected hidden states \(B, T, 32\)"):
        m(torch.randn(2, 3, 16, dtype=torch.float64))
    with pytest.raises(ValueError, match="memory: MultiHeadAttention has no level-3 memory"):
        m(hidden(), memory=(torch.zeros(1), torch.zeros(1)))
    with pytest.raises(ValueError, match="cache: expected a layer of a PagedKVCache"):
        m(hidden(), cache={})
    with pytest.raises(ValueError, match="memory: this module has levels=2"):
        make("mka")(hidden(), memory=(torch.zeros(1), torch.zeros(1)))
    l3 = make("mka-l3-window")
    with pytest.raises(ValueError, match=r"memory\[0\] \(keys\): expected \(B, M, G, d\)"):
        l3(hidden(), memory=(torch.zeros(2, 3, 1, 8, dtype=torch.float64),) * 2)


def test_fastmka_level3_needs_some_memory():
    torch.manual_seed(0)
    m = build_attention(config("fastmka", 2, levels=3, memory_slots=0)).double()
    with pytest.raises(ValueError, match="memory: FastMKA with levels=3"):
        m(hidden())
    m(hidden(), memory=m.project_memory(hidden(T=3)))  # recalled tokens are enough


@pytest.mark.parametrize("n_embd,n_head", [(24, 4), (12, 4), (30, 3)])
def test_mla_defaults_fit_any_head_width(n_embd, n_head):
    cfg = config("mla", n_embd=n_embd)
    cfg.n_head = n_head
    m = build_attention(cfg)
    assert m.rope % 2 == 0 and m.kv_lora_rank + m.rope == 2 * (n_embd // n_head)
    assert m(torch.randn(1, 5, n_embd)).shape == (1, 5, n_embd)
