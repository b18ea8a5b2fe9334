"""Bad --hf-* flags and combinations are errors (exit 2) that name the flag."""

import json

import pytest

pytest.importorskip("transformers")

from mka.train import main  # noqa: E402

from .hf_train_cases import config, hf_args, inline, saved_model  # noqa: E402

CFG = inline(config())


@pytest.mark.parametrize("flags, message", [
    (["--hf-config", CFG, "--hf-model", "x"], "--hf-model and --hf-config"),
    (["--hf-beta", 0.5], "--hf-beta is a setting of --hf-model or --hf-config"),
    (["--hf-convert", "mka"], "--hf-convert is a setting of --hf-model or --hf-config"),
    (["--hf-config", CFG, "--n-layer", 3], "--n-layer is a setting of the GPT models"),
    (["--hf-config", CFG, "--attention", "mka"], "--attention is a setting of the GPT models"),
    (["--hf-config", CFG, "--hf-convert", "fastmka,bogus"], "--hf-convert: expected one or a comma list"),
    (["--hf-config", CFG, "--hf-convert", "mka,mka"], "without repeats"),
    (["--hf-config", CFG, "--hf-convert", "none", "--hf-init-gap", 2], "--hf-init-gap is an option of the conversion"),
    (["--hf-config", "{not json"], "--hf-config: not valid inline JSON"),
    (["--hf-config", json.dumps({"hidden_size": 64})], "--hf-config: expected a transformers config with a 'model_type'"),
    (["--hf-config", inline(config(mka={"variant": "fastmka"}))], "a converted model's 'mka' entry"),
    (["--hf-config", inline(config(attention_dropout=0.1)), "--hf-convert", "mka-recall"],
     "--hf-config: attention_dropout 0.1 in the config with --hf-convert mka-recall"),
    (["--hf-config", inline(config(max_position_embeddings=16))], "--seq-len 32 exceeds the model's max_position_embeddings 16"),
    (["--hf-config", inline(config(vocab_size=97))], "--tokenizer bytes has 256 ids, more than the model's vocab_size 97"),
    (["--hf-config", CFG, "--attn-backend", "torch"], "--hf-convert fastmka runs only on the library's ops"),
    (["--hf-config", CFG, "--deepspeed", "ds.json"], "--deepspeed with --hf-model"),
    (["--hf-model", "no/such/folder"], "--hf-model: no/such/folder is not a folder with a config.json"),
])
def test_bad_hf_flags_are_clear_errors(corpus_file, tmp_path, capsys, flags, message):
    assert main(hf_args(tmp_path, corpus_file, "--max-steps", 1, *flags)) == 2
    assert message in capsys.readouterr().err


def test_a_folder_with_a_tokenizer_or_a_conversion_refuses_what_contradicts_it(corpus_file, tmp_path, capsys):
    folder = saved_model(tmp_path / "qwen2", corpus_file)
    assert main(hf_args(tmp_path, corpus_file, "--hf-model", folder, "--tokenizer", "bytes", "--max-steps", 1)) == 2
    assert f"{folder} has its own tokenizer" in capsys.readouterr().err
    converted = tmp_path / "converted"
    from mka.integrations import hf
    hf.convert(hf.load_model(str(folder)), "mka").save_pretrained(str(converted))
    for flags, message in ((["--hf-convert", "fastmka"], "is already converted to mka"),
                           (["--hf-beta", 0.5], "--hf-beta: ")):
        assert main(hf_args(tmp_path, corpus_file, "--hf-model", converted, "--max-steps", 1, *flags)) == 2
        assert message in capsys.readouterr().err
