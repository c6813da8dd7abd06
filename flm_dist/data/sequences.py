"""Per-user sequences: the interaction log grouped by user and ordered by time, one
row per user, for models that read a user's history (`model.history_len`).

    flm-dist data sequences IN OUT [--files N]

A Ray Data stage hash-partitions the log by user across the cluster (no machine holds
the whole log), orders each user's events by `ts` and writes one row per user:
`user_id` and, for every other column, the list of its values in event order
(`item_id`, `ts`, `label`, features...). Ties on `ts` are broken by item ID, then by
the values of the other columns in their order (a list's values joined, a dictionary's
decoded; struct columns aside), so the order is the same on every run.

Read tasks expand the rows back into one example per event (`expand`), each with the
hashed rows of the user's previous items, at most `history_len` of them, strictly
earlier in time (`history_rows`: events with the example's own `ts` are left out of
its history, whatever their order): the history is never stored once per event.
Positions stay exact for resuming: each event is a leaf slot of the `item_id` list
column, counted in the Parquet footer (`num_values`); an empty or null list takes one
slot and is a bad row (`empty_sequence`).
"""

from __future__ import annotations

import logging
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from flm_dist.data.schema import DataError, is_id_type, is_ts_type
from flm_dist.storage import Store, is_remote, join, split_uri

__all__ = ["build_sequences", "check_complete", "expand", "history_rows", "is_sequence"]

log = logging.getLogger(__name__)


def is_sequence(schema: pa.Schema) -> bool:
    """Per-user sequence data: `item_id` is a list column."""
    i = schema.get_field_index("item_id")
    return i >= 0 and (pa.types.is_list(schema.field(i).type) or pa.types.is_large_list(schema.field(i).type))


def expand(t: pa.Table, where: str = "") -> tuple[pa.Table, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One row per event of a sequence table: (flat table with the log's columns, the
    user row of each event, its index in the user's sequence, the user's sequence
    length, and a mask of placeholder slots: empty or null sequences, one slot each)."""
    items = t.column("item_id").combine_chunks()
    n = len(items)
    lengths = pc.fill_null(pc.list_value_length(items), 0).to_numpy(zero_copy_only=False).astype(np.int64)
    slots = np.maximum(lengths, 1)
    user_of = np.repeat(np.arange(n), slots)
    start = np.repeat(np.cumsum(slots) - slots, slots)
    index = np.arange(int(slots.sum()), dtype=np.int64) - start
    placeholder = np.repeat(lengths == 0, slots)
    seq_len = np.repeat(lengths, slots)
    cols = {}
    take = pa.array(user_of)
    for name in t.column_names:
        col = t.column(name).combine_chunks()
        if pa.types.is_list(col.type) or pa.types.is_large_list(col.type):
            col_len = pc.fill_null(pc.list_value_length(col), 0).to_numpy(zero_copy_only=False)
            if not np.array_equal(col_len, lengths):
                bad = int(np.flatnonzero(col_len != lengths)[0])
                raise DataError(
                    f"{where + ': ' if where else ''}row {bad} (user {t.column('user_id')[bad].as_py()!r}): column '{name}' has {int(col_len[bad])} "
                    f"values but 'item_id' has {int(lengths[bad])}; every list column of a sequence holds one value per event"
                )
            values = pc.list_flatten(col)
            if placeholder.any():  # one null value in each placeholder slot
                values = _scatter(values, np.flatnonzero(~placeholder), int(slots.sum()))
            cols[name] = values
        else:
            cols[name] = col.take(take)
    return pa.table(cols), user_of, index, seq_len, placeholder


def _scatter(values: pa.Array, idx: np.ndarray, n: int) -> pa.Array:
    """`values` placed at positions `idx` of an array of length `n`, nulls elsewhere."""
    pos = np.full(n, -1, dtype=np.int64)
    pos[idx] = np.arange(len(idx))
    return values.take(pa.array(pos, mask=pos < 0))


def history_rows(item_rows: np.ndarray, index: np.ndarray, length: int, usable: np.ndarray | None = None, times: np.ndarray | None = None) -> np.ndarray:
    """[events, length] hashed item rows of each event's previous events (same user),
    left-padded with -1 and packed: column length-1 holds the most recent. `index`: each
    event's position in its user's sequence (events of a user are contiguous, in order).
    `usable`: events that may appear in a history (bad rows may not). `times` (the
    events' `ts`, non-decreasing within a user): a history holds only events strictly
    earlier in time, so events at the example's own time (a tie) are left out."""
    e = len(item_rows)
    pos = np.arange(e, dtype=np.int64)
    user_start = pos - index
    usable = np.ones(e, dtype=bool) if usable is None else usable.astype(bool)
    cutoff = pos  # the history of event i: usable events of its user at positions < cutoff[i]
    if times is not None:
        tie_start = (index == 0) | np.r_[True, times[1:] != times[:-1]]
        cutoff = np.maximum.accumulate(np.where(tie_start, pos, 0))
    before = np.concatenate([[0], np.cumsum(usable)])  # usable events at positions < p
    events = np.flatnonzero(usable)
    have = before[cutoff] - before[user_start]
    out = np.full((e, length), -1, dtype=np.int64)
    for j in range(length):
        back = length - j  # column j holds the `back`-th most recent
        ok = have >= back
        out[ok, j] = item_rows[events[before[cutoff[ok]] - back]]
    return out


# ------------------------------------------------------------------ the Ray Data stage


def _to_sequences(block: pa.Table) -> pa.Table:
    """One block holding every event of its users -> one row per user, events in order."""
    if block.num_rows == 0:
        return block
    order = {c: block.column(c) for c in ("user_id", "ts", "item_id")}
    for c in block.column_names:
        if c not in order and (key := _sort_key(block.column(c))) is not None:
            order[f"{len(order)}"] = key
    block = block.take(pc.sort_indices(pa.table(order), sort_keys=[(c, "ascending") for c in order])).combine_chunks()
    # Sorted, each user's events are one run of rows: every other column becomes a list
    # column over those runs, whatever its type (a multi-valued feature's lists, a
    # dictionary or a struct, which a hash "list" aggregation has no kernel for).
    users = block.column("user_id").combine_chunks()
    starts = np.flatnonzero(np.r_[True, pc.not_equal(users[1:], users[:-1]).to_numpy(zero_copy_only=False)])
    offsets = pa.array(np.r_[starts, len(users)], pa.int32())
    cols = {"user_id": users.take(pa.array(starts))}
    for c in block.column_names:
        if c != "user_id":
            cols[c] = pa.ListArray.from_arrays(offsets, block.column(c).combine_chunks())
    return pa.table(cols)


def _sortable(t: pa.DataType) -> bool:
    return pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_boolean(t) or pa.types.is_timestamp(t)


def _sort_key(col: pa.ChunkedArray) -> pa.ChunkedArray | None:
    """A column as a tie-break Arrow can sort: itself, a dictionary's values, a list's
    values joined into one string; None for what has no such key (structs)."""
    t = col.type
    if pa.types.is_dictionary(t):
        col, t = col.cast(t.value_type), t.value_type
    if _sortable(t):
        return col
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        try:
            return pc.binary_join(pc.cast(col, pa.list_(pa.string())), "\x1f")
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            return None
    return None


def build_sequences(store: Store, src: str, out: str, files: int | None = None, users_per_row_group: int | None = None) -> dict:
    """Write `src` (an interaction log) as per-user sequences under `out`; returns a
    report (users, events, rows dropped for a null user_id / item_id / ts, empty input
    files skipped, files written)."""
    import ray

    from flm_dist.data.plan import leaf_index, list_files

    t0 = time.perf_counter()
    inputs = list_files(store, src)
    if not inputs:
        raise DataError(f"{src}: no data files found (names starting with '_' or '.' are ignored)")
    fs, _ = store.arrow_fs(src)
    import pyarrow.parquet as pq

    existing = list_files(store, out) if store.exists(out) else []
    if existing:
        raise DataError(f"{out} already holds data files ({existing[0].uri}); write sequences to a new prefix")
    empty = [f for f in inputs if f.size == 0]  # no rows: skipped, as training's plan skips them
    inputs = [f for f in inputs if f.size > 0]
    rows_in, first = 0, None
    for f in inputs:  # every file: Ray reads them all with the first one's schema, a missing ts as nulls
        try:
            md = pq.ParquetFile(split_uri(f.uri)[1], filesystem=fs).metadata
        except (pa.ArrowInvalid, OSError) as e:
            raise DataError(f"{f.uri}: not a readable Parquet file ({type(e).__name__}: {e}); repair it or move it out of {src}") from None
        schema = md.schema.to_arrow_schema()
        for col in ("user_id", "item_id", "ts"):
            if schema.get_field_index(col) < 0:
                raise DataError(f"{f.uri}: column '{col}' is missing; per-user sequences order each user's events by ts")
        if is_sequence(schema):
            raise DataError(f"{f.uri} already holds per-user sequences ('item_id' is a list column)")
        _check_key_types(f.uri, schema, first)
        first = first or (f.uri, schema)
        rows_in += md.num_rows
    if not inputs:
        raise DataError(f"{src}: every data file is empty ({len(empty)})")
    ds = ray.data.read_parquet([split_uri(f.uri)[1] for f in inputs], filesystem=fs)
    ds = ds.map_batches(_drop_null_keys, batch_format="pyarrow")
    ds = ds.repartition(files or partitions(rows_in), keys=["user_id"]).map_batches(_to_sequences, batch_format="pyarrow", batch_size=None)
    store.ensure_bucket(out)
    # Until the stage has written every file its marker says it has not: training refuses
    # a prefix a stopped stage left half written (`check_complete`).
    store.write_json(join(out, STAGE_MARKER), {"complete": False, "input": src})
    # Row groups of USERS_PER_ROW_GROUP users: a row group is a training read unit (never
    # split), which Arrow's default (up to 1M rows) would make a whole partition.
    ds.write_parquet(split_uri(out)[1], filesystem=fs, min_rows_per_file=1, row_group_size=users_per_row_group or USERS_PER_ROW_GROUP)
    written = list_files(store, out)
    users = events = 0
    for f in written:
        md = pq.ParquetFile(split_uri(f.uri)[1], filesystem=fs).metadata
        users += md.num_rows
        col = leaf_index(md, "item_id")  # a list column's leaf is named after its element, not the column
        events += sum(md.row_group(g).column(col).num_values for g in range(md.num_row_groups))
    report = {"input": src, "out": out, "input_rows": int(rows_in), "users": int(users), "events": int(events),
              "dropped_null_keys": int(rows_in - events), "empty_files": len(empty), "files": len(written), "seconds": round(time.perf_counter() - t0, 2)}
    store.write_json(join(out, STAGE_MARKER), {**report, "complete": True, "written": sorted(f.uri.rsplit("/", 1)[-1] for f in written)})
    return report


STAGE_MARKER = "_SEQUENCES.json"  # names starting with "_" are not data files


def check_complete(store: Store, uri: str, files: list[str]) -> None:
    """Refuse sequences a `flm-dist data sequences` run left half written under `uri`
    (its marker says it did not finish, or a file it wrote is gone). Sequences written
    otherwise have no marker and pass."""
    fs, path = store.fs(uri)
    if not is_remote(uri) and not fs.isdir(path):  # one local file (under it, a read is NotADirectoryError)
        return
    try:
        marker = store.read_json(join(uri, STAGE_MARKER))
    except FileNotFoundError:
        return
    if not marker.get("complete"):
        raise DataError(f"{uri}: the `flm-dist data sequences` run writing it did not finish ({STAGE_MARKER}); delete it and run the stage again")
    present = {f.rsplit("/", 1)[-1] for f in files}
    missing = [name for name in marker.get("written", []) if name not in present]
    if missing:
        raise DataError(f"{uri}: {missing[0]} is gone ({len(missing)} of the {len(marker['written'])} files `flm-dist data sequences` wrote); "
                        f"delete it and run the stage again")


# A partition's events are sorted by one task, and its users' rows become read units of
# USERS_PER_ROW_GROUP users: ~20k-50k events at the 20-50 events a user of a real log has.
EVENTS_PER_PARTITION = 500_000
USERS_PER_ROW_GROUP = 1024


def partitions(rows: int) -> int:
    """Partitions of a log of `rows` events: one per EVENTS_PER_PARTITION, no cap, so a
    task's sort never grows with the log (10^9 events: 2,001 partitions)."""
    return max(1, rows // EVENTS_PER_PARTITION + 1)


def _check_key_types(uri: str, schema: pa.Schema, first: tuple[str, pa.Schema] | None) -> None:
    """The key columns as training takes them, and of one type in every file (Ray reads
    every file with the first one's schema: another type fails inside a task, or casts)."""
    for col, ok, kinds in (("user_id", is_id_type, "an integer or string"), ("item_id", is_id_type, "an integer or string"), ("ts", is_ts_type, "an integer, timestamp or date")):
        t = schema.field(col).type
        if not ok(t):
            raise DataError(f"{uri}: column '{col}' is {t}; it must be {kinds}")
        if first is not None and t != (t0 := first[1].field(col).type):
            raise DataError(f"{uri}: column '{col}' is {t}, but {t0} in {first[0]}; every file of a log must give it one type")


def _drop_null_keys(batch: pa.Table) -> pa.Table:
    """Rows without a user, item or time cannot be placed in a sequence (counted in the report)."""
    keep = pc.and_(pc.and_(pc.is_valid(batch.column("user_id")), pc.is_valid(batch.column("item_id"))), pc.is_valid(batch.column("ts")))
    return batch.filter(keep)
