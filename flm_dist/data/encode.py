"""Encoding: one Parquet table -> model rows. Validation, ID hashing, splits and the
read-task body that Ray Data runs. Pure numpy/pyarrow: no torch, no Ray, so read
tasks start fast and other tools (inspect, benchmarks) use it without either."""

from __future__ import annotations

import logging
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from flm_dist.config import DataConfig, FeatureConfig, SplitConfig
from flm_dist.data.hashing import HashSpec, fmix64, hash64, identity_keys
from flm_dist.data.plan import Unit
from flm_dist.data.schema import BAD_FILE_CODE, BAD_REASONS, DataError, ReadSpec
from flm_dist.data.sequences import expand, history_rows
from flm_dist.storage import StorageError, Store, split_uri

__all__ = ["EncodeSpec", "empty_columns", "encode_table", "event_times", "history_events", "read_units", "sequence_slots", "split_mask", "training_read"]

log = logging.getLogger(__name__)

# Row groups a read task fetches ahead of the one it encodes, in threads: hides object
# storage's per-request latency (many small files) at the cost of READ_AHEAD raw row groups.
READ_AHEAD = 4


@dataclass(frozen=True)
class EncodeSpec:
    """Everything a read task needs to turn a Parquet table into model rows."""

    read: ReadSpec
    hash: HashSpec
    split: SplitConfig = field(default_factory=SplitConfig)
    # "all"; "eval" (data.split's eval rows); "known" (the rest: training data); of
    # which "valid" (the data.valid_fraction carve) and "train" (what is trained on)
    side: str = "all"
    seed: int = 0
    valid_fraction: float = 0.0


def training_read(data: DataConfig, task: str, history_len: int, hash_spec: HashSpec, seed: int, eval_given: bool) -> EncodeSpec:
    """How a run reads its training data (side "train"): the split (an explicit eval set,
    `eval_given`, replaces `data.split`), the validation carve held out of it, and the
    checks each row passes for `task`. Training (`launch.plan_datasets`) and what its
    export serves (the history snapshot, the transition counts) both take it from here.

    The carve (a function of the rows alone: a pair hash, or leave-one-out's
    second-to-last event) is held out of every training side, pretraining too: a
    backbone that trained on a fine-tune's validation rows inflates the pretrained arm's
    validation score, and early stopping then picks epochs on memorised pairs."""
    split = SplitConfig() if eval_given else data.split
    read = ReadSpec.for_task(task, data.features, data.rating_range, need_ts=split.by == "time", history_len=history_len)
    carve = data.valid_fraction if not data.valid else 0.0
    return EncodeSpec(read=read, hash=hash_spec, split=split, side="train", seed=seed, valid_fraction=carve)


# ------------------------------------------------------------------ encoding


def _unit_hash(t: pa.Table, columns: tuple[str, ...], seed: int) -> np.ndarray:
    """A uniform number in [0, 1) per row from a hash of `columns`."""
    h = hash64(t.column(columns[0]).combine_chunks(), seed)
    for k, c in enumerate(columns[1:], start=1):
        h ^= hash64(t.column(c).combine_chunks(), seed + k) * np.uint64(0x9E3779B97F4A7C15)
        h = fmix64(h)
    return (h >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def split_mask(t: pa.Table, spec: EncodeSpec, index: np.ndarray | None = None, seq_len: np.ndarray | None = None) -> np.ndarray | None:
    """True for rows on `spec.side`. A function of the data alone (hashes, times,
    positions in a user's sequence), so identical across runs and worker counts.
    `index` / `seq_len`: each event's place in its user's sequence (sequence data)."""
    split, side = spec.split, spec.side
    if side == "all":
        return None
    if split.by == "last":
        if index is None:
            raise DataError("data.split.by=last (leave-one-out) needs per-user sequences: run `flm-dist data sequences IN OUT`")
        in_eval = index == seq_len - 1
        in_valid = (index == seq_len - 2) if spec.valid_fraction > 0 else np.zeros(t.num_rows, dtype=bool)
        return {"eval": in_eval, "known": ~in_eval, "valid": in_valid}.get(side, ~in_eval & ~in_valid)
    in_eval = np.zeros(t.num_rows, dtype=bool)
    if split.by == "time":
        in_eval = _ts_seconds(t.column("ts")) >= split.time_cutoff
    elif split.by == "user":
        in_eval = _unit_hash(t, ("user_id",), spec.seed) < split.fraction
    elif split.by == "random":
        # by (user, item) pair: repeats of a pair stay on one side (no leakage)
        in_eval = _unit_hash(t, ("user_id", "item_id"), spec.seed) < split.fraction
    if side == "eval":
        return in_eval
    known = ~in_eval
    if side == "known":
        return known
    # the validation carve, by pair with its own seed: independent of the eval split
    in_valid = _unit_hash(t, ("user_id", "item_id"), spec.seed + 2) < spec.valid_fraction if spec.valid_fraction > 0 else np.zeros(t.num_rows, dtype=bool)
    return known & (in_valid if side == "valid" else ~in_valid)


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
    when read), `hist__<j>` (history rows, -1 padded on the left, with
    `read.history_len`), `_pos` (int64 position) and `_bad` (int8 reason code, 0 = good)."""
    if spec.read.sequence:
        return _encode_sequences(t, spec, unit)
    n = t.num_rows
    pos = (np.int64(unit) << np.int64(32)) | (np.arange(n, dtype=np.int64) + row_offset)
    keep = split_mask(t, spec)
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
            out[f"{table}_key"] = identity_keys(arr)
    rs = spec.read
    if rs.read_label and "label" in t.column_names:
        v, nulls = _float_col(t, "label")
        mark(nulls, "null_label")
        mark(~np.isfinite(v) & ~nulls, "nonfinite_label")
        with np.errstate(invalid="ignore"):
            mark((v < 0) | (v > 1), "label_out_of_range")
            if rs.positives_only:
                mark(v <= 0, "not_positive")
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
            # null is a missing value and enters as 0; NaN / Inf is a bad row, never a silent 0
            v = pc.cast(col, pa.float64(), safe=False).fill_null(0.0).to_numpy(zero_copy_only=False)
            with np.errstate(over="ignore"):
                v32 = v.astype(np.float32)  # past float32's range a finite double becomes Inf
            finite = np.isfinite(v32)
            mark(~finite, "nonfinite_feature")
            out[f"f_{f.name}"] = np.where(finite, v32, np.float32(0.0))
        elif f.kind == "categorical":
            # A null feature value is a value of its own (hashes like ""/0), not a bad row.
            out[f"f_{f.name}"] = spec.hash.hash(f.name, col)
        else:
            out.update(_encode_multi(col, f, spec.hash))
    out["_pos"] = pos
    out["_bad"] = bad
    return out


def _encode_sequences(t: pa.Table, spec: EncodeSpec, unit: int) -> dict[str, np.ndarray]:
    """Per-user sequences: one example per event (a leaf slot of item_id), each with the
    rows of the user's previous items, at most `read.history_len`. Every event is
    validated and hashed first, the history taken from the good ones, then the split
    keeps the events of `spec.side`. A test event's history is its user's whole past; a
    training example's holds training events only, since held-out events (a random or
    time split's, the validation carve's) can sit between them and are what the model
    is judged on, not inputs it may train with; a validation example's holds no test
    event, so that the epoch kept is chosen without them."""
    flat, _, index, seq_len, placeholder = expand(t)
    cols, usable = history_events(flat, placeholder, spec, unit)
    keep = split_mask(flat, spec, index, seq_len)
    length = spec.read.history_len
    if length:
        times = event_times(flat, index) if "ts" in flat.column_names else None
        past = usable
        if keep is not None and spec.side in ("train", "known"):
            past = usable & keep
        elif keep is not None and spec.side == "valid":  # early stopping reads no test event
            past = usable & split_mask(flat, replace(spec, side="known"), index, seq_len)
        hist = history_rows(cols["item"], index, length, usable=past, times=times)
        for j in range(length):
            cols[f"hist__{j}"] = np.ascontiguousarray(hist[:, j])
    if keep is not None:
        cols = {k: v[keep] for k, v in cols.items()}
    return cols


def history_events(flat: pa.Table, placeholder: np.ndarray, spec: EncodeSpec, unit: int = 0) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Every event of `expand`ed sequences encoded under `spec.read`'s checks, whatever
    its side of the split, and which events may enter a history: good rows with a time
    (when the file has times). A retrieval run's label-0 events are not good, nor is a
    placeholder. Training's histories, the export's snapshot of each user's last items
    and the transition counts all take this, so that what is served is what was trained."""
    cols = encode_table(flat, replace(spec, read=replace(spec.read, sequence=False), side="all"), unit, 0)
    cols["_bad"][placeholder] = BAD_REASONS.index("empty_sequence")
    usable = cols["_bad"] == 0
    if "ts" in flat.column_names:
        usable &= flat.column("ts").is_valid().to_numpy(zero_copy_only=False)
    return cols, usable


def event_times(flat: pa.Table, index: np.ndarray) -> np.ndarray:
    """Comparable `ts` of each event; refuses a sequence whose times go backwards (its
    history would hold later events)."""
    ts = flat.column("ts").combine_chunks()
    if pa.types.is_date32(ts.type):
        ts = pc.cast(ts, pa.int32())
    if not (pa.types.is_integer(ts.type) or pa.types.is_floating(ts.type)):
        ts = pc.cast(ts, pa.int64())  # timestamps, dates, durations
    valid = ts.is_valid().to_numpy(zero_copy_only=False)
    times = ts.fill_null(0).to_numpy(zero_copy_only=False)
    if times.dtype.kind == "f":
        valid &= ~np.isnan(times)
    # An event without a time takes the last time before it in its user's sequence (the
    # user's first times: the lowest value), so order and ties are judged across it: in
    # [7, null, 3] the 3 still comes after the 7, in [5, null, 5] the two 5s still tie.
    pos = np.arange(len(times))
    last = np.maximum.accumulate(np.where(valid, pos, -1))
    carried = valid | (last >= pos - index)
    low = np.iinfo(times.dtype).min if times.dtype.kind in "iu" else -np.inf
    times = np.where(valid, times, np.where(carried, times[np.maximum(last, 0)], low))
    back = np.flatnonzero((index[1:] > 0) & (times[1:] < times[:-1]))
    if len(back):
        i = int(back[0]) + 1
        j = int(last[i - 1])
        raise DataError(
            f"user {flat.column('user_id')[i].as_py()!r}: event {int(index[i])} of the sequence has ts {ts[i].as_py()} after "
            f"{ts[j].as_py()}; per-user sequences list events in time order (write them with `flm-dist data sequences`)"
        )
    return times


def sequence_slots(t: pa.Table) -> int:
    """Events (leaf slots of item_id, an empty or null list one each) of a sequence table."""
    lengths = pc.fill_null(pc.list_value_length(t.column("item_id").combine_chunks()), 0).to_numpy(zero_copy_only=False)
    return int(np.maximum(lengths, 1).sum())


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


def read_units(units: list[Unit], plan_files: list, spec: EncodeSpec, store: Store, columns: list[str], shuffle_seed: int | None, on_bad_file: str, empty: dict, skip_rows: dict):
    """Read, validate and hash row groups. `skip_rows[unit]` marks rows already trained
    on in this epoch (a resumed epoch); they are dropped here, before they cost anything downstream."""
    fs, _ = store.arrow_fs(plan_files[units[0].file] if units else "")
    footers: dict[int, pq.FileMetaData] = {}

    def fetch(u: Unit) -> pa.Table:
        # Runs in the I/O threads: on object storage a row group is a few HTTP requests
        # whose latency, not bandwidth, dominates for small files.
        handle = fs.open_input_file(split_uri(plan_files[u.file])[1])
        pf = pq.ParquetFile(handle, metadata=footers.get(u.file))
        footers.setdefault(u.file, pf.metadata)  # parsed once per file, shared (read-only)
        present = [c for c in columns if c in pf.schema_arrow.names]
        return pf.read_row_group(u.row_group, columns=present)

    with ThreadPoolExecutor(max_workers=READ_AHEAD, thread_name_prefix="flm-read") as pool:
        ahead = deque(pool.submit(fetch, u) for u in units[:READ_AHEAD])
        for i, u in enumerate(units):
            if i + READ_AHEAD < len(units):
                ahead.append(pool.submit(fetch, units[i + READ_AHEAD]))
            uri = plan_files[u.file]
            try:
                t = ahead.popleft().result()
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError) as e:
                corrupt = isinstance(e, (pa.ArrowInvalid, pa.ArrowNotImplementedError))
                if corrupt and on_bad_file == "skip":
                    log.warning("skipping %s row group %d: %s", uri, u.row_group, e)
                    # One marker row per skipped unit, so workers count it as a bad file.
                    marker = {k: np.zeros(1, v.dtype) for k, v in empty.items()}
                    marker["_pos"][0] = np.int64(u.index) << np.int64(32)
                    marker["_bad"][0] = BAD_FILE_CODE
                    marker["_side_rows"][0] = 1  # the unit's one row: counting it finishes the unit
                    yield pa.table(marker)
                    continue
                for f in ahead:
                    f.cancel()
                if not corrupt:  # the store (down, throttling past the retries, access): a restart may find it back
                    raise StorageError(f"{uri}: row group {u.row_group}: cannot read: {e}") from e
                raise DataError(f"{uri}: row group {u.row_group}: cannot read: {e}") from e
            yield from _encode_unit(t, u, uri, spec, skip_rows, shuffle_seed)


def _encode_unit(t: pa.Table, u: Unit, uri: str, spec: EncodeSpec, skip_rows: dict, shuffle_seed: int | None):
    rows = sequence_slots(t) if spec.read.sequence else t.num_rows
    if rows != u.rows:
        raise DataError(f"{uri}: row group {u.row_group} has {rows} rows, the plan expected {u.rows} (file changed during the run?)")
    try:
        cols = encode_table(t, spec, u.index, 0)
    except DataError as e:  # a row's own fault (a sequence's lists of unequal length, its time going back): name where
        raise DataError(f"{uri}: row group {u.row_group}: {e}") from None
    # The unit's rows on this side of the split: once that many are consumed (trained or
    # dropped as bad), the unit is done (`position.ConsumedRows`), its held-out rows aside.
    cols["_side_rows"] = np.full(len(cols["_pos"]), len(cols["_pos"]), np.int32)
    seen = skip_rows.get(u.index)
    if seen is not None:
        keep = ~seen[cols["_pos"] & 0xFFFFFFFF]
        cols = {k: v[keep] for k, v in cols.items()}
    if shuffle_seed is not None and len(cols["_pos"]) > 1:
        perm = np.random.default_rng([shuffle_seed, u.index]).permutation(len(cols["_pos"]))
        cols = {k: v[perm] for k, v in cols.items()}
    yield pa.table(cols)


def empty_columns(spec: EncodeSpec) -> dict[str, np.ndarray]:
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
    for j in range(rs.history_len):
        out[f"hist__{j}"] = np.zeros(0, np.int64)
    out["_pos"] = np.zeros(0, np.int64)
    out["_bad"] = np.zeros(0, np.int8)
    out["_side_rows"] = np.zeros(0, np.int32)
    return out
