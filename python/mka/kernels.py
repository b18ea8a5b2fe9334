"""Which CUDA kernels the ops run: an explicit choice, made when an op's forward runs and
handed to its backward, so the two never disagree.

    mka.current_kernels()                      # KernelOptions(attention='tma', ...)
    mka.set_kernels(scan="3pass")              # the process default; returns the previous one
    with mka.use_kernels(attention="mma"):     # a scoped change
        out = torch.ops.mka.attention(q, k, v)

The choice is process-wide, like ``torch.backends`` flags. Eager calls read it at every
forward; a ``torch.compile`` graph reads it once, when the graph is traced (recompile, e.g.
after ``torch.compiler.reset()``, to change it there). The CPU kernels have one path per op
and ignore it. The
environment variables MKA_CUDA_WGMMA, MKA_CUDA_SCAN, MKA_CUDA_SCAN_THROUGH and MKA_CUDA_RECALL
set the defaults, read once at import by the native module (docs/configuration.md).
"""

import contextlib
import dataclasses
import functools
from typing import Iterator

from . import _C

ATTENTION_KERNELS, SCAN_KERNELS, RECALL_KERNELS = (tuple(names)
                                                   for names in _C.kernel_option_names())


@dataclasses.dataclass(frozen=True)
class KernelOptions:
    """attention: "tma" (the default: Hopper wgmma kernels, a warp-specialised forward, a TMA
    producer and two consumers that overlap their softmax with the products), "pingpong"
    (wgmma, three-stage ping-pong forward), "lockstep" (wgmma, two-stage forward) or "mma" (the
    sm_80 mma.sync kernels; the wgmma choices fall back to them off Hopper). scan: the EMA
    scan's forward, "1pass" (decoupled look-back) or "3pass" (chunked). scan_through: run
    fastmka's and mka's EMA backward inside the Hopper attention backward where it can (else
    separate scan passes). recall: the recall op's tensor-core kernels, "chunks" (chunk-major:
    each chosen chunk read once per kv head, per-entry partials merged) or "rows" (row-major:
    each row block reads its rows' chunks)."""

    attention: str = "tma"
    scan: str = "1pass"
    scan_through: bool = True
    recall: str = "chunks"

    def __post_init__(self) -> None:
        if self.attention not in ATTENTION_KERNELS:
            raise ValueError(f"attention: expected one of {', '.join(ATTENTION_KERNELS)}, "
                             f"got {self.attention!r}")
        if self.scan not in SCAN_KERNELS:
            raise ValueError(f"scan: expected one of {', '.join(SCAN_KERNELS)}, got {self.scan!r}")
        if not isinstance(self.scan_through, bool):
            raise ValueError(f"scan_through: expected a bool, got {self.scan_through!r}")
        if self.recall not in RECALL_KERNELS:
            raise ValueError(f"recall: expected one of {', '.join(RECALL_KERNELS)}, "
                             f"got {self.recall!r}")

    @property
    def token(self) -> str:
        """The choice as one string, the form the private ops take it in (a custom op's
        argument, saved by the forward for its backward)."""
        return f"{self.attention},{self.scan},{int(self.scan_through)},{self.recall}"

    @classmethod
    def from_token(cls, token: str) -> "KernelOptions":
        return cls(*_fields(token))


@functools.lru_cache(maxsize=64)  # read by every op call; a process sees a few tokens
def _fields(token: str) -> tuple:
    """(attention, scan, scan_through, recall) of a token, unchecked: tokens come from
    KernelOptions."""
    attention, scan, through, recall = token.split(",")
    return attention, scan, through == "1", recall


def launch(token: str, stream: int) -> dict:
    """The native ops' launch arguments (op_args.h: Launch) for a token and stream."""
    attention, scan, through, recall = _fields(token)
    return {"stream": stream, "attention_kernel": attention, "scan_kernel": scan,
            "scan_through": through, "recall_kernel": recall}


class _State:
    current = KernelOptions(*_C.kernel_options_from_environment())
    token = current.token  # read by the ops at every forward


def _set(options: KernelOptions) -> None:
    _State.current, _State.token = options, options.token


def current_kernels() -> KernelOptions:
    """The kernel options the next op call takes."""
    return _State.current


def set_kernels(**changes) -> KernelOptions:
    """Changes the process default (fields of :class:`KernelOptions`); returns the previous."""
    previous = _State.current
    _set(dataclasses.replace(previous, **changes))
    return previous


@contextlib.contextmanager
def use_kernels(**changes) -> Iterator[KernelOptions]:
    """Runs a block under changed kernel options, restoring the previous ones after it."""
    previous = set_kernels(**changes)
    try:
        yield _State.current
    finally:
        _set(previous)
