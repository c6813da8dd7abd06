"""The train loop: one function (`train`), run by every Ray Train worker, for
pretraining and fine-tuning; they differ in objective, data and initialisation only.

Each step starts with one small all-reduce (`agree`) that carries, for all ranks, the
rows each will train on, the bad-row counts, and the previous step's loss and
non-finite flag. From it every rank takes the same decisions at the same step: end
the epoch (when no rank has rows left; a rank that ran dry joins with an empty batch,
so uneven shards never hang DDP), fail on a bad-row budget or a NaN/Inf loss or
gradient (before a checkpoint could hold it), and save a checkpoint.

Fine-tuning from a pretrained backbone follows the recipe measured in docs/RESULTS.md:
the new head trains alone for about an epoch first (`train.head_warmup_steps`), the
validation criterion is measured after every epoch on rows held out of the training
data (the task loss; for retrieval NDCG@10 by full ranking, which on real data went on
rising for epochs after the sampled softmax loss turned), the best epoch's checkpoint
is kept and is the result, and training stops once the criterion has not improved for
`train.patience` epochs. A retrieval fine-tune has no new head, so the pretrained model
it starts from is validated too (epoch -1) and is the result when no epoch beats it.
Its first epoch, the switch from pretraining's objective, often falls below that start
before later ones pass it, so it is not counted against the patience (on Toys, run R
stopped on its start after two epochs where other runs climbed on for eight).
Pretraining validates too, but runs every epoch (`_patience`).
"""

from __future__ import annotations

import logging
import math
import os
import queue
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from flm_dist import checkpoint as ckpt
from flm_dist.batch import Batch
from flm_dist.config import CheckpointConfig, ConfigError, FeatureConfig, ModelConfig, TrainConfig
from flm_dist.data.batches import BatchStream, empty_batch
from flm_dist.data.budget import BadRows
from flm_dist.data.hashing import HashSpec
from flm_dist.data.plan import DataPlan
from flm_dist.data.position import ConsumedRows
from flm_dist.data.schema import BAD_REASONS, DataError
from flm_dist.evaluation import (
    catalog_matrix,
    catalog_vectors,
    eval_outputs,
    gather_outputs,
    validation_loss,
    validation_ranking,
)
from flm_dist.ingest import wait_for_catalog
from flm_dist.model import FLM
from flm_dist.objectives import (
    NegativeSampler,
    PopularityEstimator,
    compute_loss,
    forward_flags,
    used_modules,
)
from flm_dist.optim import build_optimizers, optimizer_state
from flm_dist.sharding import describe_plan, global_view, parallelize, plan_tables, unwrap
from flm_dist.storage import Store, join

__all__ = ["DataSpec", "NonFiniteLossError", "Progress", "RunSpec", "RuntimeSpec", "Worker", "WorkerSpec", "train", "worker_main"]

log = logging.getLogger(__name__)

HEAD_WARMUP_MAX_STEPS = 1000  # train.head_warmup_steps = -1: about one epoch, at most this


class NonFiniteLossError(FloatingPointError):
    """The loss or the gradients became NaN/Inf; training stopped before writing another checkpoint."""


@dataclass
class DataSpec:
    """The worker's data side: how its shards become batches, and the bad-row budget."""

    hash_spec: dict  # HashSpec.to_dict(): raw IDs -> table rows, as the driver planned them
    batch_size: int
    shuffle_window: int
    prefetch_batches: int
    max_bad_fraction: float
    rating_range: list[float]
    train_plan: dict | None = None  # DataPlan.to_dict() of the training data
    eval_plan: dict | None = None
    valid_rows: int = 0  # rows of the validation data (0: no validation)
    valid_carved: bool = True  # those rows are carved out of train_plan's (else data.valid's own)
    valid_cache_mb: int = 256  # data.valid_cache_mb
    catalog: dict | None = None  # retrieval evaluation: the item catalog (rows, features)
    # or, with catalog_later, the one the driver publishes on the run channel (`catalog_of`)
    catalog_later: bool = False

    def stream(self, shard, features, seed: int | None = None) -> BatchStream:
        """Batches of a Ray Data shard; `seed` shuffles them (training), None keeps the order."""
        window = self.shuffle_window if seed is not None else 1
        return BatchStream(shard, self.batch_size, tuple(features), window, seed or 0, self.prefetch_batches)


@dataclass
class RunSpec:
    """Where the run lives and what it starts from."""

    store: Store
    dir: str  # the run folder: checkpoints, TensorBoard
    seed: int
    manifest: dict = field(default_factory=dict)  # config, lineage, data fingerprint
    init_from: str = ""  # a committed checkpoint URI (backbone for fine-tuning)
    evaluate_from: str = ""  # mode=evaluate: the checkpoint to evaluate
    resume: bool = True


@dataclass
class RuntimeSpec:
    """How the worker process runs and reports."""

    use_gpu: bool = False
    threads: int = 1
    shard_threshold_bytes: int = 0  # tables above this are row-wise sharded
    plan_overrides: dict[str, str] = field(default_factory=dict)
    progress: Any = None  # an ingest.RunChannel handle, or None
    print_steps: bool = False  # rank 0 prints its step records (job logs without a progress bar)
    trace_rows: str = ""  # folder for the per-step row audit trail (tests), "" = off


@dataclass
class WorkerSpec:
    """What a worker needs, as the components' own configs; assembled by the driver (launch.py)."""

    mode: str  # "train" | "evaluate"
    task: str
    model: ModelConfig
    features: list[FeatureConfig]
    train: TrainConfig
    checkpoint: CheckpointConfig
    data: DataSpec
    run: RunSpec
    runtime: RuntimeSpec


@dataclass
class Progress:
    """Where a run stands; restored from a checkpoint's manifest."""

    step: int = 0
    epoch: int = 0
    epoch_done: bool = False
    data_state: dict | None = None
    checkpoint: str | None = None  # the last committed checkpoint
    best: dict | None = None  # {"step", "epoch", "valid_loss"} of the best epoch so far
    stale: int = 0  # epochs since the best one
    curve: list = field(default_factory=list)  # per epoch: {"step", "epoch", "loss", "valid_loss"}

    @classmethod
    def resumed(cls, manifest: dict, uri: str) -> Progress:
        return cls(
            step=manifest["step"],
            epoch=manifest["epoch"],
            epoch_done=manifest.get("epoch_done", False),
            data_state=manifest.get("data_state"),
            checkpoint=uri,
            best=manifest.get("best"),
            stale=manifest.get("stale", 0),
            curve=manifest.get("curve", []),
        )


# ------------------------------------------------------------------ helpers


def catalog_of(s: WorkerSpec) -> dict | None:
    """The item catalog a ranking run ranks against: the spec's, or the one the driver
    publishes on the run channel (`catalog_later`), waited for at its first use. The
    driver reads it from the training data (seconds on a thousand files) only once
    training is under way, so that the first batch does not wait for it."""
    if s.data.catalog is None and s.data.catalog_later:
        s.data.catalog = wait_for_catalog(s.runtime.progress)
    return s.data.catalog


def _state(model, dense_opt, sparse_opt, popularity: dict | None = None, negatives: dict | None = None) -> dict:
    """The DCP state: sharded tables and their Adagrad state as DTensor row blocks, the
    log-Q popularity estimate and the uniform negatives' catalog (pretrain, retrieval)."""
    m = unwrap(model)
    state = {
        "model": {k: global_view(m, k, v) for k, v in m.state_dict().items()},
        "dense_optim": optimizer_state(m, dense_opt),
        "sparse_optim": optimizer_state(m, sparse_opt, wrap=lambda n, v: global_view(m, n, v)),
    }
    if popularity is not None:
        state["popularity"] = popularity
    if negatives is not None:
        state["negatives"] = negatives
    return state


def _saved_popularity(w: Worker, saved: set[str]) -> dict | None:
    """A placeholder for the item counts behind the logQ correction, to load into, when
    this run keeps them and the checkpoint (`saved`: its keys) has them; else None and
    they start afresh (a checkpoint from before they were saved, or a pointwise task's)."""
    if w.popularity is None or not {"popularity.counts", "popularity.total"} <= saved:
        return None
    return w.popularity.state()


def _load_run_state(w: Worker, ref: ckpt.CheckpointRef) -> None:
    """Collective: everything a resumed run goes on from, as `ref` saved it."""
    saved = ckpt.saved_keys(w.store, ref)
    pop, neg = _saved_popularity(w, saved), _saved_negatives(w, saved)
    ckpt.load_state(w.store, ref, _state(w.model, w.dense_opt, w.sparse_opt, pop, neg))
    if pop is not None:
        w.popularity.load(pop)
    if neg is not None:
        w.negatives.load(neg)


def _saved_negatives(w: Worker, saved: set[str]) -> dict | None:
    """A placeholder for the uniform negatives' catalog, when this run draws them and the
    checkpoint has it (one saved before it did: the catalog builds up again)."""
    if w.negatives is None or "negatives.seen" not in saved:
        return None
    return {"seen": torch.zeros_like(w.negatives.seen, dtype=torch.uint8, device="cpu"), "features": {n: torch.zeros_like(t, device="cpu") for n, t in w.negatives.cache.items()}}


def _all_finite(tensors) -> bool:
    """True when every tensor (dense, sparse COO or DTensor) holds only finite values;
    one host sync per device."""
    checks = []
    for t in tensors:
        if t is None or not torch.is_tensor(t) or not t.is_floating_point():
            continue
        if hasattr(t, "to_local"):
            t = t.to_local()
        checks.append(torch.isfinite(t._values() if t.is_sparse else t).all())
    by_device: dict = {}
    for c in checks:  # optimiser step counters live on the host beside device tensors
        by_device.setdefault(c.device, []).append(c)
    return all(bool(torch.stack(cs).all()) for cs in by_device.values())


def _tensors(tree):
    if isinstance(tree, dict):
        for v in tree.values():
            yield from _tensors(v)
    elif torch.is_tensor(tree):
        yield tree


def _prime_optimizers(model, dense_opt, sparse_opt) -> None:
    """Allocate optimiser state up front so DCP can load into it in place."""
    if dense_opt is not None:
        for group in dense_opt.param_groups:
            for p in group["params"]:
                st = dense_opt.state[p]
                if not st:
                    st["step"] = torch.tensor(0.0)
                    st["exp_avg"] = torch.zeros_like(p)
                    st["exp_avg_sq"] = torch.zeros_like(p)
    if sparse_opt is not None:
        for group in sparse_opt.param_groups:
            for p in group["params"]:
                if "sum" not in sparse_opt.state[p] and not group["sgd"]:
                    sparse_opt.state[p]["sum"] = torch.zeros(p.shape[0], device=p.device)


def _load_backbone(w: Worker, ref: ckpt.CheckpointRef) -> tuple[int, int]:
    """Collective: a fine-tune's start from a pretraining checkpoint: the backbone's
    tensors; for retrieval, which goes on with pretraining's contrastive objective, also
    the item counts, and with `train.continue_pretraining` their optimiser state, where
    the checkpoint has them.

    From a fresh state a parameter's first steps move it by about the learning rate
    whatever its gradient's size (Adagrad: `sparse_lr` per coordinate of a row): what a
    fine-tune needs to move off a backbone trained on another view (the FLM ID model's
    corrupted one), and what a continued pretraining does not want. A new task (ctr,
    rating) always starts afresh: the rows must learn what pretraining did not see, and
    pretraining's accumulators would hold them still (MovieLens rating with all labels:
    RMSE 0.909 in the one run that carried the state, 0.894-0.904 in every run
    without)."""
    full = _state(w.model, w.dense_opt, w.sparse_opt)
    keys = set(unwrap(w.model).backbone_keys())
    saved = ckpt.saved_keys(w.store, ref) if w.spec.task == "retrieval" else set()
    state = {"model": {k: v for k, v in full["model"].items() if k in keys}}
    carry = saved if w.spec.train.continue_pretraining else set()
    for opt in ("dense_optim", "sparse_optim"):
        state[opt] = {n: st for n, st in full[opt].items() if n in keys and st and all(f"{opt}.{n}.{k}" in carry for k in st)}
    pop = _saved_popularity(w, saved)
    if pop is not None:
        state["popularity"] = pop
    ckpt.load_state(w.store, ref, state)
    if pop is not None:
        w.popularity.load(pop)
    return len(state["model"]), len(state["dense_optim"]) + len(state["sparse_optim"])


def agree(group, rows: int, bad: np.ndarray, loss_sum: float, nonfinite: bool) -> tuple[int, np.ndarray, float, bool]:
    """One all-reduce per step: global rows, bad counts, last loss, any non-finite."""
    t = torch.tensor([float(rows), float(nonfinite), loss_sum, *bad.astype(np.float64)], dtype=torch.float64)
    if dist.is_initialized():
        dist.all_reduce(t, group=group)
    return int(t[0]), t[3:].numpy().astype(np.int64), float(t[2]), bool(t[1] > 0)


class Fetcher:
    """Pulls the next batch and the bad-row counts that came before it.

    A background thread stays `ahead` batches in front of the train loop: batch
    assembly (numpy concatenation, the shuffle window) overlaps the model step, and on
    GPU runs the batch is pinned there so the host-to-device copy is asynchronous."""

    def __init__(self, stream: BatchStream, epoch: int, pin: bool = False, ahead: int = 2):
        self.stream, self.epoch = stream, epoch
        self._it = stream.epoch(epoch)
        self._pin = pin
        self._q: queue.Queue = queue.Queue(maxsize=ahead)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="flm-fetch", daemon=True)
        self._thread.start()
        self.done = False

    def _run(self) -> None:
        try:
            for batch, counts, dropped in self._it:
                if batch is not None and self._pin:
                    batch = batch.pin_memory()
                self._q.put((batch, counts, dropped, None))
                if self._stop.is_set():
                    return
        except BaseException as e:  # noqa: BLE001 - re-raised in the train loop's thread
            self._q.put((None, None, None, e))
            return
        finally:
            # Closing the generator ends the epoch's Ray Data execution now, not at GC.
            self._it.close()
        self._q.put((None, None, None, StopIteration()))

    def close(self) -> None:
        """Stop reading (e.g. at train.max_steps, mid-epoch): unblock the thread, let
        it close the stream, and wait for it."""
        self._stop.set()
        while self._thread.is_alive():
            try:
                self._q.get(timeout=0.1)
            except queue.Empty:
                pass
        self.done = True

    def next(self) -> tuple[Batch | None, np.ndarray, np.ndarray]:
        """(the next batch or None at the epoch's end, the bad rows' counts since the
        last call, their positions)."""
        counts, dropped = np.zeros(len(BAD_REASONS), dtype=np.int64), []
        while not self.done:
            batch, c, d, err = self._q.get()
            if isinstance(err, StopIteration):
                self.done = True
                break
            if err is not None:
                raise err
            counts += c
            dropped.append(d)
            if batch is not None:
                break
        else:
            batch = None
        return batch, counts, np.concatenate(dropped) if dropped else np.zeros(0, np.int64)


def agreed_batches(stream: BatchStream, epoch: int, group, device, budget: BadRows | None = None):
    """This rank's batches of one pass (or None once it ran dry), for as many steps as
    the rank with the most rows needs: the eval and validation passes."""
    fetch = Fetcher(stream, epoch, pin=device.type == "cuda")
    try:
        while True:
            batch, bad, _ = fetch.next()
            rows, gbad, _, _ = agree(group, len(batch) if batch else 0, bad, 0.0, False)
            if budget is not None:
                budget.add(gbad, rows)
            if rows == 0:
                return
            yield batch
    finally:
        fetch.close()


class ValidationBatches:
    """One rank's validation batches, the same rows every epoch: the first pass reads
    them (`agreed_batches`) and keeps them when every rank's fit in `limit` bytes of
    host memory; later passes replay them. A sequence fine-tune on Toys spent more time
    per epoch reading its validation rows again than training (3-4 s of ~11). Every
    rank decides alike (one all-reduce after the first pass), so replays make the same
    collectives everywhere: a replay has the agreed length, a rank out of rows
    replays its `None`s."""

    def __init__(self, stream: BatchStream, group, device, limit: int):
        self.stream, self.group, self.device, self.limit = stream, group, device, limit
        self.kept: list[Batch | None] | None = None

    def __call__(self, budget: BadRows):
        if self.kept is not None:
            yield from self.kept
            return
        kept, size = [], 0
        for batch in agreed_batches(self.stream, 0, self.group, self.device, budget):
            size += _nbytes(batch)
            kept.append(batch)
            yield batch
        total = torch.tensor([float(size)], dtype=torch.float64)
        if dist.is_initialized():
            dist.all_reduce(total, op=dist.ReduceOp.MAX, group=self.group)
        if float(total) <= self.limit:
            self.kept = kept


def _nbytes(b: Batch | None) -> int:
    """Host bytes of every tensor a batch holds (its fields and their dicts)."""
    if b is None:
        return 0
    values = [getattr(b, f.name) for f in fields(b)]
    tensors = [t for v in values for t in (v.values() if isinstance(v, dict) else [v])]
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def _say(msg: str) -> None:
    """Print from a worker once: Ray Train's patched `print` would log it twice."""
    print(msg, file=sys.__stdout__, flush=True)


class _RowTrace:
    """With a trace folder (`trace_rows`, a test's audit trail), each rank appends, per
    step, [step, n, n row positions] (int64) to a file named by epoch, rank and pid:
    exactly which rows each attempt trained on."""

    def __init__(self, folder: str, rank: int):
        self._dir = folder
        self._rank = rank

    def write(self, epoch: int, step: int, pos: np.ndarray) -> None:
        if self._dir:
            rec = np.concatenate([np.array([step, len(pos)], np.int64), pos.astype(np.int64)])
            with open(os.path.join(self._dir, f"epoch{epoch}-rank{self._rank}-pid{os.getpid()}.bin"), "ab") as f:
                f.write(rec.tobytes())


class StepLog:
    """Rank 0's step records: to the driver's progress bar (run channel), TensorBoard
    (uploaded to the run folder) and, for cluster job logs, stdout."""

    def __init__(self, spec: WorkerSpec, rank: int):
        self.spec, self.rank = spec, rank
        self.records: list[dict] = []
        self._tb = None
        self._tb_dir = ""

    def add(self, rec: dict) -> None:
        if self.rank != 0:
            return
        self.records.append(rec)
        if self.spec.runtime.progress is not None:
            self.spec.runtime.progress.update.remote(rec)
        if self.spec.runtime.print_steps:
            _say(str({k: round(v, 4) if isinstance(v, float) else v for k, v in rec.items()}))
        if self._tb is None:
            from torch.utils.tensorboard import SummaryWriter

            self._tb_dir = tempfile.mkdtemp(prefix="flm-tb-")
            self._tb = SummaryWriter(self._tb_dir)
        for k, v in rec.items():
            if isinstance(v, (int, float)) and k not in ("step", "epoch") and math.isfinite(v):
                self._tb.add_scalar(f"{self.spec.task}/{k}", v, rec["step"])

    def flush(self, final: bool = False) -> None:
        if self.rank == 0 and self._tb is not None:
            self._tb.flush()
            self.spec.run.store.upload_dir(self._tb_dir, join(self.spec.run.dir, "tensorboard"))
            if final:
                self._tb.close()
                shutil.rmtree(self._tb_dir, ignore_errors=True)
                self._tb = None


# ------------------------------------------------------------------ the worker


def _set_trainable(model: FLM, task: str, recon_weight: float, freeze: list[str] | None) -> None:
    """Train only the modules the task's loss reaches, less those in `train.freeze`;
    `freeze` None: nothing trains (evaluation)."""
    if freeze is None:
        model.requires_grad_(False)
        return
    used = used_modules(task, recon_weight)
    frozen = set()
    if "embeddings" in freeze:
        frozen |= {"tables", "numeric"}
    if "encoder" in freeze:
        frozen |= {"user_encoder", "item_encoder", "history"}
    if "decoder" in freeze:
        frozen |= {"user_decoder", "item_decoder"}
    for name, mod in model.named_children():
        mod.requires_grad_(name in used and name not in frozen)


def _frozen(s: WorkerSpec) -> list[str] | None:
    """`train.freeze`, plus `train.freeze_pretrained` when starting from a pretrained
    backbone; None when nothing trains (evaluation)."""
    return s.train.freeze + (s.train.freeze_pretrained if s.run.init_from else []) if s.mode == "train" else None


class Worker:
    """One rank's model, optimisers and checkpoints, built from the spec."""

    def __init__(self, spec: WorkerSpec):
        self.spec = spec
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        torch.set_num_threads(spec.runtime.threads)
        if spec.runtime.use_gpu:
            import ray.train.torch

            self.device = ray.train.torch.get_device()
        else:
            self.device = torch.device("cpu")
        self.amp = self.device.type == "cuda" and spec.train.amp
        # Control collectives are tiny CPU tensors: on NCCL runs they get a gloo group.
        backend = dist.get_backend() if dist.is_initialized() else "gloo"
        self.ctrl = dist.new_group(backend="gloo") if dist.is_initialized() and backend != "gloo" else None
        self.store = spec.run.store
        self.hash = HashSpec.from_dict(spec.data.hash_spec)
        self.train_plan = DataPlan.from_dict(spec.data.train_plan) if spec.data.train_plan else None
        self.empty = empty_batch(tuple(spec.features), label=spec.task == "ctr", rating=spec.task == "rating", history_len=spec.model.history_len)
        self.checkpointer: ckpt.Checkpointer | None = None

    # -- model ----------------------------------------------------------------------

    def build(self) -> None:
        s = self.spec
        torch.manual_seed(s.run.seed)  # dense layers start equal on every rank
        lo, hi = s.data.rating_range
        center = (lo + hi) / 2 if s.task == "rating" else 0.0
        model = FLM(s.model, s.features, rating_center=center, init_seed=s.run.seed, table_device="meta")
        _set_trainable(model, s.task, s.train.recon_weight, _frozen(s))
        sizes = {n: t.num_embeddings for n, t in model.tables.items()}
        self.plan = plan_tables(sizes, s.model.embedding_dim, self.world, s.runtime.shard_threshold_bytes, s.runtime.plan_overrides)
        if self.rank == 0:
            _say(describe_plan(self.plan))
        self.model = parallelize(model, self.plan, self.device, seed=s.run.seed)
        # From here on, randomness (corruption masks, noise) differs per rank: equal
        # masks on every rank would make the ranks' views of the data correlated.
        torch.manual_seed(s.run.seed * 1_000_003 + 7919 * (self.rank + 1))
        # One bucket per item row up to 2**20: exact counts for tables that small, and a
        # checkpoint never carries more than 8 MB of it.
        buckets = min(s.model.item_rows, 1 << 20)
        self.popularity = PopularityEstimator(buckets, device=self.device) if s.mode == "train" and s.task in ("pretrain", "retrieval") else None
        # Uniform negatives, and the item features of history items (next-item targets)
        item_features = any(f.side == "item" for f in s.features)
        self.negatives = None
        if self.popularity is not None and (s.train.uniform_negatives or (s.model.history_len and item_features)):
            self.negatives = NegativeSampler(s.model.item_rows, s.features, s.train.uniform_negatives, self.device, seed=s.run.seed * 7919 + self.rank)
        self.dense_opt = self.sparse_opt = None
        if s.mode == "train":
            self.dense_opt, self.sparse_opt = build_optimizers(unwrap(self.model), s.train.lr, s.train.weight_decay, s.train.sparse_lr, s.train.sparse_optimizer)
            _prime_optimizers(self.model, self.dense_opt, self.sparse_opt)
        self.flags = forward_flags(s.task, s.train.recon_weight, all_positions=s.train.next_item_positions == "all")
        # The new head of a fine-tune from a pretrained backbone trains alone first, so
        # the backbone's first updates follow a head that already fits it (a random head
        # pulls the pretrained features wherever its first gradients point).
        self.backbone_dense = [p for n, p in unwrap(self.model).named_parameters() if p.requires_grad and not n.startswith("head.") and not n.startswith("tables.")]

    def resume_point(self) -> tuple[Progress, ckpt.CheckpointRef | None]:
        """The checkpoint this worker group continues (the run's latest committed one, or
        the one evaluated) and its progress, else a fresh start; loads nothing. Collective."""
        s = self.spec
        if s.mode == "evaluate":
            ref = ckpt.resolve(self.store, s.run.evaluate_from)
            return Progress(checkpoint=ref.uri), ref
        uri = self._decide_resume() if s.run.resume else None
        if not uri:
            return Progress(), None
        ref = ckpt.resolve(self.store, uri)
        return Progress.resumed(ckpt.load_manifest(self.store, ref), ref.uri), ref

    def restore(self, ref: ckpt.CheckpointRef | None) -> None:
        """Collective: `ref`'s state (`resume_point`'s), else `init_from`'s backbone."""
        s = self.spec
        if s.mode == "evaluate":
            self.load_model(ref)
        elif ref is not None:
            _load_run_state(self, ref)
            if self.rank == 0:
                _say(f"resumed from {ref.uri} (step {ref.step})")
        elif s.run.init_from:
            ref = ckpt.resolve(self.store, s.run.init_from)
            tensors, states = _load_backbone(self, ref)
            if self.rank == 0:
                _say(f"initialised backbone ({tensors} tensors, optimiser state of {states}) from {ref.uri}; head is new")

    def load_model(self, ref: ckpt.CheckpointRef) -> None:
        """Collective: the model weights of a committed checkpoint, in this layout."""
        ckpt.load_state(self.store, ref, {"model": _state(self.model, None, None)["model"]})

    def _decide_resume(self) -> str | None:
        """The checkpoint this worker group resumes from, decided once: rank 0 picks the
        run's latest committed checkpoint and hands it to every rank and, through the
        run channel, to the data pipeline, which skips the rows it consumed. (Each
        reading "the latest" on its own could mix two checkpoints if one is committed
        in between.) Collective."""
        import ray

        s = self.spec
        decided = [None]
        if self.rank == 0:
            ref = ckpt.find_latest(self.store, s.run.dir)
            decided = [ref.uri if ref is not None else None]
            if s.runtime.progress is not None:
                ray.get(s.runtime.progress.set_resume.remote(decided[0]))
        if dist.is_initialized():
            dist.broadcast_object_list(decided, src=0, group=self.ctrl)
        return decided[0]

    def head_warmup_steps(self) -> int:
        """Steps in which only the new head trains: fine-tunes of a pretrained backbone
        with a head (ctr, rating); -1 = about one epoch, at most HEAD_WARMUP_MAX_STEPS."""
        s = self.spec
        if not s.run.init_from or s.task not in ("ctr", "rating") or s.train.head_warmup_steps == 0:
            return 0
        if s.train.head_warmup_steps > 0:
            return s.train.head_warmup_steps
        rows = self.train_plan.total_rows - s.data.valid_rows * s.data.valid_carved if self.train_plan else 0
        return min(HEAD_WARMUP_MAX_STEPS, max(1, -(-rows // (s.data.batch_size * self.world))))

    # -- one step ---------------------------------------------------------------------

    def step(self, batch: Batch, rows: int, head_only: bool) -> tuple[float, bool, dict]:
        """Forward, loss, backward, optimiser step on this rank's batch (`rows`: the
        global batch). Returns (this rank's loss sum, any NaN/Inf in it or in a
        gradient, the loss parts)."""
        s = self.spec
        b = batch.to(self.device, non_blocking=True)
        if self.popularity is not None:
            self.popularity.update(b.item)
        share = 0.0
        if self.negatives is not None:  # every rank draws (and looks up) the same number
            self.negatives.observe(b)
            if s.train.uniform_negatives:
                b.negatives, b.negative_features, share = self.negatives.sample()
            if b.history is not None and self.negatives.cache:
                b.history_features = self.negatives.history_features(b.history)
        # bf16 autocast on GPU for the dense layers; embedding rows and their exchange
        # stay fp32 (the tables are the model's memory, not its FLOPs).
        with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            out = self.model(b, **self.flags)
        # The loss in fp32: softmaxes and logs over bf16 logits lose too much.
        t = s.train
        lp = compute_loss(s.task, out.float(), b, t.recon_weight, t.contrastive_weight, t.temperature, self.popularity, t.num_negatives, share)
        # Local sum / global rows, times world because DDP averages gradients: the sum
        # over ranks is the gradient of the global mean loss.
        opts = [o for o in (self.dense_opt, self.sparse_opt) if o is not None]
        for opt in opts:
            opt.zero_grad(set_to_none=True)
        (lp.total * (self.world / rows)).backward()
        params = [p for opt in opts for g in opt.param_groups for p in g["params"]]
        # The guard: a finite loss can still come with NaN/Inf gradients, which the step
        # would write into the weights. Any rank's flag stops every rank at the next
        # step's agreement, before any checkpoint is written.
        nonfinite = not _all_finite([lp.total.detach(), *(p.grad for p in params)])
        if head_only:  # the backbone's gradients are dropped: only the head steps
            for p in self.backbone_dense:
                p.grad = None
            opts = [self.dense_opt]
        if t.grad_clip > 0 and self.dense_opt is not None:
            torch.nn.utils.clip_grad_norm_([p for g in self.dense_opt.param_groups for p in g["params"]], t.grad_clip)
        for opt in opts:
            opt.step()
        return float(lp.total.detach()), nonfinite, {k: float(v) for k, v in lp.parts.items()}

    # -- checkpoints ------------------------------------------------------------------

    def save(self, progress: Progress, consumed: ConsumedRows | None, metrics: dict, budget: BadRows | None = None) -> None:
        """Collective. The data position (rows consumed in this epoch, from every rank)
        and the epoch's bad-row counts go into the manifest; the checkpoint counts once
        committed (maybe later, in the background)."""
        s = self.spec
        data_state = None
        if consumed is not None and not progress.epoch_done:
            states = [consumed.state()]
            if dist.is_initialized():
                states = [None] * self.world
                dist.all_gather_object(states, consumed.state(), group=self.ctrl)
            merged = ConsumedRows(self.train_plan)
            for st in states:
                merged.merge_state(st)
            data_state = {**merged.state(), **({"budget": budget.window()} if budget is not None else {})}
        manifest = dict(s.run.manifest)
        manifest.update({
            "step": progress.step,
            "epoch": progress.epoch,
            "epoch_done": progress.epoch_done,
            "data_state": data_state,
            "best": progress.best,
            "stale": progress.stale,
            "curve": progress.curve,
            "world_size": self.world,
            "sharding_plan": {n: p.to_dict() for n, p in self.plan.items()},
            "hash_spec": self.hash.to_dict(),
            "metrics": metrics,
        })
        pop = self.popularity.sync(self.ctrl) if self.popularity is not None else None
        neg = self.negatives.state(self.ctrl) if self.negatives is not None else None
        state = _state(self.model, self.dense_opt, self.sparse_opt, pop, neg)
        # No committed checkpoint may hold a non-finite value, whatever produced it.
        finite = torch.tensor([float(_all_finite(_tensors(state)))])
        if dist.is_initialized():
            dist.all_reduce(finite, op=dist.ReduceOp.MIN, group=self.ctrl)
        if finite.item() < 1:
            raise NonFiniteLossError(
                f"the state at step {progress.step} (epoch {progress.epoch}) holds NaN/Inf values; stopped before writing a "
                f"checkpoint. Last committed checkpoint: {_committed_so_far(self)}. Lower train.lr / train.sparse_lr or set train.grad_clip."
            )
        keep = {progress.best["step"]} if progress.best else set()
        self.checkpointer.save(progress.step, state, manifest, keep=keep)

    # -- evaluation ---------------------------------------------------------------------

    def validate(self, batches) -> dict[str, float]:
        """Collective: the criterion (lower is better) over every rank's validation rows
        (`batches`, this rank's agreed ones): 1 - NDCG@10 by full ranking for retrieval
        with a catalog (`validation_ranking`), otherwise the mean task loss."""
        s = self.spec
        items = catalog_of(s) if s.task in ("retrieval", "pretrain") else None
        if ranking := bool(items):
            catalog = catalog_matrix(self.model, items, s.features, s.data.batch_size, self.device, self.empty, self.ctrl)
            parts = validation_ranking(self.model, batches, catalog, self.device, self.empty, seen=items.get("seen"))
        else:
            parts = validation_loss(self.model, batches, s.task, self.device, self.empty, self.popularity, s.train)
        t = torch.tensor(parts, dtype=torch.float64)
        if dist.is_initialized():
            dist.all_reduce(t, group=self.ctrl)
        m = t / max(float(t[-1]), 1.0)
        return {"valid_loss": 1.0 - float(m[0]), "valid_ndcg@10": float(m[0]), "valid_recall@10": float(m[1])} if ranking else {"valid_loss": float(m[0])}

    def evaluate(self, stream: BatchStream) -> dict:
        """Model outputs for every eval row from every rank, gathered on rank 0 (the
        driver computes exact metrics from them); {} on the other ranks."""
        s = self.spec
        budget = BadRows(self.store, None, 1.0, self.ctrl)
        self.model.eval()
        batches = agreed_batches(stream, 0, self.ctrl, self.device, budget)
        local = eval_outputs(self.model, batches, s.task, self.device, self.empty, s.model.latent_dim)
        if s.task in ("retrieval", "pretrain"):
            local["catalog"] = catalog_vectors(self.model, catalog_of(s), s.features, s.data.batch_size, self.device, self.empty, self.rank, self.world)
        result = gather_outputs(local, group=self.ctrl)
        self.model.train()
        if result is None:
            return {}
        result["bad_rows"] = budget.report()
        return result


# ------------------------------------------------------------------ the loop


def first_epoch(w: Worker, progress: Progress, shard) -> Fetcher:
    """Start reading the first epoch `progress` trains, from this rank's training data
    `shard`. Started before the model is built, the data path's start (the rank's
    split coordinator starting its execution, a read task's process, the first row
    groups) overlaps the model's (imports, tables, DDP) on the way to the first batch."""
    stream = w.spec.data.stream(shard, w.spec.features, seed=w.spec.run.seed * 1000 + w.rank)
    return Fetcher(stream, progress.epoch + progress.epoch_done, pin=w.device.type == "cuda")


def train(w: Worker, progress: Progress, first: Fetcher, valid_shard=None) -> dict:
    """Train to `train.epochs` (or `train.max_steps`, or early stopping) from
    `progress`; `first` reads the first epoch (`first_epoch`), `valid_shard` is this
    rank's validation data."""
    s, t = w.spec, w.spec.train
    stream = first.stream
    valid = None
    if valid_shard is not None:
        valid = ValidationBatches(s.data.stream(valid_shard, s.features), w.ctrl, w.device, s.data.valid_cache_mb << 20)
    w.checkpointer = ckpt.Checkpointer(w.store, s.run.dir, s.checkpoint.keep_last, s.checkpoint.async_save, w.ctrl)
    w.checkpointer.last_committed = progress.checkpoint
    budget, steplog, trace = BadRows(w.store, w.train_plan, s.data.max_bad_fraction, w.ctrl), StepLog(s, w.rank), _RowTrace(s.runtime.trace_rows, w.rank)
    consumed = ConsumedRows(w.train_plan, stream.side_rows)
    if progress.epoch_done:
        progress.epoch, progress.epoch_done = progress.epoch + 1, False
    else:  # the resumed epoch's rows so far, and its bad rows' counts
        consumed.merge_state(progress.data_state)
        budget.resume((progress.data_state or {}).get("budget"))
    warmup, rows_total, last_loss, t_start = w.head_warmup_steps(), 0, float("nan"), time.perf_counter()
    stop = valid is not None and bool(_patience(s)) and progress.stale >= _patience(s)  # stopped early before a resume
    if valid is not None and s.task == "retrieval" and s.run.init_from and progress.step == 0 and progress.best is None:
        # A retrieval fine-tune adds no parameters to the pretrained model, which is thus a
        # candidate too: validated and saved before the first step, it is the result when
        # no epoch beats it (epoch -1 in the curve).
        _end_of_epoch(w, progress, valid, budget, last_loss, epoch=-1)
        w.save(progress, consumed, {"loss": last_loss}, budget)
    while progress.epoch < t.epochs and not stop:
        fetch = first if first.epoch == progress.epoch and not first.done else Fetcher(stream, progress.epoch, pin=w.device.type == "cuda")
        loss_sum, nonfinite, step_rows = 0.0, False, 0
        while True:
            t0 = time.perf_counter()
            batch, bad, dropped = fetch.next()
            rows, gbad, gloss, any_nonfinite = agree(w.ctrl, len(batch) if batch else 0, bad, loss_sum, nonfinite)
            t_data = time.perf_counter() - t0
            if any_nonfinite:
                raise NonFiniteLossError(
                    f"loss or gradients became NaN/Inf at step {progress.step} (epoch {progress.epoch}); stopped before writing "
                    f"a checkpoint. Last committed checkpoint: {_committed_so_far(w)}. Lower train.lr / train.sparse_lr or set train.grad_clip."
                )
            last_loss = gloss / step_rows if step_rows else last_loss
            stop = bool(t.max_steps and progress.step >= t.max_steps)
            trained = 0 if rows == 0 or stop else rows  # this batch, unless the data or the run ended
            # The bad rows that came with it are counted, and consumed: a resume reads them no more.
            budget.add(gbad, trained=trained)
            consumed.add(dropped)
            rows_total += trained
            budget.check(final=False, examples=stream.bad_examples)
            if not trained:
                break
            # The state after the previous step, now known finite on every rank.
            if step_rows and s.checkpoint.every_steps and progress.step % s.checkpoint.every_steps == 0:
                w.save(progress, consumed, {"loss": last_loss}, budget)
            t1 = time.perf_counter()
            batch = batch if batch is not None else w.empty
            loss_sum, nonfinite, parts = w.step(batch, rows, head_only=progress.step < warmup)
            step_rows = rows
            progress.step += 1
            consumed.add(batch.pos.numpy())
            trace.write(progress.epoch, progress.step, batch.pos.numpy())
            if progress.step % t.log_every == 0:
                elapsed = time.perf_counter() - t_start
                steplog.add({"step": progress.step, "epoch": progress.epoch, "loss": last_loss, "rows": rows_total, "rows_per_s": rows_total / max(elapsed, 1e-9),
                             "data_wait_s": t_data, "step_s": time.perf_counter() - t1, **{k: v / max(len(batch), 1) for k, v in parts.items()}})
        fetch.close()
        if nonfinite:
            raise NonFiniteLossError(f"loss or gradients became NaN/Inf at step {progress.step} (epoch {progress.epoch}), the last step; no checkpoint was written for it")
        budget.check(final=True, examples=stream.bad_examples)
        progress.epoch_done = rows == 0  # the data ran out, max_steps reached on its last batch or not
        if progress.epoch_done:
            budget.next_window()  # the validation pass below counts with the next epoch
            stop = _end_of_epoch(w, progress, valid, budget, last_loss) or stop
        if progress.step > 0:
            w.save(progress, consumed, {"loss": last_loss}, budget)
        if progress.epoch_done:
            progress.epoch, progress.epoch_done = progress.epoch + 1, False
            consumed.reset()
        steplog.flush()
    first.close()  # unread when a resumed run had no epoch left to train
    return _finish(w, progress, steplog, budget, rows_total, last_loss, time.perf_counter() - t_start)


def _end_of_epoch(w: Worker, progress: Progress, valid: ValidationBatches | None, budget: BadRows, loss: float, epoch: int | None = None) -> bool:
    """Validation and early stopping (collective); True when training should stop.
    Validation's bad rows count in the training budget (once: a replay adds none)."""
    epoch = progress.epoch if epoch is None else epoch
    rec = {"step": progress.step, "epoch": epoch, "loss": loss}
    if valid is not None:
        rec.update(w.validate(valid(budget)))
        v = rec["valid_loss"]
        if progress.best is None or v < progress.best["valid_loss"]:
            progress.best, progress.stale = {"step": progress.step, "epoch": epoch, "valid_loss": v}, 0
        elif epoch != 0 or progress.best["epoch"] != -1:  # a backbone's first epoch is spared (module docstring)
            progress.stale += 1
        if w.rank == 0:
            what = "1 - NDCG@10" if "valid_ndcg@10" in rec else "loss"
            _say(f"epoch {epoch}: validation {what} {v:.5f} (best {progress.best['valid_loss']:.5f} at epoch {progress.best['epoch']})")
    progress.curve.append(rec)
    patience = _patience(w.spec)
    return bool(valid is not None and patience and progress.stale >= patience)


def _committed_so_far(w: Worker) -> str | None:
    """Collective: the last committed checkpoint, once the save in flight has committed
    or failed (an async save that passed its checks may still commit after a NaN)."""
    try:
        return w.checkpointer.finish()
    except ckpt.CheckpointSaveError:
        return w.checkpointer.last_committed


def _patience(s) -> int:
    """Pretraining validates (its curve and best epoch are recorded, and a retrieval
    fine-tune with `train.continue_pretraining` starts from that epoch) but runs every
    epoch: its last state is what the other fine-tunes start from. On MovieLens the
    epoch with the best held-out ranking (5 of 20) gave users without labels a ctr AUC
    below scratch (0.642 against 0.660), the last one +0.024 and +0.035 above it in two
    runs (docs/RESULTS.md)."""
    return 0 if s.task == "pretrain" else s.train.patience


def _finish(w: Worker, progress: Progress, steplog: StepLog, budget: BadRows, rows_total: int, loss: float, elapsed: float) -> dict:
    """Wait for the last save; with validation, load the best epoch's weights (the
    result, and what the final evaluation scores). A pretraining's result is its last
    state, its best epoch a kept checkpoint (`_patience`)."""
    last_saved = w.checkpointer.finish()
    w.checkpointer.close()
    steplog.flush(final=True)
    result_ckpt = last_saved
    if progress.best is not None and last_saved and w.spec.task != "pretrain":
        best = ckpt.resolve(w.store, ckpt.step_dir(w.spec.run.dir, progress.best["step"]))
        if best.uri != last_saved:
            w.load_model(best)
        result_ckpt = best.uri
    # Every rank ran the same number of steps by construction (`agree`); report each
    # rank's own count so that promise is visible, not assumed.
    steps_per_worker = [progress.step]
    if dist.is_initialized():
        steps_per_worker = [None] * w.world
        dist.all_gather_object(steps_per_worker, progress.step, group=w.ctrl)
    return {
        "checkpoint": result_ckpt,
        "last_checkpoint": last_saved,
        "best": progress.best,
        "steps": progress.step,
        "steps_per_worker": steps_per_worker,
        "epochs": progress.epoch,
        "rows": rows_total,
        "rows_per_s": rows_total / max(elapsed, 1e-9),
        "train_seconds": elapsed,
        "loss": loss,
        "bad_rows": budget.report(),
        # rank 0's logged steps and every epoch's losses: learning curves for reports
        "curve": [{"step": r["step"], "epoch": r["epoch"], "loss": r["loss"]} for r in steplog.records],
        "epochs_curve": progress.curve,
    }


def worker_main(spec_dict: dict) -> None:
    """`train_loop_per_worker` for TorchTrainer."""
    import ray

    spec: WorkerSpec = spec_dict["spec"]
    os.environ.setdefault("OMP_NUM_THREADS", str(spec.runtime.threads))
    try:
        _work(spec)
    except (DataError, ConfigError) as e:
        if spec.runtime.progress is not None:  # the run ends on it: no restart would read other input
            try:
                ray.get(spec.runtime.progress.fail_on_input.remote(e))
            except Exception:  # never in place of the error itself; Ray then restarts as for any failure
                log.warning("could not post the input error on the run channel", exc_info=True)
        raise


def _work(spec: WorkerSpec) -> None:
    import ray
    import ray.train

    w = Worker(spec)
    # Where to start is decided first, so the first epoch's data is read while the
    # model is built (first_epoch).
    progress, start = w.resume_point()
    first = first_epoch(w, progress, ray.train.get_dataset_shard("train")) if spec.mode == "train" else None
    w.build()
    w.restore(start)
    result: dict[str, Any] = {}
    if first is not None:
        valid = ray.train.get_dataset_shard("valid") if spec.data.valid_rows else None
        result["train"] = train(w, progress, first, valid)
    else:
        result["checkpoint"] = progress.checkpoint
    if spec.data.eval_plan is not None:
        stream = spec.data.stream(ray.train.get_dataset_shard("eval"), spec.features)
        result["eval"] = w.evaluate(stream)
    if w.rank == 0 and spec.runtime.progress is not None:
        ray.get(spec.runtime.progress.set_result.remote(result))
