"""Settings: YAML config with flag overrides, and clear errors for bad flags and configs."""

from pathlib import Path

import pytest
import yaml

from mka.train import main
from mka.train.options import ConfigError, parse
from mka.train.schedule import lr_at


def test_flags_override_config(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("data: somewhere\nlr: 1.0e-3\nbatch_size: 64\nattn_options: {mka: {beta: 0.5}}\nbeta2: 0.99\n")
    s = parse(["--config", str(cfg), "--batch-size", "3", "--attn-option", "mka.levels=2"])
    assert (s.lr, s.batch_size, s.beta2, s.data) == (1e-3, 3, 0.99, "somewhere")
    assert s.attn_options == {"mka": {"beta": 0.5, "levels": 2}}
    assert parse(["--data", "x", "--model", "gpt2-small", "--n-layer", "3"]).model_shape() == (3, 12, 768)
    assert parse(["--data", "x", "--attention", "all"]).variants() == ["mha", "mqa", "gqa", "mla", "mka", "fastmka"]


def test_warmup_then_cosine_to_min_lr():
    s = parse(["--data", "x", "--lr", "1e-3", "--min-lr", "1e-4", "--warmup-steps", "100", "--lr-decay-steps", "5000"])
    assert lr_at(0, s, 5000) == pytest.approx(1e-3 / 101)
    assert lr_at(99, s, 5000) == pytest.approx(1e-3 * 100 / 101)
    assert lr_at(100, s, 5000) == pytest.approx(1e-3)
    assert lr_at(2550, s, 5000) == pytest.approx(5.5e-4)
    assert lr_at(5000, s, 5000) == pytest.approx(1e-4) and lr_at(9000, s, 5000) == pytest.approx(1e-4)


BAD_CONFIGS = [
    ("lr: fast\n", "'lr': expected float"),
    ("learning_rate: 0.1\n", "config key 'learning_rate' is not a setting"),
    ("- a list\n", "expected a mapping"),
    ("precision: fp8\n", "'precision': 'fp8' is not one of"),
    ("dropout: 1.5\n", "'dropout': must be in [0, 1)"),
    ("attn_options: {xla: {a: 1}}\n", "'attn_options': expected a mapping VARIANT"),
    ("lr: [1\n", "not valid YAML"),
]


@pytest.mark.parametrize("text,message", BAD_CONFIGS)
def test_bad_config_is_a_clear_error(tmp_path, capsys, text, message):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(text)
    assert main(["--config", str(cfg), "--data", "x"]) == 2
    assert message in capsys.readouterr().err


BAD_FLAGS = [
    (["--attention", "mha,sparse"], "--attention: unknown variant 'sparse'"),
    (["--attention", "gqa", "--n-head", "4", "--num-kv-heads", "3"], "--num-kv-heads 3 must divide --n-head 4"),
    (["--max-steps", "5", "--epochs", "1"], "give one training budget"),
    (["--tokenizer", "bpe:lots"], "--tokenizer bpe:lots"),
    (["--tokenizer", "wordpiece"], "--tokenizer: expected bytes, char, gpt2 or bpe:N"),
    (["--lr", "-1"], "'lr': must be > 0"),
    (["--n-embd", "100", "--n-head", "3"], "--n-embd 100 must be divisible by --n-head 3"),
    (["--min-lr", "1", "--lr", "0.1"], "--min-lr 1.0 must not exceed --lr 0.1"),
    (["--attn-option", "beta=0.5"], "--attn-option: expected VARIANT.KEY=VALUE"),
    (["--config", "/nonexistent.yaml"], "--config: no such file"),
]


@pytest.mark.parametrize("flags,message", BAD_FLAGS)
def test_bad_flag_is_a_clear_error(capsys, flags, message):
    assert main(["--data", "x", *flags]) == 2
    assert message in capsys.readouterr().err


def test_argparse_rejects_unknown_choices(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--data", "x", "--precision", "fp8"])
    assert e.value.code == 2 and "--precision" in capsys.readouterr().err


def test_missing_data_is_required():
    with pytest.raises(ConfigError, match="--data is required"):
        parse([])


RUN_ERRORS = [
    (lambda f, d: ["--data", str(f.parent / "missing")], "not a folder, a file, or one of"),
    (lambda f, d: ["--data", str(d), "--eval-split", "train"], "evaluation must read held-out text"),
    (lambda f, d: ["--data", str(d), "--train-split", "nope"], "--train-split 'nope': no such split file"),
    (lambda f, d: ["--data", str(f), "--seq-len", "8192", "--n-layer", "1"], "fewer than one global batch"),
    (lambda f, d: ["--data", str(f), "--fsdp"], "--fsdp shards across processes"),
    (lambda f, d: ["--data", str(f), "--deepspeed", "ds.json"], "--deepspeed"),
    (lambda f, d: ["--data", str(f), "--attention", "mla", "--attn-option", "mla.kv_lora_rank=-4"],
     "model config for --attention mla"),
]


@pytest.mark.parametrize("flags,message", RUN_ERRORS)
def test_bad_run_setting_is_a_clear_error(corpus_file, corpus_folder, run_args, capsys, flags, message):
    argv = run_args(corpus_file, "--max-steps", 1) + flags(corpus_file, corpus_folder)
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_out_folder_with_a_run_needs_resume(corpus_file, run_args, capsys):
    assert main(run_args(corpus_file, "--max-steps", 1)) == 0
    assert main(run_args(corpus_file, "--max-steps", 1)) == 2
    assert "pass --resume" in capsys.readouterr().err


def test_step_budget_from_epochs_tokens_or_steps():
    import numpy as np
    from mka.train.blocks import TrainSampler
    from mka.train.schedule import step_budget
    sampler = TrainSampler(np.zeros(10_000, dtype=np.uint16), 32, 4, 2, 1, seed=0)  # 311 blocks, 38 steps/epoch
    assert sampler.steps_per_epoch == 38
    assert step_budget(parse(["--data", "x"]), sampler) == 38                       # default: one epoch
    assert step_budget(parse(["--data", "x", "--epochs", "2.5"]), sampler) == 95
    assert step_budget(parse(["--data", "x", "--max-tokens", "2560"]), sampler) == 10  # 256 tokens a step
    assert step_budget(parse(["--data", "x", "--max-tokens", "2561"]), sampler) == 11
    assert step_budget(parse(["--data", "x", "--max-steps", "7"]), sampler) == 7


CONFIGS = sorted((Path(__file__).parents[2] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("config", CONFIGS, ids=[c.name for c in CONFIGS])
def test_shipped_configs_take_the_data_from_the_command_line(config):
    """The recipes hold no data path (a clone has no data): --data comes from the user."""
    assert "data" not in yaml.safe_load(config.read_text())
    with pytest.raises(ConfigError, match="--data is required"):
        parse(["--config", str(config)])
    assert parse(["--config", str(config), "--data", "corpus.txt"]).data == "corpus.txt"
