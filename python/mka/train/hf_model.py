"""The Hugging Face causal LM of an ``mka train --hf-model / --hf-config`` run: built (and
converted) on the library's attention, wrapped to the trainer's ``model(x, y) -> (logits,
loss)``, and exported with ``save_pretrained`` at the end."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import distributed as D
from . import hf_source
from .options import ConfigError, Settings
from .text_tokenizers import _lines, sha256_text


@dataclass(frozen=True)
class HFShape:
    """The fields of a model's shape that the results report (GPTConfig has them too)."""
    n_head: int
    n_kv_head: int
    attn_options: dict = field(default_factory=dict)


class CausalLMForTraining(nn.Module):
    """A transformers causal LM under the trainer's interface: ``(logits, loss)`` with the
    loss the mean cross-entropy over targets != -1, as GPT's. Its state_dict is the HF
    model's, under the prefix ``hf.``."""

    def __init__(self, hf_model: nn.Module):
        super().__init__()
        self.hf = hf_model

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        logits = self.hf(input_ids=idx, use_cache=False).logits
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameters, tied ones once. Rotary models have no position table, so both counts
        are the same (GPT's non-embedding count leaves out only its position table)."""
        return sum(p.numel() for p in self.parameters())

    def kv_cache_bytes_per_token(self, dtype: torch.dtype = torch.bfloat16) -> int:
        """Bytes one token adds to the library's paged decode cache (``hf.PagedCache``): keys
        and values of every layer, from the config's layers, key/value heads and head size."""
        from mka.integrations.hf.paged_cache import layer_spec
        text = self.hf.config.get_text_config(decoder=True)
        options = getattr(text, hf_source.CONFIG_KEY, None)
        variant = options["variant"] if isinstance(options, dict) else "attention"
        return text.num_hidden_layers * layer_spec(text, variant).bytes_per_token(dtype)


class PretrainedTextTokenizer:
    """The tokenizer of an --hf-model folder (AutoTokenizer, local files only). Text is
    encoded in pieces cut at line starts, without special tokens, as the other tokenizers."""

    def __init__(self, folder: Path):
        from transformers import AutoTokenizer
        try:
            self._tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        except Exception as e:  # noqa: BLE001 - any failure to load is the folder's problem
            raise ConfigError(f"--hf-model: cannot load the tokenizer in {folder} ({type(e).__name__}: {e})") from e
        self.vocab_size = len(self._tok)
        files = sorted(p for p in folder.iterdir() if p.name in hf_source.TOKENIZER_FILES)
        self.fingerprint = "hf:" + sha256_text("".join(p.read_text(errors="replace") for p in files))[:20]

    def encode(self, text: str) -> np.ndarray:
        pieces = self._tok(_lines(text), add_special_tokens=False)["input_ids"]
        return np.fromiter((i for ids in pieces for i in ids), dtype=np.int64)

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids])

    def save_pretrained(self, folder: Path) -> None:
        self._tok.save_pretrained(str(folder))


def _implementation(conversion: str, backend: str, reason: str) -> str:
    if backend == "torch":
        if conversion != "none":
            raise ConfigError(f"--attn-backend: the attention kernels resolved to torch ({reason}), but "
                              f"--hf-convert {conversion} runs only on the library's ops")
        return "sdpa"
    return "mka"


def build(s: Settings, variant: str, vocab_size: int, backend: str, reason: str,
          device: torch.device) -> tuple[CausalLMForTraining, HFShape]:
    """The model of ``variant`` (``hf-<conversion>``) in float32 on ``device``: --hf-model's
    weights (random init from its config when it has none) or --hf-config's random init,
    seeded by --seed, then converted."""
    import mka.integrations.hf as hf  # registers attn_implementation="mka" and the converted ones
    from transformers import AutoConfig, AutoModelForCausalLM

    conversion = hf_source.conversion_of(variant)
    flag = "--hf-model" if s.hf_model is not None else "--hf-config"
    implementation = _implementation(conversion, backend, reason)
    torch.manual_seed(s.seed)  # the same initial weights (and routers) on every rank and run
    if hf_source.saved_conversion(s) is not None and hf_source.has_weights(s):
        model = hf.load_converted(s.hf_model, dtype=torch.float32, local_files_only=True)
    elif hf_source.has_weights(s):
        model = AutoModelForCausalLM.from_pretrained(s.hf_model, dtype=torch.float32, local_files_only=True,
                                                     attn_implementation=implementation)
    else:
        data = hf_source.config_dict(s)
        options = data.pop(hf_source.CONFIG_KEY, None)
        try:
            config = AutoConfig.for_model(data.pop("model_type"), **data)
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32,
                                                     attn_implementation=implementation)
        except (KeyError, TypeError, ValueError) as e:
            raise ConfigError(f"{flag}: transformers cannot build a causal LM from the config ({e})") from e
        if isinstance(options, dict):  # a converted folder without weights: fresh routers
            hf.convert(model, **options)
    if conversion != "none" and hf_source.saved_conversion(s) is None:
        opts = {k: v for k, v in (("beta", s.hf_beta), ("init_gap", s.hf_init_gap)) if v is not None}
        hf.convert(model, **hf_source.CONVERT_OPTIONS[conversion], **opts)
    text = model.config.get_text_config(decoder=True)
    if vocab_size > text.vocab_size:
        source = f"{s.hf_model}'s tokenizer" if hf_source.tokenizer_folder(s) else f"--tokenizer {s.tokenizer}"
        raise ConfigError(f"{source} has {vocab_size} ids, more than the model's vocab_size {text.vocab_size}: "
                          f"choose a --tokenizer with at most {text.vocab_size} ids (bytes: 256; bpe:N: N)")
    options = getattr(text, hf_source.CONFIG_KEY, None)
    shape = HFShape(text.num_attention_heads,
                    getattr(text, "num_key_value_heads", None) or text.num_attention_heads,
                    {k: options[k] for k in ("beta", "router_hidden")} if isinstance(options, dict) else {})
    return CausalLMForTraining(model).to(device).train(), shape


def export(model: nn.Module, folder: Path, rt: D.Runtime, tokenizer) -> None:
    """``save_pretrained`` of the trained HF model into ``folder`` (collective under torchrun:
    every rank gathers, rank 0 writes), with the run's tokenizer when it came from the folder.
    A converted model loads back with ``mka.integrations.hf.load_converted(folder)``."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    inner = D.unwrap(model)
    if rt.distributed:
        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    else:
        state = inner.state_dict()
    if rt.is_main:
        prefix = "hf."
        hf_state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        inner.hf.save_pretrained(str(folder), state_dict=hf_state)
        if hasattr(tokenizer, "save_pretrained"):
            tokenizer.save_pretrained(folder)
    D.barrier(rt)
