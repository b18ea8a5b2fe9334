"""Where the Hugging Face model of ``mka train --hf-model / --hf-config`` comes from, and
the checks of those flags. Reads JSON only: transformers is imported when the model is
built (hf_model.py), so bad flags fail before anything heavy loads."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from .options import ConfigError, Settings

CONVERSIONS = ("fastmka", "mka", "mka-recall", "none")
# What each --hf-convert name asks of mka.integrations.hf.convert.
CONVERT_OPTIONS = {"fastmka": {"variant": "fastmka"}, "mka": {"variant": "mka"},
                   "mka-recall": {"variant": "mka", "levels": 3}}
CONFIG_KEY = "mka"  # the converter's entry in config.json (mka.integrations.hf.conversion)
# Files that mark a folder as holding a tokenizer AutoTokenizer can load.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")
# GPT settings that an HF model takes from its own config instead.
GPT_ONLY = ("attention", "num_kv_heads", "model", "n_layer", "n_head", "n_embd", "dropout", "bias",
            "rope", "key_shift", "attn_options")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def is_hf_run(s: Settings) -> bool:
    return s.hf_model is not None or s.hf_config is not None


def config_dict(s: Settings) -> dict:
    """The model's config.json as a dict, from --hf-model's folder or --hf-config (a file, a
    folder holding config.json, or inline JSON)."""
    if s.hf_model is not None:
        folder = Path(s.hf_model)
        if not (folder / "config.json").is_file():
            raise ConfigError(f"--hf-model: {folder} is not a folder with a config.json "
                              "(save_pretrained's output)")
        return _read_json(folder / "config.json", "--hf-model")
    text = s.hf_config.strip()
    if text.startswith("{"):
        try:
            data = json.loads(text)
        except ValueError as e:
            raise ConfigError(f"--hf-config: not valid inline JSON ({e})") from e
    else:
        path = Path(text)
        path = path / "config.json" if path.is_dir() else path
        if not path.is_file():
            raise ConfigError(f"--hf-config: {text!r} is neither inline JSON nor a config file or a "
                              "folder with config.json")
        data = _read_json(path, "--hf-config")
    if not isinstance(data, dict) or "model_type" not in data:
        raise ConfigError("--hf-config: expected a transformers config with a 'model_type' "
                          "(e.g. {\"model_type\": \"llama\", \"hidden_size\": 64, ...})")
    if CONFIG_KEY in data:
        raise ConfigError(f"--hf-config: the config has a converted model's '{CONFIG_KEY}' entry; "
                          "pass its folder as --hf-model (with its weights), or remove the entry "
                          "and choose --hf-convert")
    return data


def _read_json(path: Path, flag: str) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"{flag}: cannot read {path} as JSON ({e})") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{flag}: {path} holds a {type(data).__name__}, not a config mapping")
    return data


def saved_conversion(s: Settings) -> Optional[str]:
    """The variant a converted --hf-model folder was converted to, or None."""
    if s.hf_model is None:
        return None
    options = config_dict(s).get(CONFIG_KEY)
    if not isinstance(options, dict):
        return None
    return "mka-recall" if options.get("levels") == 3 else options.get("variant")


def conversions(s: Settings) -> list[str]:
    """--hf-convert as a list: what each variant of the run does to the model."""
    if s.hf_convert is not None:
        return [c.strip() for c in s.hf_convert.split(",")]
    return [saved_conversion(s) or "fastmka"]


def variant_name(conversion: str) -> str:
    return f"hf-{conversion}"


def conversion_of(variant: str) -> str:
    return variant.removeprefix("hf-")


def has_weights(s: Settings) -> bool:
    return s.hf_model is not None and any((Path(s.hf_model) / f).is_file() for f in WEIGHT_FILES)


def tokenizer_folder(s: Settings) -> Optional[Path]:
    """--hf-model's folder when it holds a tokenizer (used in place of --tokenizer)."""
    if s.hf_model is None:
        return None
    folder = Path(s.hf_model)
    return folder if any((folder / f).is_file() for f in TOKENIZER_FILES) else None


def check(s: Settings) -> None:
    """The --hf-* flags, alone and with the others; ConfigError naming the flag."""
    hf_flags = [n for n in ("hf_convert", "hf_beta", "hf_init_gap") if s.values[n] is not None]
    if not is_hf_run(s):
        if hf_flags:
            raise ConfigError(f"{_flag(hf_flags[0])} is a setting of --hf-model or --hf-config")
        return
    if s.hf_model is not None and s.hf_config is not None:
        raise ConfigError("--hf-model and --hf-config: give the model as one or the other")
    for name in GPT_ONLY:
        if name in s.given:
            raise ConfigError(f"{_flag(name)} is a setting of the GPT models; an --hf-model / --hf-config "
                              "model takes its shape, dropout and attention from its config "
                              "(choose the attention with --hf-convert)")
    if s.deepspeed:
        raise ConfigError("--deepspeed with --hf-model / --hf-config: not supported (the HF path is tested "
                          "with one process, DDP and --fsdp); leave out --deepspeed")
    config = config_dict(s)
    max_pos = config.get("max_position_embeddings")
    if isinstance(max_pos, int) and s.seq_len > max_pos:
        raise ConfigError(f"--seq-len {s.seq_len} exceeds the model's max_position_embeddings {max_pos}")
    items = conversions(s)
    if any(c not in CONVERSIONS for c in items) or len(set(items)) != len(items):
        raise ConfigError(f"--hf-convert: expected one or a comma list of {', '.join(CONVERSIONS)} "
                          f"without repeats, got {s.hf_convert!r}")
    if float(config.get("attention_dropout", 0.0) or 0.0) > 0 and "mka-recall" in items:
        raise ConfigError(f"{_flag('hf_model' if s.hf_model else 'hf_config')}: attention_dropout "
                          f"{config['attention_dropout']} in the config with --hf-convert mka-recall: "
                          "the recall op has no attention dropout; set it to 0")
    saved = saved_conversion(s)
    if saved is not None:
        if items != [saved]:
            raise ConfigError(f"--hf-convert {s.hf_convert}: {s.hf_model} is already converted to {saved}; "
                              f"leave out --hf-convert (or pass {saved})")
        for name in ("hf_beta", "hf_init_gap"):
            if s.values[name] is not None:
                raise ConfigError(f"{_flag(name)}: {s.hf_model} is already converted (its config.json has "
                                  "the conversion's options and the routers are trained weights)")
    elif items == ["none"]:
        for name in ("hf_beta", "hf_init_gap"):
            if s.values[name] is not None:
                raise ConfigError(f"{_flag(name)} is an option of the conversion; --hf-convert none "
                                  "converts nothing")
    if tokenizer_folder(s) is not None and "tokenizer" in s.given:
        raise ConfigError(f"--tokenizer {s.tokenizer}: {s.hf_model} has its own tokenizer, which the run "
                          "uses; leave out --tokenizer (or remove the tokenizer files from the folder)")
