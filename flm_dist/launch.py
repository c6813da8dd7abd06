"""Driver side: plan and validate the data, size resources, start the Ray Train
worker group, show progress, return the result. The workers run `train_loop.worker_main`.
"""

from __future__ import annotations

import logging
import os
import platform
import tempfile
import threading
import time
from dataclasses import replace
from typing import Any

import ray

from flm_dist import __version__
from flm_dist import checkpoint as ckpt
from flm_dist.config import ConfigError, JobConfig, ScalingConfig, from_dict, to_dict
from flm_dist.data.hashing import HashSpec
from flm_dist.data.pipeline import EncodeSpec, build_dataset
from flm_dist.data.plan import DataPlan, plan_read
from flm_dist.data.schema import ReadSpec
from flm_dist.model import table_sizes
from flm_dist.storage import Store, is_remote, join, split_uri
from flm_dist.train_loop import WorkerSpec, worker_main

__all__ = ["TrainingFailed", "ensure_ray", "evaluate", "resources", "train"]

log = logging.getLogger(__name__)


def ensure_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Connect to RAY_ADDRESS / `address`, else start a local Ray with this machine's CPUs."""
    if ray.is_initialized():
        return
    addr = address or os.environ.get("RAY_ADDRESS")
    kwargs: dict[str, Any] = {"log_to_driver": True, "configure_logging": False}
    if addr:
        ray.init(address=addr, **kwargs)
    else:
        # The dashboard serves the State API that Ray Train's controller monitoring uses.
        ray.init(num_cpus=num_cpus or os.cpu_count(), include_dashboard=True, **kwargs)
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False  # our own bar shows training progress


def resources(scaling: ScalingConfig, cluster_cpus: float) -> tuple[float, int]:
    """(CPUs reserved per train worker, torch threads per worker).

    Ray Data's read tasks need CPUs while train workers hold theirs: "auto" leaves at
    least one CPU (or a quarter of the cluster) to Ray Data, so the defaults cannot
    deadlock on a small machine. An explicit value that leaves nothing is refused."""
    n = scaling.max_workers
    if scaling.cpus_per_worker == "auto":
        spare = max(1.0, 0.25 * cluster_cpus)
        cpw = max(0.1, (cluster_cpus - spare) / n)
        cpw = min(cpw, 8.0) if not scaling.use_gpu else min(max(cpw, 1.0), 8.0)
        cpw = round(cpw, 2)
    else:
        cpw = float(scaling.cpus_per_worker)
        if cluster_cpus - cpw * n < 1.0:
            raise ConfigError(
                f"scaling.cpus_per_worker={cpw} x {n} workers leaves {cluster_cpus - cpw * n:.1f} of the cluster's "
                f"{cluster_cpus:.0f} CPUs for Ray Data, which needs at least 1 to feed the workers (it would hang). "
                f"Lower scaling.cpus_per_worker or use 'auto'."
            )
    return cpw, max(1, int(cpw))


class TrainingFailed(RuntimeError):
    """The worker group failed; the message is the first failing rank's own error."""


def _fit(trainer):
    """trainer.fit(), re-raising a worker's own error (DataError, CheckpointCorruptError,
    NonFiniteLossError, ...) instead of Ray's wrapper, so the CLI can print it plainly."""
    from ray.train.v2.api.exceptions import WorkerGroupError

    try:
        return trainer.fit()
    except WorkerGroupError as e:
        failures = getattr(e, "worker_failures", {}) or {}
        for rank in sorted(failures):
            exc = failures[rank]
            cause = getattr(exc, "cause", None) or exc
            if isinstance(cause, Exception) and not isinstance(cause, WorkerGroupError):
                raise cause from e
        raise TrainingFailed(str(e)) from e


def _ray_storage(store: Store, uri: str):
    if is_remote(uri):
        fs, path = store.arrow_fs(uri)
        return path, fs
    path = split_uri(uri)[1]
    os.makedirs(path, exist_ok=True)
    return path, None


@ray.remote(num_cpus=0)
class RunChannel:
    """Rank 0 pushes its latest step record (for the driver's progress bar) and the
    final result here."""

    def __init__(self):
        self.latest: dict | None = None
        self.final: dict | None = None

    def update(self, rec: dict) -> None:
        self.latest = rec

    def get(self) -> dict | None:
        return self.latest

    def set_result(self, res: dict) -> None:
        self.final = res

    def result(self) -> dict | None:
        return self.final


class _ProgressBar:
    def __init__(self, actor, total_rows: int, desc: str, enabled: bool):
        self.actor, self.total, self.desc, self.enabled = actor, total_rows, desc, enabled
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        from tqdm import tqdm

        bar = tqdm(total=self.total, desc=self.desc, unit="row", unit_scale=True, dynamic_ncols=True, disable=not self.enabled)
        shown = 0
        while not self._stop.wait(0.5):
            try:
                rec = ray.get(self.actor.get.remote(), timeout=5)
            except Exception:
                continue
            if rec:
                rows = min(int(rec["rows"]), self.total)
                bar.update(max(0, rows - shown))
                shown = max(shown, rows)
                bar.set_postfix(loss=f"{rec['loss']:.4f}", step=rec["step"], rows_s=f"{rec['rows_per_s']:,.0f}")
        bar.close()

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=2)


def _redacted(job: JobConfig) -> dict:
    d = to_dict(job)
    if d["storage"].get("secret_access_key"):
        d["storage"]["secret_access_key"] = "***"
    return d


def _parent_lineage(store: Store, init_from: str) -> dict | None:
    if not init_from:
        return None
    ref = ckpt.resolve(store, init_from)
    m = ckpt.load_manifest(store, ref)
    return {"checkpoint": ref.uri, "task": m.get("task"), "run": m.get("run"), "data": m.get("data"), "parent": m.get("parent")}


def _check_parent_hash(store: Store, init_from: str, spec: HashSpec) -> None:
    ref = ckpt.resolve(store, init_from)
    parent = ckpt.load_manifest(store, ref).get("hash_spec", {})
    mine = spec.to_dict()
    for table, t in parent.get("tables", {}).items():
        if table in mine["tables"] and mine["tables"][table] != t:
            raise ConfigError(
                f"init_from {ref.uri}: table '{table}' was pretrained with {t} but this job hashes it as "
                f"{mine['tables'][table]}; use the same model.*_rows / feature rows and model.hash_seed as the pretraining job"
            )


def _plan(store: Store, uri: str, spec: ReadSpec, job: JobConfig) -> DataPlan:
    t0 = time.perf_counter()
    plan = plan_read(store, uri, spec, on_bad_file=job.data.on_bad_file, max_bad_files=job.data.max_bad_files)
    log.info("planned %s: %d files, %d row groups, %d rows in %.1fs", uri, len(plan.files), len(plan.units), plan.total_rows, time.perf_counter() - t0)
    for uri_, reason in plan.skipped_files:
        print(f"skipped unreadable file {uri_}: {reason}", flush=True)
    return plan


def _trainer(job: JobConfig, store: Store, spec: WorkerSpec, datasets: dict, cpw: float, storage_uri: str, name: str):
    from ray.train import FailureConfig, RunConfig
    from ray.train import ScalingConfig as RayScaling
    from ray.train.torch import TorchTrainer

    nw = job.scaling.num_workers
    num_workers = tuple(nw) if isinstance(nw, list) else nw
    storage_path, storage_fs = _ray_storage(store, storage_uri)
    return TorchTrainer(
        worker_main,
        train_loop_config={"spec": spec},
        scaling_config=RayScaling(
            num_workers=num_workers,
            use_gpu=job.scaling.use_gpu,
            resources_per_worker={"CPU": cpw, **({"GPU": 1} if job.scaling.use_gpu else {})},
            placement_strategy=job.scaling.placement_strategy,
        ),
        run_config=RunConfig(
            name=name,
            storage_path=storage_path,
            storage_filesystem=storage_fs,
            failure_config=FailureConfig(max_failures=job.scaling.max_failures),
        ),
        datasets=datasets,
    )


def _worker_spec(job: JobConfig, store: Store, mode: str, hash_spec: HashSpec, threads: int, **kw) -> WorkerSpec:
    return WorkerSpec(
        mode=mode,
        task=job.task,
        model=job.model,
        features=list(job.data.features),
        train=job.train,
        checkpoint=job.checkpoint,
        store=store,
        run_dir=join(job.run.storage, job.run.name),
        hash_spec=hash_spec.to_dict(),
        seed=job.run.seed,
        batch_size=job.data.batch_size,
        shuffle_window=job.data.shuffle_window if job.data.shuffle else 1,
        prefetch_batches=job.data.prefetch_batches,
        max_bad_fraction=job.data.max_bad_fraction,
        rating_range=list(job.data.rating_range),
        shard_threshold_bytes=job.scaling.shard_threshold_bytes,
        plan_overrides=dict(job.scaling.plan),
        use_gpu=job.scaling.use_gpu,
        threads=threads,
        **kw,
    )


def _datasets(job: JobConfig, store: Store, hash_spec: HashSpec, train_uri: str | None, eval_uri: str | None, task: str):
    """Plans (validated before any worker starts) and Ray datasets for train / eval."""
    d = job.data
    split = d.split
    need_ts = split.by == "time"
    datasets, plans = {}, {}
    if train_uri:
        rs = ReadSpec.for_task(task, d.features, d.rating_range, need_ts=need_ts)
        plan = _plan(store, train_uri, rs, job)
        side = "train" if split.by != "none" and not eval_uri else "all"
        enc = EncodeSpec(read=rs, hash=hash_spec, split=split, side=side, seed=job.run.seed)
        datasets["train"] = build_dataset(plan, enc, store, shuffle=d.shuffle, seed=job.run.seed, block_rows=d.read_block_rows, on_bad_file=d.on_bad_file)
        plans["train"] = plan
    if eval_uri or (train_uri and split.by != "none"):
        rs = ReadSpec.for_task(task, d.features, d.rating_range, need_ts=need_ts and not eval_uri)
        src = eval_uri or train_uri
        plan = plans["train"] if not eval_uri else _plan(store, src, rs, job)
        side = "all" if eval_uri else "eval"
        enc = EncodeSpec(read=rs, hash=hash_spec, split=split, side=side, seed=job.run.seed)
        datasets["eval"] = build_dataset(plan, enc, store, shuffle=False, seed=job.run.seed, block_rows=d.read_block_rows, on_bad_file=d.on_bad_file)
        plans["eval"] = plan
    return datasets, plans


def train(job: JobConfig, store: Store, *, fresh: bool = False, progress: bool = True, address: str | None = None) -> dict:
    """Pretrain or fine-tune per `job`; evaluates on `data.eval` (or the split) at the
    end. Returns {"checkpoint": URI, "metrics": {...}}."""
    job.check_runnable()
    run_dir = join(job.run.storage, job.run.name)
    store.ensure_bucket(run_dir)
    if fresh:
        store.rm(run_dir)
    ensure_ray(address)
    hash_spec = HashSpec.build(table_sizes(job.model, job.data.features), job.model.hash_seed)
    if job.init_from:
        _check_parent_hash(store, job.init_from, hash_spec)
    eval_uri = job.data.eval if job.task != "pretrain" else ""
    datasets, plans = _datasets(job, store, hash_spec, job.train_data, eval_uri or None, job.task)
    if job.task == "pretrain" and "eval" in datasets:
        datasets.pop("eval"), plans.pop("eval")
    cpw, threads = resources(job.scaling, ray.cluster_resources().get("CPU", os.cpu_count() or 1))
    manifest = {
        "task": job.task,
        "run": job.run.name,
        "config": _redacted(job),
        "init_from": job.init_from,
        "parent": _parent_lineage(store, job.init_from),
        "data": plans["train"].fingerprint(),
        "data_columns": plans["train"].id_kinds,
        "versions": {"flm_dist": __version__, "torch": _torch_version(), "ray": ray.__version__, "python": platform.python_version()},
    }
    channel = RunChannel.remote()
    spec = _worker_spec(
        job,
        store,
        "train",
        hash_spec,
        threads,
        train_plan=plans["train"].to_dict(),
        eval_plan=plans["eval"].to_dict() if "eval" in plans else None,
        init_from=job.init_from,
        resume=not fresh,
        manifest=manifest,
        progress=channel,
    )
    total = plans["train"].total_rows * job.train.epochs
    print(f"{job.task}: {plans['train'].total_rows:,} rows in {len(plans['train'].files)} files x {job.train.epochs} epochs, "
          f"{job.scaling.max_workers} workers x {cpw} CPUs -> {run_dir}", flush=True)
    trainer = _trainer(job, store, spec, datasets, cpw, job.run.storage, job.run.name)
    with _ProgressBar(channel, total, job.task, progress):
        _fit(trainer)
    res = ray.get(channel.result.remote())
    tr = res.get("train", {})
    metrics = {k: v for k, v in tr.items() if k != "checkpoint"}
    if "eval" in res:
        metrics["eval"] = res["eval"]
    return {"checkpoint": tr.get("checkpoint"), "metrics": metrics}


def evaluate(checkpoint: str, store: Store, data: str | None = None, *, workers: int | None = None, progress: bool = False, address: str | None = None, overrides: dict | None = None) -> dict:
    """Evaluate a committed checkpoint on `data` (default: its job's data.eval) with
    the sharded model on Ray Train workers. Returns {"overall": {...}, "checkpoint": URI}."""
    ref = ckpt.resolve(store, checkpoint)
    manifest = ckpt.load_manifest(store, ref)
    job = from_dict(JobConfig, manifest["config"])
    job.storage = replace(job.storage, **{k: getattr(store, k) for k in ("endpoint_url", "region", "access_key_id", "secret_access_key")})
    if workers:
        job.scaling = replace(job.scaling, num_workers=workers)
    data = data or job.data.eval
    if not data and job.data.split.by == "none":
        raise ConfigError(f"{ref.uri}: no evaluation data: pass --data URI (the job had no data.eval)")
    ensure_ray(address)
    hash_spec = HashSpec.from_dict(manifest["hash_spec"])
    task = manifest["task"]
    if task == "pretrain":
        task = "retrieval"  # a pretrained backbone is evaluated on its interaction objective
    job.task = task
    datasets, plans = _datasets(job, store, hash_spec, None if data else job.data.train, data or None, task)
    cpw, threads = resources(job.scaling, ray.cluster_resources().get("CPU", os.cpu_count() or 1))
    channel = RunChannel.remote()
    spec = _worker_spec(job, store, "evaluate", hash_spec, threads, eval_plan=plans["eval"].to_dict(), evaluate_from=ref.uri, resume=False, progress=channel)
    trainer = _trainer(job, store, spec, {"eval": datasets["eval"]}, cpw, tempfile.mkdtemp(prefix="flm-eval-"), f"eval-{int(time.time())}")
    _fit(trainer)
    res = ray.get(channel.result.remote())
    return {"overall": res.get("eval", {}), "checkpoint": ref.uri, "data": data or f"{job.data.train} (split {job.data.split.by})"}


def _torch_version() -> str:
    import torch

    return torch.__version__
