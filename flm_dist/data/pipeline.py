"""Streaming ingest: Parquet on any URI -> Ray Data read tasks -> train workers.

Read tasks (spread over the cluster's CPUs by Ray Data) run `encode.read_units`:
read row groups with pyarrow, validate rows, hash IDs to table rows and tag each row
with its position (`unit << 32 | row`) and a bad-row reason code. Each train worker
reads its own deterministic share of the row groups (`assign_units`; ingest.py's
FLMDataConfig hands them out); `batches.py` drops and counts bad rows, mixes a window
of batches and cuts fixed-size `Batch`es. Nothing here knows about process groups
(the train loop makes every rank agree on the step count) or imports torch: Ray
Data's read tasks and coordinator actors import this module in fresh processes.
"""

from __future__ import annotations

import logging

import numpy as np
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from flm_dist.data.encode import EncodeSpec, empty_columns, read_units
from flm_dist.data.plan import DataPlan, Unit
from flm_dist.storage import Store

__all__ = ["InteractionDatasource", "assign_units", "build_dataset", "read"]

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


def read(source: InteractionDatasource, *, node_id: str | None = None, slots: int | None = None):
    """A Ray Dataset over a datasource (all ranks' data, or one rank's share).

    Each read task is one block: `override_num_blocks=1` stops Ray Data from splitting
    a rank's blocks to reach a parallelism meant for the whole dataset. With `slots`
    (one rank's share, `ingest.read_slots`), at most that many read tasks run at once,
    without a CPU reservation, on the rank's node `node_id` when known: the blocks never
    cross the network to their worker."""
    import ray.data

    if slots is None:
        return ray.data.read_datasource(source, override_num_blocks=1)
    # A rank's worker dies with its node, so a hard constraint loses nothing (Ray's
    # own node-local reads use the same label).
    on_node = {"ray.io/node-id": node_id} if node_id is not None else None
    return ray.data.read_datasource(source, override_num_blocks=1, num_cpus=0, concurrency=slots, label_selector=on_node)
