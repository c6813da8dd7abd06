"""Faults injected for real (SIGKILL of a train worker, of the driver) and the
promises that must hold: restart from the latest committed checkpoint, the same final
step count as an uninterrupted run, every row of an epoch trained on exactly once."""

from __future__ import annotations

import glob
import os
import re
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from flm_dist import checkpoint as ckpt
from flm_dist import launch
from flm_dist.storage import Store
from tests.conftest import pretraining_positions, tiny_job

pytestmark = pytest.mark.slow

FILES, ROWS_PER_FILE = 8, 500


@pytest.fixture(scope="module")
def log_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("resume") / "log"
    os.makedirs(d)
    rng = np.random.default_rng(0)
    for i in range(FILES):
        n = ROWS_PER_FILE + 37 * i  # uneven files
        pq.write_table(
            pa.table(
                {
                    "user_id": pa.array(rng.integers(0, 500, n), pa.int64()),
                    "item_id": pa.array(rng.integers(0, 200, n), pa.int64()),
                    "u_segment": pa.array([f"s{x}" for x in rng.integers(0, 5, n)]),
                    "i_category": pa.array([f"c{x}" for x in rng.integers(0, 7, n)]),
                }
            ),
            str(d / f"part-{i:02d}.parquet"),
            row_group_size=500,
        )
    return str(d)


def read_trace(folder: str, epoch: int) -> dict[int, list[tuple[int, np.ndarray]]]:
    """pid -> [(step, positions)] for one epoch."""
    out: dict[int, list] = {}
    for f in glob.glob(os.path.join(folder, f"epoch{epoch}-rank*-pid*.bin")):
        pid = int(re.search(r"pid(\d+)", f).group(1))
        a = np.fromfile(f, dtype=np.int64)
        i = 0
        while i < len(a):
            step, n = int(a[i]), int(a[i + 1])
            out.setdefault(pid, []).append((step, a[i + 2 : i + 2 + n]))
            i += 2 + n
    return out


def job_for(tmp_path, log_dir, name, **sets):
    return tiny_job(
        str(tmp_path / "runs"),
        name,
        "pretrain",
        **{
            "data.pretrain": log_dir,
            "data.batch_size": 64,
            "train.epochs": 2,
            "checkpoint.every_steps": 8,
            "scaling.max_failures": 1,
            **sets,
        },
    )


def run_traced(job, trace: str, **kw):
    os.makedirs(trace, exist_ok=True)
    return launch.train(job, Store(), progress=False, trace_rows=trace, **kw)


@pytest.fixture(scope="module")
def killed(ray_local, tmp_path_factory, log_dir):
    """Epoch 0 with rank 1 SIGKILLed after a mid-epoch commit (Ray Train restarts the
    group), then the same run asked for two epochs: resumed at the epoch boundary.
    One run serves both tests: each Ray Train start costs ~15 s of the suite."""
    tmp_path = tmp_path_factory.mktemp("killed")
    trace = str(tmp_path / "trace")
    job = job_for(tmp_path, log_dir, "killed", **{"train.epochs": 1})
    run_dir = os.path.join(str(tmp_path / "runs"), "killed")
    result: dict = {}
    t = threading.Thread(target=lambda: result.update(run_traced(job, trace, fresh=True)))
    t.start()
    # wait for a committed mid-epoch checkpoint of epoch 0, then SIGKILL rank 1
    deadline = time.monotonic() + 240
    victim = None
    while time.monotonic() < deadline and victim is None:
        time.sleep(0.2)
        latest = ckpt.find_latest(Store(), run_dir) if os.path.isdir(run_dir) else None
        if latest is not None and not ckpt.load_manifest(Store(), latest)["epoch_done"]:
            files = glob.glob(os.path.join(trace, "epoch0-rank1-pid*.bin"))
            if files:
                victim = int(re.search(r"pid(\d+)", files[0]).group(1))
    if victim is not None:
        os.kill(victim, signal.SIGKILL)
    t.join(timeout=400)
    assert victim is not None, "no mid-epoch checkpoint appeared"
    assert not t.is_alive() and result, "the run did not complete after the worker was killed"
    # read now: the second run's saves prune the first run's checkpoint (keep_last)
    result["manifest"] = ckpt.load_manifest(Store(), ckpt.resolve(Store(), result["checkpoint"]))
    # saves at epoch ends only: the boundary is what this run is for
    two = run_traced(job_for(tmp_path, log_dir, "killed", **{"checkpoint.every_steps": 0}), trace)
    return result, two, trace, victim, latest.step


def test_resume_at_epoch_boundary_runs_the_next_epoch(killed, log_dir):
    one, two, trace, _, _ = killed
    assert len(set(one["metrics"]["steps_per_worker"])) == 1
    m = one["manifest"]
    assert m["epoch_done"] and m["epoch"] == 0
    # asked for 2 epochs, the run resumed at the boundary and ran epoch 1 whole, in the
    # same steps as epoch 0, which a worker's death interrupted
    assert two["metrics"]["steps"] == 2 * one["metrics"]["steps"]
    by_pid = read_trace(trace, 1)
    assert min(s for recs in by_pid.values() for s, _ in recs) == one["metrics"]["steps"] + 1
    got1 = np.sort(np.concatenate([p for recs in by_pid.values() for _, p in recs]))
    assert np.array_equal(got1, pretraining_positions(log_dir))


def test_kill_worker_mid_epoch_resumes_exactly_once(killed, log_dir):
    _, _, trace, victim, committed_at_kill = killed
    # epoch 0: rows committed by the first attempt (up to the step the second resumed
    # from) plus rows of the second attempt == every row exactly once
    by_pid = read_trace(trace, 0)
    assert len(by_pid) >= 3, "expected both ranks of the first attempt and at least one of the second"
    first_attempt = {victim} | {pid for pid, recs in by_pid.items() if pid != victim and min(s for s, _ in recs) == 1}
    second = [recs for pid, recs in by_pid.items() if pid not in first_attempt]
    resumed_at = min(s for recs in second for s, _ in recs) - 1
    # from the latest commit (an older one would still give exactly-once rows)
    assert resumed_at >= committed_at_kill >= 8 and resumed_at % 8 == 0
    rows = [p for pid in first_attempt for s, p in by_pid[pid] if s <= resumed_at]
    rows += [p for recs in second for _, p in recs]
    got = np.sort(np.concatenate(rows))
    assert np.array_equal(got, pretraining_positions(log_dir)), "epoch 0 rows lost or duplicated across the restart"


def test_kill_driver_and_rerun_resumes(ray_local, tmp_path, log_dir):
    """SIGKILL the driver (the CLI process and its children) while it trains on a running
    Ray runtime, as on a cluster: Ray ends the dead job's actors. Rerun the command: it
    resumes. (The session's runtime: starting one per test would only add its start-up.)
    The run folder and the output are relative paths, as a user types them: Ray Train's
    workers run in another folder, so the driver must hand them absolute ones."""
    cfg = tmp_path / "job.yaml"
    cfg.write_text(
        f"""
task: pretrain
run: {{name: drv, storage: runs}}
data:
  pretrain: {log_dir}
  batch_size: 64
  features: [{{name: u_segment, side: user}}, {{name: i_category, side: item}}]
model: {{user_rows: 4096, item_rows: 1024, feature_rows: 64, embedding_dim: 8, hidden: [16], latent_dim: 8, head_hidden: [8]}}
train: {{epochs: 2, log_every: 5}}
checkpoint: {{every_steps: 8}}
scaling: {{num_workers: 2}}
"""
    )
    run_dir = str(tmp_path / "runs" / "drv")
    cmd = [sys.executable, "-m", "flm_dist.cli", "pretrain", "--config", "job.yaml", "--no-progress", "--output", "out.json"]
    env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address}
    proc = subprocess.Popen(cmd, env=env, cwd=tmp_path, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    killed_after = None
    while time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)
        latest = ckpt.find_latest(Store(), run_dir) if os.path.isdir(run_dir) else None
        if latest is not None:
            killed_after = latest.step
            os.killpg(proc.pid, signal.SIGKILL)  # the driver and everything it started
            break
    proc.wait(timeout=30)
    assert killed_after is not None, "no checkpoint appeared before the driver finished"
    # Ray ends a dead driver's actors in the background: rerun once they are gone, as a
    # user rerunning after `ray job status` says the job ended (a dead job's rank 0 could
    # otherwise still commit, or prune the rerun's save in flight).
    from ray.util.state import list_actors

    ours = ray_local.get_runtime_context().get_job_id()  # this process's runs keep theirs

    def killed_job_actors() -> list:
        return [a for a in list_actors(filters=[("state", "=", "ALIVE")]) if a.job_id != ours and a.class_name in ("TrainController", "RayTrainWorker")]

    deadline = time.monotonic() + 60
    while killed_job_actors():
        assert time.monotonic() < deadline, f"the killed driver's train actors outlived it by 60 s: {killed_job_actors()}"
        time.sleep(0.2)
    out = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=400)
    assert out.returncode == 0, out.stderr[-2000:]
    resumed = re.search(rf"resumed from {re.escape(run_dir)}/step-\d+/\S+ \(step (\d+)\)", out.stdout + out.stderr)
    assert resumed and int(resumed.group(1)) >= killed_after, "not resumed from the latest commit before the kill"
    import json

    res = json.loads((tmp_path / "out.json").read_text())
    ref = ckpt.load_manifest(Store(), ckpt.resolve(Store(), res["checkpoint"]))
    assert ref["epoch"] == 1 and ref["epoch_done"] and res["checkpoint"].startswith(run_dir + "/")
    assert res["metrics"]["steps"] > killed_after
