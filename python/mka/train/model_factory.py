"""One GPT per attention variant, all else equal; and the choice of attention kernels."""

from __future__ import annotations

import functools

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
                         bias=settings.bias, rope=settings.rope, key_shift=settings.key_shift, attention=variant, attn_backend=attn_backend,
                         attn_options=dict(settings.attn_options.get(variant, {})))
    except (TypeError, ValueError) as e:  # the model validates its own config
        raise ConfigError(f"model config for --attention {variant}: {e}") from e


@functools.lru_cache(maxsize=None)  # one probe per device and process, shared by the variants
def _probe_cuda_kernels(device: torch.device) -> str | None:
    """None if the library's CUDA ops (attention, fastmka, mka: outputs and gradients, bf16)
    match the float64 reference within SPEC's 1e-2; else why not."""
    import mka
    from mka import reference
    if not mka._C.built_with_cuda():
        return "the mka extension was built without CUDA"
    g = torch.Generator().manual_seed(0)
    q, k, v, w = (torch.randn(2, 48, 2, 64, generator=g, dtype=torch.float64) for _ in range(4))
    lam = torch.softmax(torch.randn(2, 48, 2, generator=g, dtype=torch.float64), -1)
    ops = {"attention": (mka.attention, reference.attention, ()),
           "fastmka": (lambda *a: mka.fastmka(*a)[0], lambda *a: reference.fastmka(*a)[0], (lam, 0.9)),
           "mka": (lambda *a: mka.mka(*a)[0], lambda *a: reference.mka(*a)[0], (lam, 0.9))}
    for name, (op, ref_op, extra) in ops.items():
        try:
            ins = [t.to(device, torch.bfloat16).requires_grad_() for t in (q, k, v)]
            out = op(*ins, *(e.to(device, torch.float32) if torch.is_tensor(e) else e for e in extra))
            got = [out.float().cpu(), *torch.autograd.grad((out.float() * w.to(device)).sum(), ins)]
            refs = [t.clone().requires_grad_() for t in (q, k, v)]
            ref = ref_op(*refs, *extra)
            want = [ref, *torch.autograd.grad((ref * w).sum(), refs)]
            errs = [((a.double().cpu() - b).norm() / b.norm()).item() for a, b in zip(got, want)]
        except Exception as e:  # any failure means: do not train on these kernels
            return f"{name} probe failed: {type(e).__name__}: {e}"
        if not all(e < 1e-2 for e in errs):  # NaN fails too
            return f"{name} probe off: relative errors (out, dq, dk, dv) {', '.join(f'{e:.3g}' for e in errs)}"
    return None


def model_head_dim(settings: Settings) -> int:
    """The head width ``n_embd / n_head`` of the library's GPT that ``settings`` describe."""
    _, n_head, n_embd = settings.model_shape()
    return n_embd // n_head


def choose_attn_backend(requested: str, device: torch.device,
                        head_dim: int | None = None) -> tuple[str, str]:
    """(backend, why). CPU: the library's kernels; CUDA: them only if the model's head size
    (`head_dim`, where known) has CUDA kernels and a probe call works."""
    from mka._validate import CUDA_HEAD_DIMS
    if requested != "auto":
        return requested, "requested"
    if device.type != "cuda":
        return "mka", "default on CPU"
    if head_dim is not None and head_dim not in CUDA_HEAD_DIMS:
        return "torch", f"head dim {head_dim} has no mka CUDA kernel (those: {CUDA_HEAD_DIMS})"
    problem = _probe_cuda_kernels(device)
    return ("torch", f"mka CUDA kernels unavailable: {problem}") if problem else ("mka", "CUDA probe passed")
