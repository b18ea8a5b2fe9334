"""Module cases: one pre-LN transformer block (LayerNorm, attention, LayerNorm, 4x MLP) of
every attention variant, forward+backward, on the native ops ("mha") and on PyTorch/SDPA
("mha.torch", the baseline each is compared with). Width = heads x head dim; "gqa" and
"fastmka-gqa" use the shape's key/value heads. Off float32, the block runs under autocast
to the dtype, as the trainer runs it."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from .cases import Case, Impl, Shape, register

# name -> (attention, n_kv_head from the shape, attn_options)
VARIANTS = {
    "mha": ("mha", False, {}),
    "mqa": ("mqa", False, {}),
    "gqa": ("gqa", True, {}),
    "mla-naive": ("mla", False, {"path": "naive"}),
    "mla-absorb": ("mla", False, {"path": "absorb"}),
    "mka": ("mka", False, {}),
    "mka-l3": ("mka", False, {"levels": 3}),
    "fastmka": ("fastmka", False, {}),
    "fastmka-gqa": ("fastmka", True, {}),
    "fastmka-l3": ("fastmka", False, {"levels": 3}),
}


@dataclass
class BlockInputs:
    x: torch.Tensor
    w: torch.Tensor
    shape: Shape
    dtype: torch.dtype


def block_inputs(s: Shape, device: str, dtype: torch.dtype) -> BlockInputs:
    g = torch.Generator(device=device).manual_seed(s.T)
    x = torch.randn(s.B, s.T, s.H * s.d, device=device, generator=g, requires_grad=True)
    return BlockInputs(x, torch.randn(s.B, s.T, s.H * s.d, device=device, generator=g), s, dtype)


def make_block(variant: str, backend: str, s: Shape) -> torch.nn.Module:
    from mka.models import GPTConfig
    from mka.models.gpt import Block

    attention, uses_groups, options = VARIANTS[variant]
    cfg = GPTConfig(n_layer=1, n_embd=s.H * s.d, n_head=s.H, block_size=s.T,
                    n_kv_head=s.G if uses_groups else None, attention=attention,
                    attn_backend=backend, attn_options=dict(options))
    torch.manual_seed(0)
    return Block(cfg)


def _autocast(x: BlockInputs):
    if x.dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(x.x.device.type, dtype=x.dtype)


def _forward_backward(fn, x: BlockInputs):
    block = fn(x.shape).to(x.x.device)

    def call():
        block.zero_grad(set_to_none=True)
        with _autocast(x):
            y = block(x.x)
        (y.float() * x.w).sum().backward()
    return call


def _info(impl: Impl, s: Shape) -> dict:
    with torch.device("meta"):
        attn = impl.fn(s).attn
    return {"attn_params": sum(p.numel() for p in attn.parameters()),
            "kv_bytes_per_token": attn.cache_bytes_per_token(torch.bfloat16),
            "state_bytes": attn.cache_state_bytes(torch.bfloat16, s.T)}


BLOCK = register(Case(
    "block", "one transformer block of each attention variant, forward+backward",
    inputs=block_inputs, passes={"fwd+bwd": _forward_backward}, info=_info,
    # GPT-2 small's width (12 heads of 64), one sequence of 512 tokens on the CPU, 8 of 1024
    # on a GPU (the trainer's shape); "gqa" with 4 key/value heads.
    defaults={"cpu": dict(seqs=[512], heads=12, head_dim=64, kv_heads=[4], tokens=512),
              "cuda": dict(seqs=[1024], heads=12, head_dim=64, kv_heads=[4], tokens=8192)}))

for _name in VARIANTS:
    BLOCK.impl(_name, against=(f"{_name}.torch",))(
        lambda s, _v=_name: make_block(_v, "mka", s))
    BLOCK.impl(f"{_name}.torch", baseline=True)(lambda s, _v=_name: make_block(_v, "torch", s))
