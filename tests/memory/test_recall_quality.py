"""recall_quality: the captured mass of each selector at a budget — the oracle is the ceiling,
all selectors reach 1 when the budget covers every eligible chunk, Quest's bound is an upper
bound of the chunk's scores, and a planted chunk is found."""

import pytest
import torch

from mka.memory.recall import simhash_planes
from mka.memory.recall_quality import _quest_bound, recall_quality


def test_oracle_is_the_ceiling_and_a_full_budget_captures_everything():
    torch.manual_seed(0)
    q, k = torch.randn(2, 200, 4, 16), torch.randn(2, 200, 2, 16)
    got = recall_quality(q, k, chunk=8, window=16, budgets=[0.05, 0.2, 1.0],
                         planes=simhash_planes(16))
    for f in (0.05, 0.2):
        for name in ("simhash", "mean", "quest"):
            assert got["oracle"][f] >= got[name][f] - 1e-9
        assert 0 < got["simhash"][f] <= 1
    for name in got:
        assert got[name][1.0] == pytest.approx(1.0, abs=1e-9)


def test_quest_bound_bounds_every_score_in_the_chunk():
    torch.manual_seed(1)
    q, k = torch.randn(1, 5, 2, 8), torch.randn(1, 32, 2, 8)
    bound = _quest_bound(q, k, 8)  # (1, 5, 2, 4), one head per kv head here
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
    for name in ("simhash", "mean", "quest", "oracle"):
        assert got[name][8 / 256] > 0.9


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
