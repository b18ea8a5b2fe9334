"""Every setting of ``mka train``: one table drives the command line, the YAML config
and validation, so a flag and a config key can never disagree.

Precedence: built-in default < ``--config FILE.yaml`` < flags given on the command line.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

VARIANTS = ("mha", "mqa", "gqa", "mla", "mka", "fastmka")  # what --attention all trains


def registered_variants() -> tuple[str, ...]:
    """Every name of the attention registry: a variant added there trains here by its name."""
    from mka.nn import ATTENTION_REGISTRY
    return tuple(ATTENTION_REGISTRY)

# (n_layer, n_head, n_embd): GPT-2 sizes from the paper, "tiny" for CPU smoke runs.
MODEL_PRESETS = {
    "tiny": (2, 4, 64),
    "gpt2-small": (12, 12, 768),
    "gpt2-medium": (24, 16, 1024),
}


class ConfigError(ValueError):
    """A bad flag or config value; the message names the setting."""


@dataclass(frozen=True)
class Option:
    name: str                      # config key; the flag is --name-with-dashes
    kind: type                     # int, float, str, bool, dict or list
    default: Any
    help: str
    choices: Optional[tuple] = None
    aliases: tuple = ()
    check: Optional[Callable[[Any], bool]] = None
    check_msg: str = ""


def _pos(x) -> bool:
    return x > 0


def _nonneg(x) -> bool:
    return x >= 0


OPTIONS = [
    # what to train
    Option("attention", str, "mha", "variant(s): one of mha,mqa,gqa,mla,mka,fastmka (or another name of "
           "mka.nn.ATTENTION_REGISTRY), all (the six), or a comma list"),
    Option("num_kv_heads", int, None, "key/value heads for gqa (default n_head // 2; mqa uses 1)",
           aliases=("--num-groups",), check=_pos, check_msg="must be > 0"),
    Option("model", str, "tiny", "size preset", choices=tuple(MODEL_PRESETS)),
    Option("n_layer", int, None, "layers (overrides --model)", check=_pos, check_msg="must be > 0"),
    Option("n_head", int, None, "query heads (overrides --model)", check=_pos, check_msg="must be > 0"),
    Option("n_embd", int, None, "model width (overrides --model)", check=_pos, check_msg="must be > 0"),
    Option("dropout", float, 0.0, "dropout probability (nanoGPT's: attention weights and outputs, MLP)", check=lambda x: 0 <= x < 1, check_msg="must be in [0, 1)"),
    Option("bias", bool, True, "biases in linear layers and layer norms"),
    Option("rope", float, None, "rotary position embedding with this base (e.g. 10000) in every layer, "
           "instead of the learned position table", check=lambda x: x > 1, check_msg="must be > 1"),
    Option("key_shift", bool, False, "keys also read the previous token (k = W_k (x_t + s x_{t-1}), s learned): "
           "one attention layer then does associative recall's induction step"),
    Option("attn_backend", str, "auto", "attention kernels: the library's ops or PyTorch/SDPA; auto: "
           "the library's on CPU, and on CUDA where the head size has kernels and a probe call "
           "matches the float64 reference",
           choices=("auto", "mka", "torch")),
    Option("attn_options", dict, {}, "variant options, e.g. {mka: {beta: 0.9}} or, as a flag, "
           "--attn-option mka.beta=0.9 (repeatable)"),
    # data
    Option("data", str, None, "wikitext-2 | wikitext-103 | tinyshakespeare | PATH (folder or file)"),
    Option("tokenizer", str, "bytes", "bytes | char | bpe:N | gpt2"),
    Option("train_split", str, "train", "split of a data folder to train on"),
    Option("eval_split", str, "valid", "held-out split of a data folder to evaluate on"),
    Option("holdout_fraction", float, 0.1, "single-file data: the last fraction is held out",
           check=lambda x: 0 < x < 1, check_msg="must be in (0, 1)"),
    Option("cache_dir", str, None, "token cache folder (default ~/.cache/mka/train)"),
    # a Hugging Face model instead of a GPT (hf_source.py checks these)
    Option("hf_model", str, None, "fine-tune a transformers causal LM from a local folder (save_pretrained "
           "output, converted or not; without weights: random init from its config.json); its tokenizer, "
           "if the folder has one, replaces --tokenizer"),
    Option("hf_config", str, None, "train a transformers causal LM from random init: a config.json, a folder "
           "with one, or inline JSON with a model_type"),
    Option("hf_convert", str, None, "--hf-model/--hf-config: fastmka, mka (convert: add routers) or none (the "
           "library's attention as is), or a comma list run in turn as variants hf-<name> (default fastmka, "
           "or the conversion a converted folder already has)"),
    Option("hf_beta", float, None, "--hf-convert: EMA decay of the converted layers (default the converter's, "
           "0.9)", check=lambda x: 0 <= x < 1, check_msg="must be in [0, 1)"),
    Option("hf_init_gap", float, None, "--hf-convert: the routers' initial bias of level 1 over level 2 "
           "(default the converter's, equal outputs at conversion; smaller: larger router gradients)"),
    # synthetic recall tasks (instead of --data; recall_tasks.py describes them)
    Option("task", str, None, "train on a generated recall task instead of --data: mqar (multi-query "
           "associative recall) or passkey (a passkey in filler)", choices=("mqar", "passkey")),
    Option("task_lengths", str, None, "--task: sequence lengths trained on, a comma list taken in turn, one per "
           "step (e.g. 64,256 or 1k,4k; default --seq-len, each at most --seq-len)"),
    Option("eval_lengths", str, None, "--task: held-out lengths, a comma list (default: --task-lengths)"),
    Option("eval_examples", int, 256, "--task: held-out examples per length (periodic evals read at most "
           "--eval-tokens // length of them when --eval-tokens is set)", check=_pos, check_msg="must be > 0"),
    Option("task_filler", str, None, "--task: filler between the task's tokens: random ids or one repeated "
           "text (default random)", choices=("random", "repeat")),
    Option("task_vocab", int, None, "--task mqar: vocabulary size: 16 filler ids, then keys and values in "
           "halves of the rest (default 256)", check=_pos, check_msg="must be > 0"),
    Option("num_kv_pairs", int, None, "--task mqar: key-value pairs at the start (default 8)",
           check=_pos, check_msg="must be > 0"),
    Option("num_queries", int, None, "--task mqar: queries at the end, distinct keys (default --num-kv-pairs)",
           check=_pos, check_msg="must be > 0"),
    Option("passkey_digits", int, None, "--task passkey: digits of the passkey (default 5)",
           check=_pos, check_msg="must be > 0"),
    Option("passkey_depth", float, None, "--task passkey: where the passkey sits, 0 = the start, 1 = just "
           "before the query (default: uniform per example)", check=lambda x: 0 <= x <= 1,
           check_msg="must be in [0, 1]"),
    # budget and optimisation
    Option("seq_len", int, 128, "tokens per block (model block size)", check=_pos, check_msg="must be > 0"),
    Option("batch_size", int, 8, "blocks per micro-batch per process", check=_pos, check_msg="must be > 0"),
    Option("grad_accum", int, 1, "micro-batches per optimizer step", check=_pos, check_msg="must be > 0"),
    Option("epochs", float, None, "training budget in passes over the training split",
           check=_pos, check_msg="must be > 0"),
    Option("max_steps", int, None, "training budget in optimizer steps", check=_nonneg, check_msg="must be >= 0"),
    Option("max_tokens", int, None, "training budget in tokens", check=_nonneg, check_msg="must be >= 0"),
    Option("lr", float, 6e-4, "peak learning rate", check=_pos, check_msg="must be > 0"),
    Option("min_lr", float, None, "final learning rate of the cosine decay (default lr / 10)",
           check=_nonneg, check_msg="must be >= 0"),
    Option("warmup_steps", int, 100, "linear warm-up steps", check=_nonneg, check_msg="must be >= 0"),
    Option("lr_decay_steps", int, None, "cosine decay ends here (default: the step budget)",
           check=_pos, check_msg="must be > 0"),
    Option("weight_decay", float, 0.1, "AdamW weight decay (matrices only)", check=_nonneg, check_msg="must be >= 0"),
    Option("beta1", float, 0.9, "AdamW beta1", check=lambda x: 0 <= x < 1, check_msg="must be in [0, 1)"),
    Option("beta2", float, 0.95, "AdamW beta2", check=lambda x: 0 <= x < 1, check_msg="must be in [0, 1)"),
    Option("grad_clip", float, 1.0, "gradient norm clip (0 = off)", check=_nonneg, check_msg="must be >= 0"),
    Option("precision", str, "fp32", "autocast precision", choices=("fp32", "bf16", "fp16")),
    Option("compile", bool, False, "torch.compile the model"),
    Option("seed", int, 1337, "seed of model init, data order and dropout"),
    Option("device", str, "auto", "where to train", choices=("auto", "cpu", "cuda")),
    # long runs
    Option("out", str, "runs/train", "output folder (results, plots, checkpoints)"),
    Option("resume", bool, False, "continue from the checkpoints in --out"),
    Option("eval_interval", int, 0, "evaluate every N steps, the first at step 0 (0 = only at the end)",
           check=_nonneg, check_msg="must be >= 0"),
    Option("eval_tokens", int, 0, "periodic evals read this many held-out tokens (0 = all); "
           "the final eval always reads the whole split", check=_nonneg, check_msg="must be >= 0"),
    Option("checkpoint_interval", int, 0, "checkpoint every N steps (0 = at eval steps and the end)",
           check=_nonneg, check_msg="must be >= 0"),
    Option("keep_checkpoints", int, 2, "checkpoints kept per variant (the newest N; an older one is the "
           "fallback should the newest be damaged)", check=_pos, check_msg="must be > 0"),
    Option("on_nonfinite", str, "stop", "a NaN or infinite training loss or gradient norm: stop the run "
           "(the last checkpoint stays the newest) or skip that step's update", choices=("stop", "skip")),
    Option("log_interval", int, 10, "record the training loss every N steps", check=_pos, check_msg="must be > 0"),
    Option("timing_warmup_steps", int, 5, "steps left out of tokens/s (compilation, allocator warm-up)",
           check=_nonneg, check_msg="must be >= 0"),
    Option("stop_after_steps", int, None, "stop at this step with a checkpoint, as if interrupted",
           check=_nonneg, check_msg="must be >= 0"),
    Option("plots", bool, True, "write PNG plots"),
    # distributed
    Option("fsdp", bool, False, "shard the model with FSDP2 instead of DDP (under torchrun)"),
    Option("deepspeed", str, None, "DeepSpeed ZeRO config JSON (needs the deepspeed package)"),
]
BY_NAME = {o.name: o for o in OPTIONS}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def build_parser() -> argparse.ArgumentParser:
    """Flags default to 'absent' so a config file value survives unless a flag overrides it."""
    p = argparse.ArgumentParser(
        prog="mka train", argument_default=argparse.SUPPRESS,
        description="Train GPT models with each attention variant on the same data and budget; "
                    "compare held-out loss, speed and memory.")
    p.add_argument("--config", help="YAML file of settings (keys as below, with underscores)")
    for o in OPTIONS:
        names = [_flag(o.name), *o.aliases]
        if o.kind is bool:
            p.add_argument(*names, dest=o.name, action=argparse.BooleanOptionalAction, help=o.help)
        elif o.kind is dict:
            p.add_argument("--attn-option", dest="attn_option", action="append", metavar="VARIANT.KEY=VALUE",
                           help=o.help)
        else:
            p.add_argument(*names, dest=o.name, type=o.kind, choices=o.choices, help=o.help)
    return p


def _coerce(o: Option, value: Any, origin: str) -> Any:
    if value is None:
        return None
    if o.kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if o.kind is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)  # YAML reads "data: 2" as an int
    if not isinstance(value, o.kind) or (o.kind is int and isinstance(value, bool)):
        raise ConfigError(f"{origin} '{o.name}': expected {o.kind.__name__}, got {value!r}")
    if o.choices is not None and value not in o.choices:
        raise ConfigError(f"{origin} '{o.name}': {value!r} is not one of {', '.join(o.choices)}")
    if o.kind is float and not math.isfinite(value):
        raise ConfigError(f"{origin} '{o.name}': must be finite, got {value!r}")
    if o.check is not None and not o.check(value):
        raise ConfigError(f"{origin} '{o.name}': {o.check_msg}, got {value!r}")
    return value


def load_yaml(path: str) -> dict:
    try:
        import yaml
    except ImportError as e:
        raise ConfigError("--config needs PyYAML: pip install pyyaml") from e
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--config: no such file {path}")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"--config {path}: not valid YAML ({e})") from e
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path}: expected a mapping of settings, got {type(data).__name__}")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def _parse_attn_options(items: list[str]) -> dict:
    """'mka.beta=0.9' -> {'mka': {'beta': 0.9}}; values are read as YAML scalars."""
    try:
        import yaml
    except ImportError as e:
        raise ConfigError("--attn-option needs PyYAML to read its values: pip install pyyaml") from e
    out: dict = {}
    for item in items:
        key, sep, raw = item.partition("=")
        variant, dot, opt = key.partition(".")
        if not sep or not dot or variant not in registered_variants() or not opt:
            raise ConfigError(f"--attn-option: expected VARIANT.KEY=VALUE with VARIANT in "
                              f"{', '.join(registered_variants())}, got {item!r}")
        out.setdefault(variant, {})[opt] = yaml.safe_load(raw)
    return out


def parse_lengths(text: str, name: str) -> list[int]:
    """'64,256' or '1k,4k' -> [64, 256] / [1024, 4096]; ConfigError naming the setting."""
    out = []
    for item in (t.strip().lower() for t in str(text).split(",")):
        digits, scale = (item[:-1], 1024) if item.endswith("k") else (item, 1)
        if not digits.isdigit() or int(digits) < 1:
            raise ConfigError(f"--{name.replace('_', '-')}: expected a comma list of positive lengths "
                              f"(e.g. 64,256 or 1k,4k), got {text!r}")
        out.append(int(digits) * scale)
    if len(set(out)) != len(out):
        raise ConfigError(f"--{name.replace('_', '-')}: a length is listed twice in {text!r}")
    return out


@dataclass
class Settings:
    values: dict = field(default_factory=dict)
    given: set = field(default_factory=set)   # names set by the config file or a flag

    def __getattr__(self, name: str) -> Any:
        try:
            return self.values[name]
        except KeyError:
            raise AttributeError(name) from None

    def variants(self) -> list[str]:
        from . import hf_source
        if hf_source.is_hf_run(self):
            return [hf_source.variant_name(c) for c in hf_source.conversions(self)]
        return list(VARIANTS) if self.attention == "all" else self.attention.split(",")

    def task_lengths_list(self) -> list[int]:
        return parse_lengths(self.task_lengths, "task_lengths") if self.task_lengths else [self.seq_len]

    def eval_lengths_list(self) -> list[int]:
        return parse_lengths(self.eval_lengths, "eval_lengths") if self.eval_lengths else self.task_lengths_list()

    def model_shape(self) -> tuple[int, int, int]:
        n_layer, n_head, n_embd = MODEL_PRESETS[self.model]
        return (self.n_layer or n_layer, self.n_head or n_head, self.n_embd or n_embd)


def parse(argv: Optional[list[str]]) -> Settings:
    ns = vars(build_parser().parse_args(argv))
    values = {o.name: o.default for o in OPTIONS}
    given: set = set()
    if "config" in ns:
        for k, v in load_yaml(ns.pop("config")).items():
            if k not in BY_NAME:
                raise ConfigError(f"config key '{k}' is not a setting; known: {', '.join(BY_NAME)}")
            values[k] = _coerce(BY_NAME[k], v, "config")
            given.add(k)
    if "attn_option" in ns:
        cli_opts = _parse_attn_options(ns.pop("attn_option"))
        merged = {k: dict(v) for k, v in (values["attn_options"] or {}).items()}
        for variant, opts in cli_opts.items():
            merged.setdefault(variant, {}).update(opts)
        values["attn_options"] = merged
        given.add("attn_options")
    for k, v in ns.items():
        values[k] = _coerce(BY_NAME[k], v, "flag")
        given.add(k)
    s = Settings(values, given)
    _check_together(s)
    return s


def _check_task(s: Settings, budgets: list[str]) -> None:
    from .recall_tasks import build_task, check_task_settings
    if s.task is None:
        for name in ("task_lengths", "eval_lengths"):
            if s.values[name] is not None:
                raise ConfigError(f"--{name.replace('_', '-')} is a setting of --task, not of text data (--data)")
        check_task_settings(s)
        return
    if budgets != ["max_steps"]:
        raise ConfigError("--task: give the budget as --max-steps (a generated stream has no epochs, and "
                          "steps of mixed lengths no fixed token count)")
    task = build_task(s)
    for name, lengths in (("task_lengths", s.task_lengths_list()), ("eval_lengths", s.eval_lengths_list())):
        for n in lengths:
            if n > s.seq_len:
                raise ConfigError(f"--{name.replace('_', '-')}: {n} exceeds --seq-len {s.seq_len}, the model's "
                                  "block size (its learned positions end there): raise --seq-len")
            if n < task.min_length:
                raise ConfigError(f"--{name.replace('_', '-')}: {n} is shorter than one {task.name} example "
                                  f"({task.min_length} tokens with these settings)")


def _check_together(s: Settings) -> None:
    """Checks that involve more than one setting."""
    from . import hf_source
    hf_source.check(s)
    for v in ([] if hf_source.is_hf_run(s) else s.variants()):
        if v not in registered_variants():
            raise ConfigError(f"--attention: unknown variant {v!r}; expected one of "
                              f"{', '.join(registered_variants())}, all, or a comma list")
    if len(set(s.variants())) != len(s.variants()):
        raise ConfigError(f"--attention: variant listed twice in {s.attention!r}")
    if s.data is None and s.task is None:
        raise ConfigError("--data is required (wikitext-2, wikitext-103, tinyshakespeare or a PATH), "
                          "or --task mqar|passkey")
    if s.data is not None and s.task is not None:
        raise ConfigError(f"--data {s.data!r} and --task {s.task}: train on one or the other")
    budgets = [n for n in ("epochs", "max_steps", "max_tokens") if s.values[n] is not None]
    if len(budgets) > 1:
        raise ConfigError(f"give one training budget, not {' and '.join('--' + b.replace('_', '-') for b in budgets)}")
    _check_task(s, budgets)
    opts = s.attn_options
    known = registered_variants()
    if not isinstance(opts, dict) or any(k not in known or not isinstance(v, dict) for k, v in opts.items()):
        raise ConfigError(f"'attn_options': expected a mapping VARIANT -> {{option: value}} with VARIANT in "
                          f"{', '.join(known)}, got {opts!r}")
    n_layer, n_head, n_embd = s.model_shape()
    if n_embd % n_head:
        raise ConfigError(f"--n-embd {n_embd} must be divisible by --n-head {n_head}")
    if s.num_kv_heads is not None and n_head % s.num_kv_heads:
        raise ConfigError(f"--num-kv-heads {s.num_kv_heads} must divide --n-head {n_head}")
    if s.min_lr is not None and s.min_lr > s.lr:
        raise ConfigError(f"--min-lr {s.min_lr} must not exceed --lr {s.lr}")
    if s.fsdp and s.deepspeed:
        raise ConfigError("--fsdp and --deepspeed are two ways to shard: choose one")
    if s.deepspeed and s.on_nonfinite == "skip":
        raise ConfigError("--on-nonfinite skip with --deepspeed: the engine steps inside its own loop; "
                          "use --on-nonfinite stop (DeepSpeed's fp16 loss scaler skips overflowing steps itself)")
    tok = s.tokenizer
    if not (tok in ("bytes", "char", "gpt2") or tok.startswith("bpe:")):
        raise ConfigError(f"--tokenizer: expected bytes, char, gpt2 or bpe:N, got {tok!r}")
    if tok.startswith("bpe:"):
        n = tok[4:]
        if not n.isdigit() or not 257 <= int(n) <= 1 << 20:
            raise ConfigError(f"--tokenizer {tok}: N must be an integer vocabulary size in [257, 1048576]")
