"""The registry of benchmark cases.

A case is a family of implementations timed on the same inputs: for every shape, the case
makes the inputs once (`inputs`), and each pass (`passes`: e.g. "fwd", "fwd+bwd") turns an
implementation's function into a zero-argument call. The implementations of a case are
interleaved in rounds; baselines (`baseline=True`) are what the others are compared with.

A new family (decode steps, training steps) is one `Case` and its implementations:

    DECODE = register(Case("decode", "one decode step against a cache of T tokens",
                           inputs=make_cache, passes={"step": lambda fn, x: lambda: fn(x)}))

    @DECODE.impl("attention")
    def _(x): ...

`mka bench --cases decode` then lists, times and reports it like the others.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

Call = Callable[[], object]
PassBuilder = Callable[[Callable, Any], Call]


@dataclass(frozen=True)
class Shape:
    """Batch, tokens, query heads, key/value heads, head dim; each case reads what it needs
    (decode: T is the number of cached tokens)."""
    B: int
    T: int
    H: int
    G: int
    d: int
    causal: bool = True

    def __str__(self) -> str:
        return f"B={self.B} T={self.T} H={self.H} G={self.G} d={self.d}"


@dataclass(frozen=True)
class Impl:
    name: str
    fn: Callable  # in the form the case's passes take
    devices: tuple[str, ...] = ("cpu", "cuda")
    baseline: bool = False
    flops: bool = True  # credited the case's FLOP count (False: time only)
    against: tuple[str, ...] = ()  # baselines it is compared with, the first one timed


@dataclass
class Case:
    name: str
    doc: str
    inputs: Callable[[Shape, str, torch.dtype], Any]
    passes: dict[str, PassBuilder]
    flops: Optional[Callable[[Shape, str], Optional[float]]] = None  # per pass
    # Bytes a call must move (shape, dtype, pass), for achieved GB/s: memory-bound cases.
    bytes: Optional[Callable[[Shape, torch.dtype, str], Optional[float]]] = None
    info: Optional[Callable[[Impl, Shape], dict]] = None  # e.g. parameter counts, per row
    # Shape settings where the global ones do not fit, per device: {"cpu": {"seqs": [512]}}
    defaults: dict[str, dict[str, Any]] = field(default_factory=dict)
    impls: dict[str, Impl] = field(default_factory=dict)

    def impl(self, name: str, *, devices: tuple[str, ...] = ("cpu", "cuda"),
             baseline: bool = False, flops: bool = True, against: tuple[str, ...] = ()):
        """Decorator registering an implementation of this case."""
        def add(fn):
            if name in self.impls:
                raise ValueError(f"case {self.name!r}: implementation {name!r} registered twice")
            self.impls[name] = Impl(name, fn, tuple(devices), baseline, flops, tuple(against))
            return fn
        return add

    def on(self, device: str) -> list[Impl]:
        return [i for i in self.impls.values() if device in i.devices]


_CASES: dict[str, Case] = {}


def register(case: Case) -> Case:
    if case.name in _CASES:
        raise ValueError(f"case {case.name!r} registered twice")
    _CASES[case.name] = case
    return case


def registry() -> dict[str, Case]:
    """Every registered case, by name (the built-in ones are registered on import of mka.bench)."""
    return dict(_CASES)


# --- ops: the attention-type ops, forward and forward+backward -------------------------------

BETA = 0.9


@dataclass
class OpInputs:
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    lam: torch.Tensor
    causal: bool


def op_inputs(s: Shape, device: str, dtype: torch.dtype, levels: int = 2) -> OpInputs:
    """Inputs drawn from a normal distribution (never zeros), seeded by the shape."""
    g = torch.Generator(device=device).manual_seed(s.T + s.G)
    r = lambda *sh: torch.randn(*sh, device=device, dtype=dtype, generator=g)  # noqa: E731
    lam = torch.softmax(torch.randn(s.B, s.T, levels, device=device, generator=g), -1)
    return OpInputs(r(s.B, s.T, s.H, s.d), r(s.B, s.T, s.G, s.d), r(s.B, s.T, s.G, s.d),
                    lam.to(dtype), s.causal)


def _outputs(out) -> tuple[torch.Tensor, ...]:
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def _op_forward(fn, x: OpInputs) -> Call:
    return lambda: fn(x.q, x.k, x.v, x.lam, x.causal)


def _op_forward_backward(fn, x: OpInputs) -> Call:
    """The op's gradients for q, k, v only, by torch.autograd.grad (no accumulation into .grad)."""
    q, k, v = (t.detach().requires_grad_(True) for t in (x.q, x.k, x.v))
    with torch.no_grad():
        gouts = tuple(torch.randn_like(o) for o in _outputs(fn(x.q, x.k, x.v, x.lam, x.causal)))

    def call():
        torch.autograd.grad(_outputs(fn(q, k, v, x.lam, x.causal)), (q, k, v), gouts,
                            allow_unused=True)
    return call


def attention_flops(s: Shape, pass_: str) -> float:
    """Forward 4·B·H·T²·d, halved when causal; the backward 2.5x the forward. Every
    implementation is credited the same count (fastmka's fusion and mka's second level are
    overhead, not credited work), so the throughput columns compare wall time."""
    fwd = 4.0 * s.B * s.H * s.T * s.T * s.d * (0.5 if s.causal else 1.0)
    return fwd * {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}[pass_]


OPS = register(Case(
    "ops", "the attention-type ops and SDPA, forward and forward+backward",
    inputs=op_inputs, passes={"fwd": _op_forward, "fwd+bwd": _op_forward_backward},
    flops=attention_flops))


SDPA = ("sdpa.flash", "sdpa")  # what the ops are compared with: flash on CUDA


@OPS.impl("attention", against=SDPA)
def _attention(q, k, v, lam, causal):
    return torch.ops.mka.attention(q, k, v, causal)


@OPS.impl("route_fuse", flops=False)
def _route_fuse(q, k, v, lam, causal):
    return torch.ops.mka.route_fuse(k, v, lam, BETA)[:2]


@OPS.impl("fastmka", against=SDPA)
def _fastmka(q, k, v, lam, causal):
    # lam is a constant here, so the backward skips lam's gradient (see "fastmka+dlam").
    return torch.ops.mka.fastmka(q, k, v, lam, BETA, causal=causal)[0]


@OPS.impl("fastmka+dlam", against=SDPA)
def _fastmka_dlam(q, k, v, lam, causal):
    # lam requires grad in the backward, as a router's output does.
    lam = lam.detach().requires_grad_(q.requires_grad)
    return torch.ops.mka.fastmka(q, k, v, lam, BETA, causal=causal)[0]


@OPS.impl("mka", against=SDPA)
def _mka(q, k, v, lam, causal):
    return torch.ops.mka.mka(q, k, v, lam, BETA, causal=causal)[0]


def sdpa(q, k, v, causal: bool, backend=None):
    """scaled_dot_product_attention on (B, T, H, d) tensors (mka.nn's torch backend: GQA
    without repeated heads, the SPEC's mask), under one SDPA backend where given."""
    from mka.nn.torch_ops import attention
    if backend is None:
        return attention(q, k, v, causal)
    from torch.nn.attention import sdpa_kernel
    with sdpa_kernel(backend):
        return attention(q, k, v, causal)


@OPS.impl("sdpa", baseline=True)
def _sdpa(q, k, v, lam, causal):
    return sdpa(q, k, v, causal)


@OPS.impl("sdpa.flash", devices=("cuda",), baseline=True)
def _sdpa_flash(q, k, v, lam, causal):
    from torch.nn.attention import SDPBackend
    return sdpa(q, k, v, causal, SDPBackend.FLASH_ATTENTION)


@OPS.impl("sdpa.cudnn", devices=("cuda",), baseline=True)
def _sdpa_cudnn(q, k, v, lam, causal):
    from torch.nn.attention import SDPBackend
    return sdpa(q, k, v, causal, SDPBackend.CUDNN_ATTENTION)
