"""Streaming ingest: Parquet on any URI -> Ray Data read tasks -> train workers.

Read tasks (spread over the cluster's CPUs by Ray Data) read row groups with pyarrow,
validate rows, hash IDs to table rows and tag each row with its position
(`unit << 32 | row`) and a bad-row reason code. Workers receive their share through
Ray Train's `get_dataset_shard`, drop and count bad rows, mix a window of batches and
cut fixed-size `Batch`es. Nothing here knows about process groups: the train loop
makes every rank agree on the step count.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from flm_dist.batch import Batch
from flm_dist.config import FeatureConfig, SplitConfig
from flm_dist.data.hashing import HashSpec, _fmix64
from flm_dist.data.plan import DataPlan, Unit
from flm_dist.data.schema import BAD_FILE_CODE, BAD_REASONS, DataError, ReadSpec
from flm_dist.storage import Store, split_uri

__all__ = [
    "EncodeSpec",
    "assign_units",
    "read",
    "BatchStream",
    "InteractionDatasource",
    "build_dataset",
    "empty_batch",
    "encode_table",
    "table_names",
]

log = logging.getLogger(__name__)


def table_names(features: list[FeatureConfig] | tuple[FeatureConfig, ...]) -> list[str]:
    """Embedding tables of a job: user, item, and one per categorical/multi feature."""
    return ["user", "item"] + [f.name for f in features if f.kind != "numeric"]


@dataclass(frozen=True)
class EncodeSpec:
    """Everything a read task needs to turn a Parquet table into model rows."""

    read: ReadSpec
    hash: HashSpec
    split: SplitConfig = field(default_factory=SplitConfig)
    side: str = "all"  # "all", or "train"/"eval" of data.split
    seed: int = 0


# ------------------------------------------------------------------ encoding


def _hash64(arr: pa.Array, seed: int) -> np.ndarray:
    """Full 64-bit hash of IDs (used for splits, independent of table sizes)."""
    spec = HashSpec.build({"_split": 1}, seed)
    from flm_dist.data.hashing import _fnv1a64_strings

    if pa.types.is_dictionary(arr.type):
        arr = arr.cast(arr.type.value_type)
    s = np.uint64(spec.tables["_split"]["seed"])
    if pa.types.is_integer(arr.type):
        k = pc.cast(arr.fill_null(0), pa.int64(), safe=False).to_numpy(zero_copy_only=False).view(np.uint64).copy()
    else:
        k = _fnv1a64_strings(arr)
    k ^= s
    return _fmix64(k)


def id_keys(arr: pa.Array) -> np.ndarray:
    """64-bit identity keys of raw IDs (int64 view), independent of table sizes: which
    user/item a row is, for evaluation slices and retrieval exclusions."""
    return _hash64(arr, KEY_SEED).view(np.int64)


KEY_SEED = 0x5EED


def _split_mask(t: pa.Table, split: SplitConfig, side: str, seed: int) -> np.ndarray | None:
    """True for rows on `side`. Hash-based, so identical across runs and worker counts."""
    if side == "all" or split.by == "none":
        return None
    if split.by == "time":
        ts = _ts_seconds(t.column("ts"))
        in_eval = ts >= split.time_cutoff
    else:
        if split.by == "user":
            h = _hash64(t.column("user_id").combine_chunks(), seed)
        else:
            # by (user, item) pair: repeats of a pair stay on one side (no leakage)
            h = _hash64(t.column("user_id").combine_chunks(), seed)
            h ^= _hash64(t.column("item_id").combine_chunks(), seed + 1) * np.uint64(0x9E3779B97F4A7C15)
            h = _fmix64(h)
        in_eval = (h >> np.uint64(11)).astype(np.float64) / float(1 << 53) < split.fraction
    return in_eval if side == "eval" else ~in_eval


def _ts_seconds(col) -> np.ndarray:
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    if pa.types.is_timestamp(col.type):
        col = pc.cast(col, pa.timestamp("s"), safe=False).cast(pa.int64())
    elif pa.types.is_date(col.type):
        col = pc.cast(pc.cast(col, pa.timestamp("s")), pa.int64())
    return pc.cast(col.fill_null(0), pa.int64(), safe=False).to_numpy(zero_copy_only=False)


def _float_col(t: pa.Table, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(values as float32 with NaN for nulls, null mask)."""
    col = t.column(name).combine_chunks()
    nulls = col.is_null().to_numpy(zero_copy_only=False)
    vals = pc.cast(col, pa.float64(), safe=False).fill_null(np.nan).to_numpy(zero_copy_only=False)
    return vals.astype(np.float32), nulls


def encode_table(t: pa.Table, spec: EncodeSpec, unit: int = 0, row_offset: int = 0) -> dict[str, np.ndarray]:
    """Validate and hash one Parquet table; the pure function behind every ingest path.

    Returns numpy columns: `user`, `item` (int64 rows), `f_<name>` per feature
    (multi features as `f_<name>__<j>` columns, -1 padded), `label`/`rating` (float32,
    when read), `_pos` (int64 position) and `_bad` (int8 reason code, 0 = good)."""
    n = t.num_rows
    pos = (np.int64(unit) << np.int64(32)) | (np.arange(n, dtype=np.int64) + row_offset)
    keep = _split_mask(t, spec.split, spec.side, spec.seed)
    if keep is not None:
        t = t.filter(pa.array(keep))
        pos = pos[keep]
        n = t.num_rows
    bad = np.zeros(n, dtype=np.int8)

    def mark(mask: np.ndarray, reason: str) -> None:
        # The first reason found for a row wins; later checks only mark good rows.
        code = BAD_REASONS.index(reason)
        np.copyto(bad, np.int8(code), where=mask & (bad == 0))

    out: dict[str, np.ndarray] = {}
    for col, table in (("user_id", "user"), ("item_id", "item")):
        arr = t.column(col).combine_chunks()
        mark(arr.is_null().to_numpy(zero_copy_only=False), f"null_{col}")
        out[table] = spec.hash.hash(table, arr)
        if spec.read.keys:
            out[f"{table}_key"] = id_keys(arr)
    rs = spec.read
    if rs.read_label and "label" in t.column_names:
        v, nulls = _float_col(t, "label")
        mark(nulls, "null_label")
        mark(~np.isfinite(v) & ~nulls, "nonfinite_label")
        with np.errstate(invalid="ignore"):
            mark((v < 0) | (v > 1), "label_out_of_range")
        out["label"] = v
    if rs.read_rating and "rating" in t.column_names:
        v, nulls = _float_col(t, "rating")
        mark(nulls, "null_rating")
        mark(~np.isfinite(v) & ~nulls, "nonfinite_rating")
        lo, hi = rs.rating_range
        with np.errstate(invalid="ignore"):
            mark((v < lo) | (v > hi), "rating_out_of_range")
        out["rating"] = v
    if rs.need_ts:
        mark(t.column("ts").combine_chunks().is_null().to_numpy(zero_copy_only=False), "null_ts")
    for f in rs.features:
        col = t.column(f.name).combine_chunks()
        if f.kind == "numeric":
            v = pc.cast(col, pa.float64(), safe=False).fill_null(0.0).to_numpy(zero_copy_only=False)
            out[f"f_{f.name}"] = np.nan_to_num(v, nan=0.0, posinf=0.0, neginf=0.0).astype(np.float32)
        elif f.kind == "categorical":
            # A null feature value is a value of its own (hashes like ""/0), not a bad row.
            out[f"f_{f.name}"] = spec.hash.hash(f.name, col)
        else:
            out.update(_encode_multi(col, f, spec.hash))
    out["_pos"] = pos
    out["_bad"] = bad
    return out


def _encode_multi(col: pa.Array, f: FeatureConfig, hs: HashSpec) -> dict[str, np.ndarray]:
    n = len(col)
    col = col.fill_null(pa.scalar([], type=col.type)) if col.null_count else col
    offsets = col.offsets.to_numpy(zero_copy_only=False).astype(np.int64)
    values = col.values if col.offset == 0 else col.flatten()
    if col.offset:
        offsets = offsets - offsets[0]
    rows = hs.hash(f.name, values)
    lengths = np.minimum(offsets[1:] - offsets[:-1], f.max_len)
    out = {}
    for j in range(f.max_len):
        has = lengths > j
        colj = np.full(n, -1, dtype=np.int64)
        colj[has] = rows[offsets[:-1][has] + j]
        out[f"f_{f.name}__{j}"] = colj
    return out


# ------------------------------------------------------------------ Ray Data source


def _read_units(units: list[Unit], plan_files: list, spec: EncodeSpec, store: Store, columns: list[str], shuffle_seed: int | None, on_bad_file: str, empty: dict, skip_rows: dict):
    """Read, validate and hash row groups. `skip_rows[unit]` marks rows already trained
    on in this epoch (a resumed epoch); they are dropped here, before they cost anything downstream."""
    fs, _ = store.arrow_fs(plan_files[units[0].file] if units else "")
    open_file: tuple[int, pq.ParquetFile] | None = None
    for u in units:
        uri = plan_files[u.file]
        try:
            if open_file is None or open_file[0] != u.file:
                pf = pq.ParquetFile(fs.open_input_file(split_uri(uri)[1]))
                open_file = (u.file, pf)
            pf = open_file[1]
            present = [c for c in columns if c in pf.schema_arrow.names]
            t = pf.read_row_group(u.row_group, columns=present)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError) as e:
            corrupt = isinstance(e, (pa.ArrowInvalid, pa.ArrowNotImplementedError))
            if corrupt and on_bad_file == "skip":
                log.warning("skipping %s row group %d: %s", uri, u.row_group, e)
                # One marker row per skipped unit, so workers count it as a bad file.
                marker = {k: np.zeros(1, v.dtype) for k, v in empty.items()}
                marker["_pos"][0] = np.int64(u.index) << np.int64(32)
                marker["_bad"][0] = BAD_FILE_CODE
                yield pa.table(marker)
                continue
            raise DataError(f"{uri}: row group {u.row_group}: cannot read: {e}") from e
        if t.num_rows != u.rows:
            raise DataError(f"{uri}: row group {u.row_group} has {t.num_rows} rows, the plan expected {u.rows} (file changed during the run?)")
        cols = encode_table(t, spec, u.index, 0)
        seen = skip_rows.get(u.index)
        if seen is not None:
            keep = ~seen[cols["_pos"] & 0xFFFFFFFF]
            cols = {k: v[keep] for k, v in cols.items()}
        if shuffle_seed is not None and len(cols["_pos"]) > 1:
            perm = np.random.default_rng([shuffle_seed, u.index]).permutation(len(cols["_pos"]))
            cols = {k: v[perm] for k, v in cols.items()}
        yield pa.table(cols)


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
        self._empty = _empty_columns(spec)
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
            tasks.append(ReadTask(lambda a=args: _read_units(*a), meta, per_task_row_limit=per_task_row_limit))
        return tasks


def _empty_columns(spec: EncodeSpec) -> dict[str, np.ndarray]:
    """Zero-row columns with the exact names/dtypes `encode_table` produces."""
    rs = spec.read
    out = {"user": np.zeros(0, np.int64), "item": np.zeros(0, np.int64)}
    if rs.keys:
        out["user_key"] = np.zeros(0, np.int64)
        out["item_key"] = np.zeros(0, np.int64)
    if rs.read_label:
        out["label"] = np.zeros(0, np.float32)
    if rs.read_rating:
        out["rating"] = np.zeros(0, np.float32)
    for f in rs.features:
        if f.kind == "numeric":
            out[f"f_{f.name}"] = np.zeros(0, np.float32)
        elif f.kind == "categorical":
            out[f"f_{f.name}"] = np.zeros(0, np.int64)
        else:
            for j in range(f.max_len):
                out[f"f_{f.name}__{j}"] = np.zeros(0, np.int64)
    out["_pos"] = np.zeros(0, np.int64)
    out["_bad"] = np.zeros(0, np.int8)
    return out


def build_dataset(plan: DataPlan, spec: EncodeSpec, store: Store, *, shuffle: bool, seed: int, block_rows: int, on_bad_file: str):
    return read(InteractionDatasource(plan, spec, store, shuffle, seed, block_rows, on_bad_file))


def read(source: InteractionDatasource):
    """A Ray Dataset over a datasource (all ranks' data, or one rank's share)."""
    import ray.data

    return ray.data.read_datasource(source, override_num_blocks=max(1, len(source._units)))


# ------------------------------------------------------------------ worker side


def empty_batch(features: tuple[FeatureConfig, ...], label: bool, rating: bool) -> Batch:
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

        return Batch(
            user=t("user"),
            item=t("item"),
            features=feats,
            label=t("label"),
            rating=t("rating"),
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
                idx = np.flatnonzero(~keep)[: 5 - len(self.bad_examples)]
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
