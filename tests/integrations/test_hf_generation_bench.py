"""`mka generate-bench` runs tiny on CPU: both attentions on DynamicCache, mka on the
PagedCache, the library's GPT variants on their paged cache, every phase's numbers, and the
KV bytes per token read from the cache objects."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("transformers")

from mka.cli import main  # noqa: E402
from mka.integrations.hf.generation_bench import GPT_SIZES, GPT_VARIANTS, SIZES  # noqa: E402


def test_generate_bench_tiny_cpu(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["generate-bench", "--device", "cpu", "--batches", "1,2", "--prompts", "16",
                 "--new-tokens", "3", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "random weights" in printed and "not measured on cpu" in printed
    rows = json.loads(out.read_text())["rows"]
    hf_runs = [("sdpa", "DynamicCache"), ("mka", "DynamicCache"), ("mka", "PagedCache")]
    assert [(r["model"], r["attn"], r["cache"], r["batch"]) for r in rows] == (
        [("hf", a, c, b) for b in (1, 2) for a, c in hf_runs]
        + [("gpt", v, "PagedKVCache", b) for b in (1, 2) for v in GPT_VARIANTS])
    size, gpt = SIZES["tiny"], GPT_SIZES["tiny"]
    # keys and values of every layer, float32 (16 prompt tokens fill one 16-token page)
    hf_kv = (2 * size["num_hidden_layers"] * size["num_key_value_heads"]
             * size["hidden_size"] // size["num_attention_heads"] * 4)
    gpt_kv = {"mha": 2 * gpt["n_layer"] * gpt["n_embd"] * 4,
              "gqa": gpt["n_layer"] * gpt["n_embd"] * 4}  # half the key/value heads
    for r in rows:
        assert r["prefill_tok_s"] > 0 and r["decode_tok_s"] > 0 and r["ms_per_output_token"] > 0
        assert r["peak_prefill_bytes"] is None and r["peak_decode_bytes"] is None
        if r["model"] == "hf":
            assert r["kv_bytes_per_token"] == hf_kv
        elif r["attn"] in gpt_kv:
            assert r["kv_bytes_per_token"] == gpt_kv[r["attn"]]
        else:  # mla's latent is smaller; mka/fastmka add their EMA states and checkpoints
            assert r["kv_bytes_per_token"] > 0


def test_generate_bench_reports_shapes_beyond_the_gpt_block(tmp_path, capsys):
    out = tmp_path / "bench.json"
    too_long = GPT_SIZES["tiny"]["block_size"]
    assert main(["generate-bench", "--device", "cpu", "--batches", "1", "--prompts",
                 str(too_long), "--new-tokens", "2", "--attns", "none", "--gpt", "mha",
                 "--json", str(out)]) == 0
    (row,) = json.loads(out.read_text())["rows"]
    assert row["error"] == f"prompt + new tokens exceed block_size {too_long}"
    with pytest.raises(SystemExit):
        main(["generate-bench", "--device", "cpu", "--gpt", "rwkv"])
    assert "--gpt: unknown ['rwkv']" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["generate-bench", "--device", "cpu", "--cuda-graph"])
    assert "--cuda-graph: needs --device cuda" in capsys.readouterr().err


def test_generate_bench_runs_a_variant_on_the_torch_backend(tmp_path):
    """VARIANT@torch: the same GPT on the PyTorch backend (SDPA), its rows labelled so."""
    out = tmp_path / "bench.json"
    assert main(["generate-bench", "--device", "cpu", "--batches", "1", "--prompts", "16",
                 "--new-tokens", "3", "--attns", "none", "--gpt", "mha,mha@torch",
                 "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["attn"] for r in rows] == ["mha", "mha@torch"]
    assert rows[0]["kv_bytes_per_token"] == rows[1]["kv_bytes_per_token"]
    assert all(r["decode_tok_s"] > 0 for r in rows)


def test_sdpa_flash_rows_run_without_cudnn(tmp_path, monkeypatch):
    """sdpa.flash: transformers' sdpa code with SDPA's cuDNN backend ruled out in every call
    (prefill and decode), on the DynamicCache only; plain sdpa leaves PyTorch's choice alone."""
    import torch
    seen = {}
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def watched(*args, **kwargs):
        seen.setdefault(current[0], set()).add(torch.backends.cuda.cudnn_sdp_enabled())
        return sdpa(*args, **kwargs)

    from mka.integrations.hf import generation_bench
    current = [None]
    measure = generation_bench.measure

    def measure_and_mark(model, attn, *args, **kwargs):
        current[0] = attn
        return measure(model, attn, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", watched)
    monkeypatch.setattr(generation_bench, "measure", measure_and_mark)
    out = tmp_path / "bench.json"
    assert main(["generate-bench", "--device", "cpu", "--batches", "1", "--prompts", "16",
                 "--new-tokens", "3", "--attns", "sdpa,sdpa.flash,mka", "--gpt", "none",
                 "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["attn"], r["cache"]) for r in rows] == [
        ("sdpa", "DynamicCache"), ("sdpa.flash", "DynamicCache"), ("mka", "DynamicCache"),
        ("mka", "PagedCache")]
    assert seen == {"sdpa": {torch.backends.cuda.cudnn_sdp_enabled()}, "sdpa.flash": {False}}


def test_only_sdpa_takes_the_flash_suffix(capsys):
    with pytest.raises(SystemExit):
        main(["generate-bench", "--device", "cpu", "--attns", "eager.flash"])
    assert "--attns: ['eager.flash']: only sdpa.flash" in capsys.readouterr().err


def test_a_row_never_holds_two_paged_pools(tmp_path, monkeypatch):
    """The warm-up's cache is gone before the measured one is made: a paged cache allocates
    its whole pool when made, so two at once would not fit where one does (B 32 x 16k tokens
    of a 1B model: 17 GB each on an 80 GB card)."""
    import weakref

    from mka.integrations.hf import paged_cache
    from mka.memory.cache import PagedKVCache

    alive, most = weakref.WeakSet(), [0]
    init = PagedKVCache.__init__

    def counted(self, *args, **kwargs):
        init(self, *args, **kwargs)
        alive.add(self)  # no garbage collection here: a dropped cache must go at once
        most[0] = max(most[0], len(alive))

    monkeypatch.setattr(PagedKVCache, "__init__", counted)
    assert paged_cache.PagedKVCache is PagedKVCache
    out = tmp_path / "bench.json"
    assert main(["generate-bench", "--device", "cpu", "--batches", "1", "--prompts", "16",
                 "--new-tokens", "3", "--attns", "mka", "--caches", "paged",
                 "--gpt", "mha", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["model"], r["cache"]) for r in rows] == [("hf", "PagedCache"),
                                                         ("gpt", "PagedKVCache")]
    assert most[0] == 1


def test_rounds_alternate_the_rows_and_report_medians(tmp_path, monkeypatch):
    """--rounds N: each shape's rows measured N times, in alternating order (so the host's
    drift falls alike on every row), one row each with the median ms/token, the rates that
    follow from it, and the range over the rounds."""
    from mka.integrations.hf import generation_bench
    order = []
    measure = generation_bench.measure

    def measure_and_note(model, attn, cache, batch, *args, **kwargs):
        if batch == 2:  # the measured shape, not the warm-up
            order.append((attn, cache))
        return measure(model, attn, cache, batch, *args, **kwargs)

    monkeypatch.setattr(generation_bench, "measure", measure_and_note)
    out = tmp_path / "bench.json"
    assert main(["generate-bench", "--device", "cpu", "--batches", "2", "--prompts", "16",
                 "--new-tokens", "3", "--gpt", "none", "--rounds", "3", "--json", str(out)]) == 0
    runs = [("sdpa", "dynamic"), ("mka", "dynamic"), ("mka", "paged")]
    assert order == runs + runs[::-1] + runs
    rows = json.loads(out.read_text())["rows"]
    assert [(r["attn"], r["cache"]) for r in rows] == [
        ("sdpa", "DynamicCache"), ("mka", "DynamicCache"), ("mka", "PagedCache")]
    for r in rows:
        low, high = r["ms_per_output_token_range"]
        assert r["rounds"] == 3 and low <= r["ms_per_output_token"] <= high
        assert r["decode_tok_s"] == pytest.approx(2 * 1e3 / r["ms_per_output_token"])
    with pytest.raises(SystemExit):
        main(["generate-bench", "--device", "cpu", "--rounds", "0"])


def test_rounds_alternate_the_gpt_rows(tmp_path, monkeypatch):
    """The GPT rows take rounds the same way: every variant's model is built first, then each
    shape's rows run in alternating order (the native ops against the PyTorch backend)."""
    from mka.integrations.hf import generation_bench
    order = []
    measure_gpt = generation_bench.measure_gpt

    def measure_and_note(model, batch, *args, **kwargs):
        if batch == 2:
            order.append(model.config.attn_backend)
        return measure_gpt(model, batch, *args, **kwargs)

    monkeypatch.setattr(generation_bench, "measure_gpt", measure_and_note)
    out = tmp_path / "bench.json"
    assert main(["generate-bench", "--device", "cpu", "--batches", "2", "--prompts", "16",
                 "--new-tokens", "3", "--attns", "none", "--gpt", "mha,mha@torch",
                 "--rounds", "2", "--json", str(out)]) == 0
    assert order == ["mka", "torch", "torch", "mka"]
    rows = json.loads(out.read_text())["rows"]
    assert [(r["attn"], r["rounds"]) for r in rows] == [("mha", 2), ("mha@torch", 2)]


def test_median_row_takes_the_median_round():
    from mka.integrations.hf.generation_bench import median_row
    base = {"model": "hf", "attn": "mka", "cache": "DynamicCache", "batch": 4, "prompt": 10,
            "new_tokens": 5, "peak_prefill_bytes": None, "peak_decode_bytes": None,
            "kv_bytes_per_token": 8.0}
    rounds = [{**base, "prefill_tok_s": 40 / s, "ms_per_output_token": ms,
               "decode_tok_s": 4e3 / ms, "steady_ms_per_token": ms - 1}
              for s, ms in ((1.0, 30.0), (4.0, 10.0), (2.0, 20.0))]
    row = median_row(rounds)
    assert row["prefill_tok_s"] == 20 and row["ms_per_output_token"] == 20
    assert row["decode_tok_s"] == 200 and row["steady_ms_per_token"] == 19
    assert row["ms_per_output_token_range"] == [10, 30] and row["rounds"] == 3
    assert median_row(rounds[:1]) == rounds[0]
    failed = {**base, "error": "out of memory: ..."}
    assert median_row([rounds[0], failed]) == failed
