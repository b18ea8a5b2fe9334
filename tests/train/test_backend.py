"""Choosing attention kernels: CPU uses the library's ops; on CUDA a probe of outputs and
gradients against the float64 reference decides (exercised here on CPU tensors)."""

import sys

import pytest
import torch

import mka
from mka.train.model_factory import _probe_cuda_kernels, choose_attn_backend
from mka.train.options import ConfigError
from mka.train.corpus import load_corpus

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def fresh_probe():
    _probe_cuda_kernels.cache_clear()  # each test changes what the probe sees
    yield
    _probe_cuda_kernels.cache_clear()


def test_cpu_defaults_to_library_ops_and_flag_wins():
    assert choose_attn_backend("auto", CPU)[0] == "mka"
    assert choose_attn_backend("torch", CPU) == ("torch", "requested")


def test_cuda_head_dim_without_kernels_takes_torch(monkeypatch):
    # a head size the CUDA kernels lack trains on torch's attention, before any probe runs
    monkeypatch.setattr("mka.train.model_factory._probe_cuda_kernels",
                        lambda device: pytest.fail("probed a head size without kernels"))
    backend, why = choose_attn_backend("auto", torch.device("cuda"), 32)
    assert backend == "torch" and "head dim 32" in why
    assert choose_attn_backend("mka", torch.device("cuda"), 32) == ("mka", "requested")


def test_probe_passes_correct_ops(monkeypatch):
    monkeypatch.setattr(mka._C, "built_with_cuda", lambda: True)
    assert _probe_cuda_kernels(CPU) is None


def test_probe_rejects_wrong_gradients_and_failures(monkeypatch):
    monkeypatch.setattr(mka._C, "built_with_cuda", lambda: True)
    real = mka.attention
    # right forward, gradient scaled by 2: only the backward check can see it
    wrong_grad = lambda q, k, v: real(q, k, v) * 2 - real(q, k, v).detach()  # noqa: E731
    monkeypatch.setattr(mka, "attention", wrong_grad)
    assert "attention probe off" in _probe_cuda_kernels(CPU)
    _probe_cuda_kernels.cache_clear()

    def broken(*args):
        raise RuntimeError("no kernel image for this device")
    monkeypatch.setattr(mka, "attention", broken)
    assert "no kernel image" in _probe_cuda_kernels(CPU)
    _probe_cuda_kernels.cache_clear()
    monkeypatch.setattr(mka._C, "built_with_cuda", lambda: False)
    assert "built without CUDA" in _probe_cuda_kernels(CPU)


def test_named_set_without_datasets_package_says_what_to_do(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import fails as if not installed
    with pytest.raises(ConfigError, match="pip install datasets.*--data PATH"):
        load_corpus("wikitext-2", "train", "valid", 0.1)


def test_gpt2_tokenizer_offline_or_missing_says_what_to_do(monkeypatch, tmp_path):
    import types
    from mka.train.text_tokenizers import build_tokenizer

    def offline(name):
        raise ConnectionError("no network")
    monkeypatch.setitem(sys.modules, "tiktoken", types.SimpleNamespace(get_encoding=offline))
    with pytest.raises(ConfigError, match="--tokenizer gpt2: tiktoken could not load.*use bpe:N or bytes"):
        build_tokenizer("gpt2", "text", "more", tmp_path)
    monkeypatch.setitem(sys.modules, "tiktoken", None)  # not installed
    with pytest.raises(ConfigError, match="--tokenizer gpt2 needs tiktoken"):
        build_tokenizer("gpt2", "text", "more", tmp_path)


def test_wikitext_file_names_are_recognised(tmp_path):
    for split in ("train", "valid", "test"):
        (tmp_path / f"wiki.{split}.tokens").write_text(f"{split} text\n")
    c = load_corpus(str(tmp_path), "train", "test", 0.1)
    assert (c.train, c.heldout) == ("train text\n", "test text\n")
    assert c.heldout_source.endswith("wiki.test.tokens")
