"""Faults injected for real, each named by its case number in ../shared/RELIABILITY.md
(cases covered elsewhere are mapped in docs/RELIABILITY.md)."""

from __future__ import annotations

import glob
import json
import os
import re
import signal
import threading
import time
from dataclasses import replace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from flm_dist import checkpoint as ckpt
from flm_dist import launch
from flm_dist.config import ConfigError
from flm_dist.data.encode import EncodeSpec, empty_columns, read_units
from flm_dist.data.hashing import HashSpec
from flm_dist.data.plan import plan_read
from flm_dist.data.schema import DataError, ReadSpec
from flm_dist.export import load_model
from flm_dist.storage import StorageError, Store, join
from flm_dist.train_loop import NonFiniteLossError
from tests.conftest import pretraining_positions, tiny_job
from tests.faulty_s3 import FaultyS3
from tests.test_resume import read_trace

pytestmark = pytest.mark.slow


def _write_log(d: str, files: int, rows: int, seed: int = 0, start: int = 0) -> None:
    os.makedirs(d, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(start, start + files):
        n = rows + 13 * i
        pq.write_table(
            pa.table(
                {
                    "user_id": pa.array(rng.integers(0, 400, n), pa.int64()),
                    "item_id": pa.array(rng.integers(0, 150, n), pa.int64()),
                    "label": pa.array(rng.integers(0, 2, n).astype(np.float32)),
                    "u_segment": pa.array([f"s{x}" for x in rng.integers(0, 5, n)]),
                    "i_category": pa.array([f"c{x}" for x in rng.integers(0, 7, n)]),
                }
            ),
            os.path.join(d, f"part-{i:02d}.parquet"),
            row_group_size=400,
        )


def _job(storage: str, name: str, data: str, **sets):
    return tiny_job(storage, name, "pretrain", **{"data.pretrain": data, "data.batch_size": 64, "checkpoint.every_steps": 6, **sets})


def _run_in_thread(job, store, monkeypatch=None, trace=None, **kw):
    box: dict = {}

    def target():
        try:
            box["result"] = launch.train(job, store, progress=False, **kw)
        except BaseException as e:  # noqa: BLE001 - inspected by the test
            box["error"] = e

    if trace:
        os.makedirs(trace, exist_ok=True)
        kw["trace_rows"] = trace
    t = threading.Thread(target=target)
    t.start()
    return t, box


def _wait(cond, timeout=240, every=0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = cond()
        if v:
            return v
        time.sleep(every)
    return None


def _worker_pid(trace: str, rank: int) -> int | None:
    files = glob.glob(os.path.join(trace, f"epoch*-rank{rank}-pid*.bin"))
    return int(re.search(r"pid(\d+)", files[0]).group(1)) if files else None


# ---------------------------------------------------------------- cases 2, 3


def test_case02_more_failures_than_max_failures_fail_with_the_error(ray_local, tmp_path, monkeypatch):
    data = str(tmp_path / "log")
    _write_log(data, 4, 800)
    trace = str(tmp_path / "trace")
    job = _job(str(tmp_path / "runs"), "fail", data, **{"scaling.max_failures": 0, "train.epochs": 3})
    t, box = _run_in_thread(job, Store(), monkeypatch, trace, fresh=True)
    pid = _wait(lambda: _worker_pid(trace, 1))
    assert pid, "training did not start"
    t0 = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    t.join(timeout=180)
    assert not t.is_alive(), "the job hung after a worker died with max_failures=0"
    assert "error" in box and time.monotonic() - t0 < 180
    # the original error: the death of the killed process, not its peer's broken collective
    err = box["error"]
    assert isinstance(err, launch.TrainingFailed), repr(err)
    assert str(err).startswith("rank 1 failed its health check") and f"pid={pid}" in str(err) and "died unexpectedly" in str(err), err


# ---------------------------------------------------------------- cases 3, 4


@pytest.fixture(scope="module")
def two_kills(ray_local, s3, s3_store, tmp_path_factory):
    """One run (S3 behind a fault proxy, a save every 12 steps, max_failures 2) whose
    rank 1 is SIGKILLed twice: before anything is committed (case 3), then while its
    restart's second save is being uploaded (case 4). Ray Train's two restarts make
    three attempts; two runs of two attempts each cost one more start (~15 s)."""
    tmp_path = tmp_path_factory.mktemp("kills")
    s3_store.ensure_bucket("s3://rel4")
    data = "s3://rel4/log"
    local = str(tmp_path / "log")
    _write_log(local, 4, 1200)
    s3_store.upload_dir(local, data)
    run_dir = "s3://rel4/runs/k4"
    trace = str(tmp_path / "trace")
    out: dict = {"data": data, "run_dir": run_dir, "trace": trace}
    with FaultyS3(s3.url) as px:
        store = Store.from_config(replace(s3.storage_config(), endpoint_url=px.url))
        job = replace(_job("s3://rel4/runs", "k4", data, **{"scaling.max_failures": 2, "train.epochs": 1, "checkpoint.every_steps": 12}),
                      storage=replace(s3.storage_config(), endpoint_url=px.url))
        px.slow_puts_s = 1.5  # the first save cannot commit before the first kill lands
        t, box = _run_in_thread(job, store, None, trace, fresh=True)
        try:
            first = _wait(lambda: (_worker_pid(trace, 0), _worker_pid(trace, 1)) if _worker_pid(trace, 0) and _worker_pid(trace, 1) else None, every=0.05)
            assert first, "training did not start"
            out["committed_before_first_kill"] = ckpt.find_latest(s3_store, run_dir)
            os.kill(first[1], signal.SIGKILL)
            px.slow_puts_s = 0.0
            out["attempt1"] = set(first)
            # the restart's first checkpoint, then its next save caught in flight
            out["first"] = first_ckpt = _wait(lambda: ckpt.find_latest(s3_store, run_dir))
            assert first_ckpt, "no first checkpoint"
            px.slow_puts_s = 1.5  # uploads crawl: the next save stays in flight for seconds

            def partial():
                for sd in s3_store.ls(run_dir):
                    name = sd.rstrip("/").rsplit("/", 1)[-1]
                    if name.startswith("step-") and not s3_store.exists(f"s3://{sd}/COMMITTED"):
                        if any(e.rstrip("/").rsplit("/", 1)[-1] != "COMMITTED" for e in s3_store.ls(f"s3://{sd}")):
                            return f"s3://{sd}"
                return None

            out["in_flight"] = in_flight = _wait(partial, every=0.1)
            assert in_flight, "never caught a save in flight"
            out["dead_attempts"] = {e.rstrip("/").rsplit("/", 1)[-1] for e in s3_store.ls(in_flight)} - {"COMMITTED"}
            second = [int(re.search(r"pid(\d+)", f).group(1)) for f in glob.glob(os.path.join(trace, "epoch0-rank1-pid*.bin"))]
            victim = [pid for pid in second if pid not in first]
            assert len(victim) == 1, (first, second)
            os.kill(victim[0], signal.SIGKILL)
        finally:
            px.slow_puts_s = 0.0
            t.join(timeout=400)  # never left running into later tests
    assert not t.is_alive() and "result" in box, box.get("error")
    out["result"] = box["result"]
    return out


def test_case03_failure_before_first_checkpoint_restarts_from_step_0(two_kills, s3_store):
    k = two_kills
    assert k["committed_before_first_kill"] is None  # nothing committed yet
    by_pid = read_trace(k["trace"], 0)
    # the second attempt started over at step 1 on both ranks
    second = {pid: recs for pid, recs in by_pid.items() if pid not in k["attempt1"] and min(s for s, _ in recs) == 1}
    assert len(second) == 2, {pid: min(s for s, _ in recs) for pid, recs in by_pid.items()}
    # every row trained exactly once: the second attempt's up to the step the third
    # resumed from, then the third's
    third = [recs for pid, recs in by_pid.items() if pid not in k["attempt1"] and pid not in second]
    resumed_at = min(s for recs in third for s, _ in recs) - 1
    rows = [p for recs in second.values() for s, p in recs if s <= resumed_at] + [p for recs in third for _, p in recs]
    assert np.array_equal(np.sort(np.concatenate(rows)), pretraining_positions(k["data"], s3_store))
    assert k["result"]["metrics"]["steps"] == max(s for recs in by_pid.values() for s, _ in recs)


def test_case04_kill_during_checkpoint_write_never_loads_the_partial(two_kills, s3_store):
    k = two_kills
    run_dir, in_flight, dead_attempts = k["run_dir"], k["in_flight"], k["dead_attempts"]
    # the partial step was never committed under the dead attempt's files, and the run's
    # committed checkpoints all verify and load
    latest = ckpt.find_latest(s3_store, run_dir)
    ckpt.verify_contents(s3_store, latest)
    model, manifest, _ = load_model(s3_store, latest.uri)
    assert manifest["epoch_done"] and manifest["epoch"] == 0
    for sd in s3_store.ls(run_dir):
        name = sd.rstrip("/").rsplit("/", 1)[-1]
        if name.startswith("step-") and int(name[5:]) < latest.step:
            assert s3_store.exists(f"s3://{sd}/COMMITTED"), f"orphan {sd} left behind"
    # the step caught in flight: committed (if kept) by a fresh attempt, the dead one's files gone
    if s3_store.exists(f"{in_flight}/COMMITTED"):
        winner = json.loads(s3_store.read_bytes(f"{in_flight}/COMMITTED"))["attempt"]
        assert winner not in dead_attempts, "the dead attempt's folder was committed"
        left = {e.rstrip("/").rsplit("/", 1)[-1] for e in s3_store.ls(in_flight)}
        assert not left & dead_attempts, f"the dead attempt's files are left in {in_flight}: {left & dead_attempts}"
    # the last restart resumed from a committed checkpoint, not from step 0: each rank's
    # first two processes started at step 1 (nothing was committed at the first kill),
    # its third after the checkpoint committed before the second kill
    starts = sorted(min(step for step, _ in recs) for recs in read_trace(k["trace"], 0).values())
    assert len(starts) == 6 and starts[:4] == [1, 1, 1, 1] and min(starts[4:]) > k["first"].step, starts


# ---------------------------------------------------------------- case 11


def test_case11_new_files_join_changed_files_refused_and_other_world_size(ray_local, tmp_path, monkeypatch):
    data = str(tmp_path / "log")
    _write_log(data, 4, 1200)
    runs = str(tmp_path / "runs")
    trace = str(tmp_path / "trace")
    os.makedirs(trace)
    first = launch.train(_job(runs, "r11", data, **{"train.max_steps": 10}), Store(), fresh=True, progress=False, trace_rows=trace)
    assert not ckpt.load_manifest(Store(), ckpt.resolve(Store(), first["checkpoint"]))["epoch_done"]
    _write_log(data, 1, 700, seed=9, start=4)  # a new file lands under the prefix
    # resume with one worker instead of two: a deterministic re-plan of the rest
    res = launch.train(_job(runs, "r11", data, **{"scaling.num_workers": 1, "checkpoint.every_steps": 0}), Store(), progress=False, trace_rows=trace)
    m = ckpt.load_manifest(Store(), ckpt.resolve(Store(), res["checkpoint"]))
    assert m["epoch_done"] and m["world_size"] == 1
    by_pid = read_trace(trace, 0)
    got = np.sort(np.concatenate([p for recs in by_pid.values() for s, p in recs if s <= 10 or min(x for x, _ in recs) > 10]))
    assert np.array_equal(got, pretraining_positions(data))
    # a job that would read the checkpoint's rows or its held-out rows differently: refused, naming the key
    for key, value, said in (("model.hash_seed", 1, "model.hash_seed was 0, now 1"), ("run.seed", 5, "run.seed was 0, now 5"),
                             ("data.valid_fraction", 0.2, "data.valid_fraction was 0.1, now 0.2")):
        with pytest.raises(ConfigError, match=rf"cannot resume .*r11 .*{re.escape(said)}.*--fresh"):
            launch.train(_job(runs, "r11", data, **{key: value}), Store(), progress=False)
    # a file the checkpoint read changes: resuming is refused, naming the file
    pq.write_table(pa.table({"user_id": pa.array([1], pa.int64()), "item_id": pa.array([2], pa.int64()), "u_segment": ["s"], "i_category": ["c"]}), os.path.join(data, "part-00.parquet"))
    with pytest.raises(DataError, match=r"cannot resume .* changed or vanished .*part-00.parquet"):
        launch.train(_job(runs, "r11", data, **{"train.epochs": 2}), Store(), progress=False)


# ---------------------------------------------------------------- case 13


def test_case13_nan_loss_stops_before_a_checkpoint(ray_local, tmp_path):
    data = str(tmp_path / "log")
    _write_log(data, 4, 1200)
    runs = str(tmp_path / "runs")
    # A learning rate that blows the weights up: step 1's loss is finite (the initial
    # weights), a later one is not. A save after every step, so the step that went
    # non-finite is the one whose checkpoint must not be written; a second run (a good
    # one, then a resume into NaN) would cost another Ray Train start, nothing more.
    with pytest.raises(NonFiniteLossError, match=r"NaN/Inf at step \d+") as e:
        launch.train(_job(runs, "nan", data, **{"train.lr": 1e30, "train.sparse_lr": 1e30, "checkpoint.every_steps": 1}), Store(), fresh=True, progress=False)
    bad = int(re.search(r"NaN/Inf at step (\d+)", str(e.value)).group(1))
    latest = ckpt.find_latest(Store(), os.path.join(runs, "nan"))
    assert bad >= 2 and latest is not None and latest.step == bad - 1, (bad, latest)
    assert f"Last committed checkpoint: {latest.uri}." in str(e.value)  # what a rerun resumes from
    model, _, _ = load_model(Store(), latest.uri)
    assert all(torch.isfinite(p).all() for p in model.parameters())


# ---------------------------------------------------------------- cases 14, 19


def test_case14_network_and_permission_errors_are_never_skipped(s3, s3_store, bucket, tmp_path):
    local = str(tmp_path / "log")
    _write_log(local, 2, 100)
    s3_store.upload_dir(local, join(bucket, "log"))
    spec = ReadSpec.for_task("pretrain", [], [1, 5])
    with FaultyS3(s3.url) as px:
        store = Store.from_config(replace(s3.storage_config(), endpoint_url=px.url, max_attempts=2))
        px.deny = {"part-01.parquet"}  # a real 403 AccessDenied over HTTP for one object
        with pytest.raises(StorageError, match="part-01.parquet"):
            plan_read(store, join(bucket, "log"), spec, on_bad_file="skip", max_bad_files=100)
        px.deny = set()
        px.down = True  # the store answers 503 to everything
        before = px.counts["requests"]
        with pytest.raises(StorageError):
            plan_read(store, join(bucket, "log"), spec, on_bad_file="skip", max_bad_files=100)
        # storage.max_attempts (2) bounds each call's attempts: one retry layer, not s3fs's
        # 5 x botocore's. s3fs's info() may make two calls, so at most 4 requests (was 15).
        assert px.counts["requests"] - before <= 4, px.counts
        # planned, then the store goes down under the read tasks: a storage error, which a
        # run restarts on (scaling.max_failures), not a data error, which ends it for good
        px.down = False
        plan = plan_read(store, join(bucket, "log"), spec)
        enc = EncodeSpec(read=spec, hash=HashSpec.build({"user": 64, "item": 64}, 0))
        px.down = True
        with pytest.raises(StorageError, match=r"part-0\d\.parquet") as e:
            list(read_units(plan.units, [f.uri for f in plan.files], enc, store, plan.columns, None, "skip", empty_columns(enc), {}))
        assert not isinstance(e.value, DataError)


def test_case19_flaky_store_same_result_and_store_down_fails_cleanly(ray_local, s3, s3_store, tmp_path):
    s3_store.ensure_bucket("s3://rel19")
    local = str(tmp_path / "log")
    _write_log(local, 3, 600)
    s3_store.upload_dir(local, "s3://rel19/log")

    def job(name, endpoint, **sets):
        # a quarter CPU per worker: two runs share the 2-CPU runtime and leave Ray Data 1
        sets = {"data.deterministic": True, "train.epochs": 1, "scaling.cpus_per_worker": 0.25, **sets}
        j = _job("s3://rel19/runs", name, "s3://rel19/log", **sets)
        return replace(j, storage=replace(s3.storage_config(), endpoint_url=endpoint))

    # The flaky run spends most of its time in retry backoff, so the clean reference run
    # and the store-down run go on beside it, each against its own endpoint.
    # A save every 3 steps: enough requests (reads, saves, commits) for the faults to land.
    with FaultyS3(s3.url, error_rate=0.10, delay_rate=0.10, reset_rate=0.02, delay_s=0.2, seed=1) as flaky_px:
        flaky_store = Store.from_config(replace(s3.storage_config(), endpoint_url=flaky_px.url))
        flaky_job = job("flaky", flaky_px.url, **{"checkpoint.every_steps": 3})
        flaky_box: dict = {}
        flaky_t = threading.Thread(target=lambda: flaky_box.update(r=_safe(lambda: launch.train(flaky_job, flaky_store, fresh=True, progress=False))))
        flaky_t.start()
        try:
            clean = launch.train(job("clean", s3.url, **{"checkpoint.every_steps": 3}), s3_store, fresh=True, progress=False)

            # the store goes down for good mid-run: a clear error, bounded time, last checkpoint intact
            with FaultyS3(s3.url) as px:
                down_store = Store.from_config(replace(s3.storage_config(), endpoint_url=px.url, max_attempts=2))
                j = job("down", px.url, **{"storage.max_attempts": 2, "train.epochs": 50})  # outlives the outage (each epoch re-reads the store)
                box: dict = {}
                t = threading.Thread(target=lambda: box.update(r=_safe(lambda: launch.train(j, down_store, fresh=True, progress=False))))
                t.start()
                assert _wait(lambda: ckpt.find_latest(s3_store, "s3://rel19/runs/down")), "no checkpoint before the outage"
                t0 = time.monotonic()
                px.down = True
                t.join(timeout=400)
                assert not t.is_alive(), "the job hung while the store was down"
                err = box["r"]
                assert isinstance(err, BaseException), "the job cannot succeed without its store"
                # the store's answer as the failing client words it: botocore (SlowDown, 503) for
                # writes and listings, the AWS C++ SDK (SERVICE_UNAVAILABLE) for a row group read
                assert re.search(r"SlowDown|503|SERVICE_UNAVAILABLE|reduce your request rate|failed", str(err)), err
                assert time.monotonic() - t0 < 400
            latest = ckpt.find_latest(s3_store, "s3://rel19/runs/down")
            ckpt.verify_contents(s3_store, latest)
            load_model(s3_store, latest.uri)
        finally:
            flaky_t.join(timeout=400)  # never left running into later tests, the test failed or not
        assert not flaky_t.is_alive(), "the flaky run hung"
        flaky = flaky_box["r"]
        assert not isinstance(flaky, BaseException), flaky
        assert flaky_px.counts["errors"] > 10 and flaky_px.counts["resets"] > 0, flaky_px.counts
    assert flaky["metrics"]["steps"] == clean["metrics"]["steps"] and flaky["metrics"]["rows"] == clean["metrics"]["rows"]
    a, _, _ = load_model(s3_store, clean["checkpoint"])
    b, _, _ = load_model(s3_store, flaky["checkpoint"])
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True)), "a flaky store changed the result"


def _safe(fn):
    try:
        return fn()
    except BaseException as e:  # noqa: BLE001
        return e
