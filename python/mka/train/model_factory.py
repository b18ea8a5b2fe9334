"""One GPT per attention variant, all else equal; and the choice of attention kernels."""

from __future__ import annotations

import torch

from .options import ConfigError, Settings

PRECISION_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def kv_heads(settings: Settings, variant: str, n_head: int) -> int:
    if variant == "mqa":
        return 1
    if variant == "gqa":
        return settings.num_kv_heads or max(1, n_head // 2)
    return n_head  # mha, mla, mka, fastmka: --num-kv-heads is gqa's setting only


def gpt_config(settings: Settings, variant: str, vocab_size: int, attn_backend: str):
    from mka.models import GPTConfig
    n_layer, n_head, n_embd = settings.model_shape()
    try:
        return GPTConfig(n_layer=n_layer, n_head=n_head, n_embd=n_embd, n_kv_head=kv_heads(settings, variant, n_head),
                         block_size=settings.seq_len, vocab_size=vocab_size, dropout=settings.dropout,
                         bias=settings.bias, attention=variant, attn_backend=attn_backend,
                         attn_options=dict(settings.attn_options.get(variant, {})))
    except (TypeError, ValueError) as e:  # the model validates its own config
        raise ConfigError(f"model config for --attention {variant}: {e}") from e


def _probe_cuda_kernels(device: torch.device) -> str | None:
    """None if the library's CUDA attention runs and matches the reference; else why not."""
    import mka
    if not mka._C.built_with_cuda():
        return "the mka extension was built without CUDA"
    try:
        g = torch.Generator(device="cpu").manual_seed(0)
        q, k, v = (torch.randn(1, 16, 2, 64, generator=g).to(device, torch.bfloat16) for _ in range(3))
        out = torch.ops.mka.attention(q, k, v, True, None, None).float()
        ref = mka.reference.attention(q.double(), k.double(), v.double()).float()
        err = ((out - ref).norm() / ref.norm()).item()
    except Exception as e:  # any failure means: do not train on these kernels
        return f"probe call failed: {type(e).__name__}: {e}"
    return None if err < 1e-2 else f"probe result off by relative error {err:.3g}"


def choose_attn_backend(requested: str, device: torch.device) -> tuple[str, str]:
    """(backend, why). CPU: the library's kernels; CUDA: them only if a probe call works."""
    if requested != "auto":
        return requested, "requested"
    if device.type != "cuda":
        return "mka", "default on CPU"
    problem = _probe_cuda_kernels(device)
    return ("torch", f"mka CUDA kernels unavailable: {problem}") if problem else ("mka", "CUDA probe passed")
