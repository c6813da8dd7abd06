"""Streaming ingest: Parquet on any URI -> Ray Data read tasks -> train workers.

Read tasks (spread over the cluster's CPUs by Ray Data) run `encode.read_units`:
read row groups with pyarrow, validate rows, hash IDs to table rows and tag each row
with its position (`unit << 32 | row`) and a bad-row reason code. Each train worker
reads its own deterministic share of the row groups (`assign_units`; launch.py's
FLMDataConfig hands them out), drops and counts bad rows, mixes a window of batches
and cuts fixed-size `Batch`es. Nothing here knows about process groups: the train
loop makes every rank agree on the step count.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import numpy as np
import torch
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from flm_dist.batch import Batch
from flm_dist.config import FeatureConfig
from flm_dist.data.encode import EncodeSpec, empty_columns, read_units
from flm_dist.data.plan import DataPlan, Unit
from flm_dist.data.schema import BAD_REASONS, NOT_BUDGETED
from flm_dist.storage import Store

__all__ = [
    "BatchStream",
    "InteractionDatasource",
    "assign_units",
    "build_dataset",
    "empty_batch",
    "read",
]

log = logging.getLogger(__name__)


def assign_units(units: list[Unit], world: int, seed: int, epoch: int) -> list[list[Unit]]:
    """Deal read units to `world` ranks so their row counts are as equal as possible
    (longest-processing-time first; ties broken by a per-epoch seeded order).

    Deterministic in (units, world, seed, epoch): a restarted worker group gets the same
    shares, so the steps left in a resumed epoch are known, and a rank never depends on
    another rank's speed for its data. Shares change from epoch to epoch."""
    tiebreak = np.random.default_rng([seed, epoch, 7]).permutation(len(units))
    order = sorted(range(len(units)), key=lambda i: (-units[i].rows, tiebreak[i]))
    loads = [0] * world
    shares: list[list[Unit]] = [[] for _ in range(world)]
    for i in order:
        r = min(range(world), key=lambda k: (loads[k], k))
        shares[r].append(units[i])
        loads[r] += units[i].rows
    return shares


class InteractionDatasource(Datasource):
    """A Ray Data datasource over a `DataPlan`, for all ranks or one rank's share.

    With `rank` set, it reads only that rank's units (`assign_units`) for the epoch
    being read, epoch = `first_epoch` + the dataset's execution index (one execution
    per epoch). With `shuffle`, the order of read tasks and the rows within each row
    group are permuted per epoch, seeded. `resume` (the consumed rows of a resumed
    epoch: unit -> None for all rows, or a bool mask) applies to the first execution only."""

    def __init__(self, plan: DataPlan, spec: EncodeSpec, store: Store, shuffle: bool, seed: int, block_rows: int, on_bad_file: str):
        super().__init__()
        self._plan_files = [f.uri for f in plan.files]
        self._units = plan.units
        self._columns = plan.columns
        self._spec = spec
        self._store = store
        self._shuffle = shuffle
        self._seed = seed
        self._block_rows = block_rows
        self._on_bad_file = on_bad_file
        self._empty = empty_columns(spec)
        self._rank: int | None = None
        self._world = 1
        self._first_epoch = 0
        self._resume: dict[int, np.ndarray | None] = {}

    def for_rank(self, rank: int, world: int, first_epoch: int = 0, resume: dict[int, np.ndarray | None] | None = None) -> InteractionDatasource:
        import copy

        ds = copy.copy(self)
        ds._rank, ds._world, ds._first_epoch, ds._resume = rank, world, first_epoch, dict(resume or {})
        return ds

    def get_name(self) -> str:
        return "FLMInteractions"

    def estimate_inmemory_data_size(self) -> int:
        return sum(u.rows for u in self._units) * 8 * (3 + len(self._spec.read.features)) // self._world

    def _groups(self, units: list[Unit]) -> list[list[Unit]]:
        groups, cur, rows = [], [], 0
        for u in units:
            if cur and rows + u.rows > self._block_rows:
                groups.append(cur)
                cur, rows = [], 0
            cur.append(u)
            rows += u.rows
        if cur:
            groups.append(cur)
        return groups

    def units_for(self, execution: int) -> list[Unit]:
        epoch = self._first_epoch + execution
        units = self._units if self._rank is None else assign_units(self._units, self._world, self._seed, epoch)[self._rank]
        if execution == 0 and self._resume:
            units = [u for u in units if not (u.index in self._resume and self._resume[u.index] is None)]
        return units

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None, data_context=None):
        execution = getattr(data_context, "_execution_idx", 0) if data_context is not None else 0
        units = self.units_for(execution)
        skip = {i: m for i, m in self._resume.items() if m is not None} if execution == 0 else {}
        shuffle_seed = None
        if self._shuffle:
            shuffle_seed = int(np.random.default_rng([self._seed, self._first_epoch + execution]).integers(1 << 62))
            units = [units[i] for i in np.random.default_rng(shuffle_seed).permutation(len(units))]
        tasks = []
        for g in self._groups(units):
            rows = sum(u.rows for u in g)
            meta = BlockMetadata(
                num_rows=None,  # splits, bad rows and resumed rows change the count
                size_bytes=rows * 8 * (3 + len(self._spec.read.features)),
                input_files=[self._plan_files[u.file] for u in g[:1]],
                exec_stats=None,
            )
            g_skip = {u.index: skip[u.index] for u in g if u.index in skip}
            args = (g, self._plan_files, self._spec, self._store, self._columns, shuffle_seed, self._on_bad_file, self._empty, g_skip)
            tasks.append(ReadTask(lambda a=args: read_units(*a), meta, per_task_row_limit=per_task_row_limit))
        return tasks


def build_dataset(plan: DataPlan, spec: EncodeSpec, store: Store, *, shuffle: bool, seed: int, block_rows: int, on_bad_file: str):
    return read(InteractionDatasource(plan, spec, store, shuffle, seed, block_rows, on_bad_file))


def read(source: InteractionDatasource):
    """A Ray Dataset over a datasource (all ranks' data, or one rank's share)."""
    import ray.data

    return ray.data.read_datasource(source, override_num_blocks=max(1, len(source._units)))


# ------------------------------------------------------------------ worker side


def empty_batch(features: tuple[FeatureConfig, ...], label: bool, rating: bool, history_len: int = 0) -> Batch:
    feats = {}
    for f in features:
        if f.kind == "numeric":
            feats[f.name] = torch.zeros(0, dtype=torch.float32)
        elif f.kind == "categorical":
            feats[f.name] = torch.zeros(0, dtype=torch.int64)
        else:
            feats[f.name] = torch.zeros(0, f.max_len, dtype=torch.int64)
    return Batch(
        user=torch.zeros(0, dtype=torch.int64),
        item=torch.zeros(0, dtype=torch.int64),
        features=feats,
        label=torch.zeros(0) if label else None,
        rating=torch.zeros(0) if rating else None,
        history=torch.zeros(0, history_len, dtype=torch.int64) if history_len else None,
        pos=torch.zeros(0, dtype=torch.int64),
    )


class BatchStream:
    """One worker's view of an epoch: fixed-size Batches plus per-reason bad-row counts.

    Bad rows are dropped here (counted, never trained on). A window of
    `shuffle_window` batches is permuted together (seeded) so rows from different read
    units mix; the window is cheap: one numpy permutation, no per-row Python."""

    def __init__(self, iterator, batch_size: int, features: tuple[FeatureConfig, ...], shuffle_window: int = 1, seed: int = 0, prefetch_batches: int = 2):
        self._it = iterator
        self._bs = batch_size
        self._features = features
        self._window = max(1, shuffle_window)
        self._seed = seed
        self._prefetch = prefetch_batches
        self.bad_examples: list[tuple[int, int]] = []  # (position, reason code) of a few bad rows

    def _to_batch(self, cols: dict[str, np.ndarray]) -> Batch:
        feats = {}
        for f in self._features:
            if f.kind == "multi":
                feats[f.name] = torch.from_numpy(np.stack([cols[f"f_{f.name}__{j}"] for j in range(f.max_len)], axis=1))
            else:
                feats[f.name] = torch.from_numpy(np.ascontiguousarray(cols[f"f_{f.name}"]))

        def t(name):
            return torch.from_numpy(np.ascontiguousarray(cols[name])) if name in cols else None

        history = None
        if "hist__0" in cols:
            width = sum(1 for k in cols if k.startswith("hist__"))
            history = torch.from_numpy(np.stack([cols[f"hist__{j}"] for j in range(width)], axis=1))

        return Batch(
            user=t("user"),
            item=t("item"),
            features=feats,
            label=t("label"),
            rating=t("rating"),
            history=history,
            pos=t("_pos"),
            user_key=t("user_key"),
            item_key=t("item_key"),
        )

    def epoch(self, epoch: int) -> Iterator[tuple[Batch, np.ndarray]]:
        """Yields (batch, bad_counts_since_last_yield). The final batch may be short."""
        counts = np.zeros(len(BAD_REASONS), dtype=np.int64)
        rng = np.random.default_rng([self._seed, epoch])
        pending: list[dict[str, np.ndarray]] = []
        pending_rows = 0
        window_rows = self._bs * self._window

        def flush(final: bool):
            nonlocal pending, pending_rows
            cols = {k: np.concatenate([p[k] for p in pending]) for k in pending[0]}
            n = len(cols["_pos"])
            if self._window > 1:
                perm = rng.permutation(n)
                cols = {k: v[perm] for k, v in cols.items()}
            full = n if final else (n // self._bs) * self._bs
            out = [{k: v[i : i + self._bs] for k, v in cols.items()} for i in range(0, full, self._bs)]
            rest = {k: v[full:] for k, v in cols.items()}
            pending = [rest] if len(rest["_pos"]) else []
            pending_rows = len(rest["_pos"])
            return out

        for raw in self._it.iter_batches(batch_size=window_rows, batch_format="numpy", prefetch_batches=self._prefetch):
            bad = raw.pop("_bad")
            counts += np.bincount(bad, minlength=len(BAD_REASONS))
            keep = bad == 0
            if len(self.bad_examples) < 5 and not keep.all():
                budgeted = ~keep & ~np.isin(bad, NOT_BUDGETED)
                idx = np.flatnonzero(budgeted)[: 5 - len(self.bad_examples)]
                self.bad_examples += [(int(raw["_pos"][i]), int(bad[i])) for i in idx]
            if not keep.all():
                raw = {k: v[keep] for k, v in raw.items()}
            if len(raw["_pos"]) == 0:
                continue
            pending.append(raw)
            pending_rows += len(raw["_pos"])
            if pending_rows >= window_rows:
                for cols in flush(final=False):
                    yield self._to_batch(cols), counts
                    counts = np.zeros_like(counts)
        if pending_rows:
            for cols in flush(final=True):
                yield self._to_batch(cols), counts
                counts = np.zeros_like(counts)
        if counts.any():
            yield None, counts
