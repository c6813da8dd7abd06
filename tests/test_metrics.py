"""Metrics against hand-computed cases, distributed gathering against one process."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from flm_dist.data.reference import Reference
from flm_dist.metrics import (
    auc,
    ctr_metrics,
    group_auc,
    pointwise_report,
    ranking_report,
    slice_masks,
)
from tests.dist import run_ranks


def brute_auc(s, y):
    pos = [a for a, b in zip(s, y, strict=True) if b]
    neg = [a for a, b in zip(s, y, strict=True) if not b]
    return sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg)) / (len(pos) * len(neg))


def test_auc_with_ties_matches_pairwise_definition():
    rng = np.random.default_rng(0)
    s = rng.integers(0, 5, 300).astype(float)  # many ties
    y = rng.integers(0, 2, 300)
    assert auc(s, y) == pytest.approx(brute_auc(s, y), abs=1e-12)
    assert auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == 0.75
    assert math.isnan(auc([0.1, 0.2], [1, 1]))


def test_group_auc_and_calibration_by_hand():
    s = np.array([0.9, 0.1, 0.8, 0.7, 0.2, 0.3])
    y = np.array([1, 0, 0, 1, 1, 0])
    g = np.array([1, 1, 2, 2, 3, 3])
    # user 1: 1.0 (2 rows); user 2: 0.0 (2 rows); user 3: 0.0 (2 rows) -> weighted mean 1/3
    assert group_auc(s, y, g) == pytest.approx(1 / 3)
    m = ctr_metrics(np.log(s / (1 - s)), y.astype(float), g)
    assert m["calibration"] == pytest.approx(s.mean() / y.mean())
    assert m["logloss"] == pytest.approx(-np.mean(y * np.log(s) + (1 - y) * np.log(1 - s)))


def _gather_auc(rank, world, scores, labels):
    """Each rank holds a slice of the predictions; the gathered set gives the AUC."""
    import torch.distributed as dist

    part = (scores[rank::world], labels[rank::world])
    gathered = [None] * world
    dist.all_gather_object(gathered, part)
    s = np.concatenate([g[0] for g in gathered])
    y = np.concatenate([g[1] for g in gathered])
    return auc(s, y), auc(*part)


@pytest.mark.slow
def test_distributed_auc_equals_single_process_exactly():
    rng = np.random.default_rng(1)
    scores = np.round(rng.random(2001), 2)  # ties across ranks
    labels = (rng.random(2001) < scores).astype(int)
    results = run_ranks(_gather_auc, 2, scores, labels)
    assert results[0][0] == results[1][0] == auc(scores, labels)
    # the tempting shortcut, averaging per-rank AUCs, is not the AUC
    assert (results[0][1] + results[1][1]) / 2 != auc(scores, labels)


def _ref():
    # training data: users 1, 2; items 10 (popular), 11, 12; pairs (1,10) (1,11) (2,10)
    return Reference(
        users=np.array([1, 2]),
        items=np.array([10, 11, 12, 13, 14]),
        item_counts=np.array([50, 3, 2, 1, 1]),
        catalog={"item_key": np.array([10, 11, 12, 13, 14])},
        pair_users=np.array([1, 1, 2]),
        pair_items=np.array([10, 11, 10]),
    )


def test_slices_by_hand():
    ref = _ref()
    users = np.array([1, 2, 3, 3, 1])
    items = np.array([10, 12, 10, 99, 13])
    m = slice_masks(users, items, ref)
    assert m["cold_user"].tolist() == [False, False, True, True, False]
    assert m["cold_item"].tolist() == [False, False, False, True, False]
    # top 20% of 5 items = 1 item (10): everything else is long tail, cold item included
    assert m["long_tail"].tolist() == [False, True, False, True, True]
    assert m["warm"].tolist() == [True, True, False, False, True]
    rep = pointwise_report("rating", np.array([4.0, 3, 2, 5, 1]), np.array([5.0, 3, 2, 1, 1]), users, items, ref)
    assert rep["overall"]["rmse"] == pytest.approx(math.sqrt((1 + 16) / 5))
    assert rep["slices"]["cold_user"]["rows"] == 2 and rep["slices"]["cold_user"]["mae"] == pytest.approx(2.0)


def test_ranking_metrics_by_hand():
    ref = _ref()
    catalog = ref.catalog["item_key"]
    # scores per eval row over catalog items [10, 11, 12, 13, 14]
    scores = np.array(
        [
            [9.0, 8.0, 1.0, 2.0, 3.0],  # user 1, target 12: 10 and 11 excluded (seen) -> 14, 13, 12: rank 2
            [9.0, 8.0, 7.0, 2.0, 3.0],  # user 2, target 11: 10 excluded -> 11 first: rank 0
            [1.0, 2.0, 3.0, 4.0, 5.0],  # user 3 (cold), target 10: rank 4
            [1.0, 2.0, 3.0, 4.0, 5.0],  # user 3, target 99 (not in catalog): miss
        ]
    )
    users, targets = np.array([1, 2, 3, 3]), np.array([12, 11, 10, 99])
    rep = ranking_report(lambda lo, hi: scores[lo:hi], 4, users, targets, catalog, ref, ks=(1, 3))
    o = rep["overall"]
    # per user: u1 hit@3 (rank 2), u2 hit@1, u3: 0 of 2 targets in top 3
    assert o["recall@1"] == pytest.approx((0 + 1 + 0) / 3)
    assert o["recall@3"] == pytest.approx((1 + 1 + 0) / 3)
    assert o["hitrate@3"] == pytest.approx(2 / 3)
    ndcg_u1 = (1 / math.log2(2 + 2)) / 1.0
    assert o["ndcg@3"] == pytest.approx((ndcg_u1 + 1.0 + 0.0) / 3)
    assert rep["slices"]["cold_user"]["users"] == 1 and rep["slices"]["cold_user"]["recall@3"] == 0.0
