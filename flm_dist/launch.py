"""Driver side: plan and validate the data, size resources, start the Ray Train
worker group, show progress, return the result. The workers run `train_loop.worker_main`.
"""

from __future__ import annotations

import logging
import math
import os
import platform
import tempfile
import threading
import time
from dataclasses import replace
from typing import Any

import numpy as np
import ray

from flm_dist import __version__
from flm_dist import checkpoint as ckpt
from flm_dist.config import ConfigError, JobConfig, ScalingConfig, absolute_path, from_dict, to_dict
from flm_dist.data.encode import EncodeSpec, training_read
from flm_dist.data.hashing import HashSpec
from flm_dist.data.pipeline import InteractionDatasource, read
from flm_dist.data.plan import DataPlan, plan_read
from flm_dist.data.reference import Reference, scan_reference
from flm_dist.data.schema import DataError, ReadSpec
from flm_dist.ingest import FLMDataConfig, NoRetryOnInputErrors, RunChannel
from flm_dist.metrics import pointwise_report, ranking_report
from flm_dist.model import table_sizes
from flm_dist.storage import StorageError, Store, is_remote, join, split_uri
from flm_dist.train_loop import DataSpec, RunSpec, RuntimeSpec, WorkerSpec, worker_main

__all__ = ["TrainingFailed", "ensure_ray", "evaluate", "plan_datasets", "resources", "train", "training_reference"]

log = logging.getLogger(__name__)


# Ray settings for the nodes flm_dist starts (`ensure_ray`) and for its image
# (Dockerfile; tests/test_cluster_configs.py keeps the two alike). Ray keeps only as many
# idle worker processes as a node has unreserved CPUs and kills the others after 1 s
# idle; a run's train workers reserve the CPUs, so every epoch's read tasks waited for a
# fresh Python process (Amazon Toys sequence fine-tune, 2 workers on 2 cores: 1.7-2.1 s
# to each epoch's first batch, 0.3-0.4 s with idle workers kept a minute).
RAY_NODE_ENV = {"RAY_idle_worker_killing_time_threshold_ms": "60000"}


def ensure_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Connect to RAY_ADDRESS / `address`, else start a local Ray with this machine's CPUs
    (and `RAY_NODE_ENV`, unless the environment sets those keys)."""
    if ray.is_initialized():
        return
    addr = address or os.environ.get("RAY_ADDRESS")
    if addr and addr.startswith(("http://", "https://")):
        raise ConfigError(
            f"Ray address {addr} (from {'--address' if address else 'RAY_ADDRESS'}) is a dashboard's Jobs API, which `flm-dist submit`, "
            f"`status`, `logs` and `stop` take; this command runs its driver here and joins a cluster at HOST:6379 or ray://HOST:10001. "
            f"Submit the job with `flm-dist submit`, or unset RAY_ADDRESS to start a local Ray (RAY_API_SERVER_ADDRESS gives those commands the Jobs API "
            f"without reaching this one)"
        )
    kwargs: dict[str, Any] = {"log_to_driver": True, "configure_logging": False}
    if addr:
        ray.init(address=addr, **kwargs)
    else:
        # The dashboard serves the State API that Ray Train's controller monitoring uses.
        # Its address is fixed up front and given to every worker, so that monitoring
        # reaches this cluster even when other local Ray instances run beside it.
        port = _free_port()
        for k, v in RAY_NODE_ENV.items():
            os.environ.setdefault(k, v)  # read by the raylet this call starts
        ray.init(
            num_cpus=num_cpus or os.cpu_count(),
            include_dashboard=True,
            dashboard_port=port,
            runtime_env={"env_vars": {"RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{port}"}},
            **kwargs,
        )
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False  # our own bar shows training progress


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def resources(scaling: ScalingConfig, node_cpus: list[float], node_gpus: list[float] | None = None) -> tuple[float, int]:
    """(CPUs reserved per train worker, torch threads per worker) for a cluster whose
    nodes have `node_cpus` CPUs (and `node_gpus` GPUs).

    The CPUs the workers do not reserve read and decode the data (each rank's read
    tasks run on its node, as many at once as its share of them: `ingest.read_slots`):
    "auto" leaves at least one CPU (or a quarter of the cluster) to them overall, and
    at least one CPU on each node when the workers are spread evenly. GPU workers run
    one per GPU on the GPU nodes alone: sized from those nodes (a CPU head or CPU
    group beside them would shrink every worker to its share of them). An explicit
    value that leaves less than one is refused."""
    n = scaling.max_workers
    gpu_nodes = [(c, g) for c, g in zip(node_cpus, node_gpus or [], strict=False) if c > 0 and g > 0]
    if scaling.use_gpu and scaling.cpus_per_worker == "auto" and gpu_nodes:
        # a node's CPUs but one, shared by its GPUs' workers; the smallest node decides
        cpw = round(min(max((c - 1.0) / g, 1.0) for c, g in gpu_nodes), 2)
        cpw = min(cpw, 8.0)
        return cpw, max(1, int(cpw))
    nodes = [c for c in node_cpus if c > 0] or [float(os.cpu_count() or 1)]
    total = sum(nodes)
    if scaling.cpus_per_worker == "auto":
        spare = max(1.0, 0.25 * total)
        cpw = (total - spare) / n
        per_node = -(-n // len(nodes))  # workers on the busiest node when spread evenly
        if min(nodes) > 1:
            cpw = min(cpw, (min(nodes) - 1.0) / per_node)
        cpw = max(0.1, cpw)
        cpw = min(cpw, 8.0) if not scaling.use_gpu else min(max(cpw, 1.0), 8.0)
        cpw = round(cpw, 2)
    else:
        cpw = float(scaling.cpus_per_worker)
        if total - cpw * n < 1.0:
            raise ConfigError(
                f"scaling.cpus_per_worker={cpw} x {n} workers leaves {total - cpw * n:.1f} of the cluster's "
                f"{total:.0f} CPUs to read the data, which needs at least 1 beside the workers' reservations. "
                f"Lower scaling.cpus_per_worker or use 'auto'."
            )
    return cpw, max(1, int(cpw))


def _node_cpus() -> list[float]:
    return [float(nd["Resources"].get("CPU", 0.0)) for nd in ray.nodes() if nd.get("Alive")]


def _node_gpus() -> list[float]:
    return [float(nd["Resources"].get("GPU", 0.0)) for nd in ray.nodes() if nd.get("Alive")]


class TrainingFailed(RuntimeError):
    """The worker group failed; the message is the first failing rank's own error."""


def _fit(trainer, channel=None):
    """trainer.fit(), re-raising the failure that started it instead of Ray's wrapper,
    so the CLI can print it plainly: a worker's own error (DataError,
    CheckpointCorruptError, NonFiniteLossError, ...) or the death of a worker process.
    When one rank dies, the others fail in their next collective ("connection closed
    by peer"): those are consequences, reported only when nothing else failed. An
    input error that ended the run before a restart (`NoRetryOnInputErrors`) comes
    from the run `channel`."""
    from ray.train.v2._internal.exceptions import (
        WorkerGroupStartupTimeoutError,
        WorkerHealthCheckFailedError,
    )
    from ray.train.v2.api.exceptions import ControllerError, WorkerGroupError

    try:
        return trainer.fit()
    except ControllerError as e:
        error, starts = ray.get(channel.input_failure.remote()) if channel is not None else (None, 0)
        if error is None and isinstance(e.controller_failure, WorkerGroupStartupTimeoutError):
            sc = trainer.scaling_config
            raise TrainingFailed(f"the cluster did not give the run its {sc.num_workers} workers of {sc.resources_per_worker} each "
                                 f"({sc.placement_strategy}) within scaling.start_timeout_s: check what its nodes have (`ray status`), "
                                 f"or raise the timeout for an autoscaler that adds nodes slowly. Ray: {e.controller_failure}") from e
        if error is None:
            raise
        # starts: counted where rank 0 decides a resume point, i.e. in training runs
        error.add_note("not retried: an input error fails every attempt the same way" + (f" ({starts} worker-group start{'s' * (starts != 1)})" if starts else ""))
        raise error from e
    except WorkerGroupError as e:
        failures = getattr(e, "worker_failures", {}) or {}
        causes = {rank: getattr(exc, "cause", None) or exc for rank, exc in failures.items()}
        for rank in sorted(causes):
            if isinstance(causes[rank], WorkerHealthCheckFailedError):
                raise TrainingFailed(f"rank {rank} failed its health check (its process died or hung): {causes[rank]}") from e

        def consequence(exc) -> bool:
            return "by peer" in str(exc) or "Connection closed" in str(exc)

        for rank in sorted(causes, key=lambda r: (consequence(causes[r]), r)):
            cause = causes[rank]
            if isinstance(cause, Exception) and not isinstance(cause, WorkerGroupError):
                raise cause from e
        raise TrainingFailed(str(e)) from e


def _start_tries(scaling: ScalingConfig) -> int:
    """Ray Train's controller retries, without limit by default, a worker group start
    that waited RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S (60 s) for its resources: a
    request the cluster can never give (GPUs on a CPU cluster, more workers than nodes
    under STRICT_SPREAD) waited forever, holding what it had. `scaling.start_timeout_s`
    bounds it, as retries of that wait beyond the first. Ray counts them over the whole
    run (restarts after failures and preemptions wait within the same budget), and an
    elastic run waits for its minimum without trying a start at all."""
    if not scaling.start_timeout_s:
        return -1
    per_try = float(os.environ.get("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", 60.0))
    return max(0, math.ceil(scaling.start_timeout_s / max(per_try, 1e-3)) - 1)


def _ray_storage(store: Store, uri: str):
    if is_remote(uri):
        fs, path = store.arrow_fs(uri)
        return path, fs
    path = split_uri(uri)[1]
    os.makedirs(path, exist_ok=True)
    return path, None


class _ProgressBar:
    def __init__(self, actor, total_rows: int, desc: str, enabled: bool):
        self.actor, self.total, self.desc, self.enabled = actor, total_rows, desc, enabled
        self._stop = threading.Event()
        # training is under way: rank 0's first step record (train.log_every), a worker
        # waiting for the catalog (`ingest.wait_for_catalog`), or the run's end
        self.first_step = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        from tqdm import tqdm

        bar = tqdm(total=self.total, desc=self.desc, unit="row", unit_scale=True, dynamic_ncols=True, disable=not self.enabled)
        shown = 0
        while not self._stop.wait(0.5):
            try:
                rec, catalog_wanted = ray.get(self.actor.poll.remote(), timeout=5)
            except Exception:
                continue
            if rec or catalog_wanted:
                self.first_step.set()
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
        self.first_step.set()
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


def start_checkpoint(store: Store, job: JobConfig) -> str:
    """The checkpoint a fine-tune starts from, resolved once (its attempt's URI; ranks
    resolving a run folder apart could each load another checkpoint of a pretraining that
    commits meanwhile): `init_from`, or with `train.continue_pretraining` its backbone's
    best pretraining epoch, which pretraining validated by the fine-tune's own criterion
    (NDCG@10 by full ranking) and kept while it went on to its last (`train_loop._patience`)."""
    ref = ckpt.resolve(store, job.init_from)
    if not job.train.continue_pretraining:
        return ref.uri
    m = ckpt.load_manifest(store, ref)
    best = m.get("best") if m.get("task") == "pretrain" else None
    if not best or best["step"] == ref.step:
        return ref.uri
    return ckpt.resolve(store, ckpt.step_dir(ref.run_dir, best["step"])).uri


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
    plan = plan_read(store, uri, spec, on_bad_file=job.data.on_bad_file, max_bad_files=job.data.max_bad_files, cache=join(job.run.storage, "_cache"))
    log.info("planned %s: %d files, %d row groups, %d rows in %.1fs", uri, len(plan.files), len(plan.units), plan.total_rows, time.perf_counter() - t0)
    for uri_, reason in plan.skipped_files:
        print(f"skipped unreadable file {uri_}: {reason}", flush=True)
    return plan


# What a checkpoint's rows and data position mean: a resume under other values would load
# rows hashed for other IDs, or train on rows it held out (and hold out rows it trained on).
# The rest (epochs, learning rates, batch size, workers) may change between runs.
RESUME_KEYS = ("task", "model", "data.features", "data.split", "data.valid", "data.valid_fraction", "data.rating_range", "run.seed")


def _check_resumable(store: Store, run_dir: str, plan: DataPlan, job: JobConfig) -> None:
    """Refuse to resume when the job now reads the checkpoint's rows or data differently
    (`RESUME_KEYS`), or when files the checkpoint read have changed or vanished; files
    added since join the resumed epoch (a deterministic re-plan: keys are file#row group)."""
    ref = ckpt.find_latest(store, run_dir)
    if ref is None:
        return
    m = ckpt.load_manifest(store, ref)
    saved_job = m.get("config") or {}
    keys = [c for key in (RESUME_KEYS if saved_job else ()) for c in _changed(saved_job, _redacted(job), key)]
    if keys:
        what = "; ".join(f"{k} was {was!r}, now {is_!r}" for k, was, is_ in keys[:3])
        raise ConfigError(f"cannot resume {run_dir} from {ref.uri}: {what}. Set them back, or rerun with --fresh or a new run.name")
    before = {f["uri"]: f for f in m.get("data_files", [])}
    now = {f.uri: f for f in plan.files}
    changed = [u for u, f in before.items() if u not in now or (now[u].size, now[u].version) != (f["size"], f["version"])]
    if changed:
        raise DataError(
            f"cannot resume {run_dir} from {ref.uri}: {len(changed)} data file(s) it read changed or vanished since "
            f"(first: {changed[0]}); rerun with --fresh or use a new run.name"
        )
    added = [u for u in now if u not in before]
    if added and not m.get("epoch_done"):
        print(f"resuming {ref.uri}: {len(added)} new data file(s) join the resumed epoch (first: {added[0]})", flush=True)


_UNSAVED = object()


def _changed(before: dict, now: dict, key: str) -> list[tuple[str, object, object]]:
    """(key, saved, now) for `key` of two job configs, down to the fields that differ. A
    field the saved config lacks (added by a later flm_dist) counts as unchanged."""
    was, is_ = before, now
    for part in key.split("."):
        was = was.get(part, _UNSAVED) if isinstance(was, dict) else _UNSAVED
        is_ = is_.get(part) if isinstance(is_, dict) else None
    return _diff(key, was, is_)


def _diff(key: str, was, is_) -> list[tuple[str, object, object]]:
    if was is _UNSAVED:
        return []
    if key == "data.valid" and isinstance(was, str):
        was = absolute_path(was)  # saved as typed before jobs' paths were made absolute
    if isinstance(was, dict) and isinstance(is_, dict):
        return [d for k in sorted(was) for d in _diff(f"{key}.{k}", was[k], is_.get(k))]
    if isinstance(was, list) and isinstance(is_, list) and len(was) == len(is_) and all(isinstance(w, dict) for w in was):
        return [d for i, (w, n) in enumerate(zip(was, is_, strict=True)) for d in _diff(f"{key}[{i}]", w, n)]
    return [(key, was, is_)] if was != is_ else []


def _trainer(job: JobConfig, store: Store, spec: WorkerSpec, sources: dict, cpw: float, storage_uri: str, name: str, channel=None):
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
            failure_config=FailureConfig(max_failures=job.scaling.max_failures, controller_failure_limit=_start_tries(job.scaling)),
            callbacks=[NoRetryOnInputErrors(channel)] if channel is not None else None,
        ),
        datasets={name: read(src) for name, (src, _) in sources.items()},
        dataset_config=FLMDataConfig(sources, store, channel, deterministic=job.data.deterministic, cpus_per_worker=cpw),
    )


def _worker_spec(job: JobConfig, store: Store, mode: str, hash_spec: HashSpec, threads: int, *, train_plan: dict | None = None, eval_plan: dict | None = None,
                 valid_rows: int = 0, catalog: dict | None = None, catalog_later: bool = False, manifest: dict | None = None, init_from: str = "", evaluate_from: str = "", resume: bool = True,
                 progress=None, print_steps: bool = False, trace_rows: str = "") -> WorkerSpec:
    d = job.data
    return WorkerSpec(
        mode=mode,
        task=job.task,
        model=job.model,
        features=list(d.features),
        train=job.train,
        checkpoint=job.checkpoint,
        data=DataSpec(
            hash_spec=hash_spec.to_dict(),
            batch_size=d.batch_size,
            shuffle_window=d.shuffle_window if d.shuffle else 1,
            prefetch_batches=d.prefetch_batches,
            max_bad_fraction=d.max_bad_fraction,
            rating_range=list(d.rating_range),
            train_plan=train_plan,
            eval_plan=eval_plan,
            valid_rows=valid_rows,
            valid_carved=not d.valid,
            valid_cache_mb=d.valid_cache_mb,
            catalog=catalog,
            catalog_later=catalog_later,
        ),
        run=RunSpec(store=store, dir=join(job.run.storage, job.run.name), seed=job.run.seed, manifest=manifest or {}, init_from=init_from, evaluate_from=evaluate_from, resume=resume),
        runtime=RuntimeSpec(
            use_gpu=job.scaling.use_gpu,
            threads=threads,
            shard_threshold_bytes=job.scaling.shard_threshold_bytes,
            plan_overrides=dict(job.scaling.plan),
            progress=progress,
            print_steps=print_steps,
            trace_rows=trace_rows,
        ),
    )


def plan_datasets(job: JobConfig, store: Store, hash_spec: HashSpec, train_uri: str | None, eval_uri: str | None, task: str, train_task: str | None = None, validate: bool = False):
    """Plans (validated before any worker starts) and datasources for train / valid /
    eval: {name: (datasource, plan dict)}, the plans, and each side's EncodeSpec (plus
    "known": the training data, validation rows included, for the evaluation
    reference). `validate`: also plan the validation set, `data.valid` or the
    `data.valid_fraction` carve of the training rows (the carve is held out of the
    training side either way). The training side is read as `train_task` trained (default
    `task`): evaluating a pretrained backbone ranks positives only, but its training
    data was every row."""
    d = job.data
    train = training_read(d, train_task or task, job.model.history_len, hash_spec, job.run.seed, eval_given=bool(eval_uri))
    split, carve = train.split, train.valid_fraction
    need_ts = split.by == "time"
    datasets, plans, specs = {}, {}, {}

    def add(name: str, uri: str, rs: ReadSpec, side: str, shuffle: bool, plan: DataPlan | None = None) -> None:
        plan = plan or _plan(store, uri, rs, job)
        rs = replace(rs, sequence=plan.sequence)
        enc = EncodeSpec(read=rs, hash=hash_spec, split=split, side=side, seed=job.run.seed, valid_fraction=carve)
        src = InteractionDatasource(plan, enc, store, shuffle, job.run.seed, d.read_block_rows, d.on_bad_file)
        datasets[name], plans[name], specs[name] = (src, plan.to_dict()), plan, enc

    if train_uri:
        rs = train.read
        add("train", train_uri, rs, "train", d.shuffle)
        specs["known"] = replace(specs["train"], side="known")
        # a ranking validation excludes each user's known items, found by the user's key
        # (`seen_rows`)
        vrs = replace(rs, keys=True) if task in ("retrieval", "pretrain") else rs
        if validate and d.valid:
            add("valid", d.valid, vrs, "all", False)
        elif carve and validate:
            add("valid", train_uri, vrs, "valid", False, plans["train"])
    if eval_uri or (train_uri and split.by != "none"):
        rs = ReadSpec.for_task(task, d.features, d.rating_range, need_ts=need_ts and not eval_uri, evaluate=True, history_len=job.model.history_len)
        add("eval", eval_uri or train_uri, rs, "all" if eval_uri else "eval", False)
    return datasets, plans, specs


def training_reference(store: Store, plan: DataPlan, train_spec: EncodeSpec, task: str, stop: threading.Event | None = None) -> Reference:
    """The training data's users, item popularity and, for ranking, catalog and pairs:
    read exactly as training reads it (`train_spec`, side "known": the same split and
    bad-row rules, validation rows included), so eval rows of a `data.split` never
    count as training data."""
    ranking = task in ("retrieval", "pretrain")
    t0 = time.perf_counter()
    spec = replace(train_spec, read=replace(train_spec.read, keys=True))
    ref = scan_reference(store, plan, spec, catalog=ranking, pairs=ranking, stop=stop)
    log.info("reference data %s: %d users, %d items in %.1fs", plan.uri, len(ref.users), len(ref.items), time.perf_counter() - t0)
    return ref


def _publish_reference(store: Store, plan: DataPlan, known: EncodeSpec, task: str, channel, stop: threading.Event) -> Reference:
    """`training_reference`, and with a run `channel` its catalog (or the error that
    stopped the read) published there for the workers (`ingest.wait_for_catalog`)."""
    try:
        ref = training_reference(store, plan, known, task, stop)
        # validation excludes each user's other known items (a history holds only its last ones)
        published = {**ref.catalog, "seen": seen_rows(ref)} if ref.catalog and ref.pair_users is not None else ref.catalog
    except BaseException as e:
        if channel is not None:
            ray.get(channel.set_catalog.remote(None, f"{type(e).__name__}: {e}"))
        raise
    if channel is not None:
        # Put once in the object store; the channel hands out the handle. Through the
        # channel itself, every rank's every poll copied the catalog and its known pairs
        # (16 bytes a pair: gigabytes at 10^9 rows) out of one actor; from the object
        # store each node reads it once, zero-copy. The driver owns it for the run.
        ray.get(channel.set_catalog.remote([ray.put(published)] if published is not None else None))
    return ref


def seen_rows(ref: Reference) -> tuple[np.ndarray, np.ndarray]:
    """The known pairs (trained on or held out for validation) as (user keys, sorted;
    their item rows), which a ranking validation excludes but for the row's own
    (`evaluation._excluded`)."""
    at = np.searchsorted(ref.catalog["item_key"], ref.pair_items)  # every pair's item is in the catalog
    return ref.pair_users, np.asarray(ref.catalog["item"], np.int64)[at]


def _reference_reader(store: Store, job: JobConfig, plans: dict, specs: dict, channel, first_step: threading.Event) -> _Later:
    """The training run's evaluation reference, read in its own thread once training is
    under way; a fine-tune from a backbone ranks the backbone before its first step, so
    its catalog is read at once, beside the worker group's start."""
    after = first_step
    if channel is not None and job.init_from and "valid" in plans:
        after = threading.Event()
        after.set()
    return _Later(lambda stop: _publish_reference(store, plans["train"], specs["known"], job.task, channel, stop), after)


def _collisions(store: Store, plan: DataPlan, job: JobConfig, stop: threading.Event | None = None) -> list[str]:
    """Tables whose size makes many IDs share rows (see data.inspect.collision_warnings).
    The ID counts are cached under `run.storage/_cache/`, keyed by the data's
    fingerprint (every file's URI, size and version): a run over data another run
    counted (a fine-tune after its pretraining, a resume, a sweep) reads no rows."""
    from flm_dist.data.inspect import collision_warnings, id_counts

    tables = {"item": ("item_id", job.model.item_rows, "model.item_rows")}
    if job.model.user_id:  # without it, the user table is not part of the model
        tables["user"] = ("user_id", job.model.user_rows, "model.user_rows")
    for f in job.data.features:
        if f.kind == "categorical":
            key = f"data.features[{f.name}].rows" if f.rows else "model.feature_rows"
            tables[f.name] = (f.name, f.rows or job.model.feature_rows, key)
    columns = sorted({c for c, _, _ in tables.values()})
    cache = join(job.run.storage, "_cache", f"ids-{plan.fingerprint()['sha256'][:32]}.json")
    try:
        counts = store.read_json(cache)
        if not set(columns) <= set(counts["columns"]):
            counts = None
    except Exception:  # absent or unreadable: count again and rewrite it
        counts = None
    if counts is None:
        counts = id_counts(store, plan, columns, stop=stop)
        try:
            store.write_json(cache, counts)
        except Exception as e:  # the warnings stand without it; the next run counts again
            log.warning("could not cache the ID counts at %s: %s", cache, e)
    return collision_warnings(counts, tables)


def _warn_collisions(store: Store, plan: DataPlan, job: JobConfig, stop: threading.Event | None = None) -> None:
    try:
        warnings = _collisions(store, plan, job, stop)
    except Exception as e:  # a check: it says it failed and does not stop the run
        warnings = [f"the hash-collision check of {plan.uri} failed ({type(e).__name__}: {e}); the run goes on"]
    for w in warnings:
        print(f"warning: {w}", flush=True)


class _Later(threading.Thread):
    """`fn(stop)` in a thread once `after` is set (rank 0's first step record, every
    `train.log_every` steps; or the run's end): work the first batch need not wait
    for, such as the hash-collision check and a ctr / rating run's evaluation
    reference, seconds each on a thousand files. Run beside the worker group's start on
    a node with few cores, it slowed that start by about what it saved. `result()`
    joins and returns its value or raises its error."""

    def __init__(self, fn, after: threading.Event):
        super().__init__(name="flm-later", daemon=True)
        self._fn, self._after = fn, after
        self._halt = threading.Event()  # fn's scans drop their remaining units when set
        self._value, self._error = None, None

    def cancel(self) -> None:
        """The run failed: skip the work, or stop it where it is (its scan's queued
        units would otherwise hold the process at exit until all were read)."""
        self._halt.set()
        self._after.set()

    def run(self) -> None:
        self._after.wait()
        if self._halt.is_set():
            return
        try:
            self._value = self._fn(self._halt)
        except BaseException as e:
            self._error = e

    def result(self):
        self.join()
        if self._error is not None:
            raise self._error
        return self._value

    def failure(self) -> BaseException | None:
        """The error `fn` raised, if it has ended; None while it runs (no waiting)."""
        return None if self.is_alive() else self._error


def _eval_report(task: str, raw: dict, ref: Reference) -> dict:
    """Exact metrics on the gathered outputs of every worker, overall and per slice."""
    if task in ("ctr", "rating"):
        report = pointwise_report(task, raw["pred"], raw["target"], raw["user_key"], raw["item_key"], ref)
    else:
        vec, cat = raw["user_vec"], raw["catalog_vec"]
        report = ranking_report(lambda lo, hi: vec[lo:hi] @ cat.T, len(vec), raw["user_key"], raw["item_key"], ref.catalog["item_key"], ref)
    if raw.get("bad_rows"):
        report["bad_rows"] = raw["bad_rows"]
    return report


def train(job: JobConfig, store: Store, *, fresh: bool = False, progress: bool = True, address: str | None = None, log_steps: bool = False, trace_rows: str = "") -> dict:
    """Pretrain or fine-tune per `job`; evaluates on `data.eval` (or the split) at the
    end. Returns {"checkpoint": URI, "metrics": {...}}; with validation, a fine-tune's
    checkpoint is the best epoch's, a pretraining's its last (`train_loop._patience`).
    `progress`: a progress bar; `log_steps`: rank 0's step records in the log (cluster
    jobs). `trace_rows`: a folder where each rank records the rows of every step
    (tests' audit trail)."""
    job.check_runnable()
    run_dir = join(job.run.storage, job.run.name)
    store.ensure_bucket(run_dir)
    if fresh:
        store.rm(run_dir)
    ensure_ray(address)
    hash_spec = HashSpec.build(table_sizes(job.model, job.data.features), job.model.hash_seed)
    if job.init_from:
        start = start_checkpoint(store, job)
        if job.train.continue_pretraining and start != ckpt.resolve(store, job.init_from).uri:
            print(f"{job.task}: starting from the pretraining's best epoch by its validation, {start}", flush=True)
        job = replace(job, init_from=start)
        _check_parent_hash(store, job.init_from, hash_spec)
    eval_uri = job.data.eval if job.task != "pretrain" else ""
    datasets, plans, specs = plan_datasets(job, store, hash_spec, job.train_data, eval_uri or None, job.task, validate=True)
    if job.task == "pretrain" and "eval" in datasets:
        datasets.pop("eval"), plans.pop("eval")
    # The evaluation reference (users, popularity; for ranking runs the catalog, which
    # their workers need to validate) is read once training is under way: on a thousand
    # files that read takes about as long as the worker group's start.
    ranking = job.task in ("retrieval", "pretrain")
    with_reference = "eval" in plans or ("valid" in plans and ranking)
    cpw, threads = resources(job.scaling, _node_cpus(), _node_gpus())
    manifest = {
        "task": job.task,
        "run": job.run.name,
        "config": _redacted(job),
        "init_from": job.init_from,
        "parent": _parent_lineage(store, job.init_from),
        "data": plans["train"].fingerprint(),
        "data_files": [{"uri": f.uri, "size": f.size, "version": f.version, "rows": f.rows} for f in plans["train"].files],
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
        valid_rows=(plans["valid"].total_rows if job.data.valid else round(plans["train"].total_rows * job.data.valid_fraction)) if "valid" in plans else 0,
        catalog_later=with_reference and ranking,
        init_from=job.init_from,
        # --fresh deleted the run folder above; a Ray Train restart of this run must
        # still resume from what this run committed.
        resume=True,
        manifest=manifest,
        progress=channel,
        print_steps=log_steps,
        trace_rows=trace_rows,
    )
    total = plans["train"].total_rows * job.train.epochs
    print(f"{job.task}: {plans['train'].total_rows:,} rows in {len(plans['train'].files)} files x {job.train.epochs} epochs, "
          f"{job.scaling.max_workers} workers x {cpw} CPUs -> {run_dir}", flush=True)
    if not fresh:
        _check_resumable(store, run_dir, plans["train"], job)
    trainer = _trainer(job, store, spec, datasets, cpw, job.run.storage, job.run.name, channel)
    with _ProgressBar(channel, total, job.task, progress) as bar:
        reference = _reference_reader(store, job, plans, specs, channel if ranking else None, bar.first_step) if with_reference else None
        later = [_Later(lambda stop: _warn_collisions(store, plans["train"], job, stop), bar.first_step), *([reference] if reference else [])]
        for t in later:
            t.start()
        try:
            _fit(trainer, channel)
        except BaseException as e:
            # Asked before the scans are stopped: a scan stopped by this failure is not its cause.
            catalog_error = reference.failure() if ranking and reference is not None else None
            for t in later:
                t.cancel()
            if catalog_error is not None:
                raise catalog_error from e  # the workers stopped on the catalog's error: name it
            raise
    later[0].result()
    res = ray.get(channel.result.remote())
    tr = res.get("train", {})
    metrics = {k: v for k, v in tr.items() if k != "checkpoint"}
    if "eval" in res:
        try:
            ref = reference.result()
        except (DataError, StorageError) as e:  # read after the first step: the run's work is committed
            raise type(e)(f"training committed {tr.get('checkpoint')}, but its evaluation reference could not be read "
                          f"({e}); evaluate it with `flm-dist evaluate {tr.get('checkpoint')}`") from e
        metrics["eval"] = _eval_report(job.task, res["eval"], ref)
    elif reference is not None:
        reference.cancel()  # a pretraining's catalog: its validation is over, nothing else reads it
    return {"checkpoint": tr.get("checkpoint"), "metrics": metrics}


def evaluate(checkpoint: str, store: Store, data: str | None = None, *, reference: str | None = None, workers: int | None = None, address: str | None = None,
             scaling: dict | None = None) -> dict:
    """Evaluate a committed checkpoint on `data` (default: its job's data.eval, or the
    job's split) with the sharded model on Ray Train workers. Slices (cold users/items,
    long tail, warm) are defined by `reference`, default the checkpoint's own training
    data. Returns {"overall": {...}, "slices": {...}, "checkpoint": URI, ...}; a run
    folder stands for the run's result (`checkpoint.resolve_result`)."""
    ref = ckpt.resolve_result(store, checkpoint)
    manifest = ckpt.load_manifest(store, ref)
    job = from_dict(JobConfig, manifest["config"])
    job.storage = replace(job.storage, **{k: getattr(store, k) for k in ("endpoint_url", "region", "access_key_id", "secret_access_key")})
    job.scaling = evaluation_scaling(job.scaling, workers, scaling or {})
    ensure_ray(address)
    data = data or (job.data.eval if manifest["task"] != "pretrain" else "")
    if not data and job.data.split.by == "none":
        raise ConfigError(f"{ref.uri}: no evaluation data: pass --data URI (the job had no data.eval)")
    train_uri = reference or (manifest.get("data") or {}).get("uri") or job.train_data
    hash_spec = HashSpec.from_dict(manifest["hash_spec"])
    # a pretrained backbone is evaluated on its interaction objective: full ranking
    task = "retrieval" if manifest["task"] == "pretrain" else manifest["task"]
    job.task = task
    datasets, plans, specs = plan_datasets(job, store, hash_spec, train_uri, data or None, task, train_task=manifest["task"])
    reference_data = training_reference(store, plans["train"], specs["known"], task)
    cpw, threads = resources(job.scaling, _node_cpus(), _node_gpus())
    channel = RunChannel.remote()
    spec = _worker_spec(
        job,
        store,
        "evaluate",
        hash_spec,
        threads,
        eval_plan=plans["eval"].to_dict(),
        evaluate_from=ref.uri,
        resume=False,
        progress=channel,
        catalog=reference_data.catalog,
    )
    with tempfile.TemporaryDirectory(prefix="flm-eval-") as ray_storage:  # Ray Train's own run state
        _fit(_trainer(job, store, spec, {"eval": datasets["eval"]}, cpw, ray_storage, f"eval-{int(time.time())}", channel), channel)
    res = ray.get(channel.result.remote())
    report = _eval_report(task, res["eval"], reference_data)
    report.update({"checkpoint": ref.uri, "task": task, "data": data or f"{train_uri} (split {job.data.split.by})", "reference": train_uri})
    return report


def evaluation_scaling(trained: ScalingConfig, workers: int | None, overrides: dict) -> ScalingConfig:
    """Where an evaluation runs: the training's workers (or `--workers`) and GPUs, with
    CPUs per worker sized to this cluster and packed (the training's own CPU count and
    placement were for its nodes); any scaling key --set names overrides (`--set
    scaling.use_gpu=false` evaluates a GPU-trained checkpoint on CPUs)."""
    s = replace(trained, cpus_per_worker="auto", placement_strategy="PACK", **({"num_workers": workers} if workers else {}))
    return replace(s, **overrides)


def _torch_version() -> str:
    import torch

    return torch.__version__
