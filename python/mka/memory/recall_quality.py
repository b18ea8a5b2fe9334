"""How much of the attention level 3 is meant to serve does a chunk selector recall?
(issue 21: recall quality on real keys and queries.)

For every query row and head, the exact softmax over the keys level 3 may serve — the tokens
of the chunks wholly before the row's L1 window (SPEC §7.2) — splits into a mass per chunk.
A selector with a budget of ``R`` chunks captures the mass of the chunks it picks; the
**oracle** picks the ``R`` heaviest (the ceiling at that budget). Compared selectors, all
choosing per token and key/value head (GQA-shared, as recall does):

- ``simhash``: recall's own — agreement of sign patterns of the mean query over the group's
  heads and of each chunk's mean key; with ``sub_chunks = S`` (an experiment, not what
  recall runs) a chunk keeps the signatures of the mean keys of its ``S`` equal parts and
  scores by the best agreement among them (a finer picture of where its keys point);
- ``mean``: the exact dot product of the group's mean query with each chunk's mean key (the
  chunk's mean logit) — what the signatures estimate, without the hash's noise;
- ``moments``: the chunk's mean logit plus half the query-weighted variance of its keys,
  ``scale q·mu + scale² / 2 · sum_d q_d² var_d`` — the log of the chunk's mass were its keys
  Gaussian with a diagonal covariance (a log-sum-exp estimate, ``2 d`` numbers a chunk, as
  Quest's), averaged over the group's heads;
- ``quest``: Quest's bound (Tang et al., 2024) — per chunk the channel-wise min and max key,
  a query's upper bound ``sum_d max(q_d min_d, q_d max_d)``, averaged over the group's heads;
- ``corners``: recall's ``score="corners"`` from the same min and max keys — the log of a
  head's mean ``exp(scale q.k)`` over the corners of the chunk's key box, the group's heads
  summed as masses (:func:`~mka.memory.recall.corner_scores`);
- ``oracle``: the exact mass, summed over the group's heads.

Budgets are fractions of the context: ``R = max(1, round(f · Tk / C))`` chunks, at most the
row's eligible chunks. Rows with no eligible chunk are left out. Memory is ``O(rows · Tk)``
per block of rows: meant for analysis at a few thousand tokens.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor

from .recall import (chunk_keys, chunk_means, corner_scores, eligible, query_representatives,
                     signatures)

ROWS = 128  # query rows scored at once
METHODS = ("simhash", "mean", "moments", "quest", "corners", "oracle")


def _chunk_mass(q: Tensor, k: Tensor, chunk: int, counts: Tensor, scale: float) -> Tensor:
    """``(B, n, H, nC)``: each row's exact attention mass per chunk over its eligible chunks."""
    B, n, H, d = q.shape
    G, nC = k.shape[2], k.shape[1] // chunk
    kk = k[:, :nC * chunk].double().repeat_interleave(H // G, dim=2)
    s = torch.einsum("bnhd,bthd->bnht", q.double(), kk) * scale
    allowed = (torch.arange(nC * chunk, device=q.device) // chunk)[None, :] < counts[:, None]
    s = s.masked_fill(~allowed[None, :, None, :], -math.inf)
    p = torch.softmax(s, -1).nan_to_num(0.0)  # rows with nothing eligible: all zero
    return p.reshape(B, n, H, nC, chunk).sum(-1)


def _quest_bound(q: Tensor, extremes: Tensor) -> Tensor:
    """``(B, n, G, nC)``: Quest's upper bound of each chunk's score against the chunks' max
    and min keys ``extremes: (B, nC, G, 2d)``, mean over group heads — recall's
    ``score="bound"``: ``q+ . max + q- . min``."""
    B, n, H, d = q.shape
    G = extremes.shape[2]
    q_rep = query_representatives(q.double().reshape(B, n, G, H // G, d), None, "bound")
    return torch.einsum("bngp,bcgp->bngc", q_rep, extremes)


def _moments(q: Tensor, k_mean: Tensor, k_var: Tensor, scale: float) -> Tensor:
    """``(B, n, G, nC)``: each chunk's log-mass estimate from its keys' mean and per-channel
    variance, mean over group heads."""
    B, n, H, d = q.shape
    G = k_mean.shape[2]
    qg = q.double().reshape(B, n, G, H // G, d)
    est = scale * torch.einsum("bngxd,bcgd->bngxc", qg, k_mean) \
        + 0.5 * scale ** 2 * torch.einsum("bngxd,bcgd->bngxc", qg * qg, k_var)
    return est.mean(3)


def recall_quality(q: Tensor, k: Tensor, *, chunk: int, window: Optional[int],
                   budgets: Sequence[float], planes: Tensor, scale: Optional[float] = None,
                   sub_chunks: int = 1) -> dict[str, dict[float, float]]:
    """Mean captured fraction of the eligible attention mass, per selector and budget, for
    ``q: (B, Tq, H, d)`` against ``k: (B, Tk, G, d)`` (bottom-right aligned)."""
    B, Tq, H, d = q.shape
    Tk, G = k.shape[1], k.shape[2]
    if not budgets or any(not 0 < f <= 1 for f in budgets):
        raise ValueError(f"budgets: fractions of the context in (0, 1], got {list(budgets)}")
    if sub_chunks < 1 or chunk % sub_chunks:
        raise ValueError(f"sub_chunks: must divide the chunk of {chunk} tokens, got {sub_chunks}")
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    counts = eligible(Tq, Tk, chunk, window, q.device)
    width = {f: min(max(1, round(f * Tk / chunk)), Tk // chunk) for f in budgets}
    nC = Tk // chunk
    k_sig = signatures(chunk_means(k[:, :nC * chunk], chunk // sub_chunks), planes)  # (B, nC S, G, P)
    k_mean = chunk_means(k[:, :nC * chunk], chunk).double()  # (B, nC, G, d)
    k_var = k[:, :nC * chunk].double().reshape(B, nC, chunk, G, d).var(2, unbiased=False)
    extremes = chunk_keys(k.double(), chunk, "corners")  # (B, nC, G, 2d): max, then min
    total = {m: {f: 0.0 for f in budgets} for m in METHODS}
    rows = 0
    for i in range(0, Tq, ROWS):
        qi, ci = q[:, i:i + ROWS], counts[i:i + ROWS]
        keep = ci > 0
        if not keep.any():
            continue
        n = qi.shape[1]
        mass = _chunk_mass(qi, k, chunk, ci, scale)  # (B, n, H, nC)
        group_mass = mass.reshape(B, n, G, H // G, -1).sum(3)  # what a kv head's pick serves
        q_mean = qi.reshape(B, n, G, H // G, d).mean(3)
        agree = torch.einsum("bngp,bcgp->bngc", signatures(q_mean, planes).double(),
                             k_sig.double())
        scores = {
            "simhash": agree.reshape(B, n, G, nC, sub_chunks).amax(-1),
            "mean": torch.einsum("bngd,bcgd->bngc", q_mean.double(), k_mean),
            "moments": _moments(qi, k_mean, k_var, scale),
            "quest": _quest_bound(qi, extremes),
            "corners": corner_scores(qi.double().reshape(B, n, G, H // G, d), extremes, scale),
            "oracle": group_mass,
        }
        allowed = torch.arange(nC, device=q.device)[None, :] < ci[:, None]  # (n, nC)
        for name, sc in scores.items():
            # ties: the later chunk, as recall breaks them
            key = sc * (nC + 1) + torch.arange(nC, device=q.device, dtype=sc.dtype) \
                if name == "simhash" else sc
            key = key.masked_fill(~allowed[None, :, None, :], -math.inf)
            order = key.argsort(-1, descending=True)
            for f, R in width.items():
                pick = order[..., :R]
                got = torch.gather(group_mass, -1, pick)
                got = got.masked_fill(torch.arange(R, device=q.device) >= ci[None, :, None, None],
                                      0.0).sum(-1)  # (B, n, G): mass of the picked chunks
                share = got / (H // G)  # each head's mass sums to 1 over eligible chunks
                total[name][f] += float(share[:, keep].sum())
        rows += int(keep.sum()) * B * G
    if rows == 0:
        raise ValueError("q: no query row has an eligible chunk (the context is shorter than "
                         "the window plus one chunk)")
    return {name: {f: v / rows for f, v in per.items()} for name, per in total.items()}
