"""The RULER-style generators (deterministic per seed, sized in the tokenizer's tokens) and
RULER's scorers on hand-worked cases; `mka eval ruler` end to end on a tiny random model."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("transformers")

from mka.integrations.hf import ruler  # noqa: E402


def count_words(text: str) -> int:
    """A stand-in tokenizer: one token per whitespace-separated piece."""
    return len(text.split())


@pytest.mark.parametrize("task", sorted(ruler.TASKS))
def test_generators_are_deterministic_and_fit(task):
    a = ruler.make_samples(task, 600, count_words, 3, seed=1)
    assert a == ruler.make_samples(task, 600, count_words, 3, seed=1)
    assert a != ruler.make_samples(task, 600, count_words, 3, seed=2)
    for s in a:
        assert s.tokens == count_words(s.prompt) <= 600
        assert s.tokens > 600 * 0.9  # the filler fills the length
        assert all(ref in s.prompt for ref in s.references)


def test_niah_needles_and_answer():
    [s] = ruler.make_samples("niah_multikey", 400, count_words, 1, seed=0)
    assert s.prompt.count("One of the special magic numbers for") == 4
    [value] = s.references
    assert f"is: {value}." in s.prompt and len(value) == 7


def test_variable_tracking_chain_in_order():
    [s] = ruler.make_samples("variable_tracking", 500, count_words, 1, seed=3)
    first, *rest = s.references
    positions = [s.prompt.index(f"VAR {first} = ")] + [s.prompt.index(f"VAR {b} = VAR {a}.")
                                                       for a, b in zip(s.references, rest)]
    assert positions == sorted(positions)


def test_common_words_are_the_most_frequent():
    [s] = ruler.make_samples("common_words", 800, count_words, 1, seed=0)
    listed = [w for w in s.prompt.split() if w.isalpha() and w.islower()]
    counts = {w: listed.count(w) for w in set(listed)}
    least_common = min(counts[w] for w in s.references)
    others = [n for w, n in counts.items() if w not in s.references and n > 1]
    assert others and least_common > max(others)


def test_too_short_length_raises():
    with pytest.raises(ValueError, match="^length: 10 tokens cannot hold a niah_single sample"):
        ruler.make_samples("niah_single", 10, count_words, 1, seed=0)
    with pytest.raises(ValueError, match="^task: "):
        ruler.make_samples("qa", 100, count_words, 1, seed=0)


def test_scorers_hand_worked():
    preds = ["The numbers are 123 and 456.", "nothing here", "ABC def"]
    refs = [("123", "456"), ("789",), ("abc", "xyz")]
    # all: (2/2 + 0/1 + 1/2) / 3; part: (1 + 0 + 1) / 3
    assert ruler.string_match_all(preds, refs) == pytest.approx(100 * 1.5 / 3)
    assert ruler.string_match_part(preds, refs) == pytest.approx(100 * 2 / 3)
    assert ruler.clean("\n 42\x00x ") == "42\nx"
    with pytest.raises(ValueError, match="^predictions: "):
        ruler.string_match_all(["a"], [])


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """A tiny random Llama and a word-level tokenizer trained on generated RULER text,
    saved as a model folder (all offline)."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    text = [s.prompt for task in ruler.TASKS
            for s in ruler.make_samples(task, 400, count_words, 4, seed=9)]
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(),
                                                 pre_tokenizers.Digits(individual_digits=True)])
    tok.train_from_iterator(text, trainers.WordLevelTrainer(special_tokens=["[PAD]", "[UNK]", "[EOS]"]))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                                   eos_token="[EOS]")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(fast), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                         max_position_embeddings=1024, pad_token_id=fast.pad_token_id,
                         eos_token_id=fast.eos_token_id)
    path = tmp_path_factory.mktemp("tiny_llama")
    LlamaForCausalLM(config).save_pretrained(path)
    fast.save_pretrained(path)
    return str(path)


def test_eval_ruler_command(tiny_model_dir, tmp_path, capsys):
    from mka.cli import main
    out = tmp_path / "ruler.json"
    assert main(["eval", "ruler", "--model", tiny_model_dir, "--lengths", "200",
                 "--tasks", "niah_single,variable_tracking", "--samples", "1",
                 "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"model: {tiny_model_dir} (LlamaForCausalLM" in printed
    assert "attn_implementation=mka" in printed
    rows = json.loads(out.read_text())["rows"]
    assert [(r["task"], r["length"]) for r in rows] == [("niah_single", 200),
                                                       ("variable_tracking", 200)]
    assert all(0.0 <= r["score"] <= 100.0 and r["prompt_tokens"] <= 200 for r in rows)


def test_eval_ruler_bad_task(tiny_model_dir, capsys):
    from mka.cli import main
    assert main(["eval", "ruler", "--model", tiny_model_dir, "--tasks", "qa"]) == 2
    assert "tasks: unknown task 'qa'" in capsys.readouterr().err
