"""`mka generate-bench` runs tiny on CPU: both attentions, every phase's numbers, and the
KV bytes per token read from the cache."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("transformers")


def test_generate_bench_tiny_cpu(tmp_path, capsys):
    from mka.cli import main
    from mka.integrations.hf.generation_bench import SIZES
    out = tmp_path / "bench.json"
    assert main(["generate-bench", "--device", "cpu", "--batches", "1,2", "--prompts", "16",
                 "--new-tokens", "3", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "random weights" in printed and "not measured on cpu" in printed
    rows = json.loads(out.read_text())["rows"]
    assert [(r["attn"], r["batch"]) for r in rows] == [("sdpa", 1), ("mka", 1), ("sdpa", 2), ("mka", 2)]
    size = SIZES["tiny"]
    # keys and values of every layer, float32
    kv = (2 * size["num_hidden_layers"] * size["num_key_value_heads"]
          * size["hidden_size"] // size["num_attention_heads"] * 4)
    for r in rows:
        assert r["kv_bytes_per_token"] == kv
        assert r["prefill_tok_s"] > 0 and r["decode_tok_s"] > 0 and r["ms_per_output_token"] > 0
        assert r["peak_prefill_bytes"] is None and r["peak_decode_bytes"] is None
