"""The evaluation path's facts about training data: what counts as training data for
slices, popularity and the exclusion of each user's training items."""

from __future__ import annotations

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
