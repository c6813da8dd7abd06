"""The evaluation path's facts about training data: what counts as training data for
slices, popularity and the exclusion of each user's training items."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from flm_dist import launch
from flm_dist.data.encode import encode_table
from flm_dist.data.hashing import HashSpec
from flm_dist.data.plan import read_unit
from flm_dist.metrics import slice_masks
from flm_dist.model import table_sizes
from flm_dist.storage import Store
from tests.conftest import tiny_job


def _log(path, users=200, per_user=10, seed=0):
    rng = np.random.default_rng(seed)
    u = np.repeat(np.arange(users, dtype=np.int64), per_user)
    t = pa.table({
        "user_id": u,
        "item_id": rng.integers(0, 300, len(u)).astype(np.int64),
        "ts": np.tile(np.arange(per_user, dtype=np.int64), users),
        "label": (rng.random(len(u)) < 0.5).astype(np.float32),
        "u_segment": pa.array([f"s{x % 3}" for x in u]),
        "i_category": pa.array([f"c{x % 5}" for x in range(len(u))]),
    })
    path.mkdir(parents=True, exist_ok=True)
    pq.write_table(t, path / "part-0.parquet", row_group_size=500)
    return t


def _eval_rows(store, plans, specs):
    plan, spec = plans["eval"], specs["eval"]
    cols = [encode_table(read_unit(store, plan, u), spec, u.index) for u in plan.units]
    return np.concatenate([c["user_key"] for c in cols]), np.concatenate([c["item_key"] for c in cols])


@pytest.mark.parametrize("by,extra", [("user", {"data.split.fraction": 0.3}), ("time", {"data.split.time_cutoff": 8})])
def test_reference_of_a_split_holds_only_the_training_side(tmp_path, by, extra):
    """With the eval split carved by `data.split.by`, eval rows are not training data:
    by user, every eval user is a cold user; by time, no (user, item) pair that only
    occurs at or after the cutoff is among a user's training items."""
    t = _log(tmp_path / "log")
    job = tiny_job(str(tmp_path / "runs"), "split", "ctr", **{"data.train": str(tmp_path / "log"), "data.split.by": by, **extra})
    store = Store()
    hs = HashSpec.build(table_sizes(job.model, job.data.features), job.model.hash_seed)
    _, plans, specs = launch.plan_datasets(job, store, hs, job.data.train, None, "ctr")
    ref = launch.training_reference(store, plans["train"], specs["known"], "retrieval")
    users, items = _eval_rows(store, plans, specs)
    assert len(users) > 0
    masks = slice_masks(users, items, ref)
    if by == "user":
        assert masks["cold_user"].all()  # before: empty, eval users counted as training users
        assert len(ref.users) == len(np.unique(t.column("user_id").to_numpy())) - len(np.unique(users))
    else:
        assert not masks["cold_user"].any()
        ts = t.column("ts").to_numpy()
        assert ref.item_counts.sum() == (ts < 8).sum()  # popularity from training rows only


@pytest.mark.parametrize("known", ["history", "seen", "history and seen"])
def test_validation_ranking_matches_brute_force_with_ties_against_and_known_items_excluded(known):
    """Early stopping for retrieval follows NDCG@10 by full ranking; checked against a
    brute-force ranking of the same vectors: ties count against the row's item, the
    user's other distinct items are excluded (its own item is not), an item outside the
    catalog is a miss (as in the final evaluation: nothing can rank it), and collided
    catalog rows all count. The user's items are their known pairs found by key
    (`seen`), for a model with a history too, and the row's history only without them:
    the final evaluation excludes every known pair, so validation must, or it ranks a
    model down for learning them (a LastFM user has 48 items on average, a quarter of
    them more than the 50 a history holds)."""
    import torch
    import torch.nn.functional as F

    from flm_dist.batch import Batch
    from flm_dist.config import ModelConfig
    from flm_dist.evaluation import validation_ranking
    from flm_dist.model import FLM

    torch.manual_seed(0)
    seq = known != "seen"
    cfg = ModelConfig(user_rows=64, item_rows=40, embedding_dim=8, hidden=[], latent_dim=8, history_len=5 if seq else 0, history_layers=1, history_heads=2, user_id=not seq)
    model = FLM(cfg, [])
    with torch.no_grad():  # items 10 and 11 share a vector: a tie, whichever is the row's item
        model.tables["item"].weight[11] = model.tables["item"].weight[10]
    rows = torch.tensor([3, 5, 7, 10, 11, 12, 12, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30])  # 12 twice: a hash collision
    item = torch.tensor([10, 5, 39, 21])  # 39: not in the catalog
    hist = torch.tensor([[-1, 3, 5, 5, 11], [-1, -1, -1, -1, -1], [7, 12, 20, 21, 22], [21, 3, 5, 7, 10]])
    # the users' (keys 9, 4, 7, 2) known pairs: their history's items, and with a history
    # also items older than it holds
    keys = torch.tensor([9, 4, 7, 2])
    older = {0: {23, 24, 25, 26, 27, 28, 29, 30, 20}, 1: {22}, 2: set(), 3: {25}} if known == "history and seen" else {i: set() for i in range(4)}
    known_items = [{h for h in hist[i].tolist() if h >= 0} | older[i] for i in range(4)]
    pairs = sorted((int(keys[i]), h) for i in range(4) for h in known_items[i])
    pairs += [(5, 20), (5, 21)]  # another user's items exclude nothing here
    pairs.sort()
    seen = (np.array([p[0] for p in pairs], np.int64), np.array([p[1] for p in pairs], np.int64)) if known != "history" else None
    batch = Batch(user=torch.tensor([1, 2, 3, 4]), item=item, features={}, history=hist if seq else None, user_key=keys)
    m = model.eval()
    with torch.no_grad():
        u = F.normalize(m.user_vector(batch), dim=-1)
        cvec = F.normalize(m.item_vector(Batch(user=rows, item=rows, features={})), dim=-1)
    scores = (u @ cvec.T).numpy()
    want_ndcg = want_recall = 0.0
    for i in range(4):
        in_cat = [j for j in range(len(rows)) if rows[j] == item[i]]
        if not in_cat:
            continue  # a miss
        own = scores[i, in_cat[0]]
        # one catalog entry per distinct known row: of two items sharing a row, the
        # user holds one, so the other still counts (conservative)
        excluded = {next(j for j in range(len(rows)) if rows[j] == h) for h in known_items[i] if h != item[i] and h in rows.tolist()}
        above = sum(1 for j in range(len(rows)) if scores[i, j] >= own and j not in excluded) - 1
        want_ndcg += 1 / np.log2(above + 2) if above < 10 else 0.0
        want_recall += above < 10
    for chunk in (7, 1 << 16):  # the catalog in chunks, and in one product
        got = validation_ranking(model, [batch], (rows, cvec), torch.device("cpu"), batch, chunk=chunk, seen=seen)
        assert got[2] == 4
        assert got[0] == pytest.approx(want_ndcg, abs=1e-9) and got[1] == want_recall
    if known == "history and seen":  # the older items count: with the history alone the rows rank lower
        assert validation_ranking(model, [batch], (rows, cvec), torch.device("cpu"), batch, seen=None)[0] < want_ndcg - 0.1
        cvec[1] = float("nan")  # item 5's vector, the second row's item: a NaN score is a miss, never a hit
        for chunk in (7, 1 << 16):
            got = validation_ranking(model, [batch], (rows, cvec), torch.device("cpu"), batch, chunk=chunk, seen=seen)
            assert got[1] == want_recall - 1 and np.isfinite(got[0])


def test_seen_rows_hold_every_known_pair_the_carve_included_as_item_rows(tmp_path):
    """A ranking validation ranks each held-out pair against items the user never
    chose, as the leave-one-out test ranks its target: the pairs it excludes
    (`seen_rows`) are every known pair, those trained on and the validation carve's
    (each row keeps its own), mapped to the item rows the workers rank."""
    _log(tmp_path / "log")
    job = tiny_job(str(tmp_path / "runs"), "carve", "retrieval", **{"data.train": str(tmp_path / "log"), "data.valid_fraction": 0.3})
    store = Store()
    hs = HashSpec.build(table_sizes(job.model, job.data.features), job.model.hash_seed)
    _, plans, specs = launch.plan_datasets(job, store, hs, job.data.train, None, "retrieval", validate=True)

    def pairs(side: str) -> set:  # the side's good rows, as the scan reads them
        spec = replace(specs[side], read=replace(specs[side].read, keys=True))
        cols = [encode_table(read_unit(store, plans["train"], u), spec, u.index) for u in plans["train"].units]
        return {(int(a), int(b)) for c in cols for a, b, bad in zip(c["user_key"], c["item_key"], c["_bad"], strict=True) if not bad}

    ref = launch.training_reference(store, plans["train"], specs["known"], "retrieval")
    users, rows = launch.seen_rows(ref)
    assert (np.diff(users) >= 0).all()
    row_of = dict(zip(ref.catalog["item_key"].tolist(), ref.catalog["item"].tolist(), strict=True))
    got = set(zip(users.tolist(), rows.tolist(), strict=True))
    want = {(u, row_of[i]) for u, i in pairs("known")}
    assert got == want
    carve = {(u, row_of[i]) for u, i in pairs("valid")}
    assert carve and carve <= got  # the carve's pairs are excluded too (but for each row's own)
