"""recall_quality: the captured mass of each selector at a budget — the oracle is the ceiling,
all selectors reach 1 when the budget covers every eligible chunk, Quest's bound is an upper
bound of the chunk's scores, and a planted chunk is found."""

import math

import pytest
import torch

from mka.memory.recall import chunk_keys, simhash_planes
from mka.memory.recall_quality import _moments, _quest_bound, recall_quality


def test_oracle_is_the_ceiling_and_a_full_budget_captures_everything():
    torch.manual_seed(0)
    q, k = torch.randn(2, 200, 4, 16), torch.randn(2, 200, 2, 16)
    got = recall_quality(q, k, chunk=8, window=16, budgets=[0.05, 0.2, 1.0],
                         planes=simhash_planes(16))
    for f in (0.05, 0.2):
        for name in ("simhash", "mean", "moments", "quest", "corners"):
            assert got["oracle"][f] >= got[name][f] - 1e-9
        assert 0 < got["simhash"][f] <= 1
    for name in got:
        assert got[name][1.0] == pytest.approx(1.0, abs=1e-9)


def test_quest_bound_bounds_every_score_in_the_chunk():
    torch.manual_seed(1)
    q, k = torch.randn(1, 5, 2, 8), torch.randn(1, 32, 2, 8)
    bound = _quest_bound(q, chunk_keys(k.double(), 8, "bound"))  # (1, 5, 2, 4): G = H here
    scores = torch.einsum("bnhd,bthd->bnht", q.double(), k.double()).reshape(1, 5, 2, 4, 8)
    assert (bound >= scores.amax(-1) - 1e-9).all()


def test_a_planted_chunk_is_recalled():
    """Keys of one chunk aligned with every query: all selectors find it at a small budget."""
    torch.manual_seed(2)
    d = 32
    direction = torch.randn(d)
    k = torch.randn(1, 256, 1, d) * 0.1
    k[0, 64:72, 0] = direction * 3 + torch.randn(8, d) * 0.1
    q = (direction * 2 + torch.randn(1, 100, 2, d) * 0.1)  # the last 100 rows: all see it
    got = recall_quality(q, k, chunk=8, window=32, budgets=[8 / 256], planes=simhash_planes(d))
    for name in ("simhash", "mean", "moments", "quest", "corners", "oracle"):
        assert got[name][8 / 256] > 0.9


def test_moments_is_the_log_mass_of_gaussian_keys():
    """Keys drawn from N(mu, diag(var)): the estimate is log E[exp(scale q.k)] exactly, so it
    matches the log of the chunk's mean exp-score as the chunk grows; and it ranks a spread
    chunk above a tight one of the same mean, as the mass does (the mean key ties them)."""
    torch.manual_seed(3)
    d, C, scale = 8, 200_000, 0.5
    mu, std = torch.randn(d, dtype=torch.float64), torch.rand(d, dtype=torch.float64)
    k = (mu + std * torch.randn(C, d, dtype=torch.float64)).reshape(1, C, 1, d)
    q = torch.randn(1, 1, 1, d, dtype=torch.float64)
    est = _moments(q, k.mean(1, keepdim=True), k.var(1, unbiased=False, keepdim=True), scale)
    exact = torch.logsumexp(scale * (k[0, :, 0] @ q[0, 0, 0]), 0) - math.log(C)
    assert abs(float(est) - float(exact)) < 2e-2
    tight, spread = (torch.zeros(1, 16, 1, d, dtype=torch.float64) for _ in range(2))
    spread[0, ::2], spread[0, 1::2] = 1.0, -1.0  # same mean (0) as tight, variance 1
    k2 = torch.cat((spread, tight), 1)
    qs = torch.ones(1, 1, 1, d, dtype=torch.float64)
    est2 = _moments(qs, torch.stack((spread.mean(1), tight.mean(1)), 1),
                    torch.stack((spread.var(1, unbiased=False), tight.var(1, unbiased=False)), 1), 1.0)
    mass = torch.exp(torch.einsum("bnhd,bthd->bnht", qs, k2)).reshape(1, 1, 1, 2, 16).sum(-1)
    assert est2[0, 0, 0, 0] > est2[0, 0, 0, 1] and mass[0, 0, 0, 0] > mass[0, 0, 0, 1]


def test_bad_budgets_and_short_contexts_raise():
    q, k = torch.randn(1, 8, 2, 8), torch.randn(1, 8, 1, 8)
    with pytest.raises(ValueError, match="budgets"):
        recall_quality(q, k, chunk=4, window=2, budgets=[0.0], planes=simhash_planes(8))
    with pytest.raises(ValueError, match="no query row has an eligible chunk"):
        recall_quality(q, k, chunk=4, window=8, budgets=[0.5], planes=simhash_planes(8))


def test_a_budget_above_the_chunks_there_are_takes_them_all():
    q, k = torch.randn(1, 115, 2, 8), torch.randn(1, 115, 1, 8)
    got = recall_quality(q, k, chunk=10, window=4, budgets=[1.0], planes=simhash_planes(8))
    assert got["simhash"][1.0] == pytest.approx(1.0)


def test_sub_chunk_signatures_find_keys_their_chunk_mean_hides():
    """Two keys of a chunk point at the queries and six away: the chunk's mean key points away
    (recall's signature misses it) while the attention mass is all there; signatures of the
    chunk's quarters keep the two keys' direction, and the chunk is found."""
    torch.manual_seed(3)
    d = 32
    direction = torch.randn(d)
    k = torch.randn(1, 256, 1, d) * 0.1
    k[0, 64:66, 0] = direction * 3 + torch.randn(2, d) * 0.1
    k[0, 66:72, 0] = -direction * 3 + torch.randn(6, d) * 0.1
    q = direction * 2 + torch.randn(1, 100, 2, d) * 0.1
    planes = simhash_planes(d, tables=8)
    whole = recall_quality(q, k, chunk=8, window=32, budgets=[8 / 256], planes=planes)
    parts = recall_quality(q, k, chunk=8, window=32, budgets=[8 / 256], planes=planes,
                           sub_chunks=4)
    assert whole["oracle"][8 / 256] > 0.9 and parts["oracle"] == whole["oracle"]
    assert whole["simhash"][8 / 256] < 0.5 < 0.9 < parts["simhash"][8 / 256]
    assert parts["quest"] == whole["quest"]
    with pytest.raises(ValueError, match="sub_chunks"):
        recall_quality(q, k, chunk=8, window=32, budgets=[0.1], planes=planes, sub_chunks=3)
