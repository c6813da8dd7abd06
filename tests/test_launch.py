import os
import re
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import ray

from flm_dist import ingest, launch
from flm_dist.config import ConfigError, ScalingConfig
from flm_dist.data.hashing import HashSpec
from flm_dist.data.schema import DataError
from flm_dist.data.synth import synth
from flm_dist.launch import resources
from flm_dist.model import table_sizes
from flm_dist.storage import Store
from tests.conftest import tiny_job


@pytest.mark.parametrize("nodes,workers", [([2.0], 2), ([2.0], 1), ([2.0, 2.0], 2), ([4.0], 3), ([16.0] * 4, 8), ([1.0], 1)])
def test_auto_cpus_leave_ray_data_a_cpu(nodes, workers):
    cpw, threads = resources(ScalingConfig(num_workers=workers), nodes)
    assert cpw > 0 and threads >= 1
    assert sum(nodes) - cpw * workers >= min(1.0, sum(nodes) / 2)
    # spread evenly, every node with more than one CPU keeps one for Ray Data
    per_node = -(-workers // len(nodes))
    if min(nodes) > 1:
        assert min(nodes) - per_node * cpw >= 1.0 - 1e-9


def test_an_evaluation_runs_on_the_cluster_it_is_run_on_not_the_one_training_had():
    """A checkpoint trained on GPU nodes with 8 CPUs a worker, spread: its evaluation
    asked for that wherever it ran (and `evaluate` took no --set scaling.*)."""
    trained = ScalingConfig(num_workers=[4, 16], use_gpu=True, cpus_per_worker=8.0, placement_strategy="STRICT_SPREAD")
    here = launch.evaluation_scaling(trained, None, {})
    assert (here.num_workers, here.use_gpu, here.cpus_per_worker, here.placement_strategy) == ([4, 16], True, "auto", "PACK")
    on_cpus = launch.evaluation_scaling(trained, 2, {"use_gpu": False})  # `evaluate --workers 2 --set scaling.use_gpu=false`
    assert (on_cpus.num_workers, on_cpus.use_gpu) == (2, False)


def test_a_resume_names_each_changed_field_and_passes_fields_its_checkpoint_predates():
    """A checkpoint's saved config lacks the fields a later flm_dist added: those are no
    change (they refused as 'was None'); a feature's changed field is named in its list."""
    saved = {"model": {"user_rows": 64}, "data": {"features": [{"name": "seg", "rows": 8}]}, "run": {}}
    now = {"model": {"user_rows": 64, "history_len": 0}, "data": {"features": [{"name": "seg", "rows": 16, "max_len": 8}], "valid_fraction": 0.1}, "run": {"seed": 3}}
    changed = [c for key in launch.RESUME_KEYS for c in launch._changed(saved, now, key)]
    assert changed == [("data.features[0].rows", 8, 16)]
    # a path saved as typed (relative, before load_job made paths absolute) is the same path
    saved["data"]["valid"], now["data"]["valid"] = "log/valid", os.path.abspath("log/valid")
    assert [c for key in launch.RESUME_KEYS for c in launch._changed(saved, now, key)] == [("data.features[0].rows", 8, 16)]
    now["data"]["valid"] = os.path.abspath("log/other")
    assert ("data.valid", os.path.abspath("log/valid"), now["data"]["valid"]) in [c for key in launch.RESUME_KEYS for c in launch._changed(saved, now, key)]


def test_explicit_cpus_that_starve_ray_data_are_refused():
    with pytest.raises(ConfigError, match="scaling.cpus_per_worker=1.0 x 2 workers leaves 0.0"):
        resources(ScalingConfig(num_workers=2, cpus_per_worker=1.0), [2.0])
    assert resources(ScalingConfig(num_workers=2, cpus_per_worker=0.5), [2.0]) == (0.5, 1)


def test_elastic_sizes_for_the_maximum():
    cpw, _ = resources(ScalingConfig(num_workers=[1, 4]), [8.0])
    assert cpw * 4 <= 8 - 1


def test_the_controller_and_ray_data_side_import_no_torch():
    """The Ray Train controller, Ray Data's coordinators and read tasks, and the run
    channel are fresh processes on every run's start: they import these modules (to
    unpickle FLMDataConfig, the datasource, the channel) and must not pay for torch."""
    code = "import sys, flm_dist.ingest, flm_dist.data.pipeline; print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch')[:3])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == "[]", out.stdout


def test_a_jobs_api_address_in_ray_address_is_refused_by_commands_that_run_here():
    """Ray's own job CLI reads a Jobs API address from RAY_ADDRESS too (cluster/README
    has users export RAY_API_SERVER_ADDRESS instead); a `pretrain` or `demo` in a shell
    with an http:// RAY_ADDRESS handed that address to ray.init."""
    env = {**os.environ, "RAY_ADDRESS": "http://127.0.0.1:8265"}
    out = subprocess.run([sys.executable, "-c", "from flm_dist.launch import ensure_ray; ensure_ray()"], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "is a dashboard's Jobs API, which `flm-dist submit`" in out.stderr and "RAY_API_SERVER_ADDRESS" in out.stderr, out.stderr[-2000:]


def test_the_local_runtime_keeps_idle_workers_between_epochs(ray_local):
    """Each epoch's read tasks run in pooled worker processes. Ray keeps only as many
    idle workers as the node has unreserved CPUs and, by default, kills the others after
    1 s idle; a run's train workers reserve the CPUs, so every epoch's reads waited for
    a fresh Python process (toys sequence fine-tune, 2 workers: 1.7-2.1 s to an epoch's
    first batch, 0.3-0.4 s with the idle workers kept)."""
    ray = ray_local

    @ray.remote
    class Train:  # holds the node's CPUs, as a run's train workers do
        def ready(self):
            return True

    @ray.remote(num_cpus=0)
    def pid():
        return os.getpid()

    held = Train.options(num_cpus=ray.available_resources().get("CPU", 0.0)).remote()
    ray.get(held.ready.remote())
    worker = ray.get(pid.remote())
    time.sleep(3)  # Ray checks every 200 ms; its default threshold is 1 s
    alive = os.path.exists(f"/proc/{worker}")
    ray.kill(held)
    assert alive, "the idle worker that ran a task was killed within 3 s: each epoch's read tasks would start a new process"


def _retrieval_job(tmp_path, name: str, **sets):
    synth(Store(), str(tmp_path / "data"), rows=3000, users=200, items=120, seed=5, files=3, row_group_rows=500)
    return tiny_job(str(tmp_path / "runs"), name, "retrieval", **{
        "data.train": str(tmp_path / "data" / "train"), "data.eval": str(tmp_path / "data" / "eval"), "train.epochs": 2, "scaling.num_workers": 1, **sets})


def test_a_ranking_run_reads_its_catalog_once_training_is_under_way(ray_local, tmp_path, monkeypatch):
    """A ranking run validates against the catalog of its training items, a scan of its
    training data (10 s on a thousand files in S3). The driver reads it once training is
    under way and hands it to the workers on the run channel; before, a pretraining's or
    retrieval run's first batch waited for it. A rerun of the finished run trains no
    step, and its evaluation still gets the catalog: the worker's wait starts the read."""
    job = _retrieval_job(tmp_path, "catalog")
    trace = tmp_path / "trace"
    trace.mkdir()
    steps_at_scan = []
    read = launch.training_reference

    def watched(*args, **kwargs):  # the real read, noting how many steps came before it
        steps_at_scan.append(len(list(trace.glob("*.bin"))))
        return read(*args, **kwargs)

    monkeypatch.setattr(launch, "training_reference", watched)
    first = launch.train(job, Store(), fresh=True, progress=False, trace_rows=str(trace))
    assert steps_at_scan and steps_at_scan[0] > 0, "the catalog was read before the first step"
    assert all("valid_ndcg@10" in c for c in first["metrics"]["epochs_curve"])  # validated by ranking
    again = launch.train(job, Store(), progress=False)
    assert again["checkpoint"] == first["checkpoint"] and len(steps_at_scan) == 2
    assert again["metrics"]["eval"]["overall"] == first["metrics"]["eval"]["overall"]


def test_a_catalog_that_cannot_be_read_stops_the_workers_with_its_error(ray_local, tmp_path):
    """The workers wait for the catalog on the run channel; a read that fails must reach
    them as an error naming what failed, not leave them waiting."""
    job = _retrieval_job(tmp_path, "nocatalog")
    store = Store()
    hs = HashSpec.build(table_sizes(job.model, job.data.features), job.model.hash_seed)
    _, plans, specs = launch.plan_datasets(job, store, hs, job.data.train, job.data.eval, "retrieval", validate=True)
    gone = plans["train"].files[1].uri
    os.remove(gone)
    channel = ingest.RunChannel.remote()
    name = re.escape(os.path.basename(gone))
    with pytest.raises(Exception, match=name):
        launch._publish_reference(store, plans["train"], specs["known"], "retrieval", channel, threading.Event())
    with pytest.raises(DataError, match=rf"item catalog .* could not be read: .*{name}"):
        ingest.wait_for_catalog(channel)


def test_workers_the_cluster_cannot_give_fail_the_run_in_bounded_time_naming_the_request(ray_local, tmp_path, monkeypatch):
    """Two workers spread over distinct nodes, on one node: Ray Train's controller
    retried its start every RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S, without limit."""
    monkeypatch.setenv("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "2")  # the controller takes RAY_TRAIN_* from the driver
    job = _retrieval_job(tmp_path, "nowhere", **{"scaling.num_workers": 2, "scaling.placement_strategy": "STRICT_SPREAD", "scaling.start_timeout_s": 4})
    t0 = time.monotonic()
    with pytest.raises(launch.TrainingFailed, match=r"did not give the run its 2 workers of \{'CPU': .*\} each \(STRICT_SPREAD\) within scaling.start_timeout_s"):
        launch.train(job, Store(), fresh=True, progress=False)
    assert time.monotonic() - t0 < 120


def test_the_catalog_goes_to_the_workers_through_the_object_store_not_the_channel(ray_local, tmp_path):
    """The run channel (one actor) hands out a handle of a few bytes; the catalog and
    the known pairs (16 bytes a pair) are put in the object store once. Returned by the
    channel, each rank's poll copied all of it out of one process."""
    import pickle

    job = _retrieval_job(tmp_path, "catalog-ref")
    store = Store()
    hs = HashSpec.build(table_sizes(job.model, job.data.features), job.model.hash_seed)
    _, plans, specs = launch.plan_datasets(job, store, hs, job.data.train, job.data.eval, "retrieval", validate=True)
    channel = ingest.RunChannel.remote()
    ref = launch._publish_reference(store, plans["train"], specs["known"], "retrieval", channel, threading.Event())
    assert len(pickle.dumps(ray.get(channel.want_catalog.remote()))) < 1024
    got = ingest.wait_for_catalog(channel)
    assert np.array_equal(got["item"], ref.catalog["item"]) and len(got["item"]) > 10
    assert all(np.array_equal(a, b) for a, b in zip(got["seen"], launch.seen_rows(ref), strict=True))


def test_a_catalog_read_stopped_because_the_run_failed_is_not_named_as_its_cause():
    """When a run fails, launch.train stops its background reads, and names the catalog
    read's error only if that read had failed on its own. A read still going is asked
    before it is stopped: stopped, it raises too ("the reference scan was stopped"),
    which must not replace the run's own error (a NaN stop, the bad-row budget, Ctrl-C)."""
    now = threading.Event()
    now.set()

    def still_reading(stop):
        stop.wait()
        raise RuntimeError("the reference scan was stopped")

    def failed(stop):
        raise DataError("s3://bucket/part-7.parquet: not a Parquet file")

    reading, broken = launch._Later(still_reading, now), launch._Later(failed, now)
    reading.start(), broken.start()
    broken.join(5)
    assert reading.failure() is None  # running: not asked to wait, not a failure
    assert isinstance(broken.failure(), DataError)
    reading.cancel()
    with pytest.raises(RuntimeError, match="stopped"):
        reading.result()


def test_auto_cpus_for_gpu_workers_come_from_the_gpu_nodes():
    """aws-gpu.yaml's head (16 CPUs, no GPU) beside two p4d nodes (96 CPUs, 8 GPUs):
    sized over all nodes, 16 workers got 2.5 CPUs (2 torch threads) each where a p4d
    gives each of its GPUs' workers 8 (the cap)."""
    gpu = ScalingConfig(num_workers=16, use_gpu=True)
    assert resources(gpu, [16.0, 96.0, 96.0], [0.0, 8.0, 8.0]) == (8.0, 8)
    # g5.12xlarge: 48 CPUs, 4 GPUs; a smaller GPU node (8 CPUs, 4 GPUs) decides for all
    assert resources(gpu, [48.0, 8.0], [4.0, 4.0]) == (1.75, 1)
    # no GPU node up yet (an autoscaler brings them): sized from the nodes there are
    assert resources(gpu, [8.0], [0.0]) == resources(gpu, [8.0])
