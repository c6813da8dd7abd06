"""Metrics against hand-computed cases, distributed gathering against one process."""

from __future__ import annotations

import itertools
import json
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
    # two infinite scores tie (inf - inf is NaN), and a NaN score makes AUC undefined
    # rather than ranking the NaN above everything
    assert auc([np.inf, np.inf, 0.0], [1, 0, 0]) == pytest.approx(0.75)
    assert math.isnan(auc([np.nan, 0.1], [1, 0]))


def test_group_auc_and_calibration_by_hand():
    s = np.array([0.9, 0.1, 0.8, 0.7, 0.2, 0.3])
    y = np.array([1, 0, 0, 1, 1, 0])
    g = np.array([1, 1, 2, 2, 3, 3])
    # user 1: 1.0 (2 rows); user 2: 0.0 (2 rows); user 3: 0.0 (2 rows) -> weighted mean 1/3
    assert group_auc(s, y, g) == pytest.approx(1 / 3)
    m = ctr_metrics(np.log(s / (1 - s)), y.astype(float), g)
    assert m["calibration"] == pytest.approx(s.mean() / y.mean())
    assert m["logloss"] == pytest.approx(-np.mean(y * np.log(s) + (1 - y) * np.log(1 - s)))


def _gather(rank, world, scores, labels, keys):
    """Each rank holds a slice of the eval outputs (the last rank none at all) and
    gathers them with the evaluation path's own collective."""
    from flm_dist.evaluation import gather_outputs, local_outputs

    mine = slice(rank, len(scores), world - 1) if rank < world - 1 else slice(0, 0)
    parts = {"pred": [scores[mine]], "target": [labels[mine]], "user_key": [keys[mine]], "item_key": [keys[mine]]}
    if rank == world - 1:
        parts = {}
    res = gather_outputs(local_outputs(parts, latent_dim=4))
    return res, auc(scores[mine], labels[mine]) if rank < world - 1 else None


@pytest.mark.slow
def test_distributed_gather_equals_single_process_exactly():
    rng = np.random.default_rng(1)
    scores = np.round(rng.random(2001), 2).astype(np.float32)  # ties across ranks
    labels = (rng.random(2001) < scores).astype(np.float32)
    keys = rng.integers(-(2**63), 2**63 - 1, 2001, dtype=np.int64)  # 64-bit identity keys
    results = run_ranks(_gather, 3, scores, labels, keys)
    got = results[0][0]
    assert results[1][0] is None and results[2][0] is None  # only rank 0 holds the outputs
    order = np.concatenate([np.arange(0, 2001, 2), np.arange(1, 2001, 2)])
    # a rank without rows must not turn the int64 keys into floats (their low bits would be lost)
    assert got["user_key"].dtype == np.int64 and np.array_equal(got["user_key"], keys[order])
    assert auc(got["pred"], got["target"]) == auc(scores, labels)
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


def _oracle_ranking(scores, users, targets, catalog, seen_pairs, ks):
    """A plain loop: per row, the target ranks below every item tied with it; per user,
    over the user's distinct targets, metrics are averaged (recall, DCG) or maximised
    (hit rate), then averaged over users."""
    per_user: dict = {}
    done = set()
    for r, (u, tgt) in enumerate(zip(users, targets, strict=True)):
        if (u, tgt) in done:
            continue
        done.add((u, tgt))
        catalog_list = list(catalog)
        rec = {}
        if tgt not in catalog_list or not np.isfinite(scores[r][catalog_list.index(tgt)]):
            for k in ks:
                rec[k] = (0.0, 0.0)
        else:
            t = scores[r][catalog_list.index(tgt)]
            others = [
                s if not np.isnan(s) else np.inf
                for s, item in zip(scores[r], catalog_list, strict=True)
                if item != tgt and (u, item) not in seen_pairs
            ]
            g = sum(1 for s in others if s > t)
            e = sum(1 for s in others if s == t)
            for k in ks:
                p = g + e
                rec[k] = (1.0, 1 / math.log2(p + 2)) if p < k else (0.0, 0.0)
        per_user.setdefault(u, []).append(rec)
    out = {}
    for k in ks:
        recall, ndcg, hitrate = [], [], []
        for recs in per_user.values():
            n = len(recs)
            ideal = sum(1 / math.log2(p + 2) for p in range(min(n, k)))
            recall.append(sum(r[k][0] for r in recs) / n)
            ndcg.append(sum(r[k][1] for r in recs) / ideal)
            hitrate.append(max(r[k][0] for r in recs))
        out[f"recall@{k}"], out[f"ndcg@{k}"], out[f"hitrate@{k}"] = np.mean(recall), np.mean(ndcg), np.mean(hitrate)
    return out


def test_constant_scorer_gets_nothing():
    """Ties never count in the model's favour: a constant scorer ranks the target below
    every item it ties with (1.0 with the target first among ties, k / |catalog| with
    the expectation over a random tie-break)."""
    n = 1000
    catalog = np.arange(n, dtype=np.int64)
    ref = Reference(users=np.array([0]), items=catalog, item_counts=np.ones(n, np.int64), catalog={"item_key": catalog}, pair_users=np.zeros(0, np.int64), pair_items=np.zeros(0, np.int64))
    users = np.arange(50, dtype=np.int64)
    targets = np.arange(50, dtype=np.int64) * 7
    rep = ranking_report(lambda lo, hi: np.zeros((hi - lo, n), np.float32), 50, users, targets, catalog, ref, ks=(10, 20))
    assert rep["overall"]["recall@10"] == rep["overall"]["hitrate@20"] == rep["overall"]["ndcg@10"] == 0.0
    # one tie at the boundary: the target and one other item share the 10th best score
    scores = np.arange(n, dtype=np.float32)[::-1].copy()  # item 0 best
    scores[10] = scores[9]
    for target, hit in ((9, 0.0), (10, 0.0), (8, 1.0)):
        rep = ranking_report(lambda lo, hi, s=scores: s[None, :].repeat(hi - lo, 0), 1, np.array([0]), np.array([target]), catalog, ref, ks=(10,))
        assert rep["overall"]["recall@10"] == hit, target


def test_the_same_target_twice_counts_once_and_ndcg_stays_at_most_one():
    """A log that holds (u, A) twice in eval: ranked first, A is one hit, not two
    (NDCG was 2 / (1 + 1/log2 3) = 1.23)."""
    n = 20
    catalog = np.arange(n, dtype=np.int64)
    ref = Reference(users=np.array([0]), items=catalog, item_counts=np.ones(n, np.int64), catalog={"item_key": catalog}, pair_users=np.zeros(0, np.int64), pair_items=np.zeros(0, np.int64))
    scores = np.arange(n, dtype=np.float32)[::-1].copy()
    rep = ranking_report(lambda lo, hi: scores[None, :].repeat(hi - lo, 0), 3, np.array([7, 7, 8]), np.array([0, 0, 5]), catalog, ref, ks=(10,))
    o = rep["overall"]
    assert o["rows"] == 2 and o["users"] == 2
    assert o["ndcg@10"] == pytest.approx((1.0 + 1 / math.log2(5 + 2)) / 2)
    assert o["recall@10"] == 1.0


@pytest.mark.parametrize("seed,n_items", [(s, 30) for s in range(6)] + [(6, 5), (7, 1)])
def test_ranking_matches_a_plain_loop_oracle(seed, n_items):
    """Ties (scores on a coarse grid), seen items, a target that is also a seen item,
    cold targets, NaN scores, users with several targets and users with none seen, and
    catalogs smaller than k (a cold target is still a miss)."""
    rng = np.random.default_rng(seed)
    n_rows = 40
    catalog = np.sort(rng.choice(1000, n_items, replace=False)).astype(np.int64)
    users = rng.integers(0, 8, n_rows).astype(np.int64)
    targets = np.where(rng.random(n_rows) < 0.1, 5000, rng.choice(catalog, n_rows)).astype(np.int64)
    pairs = {(int(u), int(i)) for u in range(8) for i in rng.choice(catalog, rng.integers(0, min(10, n_items)))}
    pairs |= {(int(users[0]), int(targets[0]))}  # a target the user saw in training
    scores = np.round(rng.normal(size=(n_rows, n_items)), 0).astype(np.float32)
    scores[rng.random(scores.shape) < 0.02] = np.nan
    pu = np.array(sorted(pairs), dtype=np.int64)
    ref = Reference(users=np.unique(pu[:, 0]), items=catalog, item_counts=np.ones(n_items, np.int64), catalog={"item_key": catalog}, pair_users=pu[:, 0].copy(), pair_items=pu[:, 1].copy())
    ks = (1, 5, 10)
    rep = ranking_report(lambda lo, hi: scores[lo:hi], n_rows, users, targets, catalog, ref, ks=ks, chunk=7)
    want = _oracle_ranking(scores, users.tolist(), targets.tolist(), catalog.tolist(), pairs, ks)
    for key, v in want.items():
        assert rep["overall"][key] == pytest.approx(v, abs=1e-9), key


def test_empty_catalog_is_all_misses():
    ref = Reference(users=np.array([1]), items=np.zeros(0, np.int64), item_counts=np.zeros(0, np.int64), catalog={"item_key": np.zeros(0, np.int64)}, pair_users=np.zeros(0, np.int64), pair_items=np.zeros(0, np.int64))
    rep = ranking_report(lambda lo, hi: np.zeros((hi - lo, 0), np.float32), 3, np.array([1, 1, 2]), np.array([5, 6, 7]), np.zeros(0, np.int64), ref)
    assert rep["overall"]["recall@10"] == rep["overall"]["ndcg@10"] == rep["overall"]["hitrate@10"] == 0.0


def test_ranking_asks_for_score_blocks_of_bounded_size(monkeypatch):
    """Rows are scored in blocks against the whole catalog; with a large catalog the
    block has fewer rows (1,024 rows over 10^7 items was a 41 GB block)."""
    import flm_dist.metrics as metrics

    monkeypatch.setattr(metrics, "SCORE_BLOCK", 1000)
    n = 300
    catalog = np.arange(n, dtype=np.int64)
    ref = Reference(users=np.array([0]), items=catalog, item_counts=np.ones(n, np.int64), catalog={"item_key": catalog}, pair_users=np.zeros(0, np.int64), pair_items=np.zeros(0, np.int64))
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(40, n)).astype(np.float32)
    blocks = []

    def scores_for(lo, hi):
        blocks.append((hi - lo) * n)
        return scores[lo:hi]

    users, targets = np.arange(40, dtype=np.int64), rng.integers(0, n, 40).astype(np.int64)
    got = ranking_report(scores_for, 40, users, targets, catalog, ref, ks=(10,))
    assert max(blocks) <= 1000 and sum(blocks) == 40 * n
    whole = ranking_report(lambda lo, hi: scores[lo:hi], 40, users, targets, catalog, ref, ks=(10,), chunk=40)
    assert json.dumps(got, sort_keys=True) == json.dumps(whole, sort_keys=True)  # NaN-aware: an empty slice


def test_group_auc_equals_the_size_weighted_mean_of_each_groups_auc():
    rng = np.random.default_rng(2)
    groups = rng.integers(0, 60, 3000)
    s = np.round(rng.random(3000), 1)  # ties within and across groups
    y = (rng.random(3000) < s).astype(np.float32)
    num = den = 0.0
    for g in np.unique(groups):
        m = groups == g
        if 0 < y[m].sum() < m.sum():
            num += m.sum() * brute_auc(s[m], y[m])
            den += m.sum()
    assert group_auc(s, y, groups) == pytest.approx(num / den, abs=1e-12)
    assert math.isnan(group_auc(np.array([0.1, np.nan]), np.array([1, 0]), np.array([1, 1])))
    assert math.isnan(group_auc(np.array([0.1, 0.2]), np.array([1, 1]), np.array([1, 2])))  # no group has both
