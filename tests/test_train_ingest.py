"""Ingest under real Ray Train workers: uneven shards cannot hang DDP, bad rows are
counted and budgeted, and the error names the file and row."""

from __future__ import annotations

import os
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from flm_dist import launch
from flm_dist.data.schema import DataError
from flm_dist.storage import Store
from tests.conftest import tiny_job

pytestmark = pytest.mark.slow


def _log(n: int, start: int, bad_labels: int = 0) -> pa.Table:
    rng = np.random.default_rng(start)
    label = rng.integers(0, 2, n).astype(np.float32)
    label[:bad_labels] = 7.0  # out of [0, 1]
    return pa.table(
        {
            "user_id": pa.array(rng.integers(0, 300, n), pa.int64()),
            "item_id": pa.array(rng.integers(0, 100, n), pa.int64()),
            "label": pa.array(label),
            "u_segment": pa.array([f"s{x}" for x in rng.integers(0, 5, n)]),
            "i_category": pa.array([f"c{x}" for x in rng.integers(0, 7, n)]),
        }
    )


def _write(d, sizes, bad_in_last=0):
    os.makedirs(d, exist_ok=True)
    for i, n in enumerate(sizes):
        bad = bad_in_last if i == len(sizes) - 1 else 0
        pq.write_table(_log(n, i * 1000, bad), os.path.join(d, f"part-{i:02d}.parquet"), row_group_size=1000)


def test_uneven_files_equal_steps_and_bad_rows_counted(ray_local, tmp_path):
    data = str(tmp_path / "log")
    # one empty file, one huge, several tiny: shards differ wildly in size
    _write(data, [0, 9000, 13, 1, 250, 40], bad_in_last=3)
    job = tiny_job(str(tmp_path / "runs"), "uneven", "ctr", **{"data.train": data, "train.epochs": 2, "data.max_bad_fraction": 0.01, "data.valid_fraction": 0})
    res = launch.train(job, Store(), fresh=True, progress=False)
    m = res["metrics"]
    assert len(m["steps_per_worker"]) == 2 and len(set(m["steps_per_worker"])) == 1
    good = 9000 + 13 + 1 + 250 + 40 - 3
    assert m["rows"] == 2 * good  # every good row once per epoch: none lost, none duplicated
    assert m["bad_rows"] == {"label_out_of_range": 2 * 3}


def test_bad_rows_over_budget_fail_with_counts_and_examples(ray_local, tmp_path):
    data = str(tmp_path / "log")
    _write(data, [2000, 2000], bad_in_last=50)  # 50 / 4000 = 1.25% > 0.1%
    # restarts allowed, as in the job files: they are for lost workers and transient
    # faults, and the same rows would fail every attempt the same way
    job = tiny_job(str(tmp_path / "runs"), "bad", "ctr", **{"data.train": data, "scaling.max_failures": 3})
    with pytest.raises(DataError) as e:
        launch.train(job, Store(), fresh=True, progress=False)
    msg = str(e.value)
    # it fails as soon as the epoch can no longer stay under budget (4 of 4000 rows),
    # possibly before reading all 50
    n = int(re.search(r"label_out_of_range=(\d+)", msg).group(1))
    assert "max_bad_fraction=0.001" in msg and 4 < n <= 50
    assert "part-01.parquet row " in msg and "'label': 7.0" in msg
    assert "not retried: an input error fails every attempt the same way (1 worker-group start)" in getattr(e.value, "__notes__", [])
