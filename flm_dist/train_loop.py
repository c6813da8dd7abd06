"""The train loop: one function, run by every Ray Train worker, for pretraining,
fine-tuning and evaluation. They differ in objective, data and initialisation only.

Every step starts with one small all-reduce (`_agree`) that carries, for all ranks,
the rows each will train on, the bad-row counts, and the previous step's loss and
non-finite flag. From it every rank takes the same decisions at the same step: end the
epoch (when no rank has rows left; a rank that ran dry joins with an empty batch, so
uneven shards never hang DDP), fail on a bad-row budget or a NaN loss (before a
checkpoint could be written), and save a checkpoint.
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
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from flm_dist import checkpoint as ckpt
from flm_dist.batch import Batch
from flm_dist.config import CheckpointConfig, FeatureConfig, ModelConfig, TrainConfig
from flm_dist.data.hashing import HashSpec
from flm_dist.data.pipeline import BatchStream, empty_batch
from flm_dist.data.plan import DataPlan, read_unit
from flm_dist.data.position import ConsumedRows
from flm_dist.data.schema import BAD_REASONS, NOT_BUDGETED, DataError
from flm_dist.evaluation import gather_outputs, local_outputs
from flm_dist.model import FLM
from flm_dist.objectives import PopularityEstimator, compute_loss, forward_flags, used_modules
from flm_dist.optim import build_optimizers, optimizer_state
from flm_dist.sharding import describe_plan, global_view, parallelize, plan_tables, unwrap
from flm_dist.storage import Store, join

__all__ = ["NonFiniteLossError", "WorkerSpec", "worker_main"]

log = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN/Inf; training stopped before writing another checkpoint."""


@dataclass
class WorkerSpec:
    """What a worker needs, and nothing more; built by the driver (launch.py)."""

    mode: str  # "train" | "evaluate"
    task: str
    model: ModelConfig
    features: list[FeatureConfig]
    train: TrainConfig
    checkpoint: CheckpointConfig
    store: Store
    run_dir: str
    hash_spec: dict
    seed: int
    batch_size: int
    shuffle_window: int
    prefetch_batches: int
    max_bad_fraction: float
    rating_range: list[float]
    shard_threshold_bytes: int
    plan_overrides: dict[str, str]
    train_plan: dict | None = None  # DataPlan.to_dict() of the training data
    eval_plan: dict | None = None
    init_from: str = ""  # a committed checkpoint URI (backbone for fine-tuning)
    evaluate_from: str = ""  # mode=evaluate: the checkpoint to evaluate
    resume: bool = True
    use_gpu: bool = False
    threads: int = 1
    manifest: dict = field(default_factory=dict)  # config, lineage, data fingerprint
    progress: Any = None  # a launch.RunChannel handle, or None
    trace_rows: str = ""  # folder for the per-step row audit trail (tests), "" = off
    catalog: dict | None = None  # retrieval evaluation: the item catalog (rows, features)


# ------------------------------------------------------------------ helpers


def _state(model, dense_opt, sparse_opt, popularity: dict | None = None) -> dict:
    """The DCP state: sharded tables and their Adagrad state as DTensor row blocks, and
    the log-Q popularity estimate (pretrain, retrieval)."""
    m = unwrap(model)
    state = {
        "model": {k: global_view(m, k, v) for k, v in m.state_dict().items()},
        "dense_optim": optimizer_state(m, dense_opt),
        "sparse_optim": optimizer_state(m, sparse_opt, wrap=lambda n, v: global_view(m, n, v)),
    }
    if popularity is not None:
        state["popularity"] = popularity
    return state


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


class _Fetcher:
    """Pulls the next batch and the bad-row counts that came before it.

    A background thread stays `ahead` batches in front of the train loop: batch
    assembly (numpy concatenation, the shuffle window) overlaps the model step, and on
    GPU runs the batch is pinned there so the host-to-device copy is asynchronous."""

    def __init__(self, stream: BatchStream, epoch: int, pin: bool = False, ahead: int = 2):
        self._it = stream.epoch(epoch)
        self._pin = pin
        self._q: queue.Queue = queue.Queue(maxsize=ahead)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="flm-fetch", daemon=True)
        self._thread.start()
        self.done = False

    def _run(self) -> None:
        try:
            for batch, counts in self._it:
                if batch is not None and self._pin:
                    batch = batch.pin_memory()
                self._q.put((batch, counts, None))
                if self._stop.is_set():
                    return
        except BaseException as e:  # noqa: BLE001 - re-raised in the train loop's thread
            self._q.put((None, None, e))
            return
        finally:
            # Closing the generator ends the epoch's Ray Data execution now, not at GC.
            self._it.close()
        self._q.put((None, None, StopIteration()))

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

    def next(self) -> tuple[Batch | None, np.ndarray]:
        counts = np.zeros(len(BAD_REASONS), dtype=np.int64)
        while not self.done:
            batch, c, err = self._q.get()
            if isinstance(err, StopIteration):
                self.done = True
                break
            if err is not None:
                raise err
            counts += c
            if batch is not None:
                return batch, counts
        return None, counts


def _say(msg: str) -> None:
    """Print from a worker once: Ray Train's patched `print` would log it twice."""
    print(msg, file=sys.__stdout__, flush=True)


class _RowTrace:
    """With a trace folder (FLM_TRACE_ROWS in the driver's environment), each rank
    appends, per step, [step, n, n row positions] (int64) to a file named by epoch,
    rank and pid: an audit trail of exactly which rows each attempt trained on."""

    def __init__(self, folder: str, rank: int):
        self._dir = folder
        self._rank = rank

    def write(self, epoch: int, step: int, pos: np.ndarray) -> None:
        if self._dir:
            rec = np.concatenate([np.array([step, len(pos)], np.int64), pos.astype(np.int64)])
            with open(os.path.join(self._dir, f"epoch{epoch}-rank{self._rank}-pid{os.getpid()}.bin"), "ab") as f:
                f.write(rec.tobytes())


def _agree(group, rows: int, bad: np.ndarray, loss_sum: float, nonfinite: bool) -> tuple[int, np.ndarray, float, bool]:
    """One all-reduce per step: global rows, bad counts, last loss, any non-finite."""
    t = torch.tensor([float(rows), float(nonfinite), loss_sum, *bad.astype(np.float64)], dtype=torch.float64)
    if dist.is_initialized():
        dist.all_reduce(t, group=group)
    return int(t[0]), t[3:].numpy().astype(np.int64), float(t[2]), bool(t[1] > 0)


# ------------------------------------------------------------------ the worker


class Worker:
    def __init__(self, spec: WorkerSpec):
        self.spec = spec
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        torch.set_num_threads(spec.threads)
        if spec.use_gpu:
            import ray.train.torch

            self.device = ray.train.torch.get_device()
        else:
            self.device = torch.device("cpu")
        self.amp = self.device.type == "cuda" and spec.train.amp
        # Control collectives are tiny CPU tensors: on NCCL runs they get a gloo group.
        backend = dist.get_backend() if dist.is_initialized() else "gloo"
        self.ctrl = dist.new_group(backend="gloo") if dist.is_initialized() and backend != "gloo" else None
        self.store = spec.store
        self.hash = HashSpec.from_dict(spec.hash_spec)
        self.train_plan = DataPlan.from_dict(spec.train_plan) if spec.train_plan else None
        self.eval_plan = DataPlan.from_dict(spec.eval_plan) if spec.eval_plan else None
        self.metrics_log: list[dict] = []
        self.tb = None

    # -- model ----------------------------------------------------------------------

    def build(self):
        s = self.spec
        torch.manual_seed(s.seed)  # dense layers start equal on every rank
        lo, hi = s.rating_range
        center = (lo + hi) / 2 if s.task == "rating" else 0.0
        model = FLM(s.model, s.features, rating_center=center, init_seed=s.seed, table_device="meta")
        if s.mode == "train":
            used = used_modules(s.task, s.train.recon_weight)
            frozen = set()
            if "embeddings" in s.train.freeze:
                frozen |= {"tables", "numeric"}
            if "encoder" in s.train.freeze:
                frozen |= {"user_encoder", "item_encoder"}
            if "decoder" in s.train.freeze:
                frozen |= {"user_decoder", "item_decoder"}
            for name, mod in model.named_children():
                mod.requires_grad_(name in used and name not in frozen)
        else:
            model.requires_grad_(False)
        self.plan = plan_tables(
            {n: t.num_embeddings for n, t in model.tables.items()},
            s.model.embedding_dim,
            self.world,
            s.shard_threshold_bytes,
            s.plan_overrides,
        )
        if self.rank == 0:
            _say(describe_plan(self.plan))
        self.model = parallelize(model, self.plan, self.device, seed=s.seed)
        # From here on, randomness (corruption masks, noise) differs per rank: equal
        # masks on every rank would make the ranks' views of the data correlated.
        torch.manual_seed(s.seed * 1_000_003 + 7919 * (self.rank + 1))
        # One bucket per item row up to 2**20: exact counts for tables that small, and a
        # checkpoint never carries more than 8 MB of it.
        buckets = min(s.model.item_rows, 1 << 20)
        self.popularity = PopularityEstimator(buckets, device=self.device) if s.mode == "train" and s.task in ("pretrain", "retrieval") else None
        self.dense_opt = self.sparse_opt = None
        if s.mode == "train":
            self.dense_opt, self.sparse_opt = build_optimizers(
                unwrap(self.model), s.train.lr, s.train.weight_decay, s.train.sparse_lr, s.train.sparse_optimizer
            )
            _prime_optimizers(self.model, self.dense_opt, self.sparse_opt)

    def restore(self) -> dict:
        """Resume from the run's latest committed checkpoint, else initialise the
        backbone from `init_from`, else start fresh. Returns the progress to resume."""
        s = self.spec
        if s.mode == "evaluate":
            ref = ckpt.resolve(self.store, s.evaluate_from)
            state = {"model": _state(self.model, None, None)["model"]}
            ckpt.load_state(self.store, ref, state)
            return {"step": 0, "epoch": 0, "checkpoint": ref.uri}
        uri = self._decide_resume() if s.resume else None
        ref = ckpt.resolve(self.store, uri) if uri else None
        if ref is not None:
            manifest = ckpt.load_manifest(self.store, ref)
            pop = self.popularity.state() if self.popularity is not None else None
            if pop is not None and not {"popularity.counts", "popularity.total"} <= ckpt.saved_keys(self.store, ref):
                pop = None  # saved before the estimate was checkpointed: it starts afresh
            ckpt.load_state(self.store, ref, _state(self.model, self.dense_opt, self.sparse_opt, pop))
            if pop is not None:
                self.popularity.load(pop)
            if self.rank == 0:
                _say(f"resumed from {ref.uri} (step {ref.step})")
            return {
                "step": manifest["step"],
                "epoch": manifest["epoch"],
                "epoch_done": manifest.get("epoch_done", False),
                "data_state": manifest.get("data_state"),
                "checkpoint": ref.uri,
            }
        if s.init_from:
            ref = ckpt.resolve(self.store, s.init_from)
            m = unwrap(self.model)
            full = _state(self.model, None, None)["model"]
            keys = [k for k in m.backbone_keys() if k in full]
            ckpt.load_state(self.store, ref, {"model": {k: full[k] for k in keys}})
            if self.rank == 0:
                _say(f"initialised backbone ({len(keys)} tensors) from {ref.uri}; head is new")
        return {"step": 0, "epoch": 0, "epoch_done": False, "checkpoint": None}

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
            ref = ckpt.find_latest(self.store, s.run_dir)
            decided = [ref.uri if ref is not None else None]
            if s.progress is not None:
                ray.get(s.progress.set_resume.remote(decided[0]))
        if dist.is_initialized():
            dist.broadcast_object_list(decided, src=0, group=self.ctrl)
        return decided[0]

    # -- checkpoints ------------------------------------------------------------------

    def save(self, step: int, epoch: int, epoch_done: bool, metrics: dict, consumed: ConsumedRows | None) -> None:
        """Collective. The data position (rows consumed in this epoch, from every rank)
        goes into the manifest; the checkpoint counts once committed (maybe later, in
        the background)."""
        s = self.spec
        data_state = None
        if consumed is not None and not epoch_done:
            states = [consumed.state()]
            if dist.is_initialized():
                states = [None] * self.world
                dist.all_gather_object(states, consumed.state(), group=self.ctrl)
            merged = ConsumedRows(self.train_plan)
            for st in states:
                merged.merge_state(st)
            data_state = merged.state()
        manifest = dict(s.manifest)
        manifest.update(
            {
                "step": step,
                "epoch": epoch,
                "epoch_done": epoch_done,
                "data_state": data_state,
                "world_size": self.world,
                "sharding_plan": {n: p.to_dict() for n, p in self.plan.items()},
                "hash_spec": self.hash.to_dict(),
                "metrics": metrics,
            }
        )
        pop = self.popularity.sync(self.ctrl) if self.popularity is not None else None
        state = _state(self.model, self.dense_opt, self.sparse_opt, pop)
        # No committed checkpoint may hold a non-finite value, whatever produced it.
        finite = torch.tensor([float(_all_finite(_tensors(state)))])
        if dist.is_initialized():
            dist.all_reduce(finite, op=dist.ReduceOp.MIN, group=self.ctrl)
        if finite.item() < 1:
            raise NonFiniteLossError(
                f"the state at step {step} (epoch {epoch}) holds NaN/Inf values; stopped before writing a checkpoint. "
                f"Last committed checkpoint: {self.checkpointer.last_committed}. Lower train.lr / train.sparse_lr or set train.grad_clip."
            )
        self.checkpointer.save(step, state, manifest)

    # -- progress -------------------------------------------------------------------

    def _log(self, rec: dict) -> None:
        if self.rank != 0:
            return
        self.metrics_log.append(rec)
        if self.spec.progress is not None:
            self.spec.progress.update.remote(rec)
        if os.environ.get("FLM_DEBUG_STEPS"):
            _say(str({k: round(v, 4) if isinstance(v, float) else v for k, v in rec.items()}))
        if self.tb is None:
            from torch.utils.tensorboard import SummaryWriter

            self._tb_dir = tempfile.mkdtemp(prefix="flm-tb-")
            self.tb = SummaryWriter(self._tb_dir)
        for k, v in rec.items():
            if isinstance(v, (int, float)) and k not in ("step", "epoch") and math.isfinite(v):
                self.tb.add_scalar(f"{self.spec.task}/{k}", v, rec["step"])

    def _flush_tb(self, final: bool = False) -> None:
        if self.rank == 0 and self.tb is not None:
            self.tb.flush()
            self.store.upload_dir(self._tb_dir, join(self.spec.run_dir, "tensorboard"))
            if final:
                self.tb.close()
                shutil.rmtree(self._tb_dir, ignore_errors=True)
                self.tb = None

    # -- loops ------------------------------------------------------------------------

    def _bad_budget(self, bad_total: np.ndarray, rows_total: int, planned: int, final: bool, examples: list) -> None:
        """Raise on every rank at once (the counts are global) when bad rows exceed the
        budget: mid-epoch only once the whole epoch could no longer stay under it."""
        n_bad = int(bad_total[1:].sum() - bad_total[list(NOT_BUDGETED)].sum())
        limit = self.spec.max_bad_fraction * (rows_total + n_bad if final else planned)
        if n_bad <= limit or n_bad == 0:
            return
        gathered = [None] * self.world
        if dist.is_initialized():
            dist.all_gather_object(gathered, examples, group=self.ctrl)
        else:
            gathered = [examples]
        ex = [e for g in gathered for e in (g or [])][:5]
        where = []
        for pos, code in ex:
            if self.train_plan is not None:
                f, row = self.train_plan.locate(int(pos))
                where.append(f"{f} row {row}: {BAD_REASONS[code]} {self._row_values(int(pos))}")
        counts = ", ".join(f"{BAD_REASONS[i]}={int(c)}" for i, c in enumerate(bad_total) if i and c)
        raise DataError(
            f"bad rows exceed data.max_bad_fraction={self.spec.max_bad_fraction}: {n_bad} bad of "
            f"{rows_total + n_bad} rows read ({counts}); examples: " + "; ".join(where)
        )

    def _row_values(self, pos: int) -> dict:
        """The raw columns of one row (for error messages), read back from its file."""
        try:
            t = read_unit(self.store, self.train_plan, self.train_plan.units[pos >> 32])
            return t.slice(pos & 0xFFFFFFFF, 1).to_pylist()[0]
        except Exception as e:  # the message is still useful without the values
            return {"unavailable": str(e)}

    def train(self, progress: dict, shard=None) -> dict:
        """`shard`: this rank's training data (a Ray DataIterator); default: Ray Train's."""
        s = self.spec
        if shard is None:
            import ray.train

            shard = ray.train.get_dataset_shard("train")
        stream = BatchStream(
            shard,
            s.batch_size,
            tuple(s.features),
            shuffle_window=s.shuffle_window,
            seed=s.seed * 1000 + self.rank,
            prefetch_batches=s.prefetch_batches,
        )
        self.checkpointer = ckpt.Checkpointer(self.store, s.run_dir, s.checkpoint.keep_last, s.checkpoint.async_save, self.ctrl)
        self.checkpointer.last_committed = progress.get("checkpoint")
        flags = forward_flags(s.task, s.train.recon_weight)
        popularity = self.popularity
        step, epoch = progress["step"], progress["epoch"]
        consumed = ConsumedRows(self.train_plan)
        if progress.get("epoch_done"):
            epoch += 1
        else:
            consumed.merge_state(progress.get("data_state"))  # the resumed epoch's rows so far
        trace = _RowTrace(s.trace_rows, self.rank)
        planned = self.train_plan.total_rows
        bad_total = np.zeros(len(BAD_REASONS), dtype=np.int64)
        rows_total = 0
        t_start = time.perf_counter()
        last_loss = float("nan")
        empty = empty_batch(tuple(s.features), label=s.task == "ctr", rating=s.task == "rating")
        done = False
        while epoch < s.train.epochs and not done:
            fetch = _Fetcher(stream, epoch, pin=self.device.type == "cuda")
            prev_loss, prev_nonfinite, prev_rows = 0.0, False, 0
            while True:
                t0 = time.perf_counter()
                batch, bad = fetch.next()
                t_data = time.perf_counter() - t0
                rows, gbad, gloss, nonfinite = _agree(self.ctrl, len(batch) if batch else 0, bad, prev_loss, prev_nonfinite)
                if nonfinite:
                    raise NonFiniteLossError(
                        f"loss or gradients became NaN/Inf at step {step} (epoch {epoch}); stopped before writing a checkpoint. "
                        f"Last committed checkpoint: {self.checkpointer.last_committed}. "
                        f"Lower train.lr / train.sparse_lr or set train.grad_clip."
                    )
                if prev_rows:
                    last_loss = gloss / prev_rows
                bad_total += gbad
                rows_total += rows
                self._bad_budget(bad_total, rows_total, planned, final=False, examples=stream.bad_examples)
                done = bool(s.train.max_steps and step >= s.train.max_steps)
                if rows == 0 or done:
                    break
                # The state after the previous step, now known finite on every rank.
                if prev_rows and s.checkpoint.every_steps and step % s.checkpoint.every_steps == 0:
                    self.save(step, epoch, False, {"loss": last_loss}, consumed)
                batch = batch if batch is not None else empty
                t1 = time.perf_counter()
                batch_dev = batch.to(self.device, non_blocking=True)
                if popularity is not None:
                    popularity.update(batch_dev.item)
                # bf16 autocast on GPU for the dense layers; embedding rows and their
                # exchange stay fp32 (the tables are the model's memory, not its FLOPs).
                with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.amp):
                    out = self.model(batch_dev, **flags)
                # The loss in fp32: softmaxes and logs over bf16 logits lose too much.
                lp = compute_loss(s.task, out.float(), batch_dev, s.train.recon_weight, s.train.contrastive_weight, s.train.temperature, popularity, s.train.num_negatives)
                # Local sum / global rows, times world because DDP averages gradients:
                # the sum over ranks is the gradient of the global mean loss.
                loss = lp.total * (self.world / rows)
                for opt in (self.dense_opt, self.sparse_opt):
                    if opt is not None:
                        opt.zero_grad(set_to_none=True)
                loss.backward()
                params = [p for opt in (self.dense_opt, self.sparse_opt) if opt is not None for g in opt.param_groups for p in g["params"]]
                # The guard: a finite loss can still come with NaN/Inf gradients, which
                # the step would write into the weights. Any rank's flag stops every
                # rank at the next step's agreement, before any checkpoint is written.
                prev_nonfinite = not _all_finite([lp.total.detach(), *(p.grad for p in params)])
                if s.train.grad_clip > 0 and self.dense_opt is not None:
                    torch.nn.utils.clip_grad_norm_([p for g in self.dense_opt.param_groups for p in g["params"]], s.train.grad_clip)
                for opt in (self.dense_opt, self.sparse_opt):
                    if opt is not None:
                        opt.step()
                prev_loss = float(lp.total.detach())
                prev_rows = rows
                step += 1
                pos = batch.pos.numpy()
                consumed.add(pos)
                trace.write(epoch, step, pos)
                t_step = time.perf_counter() - t1
                if step % s.train.log_every == 0:
                    elapsed = time.perf_counter() - t_start
                    self._log(
                        {
                            "step": step,
                            "epoch": epoch,
                            "loss": last_loss,
                            "rows": rows_total,
                            "rows_per_s": rows_total / max(elapsed, 1e-9),
                            "data_wait_s": t_data,
                            "step_s": t_step,
                            **{k: float(v) / max(len(batch), 1) for k, v in lp.parts.items()},
                        }
                    )
            fetch.close()
            if prev_nonfinite:
                raise NonFiniteLossError(f"loss or gradients became NaN/Inf at step {step} (epoch {epoch}), the last step; no checkpoint was written for it")
            self._bad_budget(bad_total, rows_total, planned, final=True, examples=stream.bad_examples)
            epoch_done = not done
            if step > 0:
                self.save(step, epoch, epoch_done, {"loss": last_loss}, consumed)
            if epoch_done:
                epoch += 1
                consumed.reset()
            self._flush_tb()
        last_saved = self.checkpointer.finish()
        self.checkpointer.close()
        self._flush_tb(final=True)
        elapsed = time.perf_counter() - t_start
        bad = {BAD_REASONS[i]: int(c) for i, c in enumerate(bad_total) if i and c}
        # Every rank ran the same number of steps by construction (`_agree`); report
        # each rank's own count so that promise is visible, not assumed.
        steps_per_worker = [step]
        if dist.is_initialized():
            steps_per_worker = [None] * self.world
            dist.all_gather_object(steps_per_worker, step, group=self.ctrl)
        return {
            "checkpoint": last_saved,
            "steps": step,
            "steps_per_worker": steps_per_worker,
            "epochs": epoch,
            "rows": rows_total,
            "rows_per_s": rows_total / max(elapsed, 1e-9),
            "train_seconds": elapsed,
            "loss": last_loss,
            "bad_rows": bad,
            # rank 0's logged steps: learning curves for reports
            "curve": [{"step": r["step"], "epoch": r["epoch"], "loss": r["loss"]} for r in self.metrics_log],
        }

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Model outputs for every eval row from every rank, gathered on rank 0 (exact
        metrics need all predictions; the driver computes them). Pointwise tasks give
        predictions; retrieval (and pretraining) give normalised user vectors plus the
        vectors of the item catalog. Forward passes follow the same step agreement as
        training: sharded lookups are collectives."""
        import ray.train

        s = self.spec
        self.model.eval()
        m = unwrap(self.model)
        retrieval = s.task in ("retrieval", "pretrain")
        shard = ray.train.get_dataset_shard("eval")
        stream = BatchStream(shard, s.batch_size, tuple(s.features), shuffle_window=1, prefetch_batches=s.prefetch_batches)
        fetch = _Fetcher(stream, 0)
        empty = empty_batch(tuple(s.features), label=s.task == "ctr", rating=s.task == "rating")
        out: dict[str, list[np.ndarray]] = {"user_key": [], "item_key": [], "pred": [], "target": [], "user_vec": []}
        bad_total = np.zeros(len(BAD_REASONS), dtype=np.int64)
        while True:
            batch, bad = fetch.next()
            rows, gbad, _, _ = _agree(self.ctrl, len(batch) if batch else 0, bad, 0.0, False)
            bad_total += gbad
            if rows == 0:
                break
            b = (batch or empty).to(self.device)
            if retrieval:
                out["user_vec"].append(F.normalize(m.user_vector(b), dim=-1).float().cpu().numpy())
            else:
                out["pred"].append(self.model(b, score=True).score.float().cpu().numpy())
                target = b.label if s.task == "ctr" else b.rating
                out["target"].append(target.float().cpu().numpy())
            if batch is not None:
                out["user_key"].append(batch.user_key.numpy())
                out["item_key"].append(batch.item_key.numpy())
        local = local_outputs(out, s.model.latent_dim)
        if retrieval:
            local["catalog"] = self._catalog_vectors(m, empty)
        result = gather_outputs(local, group=self.ctrl)
        self.model.train()
        if result is None:
            return {}
        result["bad_rows"] = {BAD_REASONS[i]: int(c) for i, c in enumerate(bad_total) if i and c}
        return result

    def _catalog_vectors(self, m, empty: Batch) -> list[tuple[int, np.ndarray]]:
        """Normalised item vectors of the catalog, chunk i on rank i % world. Every rank
        makes the same number of forward passes (an empty one when out of chunks)."""
        cat = self.spec.catalog or {}
        n = len(cat.get("item", ()))
        bs = self.spec.batch_size
        chunks = -(-n // bs)
        mine = []
        for k in range(-(-chunks // self.world)):
            i = k * self.world + self.rank
            if i < chunks:
                sl = slice(i * bs, min(n, (i + 1) * bs))
                feats = {}
                for f in self.spec.features:
                    if f.side != "item":
                        continue
                    if f.kind == "multi":
                        feats[f.name] = torch.from_numpy(np.stack([cat[f"f_{f.name}__{j}"][sl] for j in range(f.max_len)], axis=1))
                    else:
                        feats[f.name] = torch.from_numpy(cat[f"f_{f.name}"][sl])
                item = torch.from_numpy(cat["item"][sl])
                b = Batch(user=torch.zeros_like(item), item=item, features=feats)
            else:
                b = empty
            v = F.normalize(m.item_vector(b.to(self.device)), dim=-1).float().cpu().numpy()
            if i < chunks:
                mine.append((i, v))
        return mine


def worker_main(spec_dict: dict) -> None:
    """`train_loop_per_worker` for TorchTrainer."""
    import ray

    spec: WorkerSpec = spec_dict["spec"]
    os.environ.setdefault("OMP_NUM_THREADS", str(spec.threads))
    w = Worker(spec)
    w.build()
    progress = w.restore()
    result: dict[str, Any] = {}
    if spec.mode == "train":
        result["train"] = w.train(progress)
    else:
        result["checkpoint"] = progress["checkpoint"]
    if spec.eval_plan is not None:
        result["eval"] = w.evaluate()
    if w.rank == 0 and spec.progress is not None:
        ray.get(spec.progress.set_result.remote(result))
