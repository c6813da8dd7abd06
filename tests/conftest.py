"""Shared fixtures: a real moto S3 endpoint on 127.0.0.1, a real local Ray runtime,
and small synthetic datasets written as real Parquet files."""

from __future__ import annotations

import os
import uuid

import numpy as np
import pytest

from flm_dist.config import FeatureConfig, JobConfig, load_job
from flm_dist.storage import EmbeddedS3, Store

# Ray on CI has 2 cores, like this machine: the tests run with what the defaults pick.
RAY_CPUS = int(os.environ.get("FLM_TEST_RAY_CPUS", "2"))

# Ray Train's controller polls its workers every 2 s, so every run (and every worker
# death a test causes) is noticed up to 2 s late; the suite starts ~40 runs. Set before
# any Ray starts, so the local runtime, `ray start` nodes and CLI subprocesses inherit it.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
# Two of Ray Train's per-run side services that no test exercises: the preemption
# watcher (an actor process per worker group, for cloud node drains) and the
# controller's and workers' Prometheus metrics. On 2 cores they cost each run ~2 s of
# its start (tiny 2-worker run, interleaved, 3 rounds: 15.4 -> 13.4 s). Production runs
# keep both: these are Ray's settings, not flm_dist's.
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
os.environ.setdefault("RAY_TRAIN_METRICS_ENABLED", "0")


@pytest.fixture(scope="session")
def s3():
    with EmbeddedS3() as endpoint:
        yield endpoint


@pytest.fixture(scope="session")
def s3_store(s3) -> Store:
    return Store.from_config(s3.storage_config())


@pytest.fixture
def bucket(s3_store) -> str:
    """A fresh bucket URI per test."""
    name = f"t-{uuid.uuid4().hex[:10]}"
    s3_store.ensure_bucket(f"s3://{name}")
    return f"s3://{name}"


@pytest.fixture(scope="session")
def ray_local():
    import ray

    from flm_dist.launch import ensure_ray

    ensure_ray(num_cpus=RAY_CPUS)
    yield ray
    ray.shutdown()


FEATURES = [
    FeatureConfig(name="u_segment", side="user"),
    FeatureConfig(name="i_category", side="item"),
]


def tiny_job(tmp_storage: str, name: str, task: str = "pretrain", **sets) -> JobConfig:
    """A job sized for tests: small tables, small batches."""
    overrides = [
        f"task={task}",
        f"run.name={name}",
        f"run.storage={tmp_storage}",
        "model.user_rows=4096",
        "model.item_rows=1024",
        "model.feature_rows=64",
        "model.embedding_dim=8",
        "model.hidden=[16]",
        "model.latent_dim=8",
        "model.head_hidden=[8]",
        "data.batch_size=256",
        "data.shuffle_window=2",
        "train.log_every=5",
        "scaling.num_workers=2",
    ]
    overrides += [f"{k}={v}" for k, v in sets.items()]
    job = load_job(None, overrides)
    job.data.features = list(FEATURES)
    return job


def pretraining_positions(uri: str, store: Store | None = None) -> np.ndarray:
    """The sorted positions of the rows a pretraining job with the default config reads
    from `uri`: every row but the `data.valid_fraction` carve, which pretraining holds
    out for the fine-tunes' validation. Read by the read tasks' own code."""
    from flm_dist.config import DataConfig
    from flm_dist.data.encode import EncodeSpec, empty_columns, read_units
    from flm_dist.data.hashing import HashSpec
    from flm_dist.data.plan import plan_read
    from flm_dist.data.schema import ReadSpec

    store = store or Store()
    rs = ReadSpec.for_task("pretrain", [], [1, 5])
    plan = plan_read(store, uri, rs)
    spec = EncodeSpec(read=rs, hash=HashSpec.build({"user": 64, "item": 64}, 0), side="train", valid_fraction=DataConfig().valid_fraction)
    tables = read_units(plan.units, [f.uri for f in plan.files], spec, store, plan.columns, None, "fail", empty_columns(spec), {})
    return np.sort(np.concatenate([t.column("_pos").to_numpy() for t in tables]))
