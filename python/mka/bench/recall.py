"""Recall cases (SPEC §7.2): level 3's attention over the chunks each query row recalled, on
a real selection (SimHash signatures of the rows' queries against the chunks' mean keys,
top-R of the chunks before the row's window), forward and forward+backward.

"recall" is the native op (``torch.ops.mka._recall_fwd``: the chosen chunks read in place);
"composite" the PyTorch path it replaces (recalled keys gathered block by block, then SDPA);
"attention" full causal attention over all T keys, for scale. FLOPs: those of the recalled
keys, ``4·B·H·T·R·C·d`` forward (2.5× that backward), credited to the recall rows only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .cases import Case, Shape, _op_forward, _op_forward_backward, register

CHUNK, TOP, WINDOW = 64, 8, 256


@dataclass
class RecallInputs:
    """The ops case's passes call ``fn(q, k, v, lam, causal)``: here ``lam`` is the choice
    ``(B, T, G, R)`` (-1: none), handed to each implementation as its fourth argument."""
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    lam: torch.Tensor
    causal: bool = True


def recall_inputs(s: Shape, device: str, dtype: torch.dtype) -> RecallInputs:
    from mka.memory.recall import chunk_means, eligible, select, signatures, simhash_planes
    g = torch.Generator(device=device).manual_seed(s.T + s.G)
    r = lambda *sh: torch.randn(*sh, device=device, dtype=dtype, generator=g)  # noqa: E731
    q, k, v = r(s.B, s.T, s.H, s.d), r(s.B, s.T, s.G, s.d), r(s.B, s.T, s.G, s.d)
    planes = simhash_planes(s.d).to(device, dtype)
    with torch.no_grad():
        q_sig = signatures(q.reshape(s.B, s.T, s.G, s.H // s.G, s.d).mean(3), planes)
        chosen = select(q_sig, signatures(chunk_means(k, CHUNK), planes),
                        eligible(s.T, s.T, CHUNK, WINDOW), TOP)
    return RecallInputs(q, k, v, chosen)


def _flops(s: Shape, pass_: str) -> float:
    fwd = 4.0 * s.B * s.H * s.T * TOP * CHUNK * s.d
    return fwd * {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}[pass_]


RECALL = register(Case(
    "recall", f"level 3 over the recalled chunks (chunks of {CHUNK}, top {TOP}, window "
    f"{WINDOW}), forward and forward+backward",
    inputs=recall_inputs, passes={"fwd": _op_forward, "fwd+bwd": _op_forward_backward},
    flops=_flops,
    defaults={"cpu": dict(seqs=[4096], heads=8, kv_heads=[2], head_dim=64, rounds=5, reps=3)}))


@RECALL.impl("recall", against=("composite",))
def _recall(q, k, v, chosen, causal):
    from mka.memory.recall_ops import recall_op
    return recall_op(q, k, v, chosen, CHUNK)


@RECALL.impl("composite", baseline=True)
def _composite(q, k, v, chosen, causal):
    from mka.memory.recall import _attend_in_blocks
    return _attend_in_blocks(q, k, v, chosen, CHUNK, 1.0 / math.sqrt(q.shape[-1]))


@RECALL.impl("attention", flops=False)
def _attention(q, k, v, chosen, causal):
    import mka
    return mka.attention(q, k, v, causal=causal)
