"""Inspect an interaction log before training on it: what is there, what training will
drop, and how full the hashed embedding tables will be.

`inspect(store, uri)` streams the Parquet files under `uri` one row group at a time
(memory is bounded by a row group plus the ID sketches) and reports:

- files (as `plan.list_files` sees them: `_*` / `.*` names ignored), empty and
  unreadable files, row groups and rows (from the Parquet footers);
- the schema (column -> type; `a | b` where files disagree) and null counts per column;
- distinct users and items. IDs are counted by 63-bit hash (`flm-hash-v1` arithmetic,
  as training sees them: integer 123 and string "123" are different IDs). Up to
  `sketch_k` distinct IDs the count is exact (up to 64-bit hash collisions, about
  n²/2⁶⁴); beyond that it is a K-minimum-values estimate with relative standard error
  about 1/sqrt(k). The report says which (`method`);
- bad rows per reason, counted by `encode_table` itself with each task's `ReadSpec`,
  so the numbers are exactly what that task's training drops (null IDs for every task;
  null / NaN / Inf / out-of-range labels for `ctr`; ratings outside `rating_range` for
  `rating`);
- the expected hash-collision rate of the user and item tables for their row counts;
- optionally a PNG: item popularity (rank vs rows, log-log) and user activity
  (histogram of rows per user, log scale). Past `sketch_k` IDs both come from the
  sketch's uniform sample of IDs, whose row counts are exact, scaled to the estimate.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, field
from datetime import UTC, datetime

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from flm_dist.config import ModelConfig
from flm_dist.data.encode import EncodeSpec, encode_table
from flm_dist.data.hashing import HashSpec, expected_collisions, hash_array
from flm_dist.data.plan import list_files
from flm_dist.data.schema import BAD_REASONS, DataError, ReadSpec, budgeted, check_schema
from flm_dist.data.sequences import expand, is_sequence
from flm_dist.storage import StorageError, Store, split_uri

__all__ = ["COLLISION_WARN_SHARE", "SKETCH_K", "collision_warnings", "id_counts", "inspect", "rows_for_share", "summary"]

SKETCH_K = 1 << 20  # exact distinct counts up to this many IDs; the KMV sample size past it
TASKS = ("pretrain", "ctr", "rating", "retrieval")
_HASH_SPACE = 1 << 63  # hash_array(..., rows=2**63) is the 63-bit flm-hash-v1 value
_COUNT_ONLY = HashSpec.build({"user": 1, "item": 1}, 0)  # encode_table's rows are not used here


class _IdCounts:
    """Rows per distinct ID, over 63-bit ID hashes.

    Exact while at most `k` distinct hashes have been seen. Past that, only the `k`
    smallest hashes are kept (K-minimum values): a uniform sample of the distinct IDs,
    and each kept ID's row count is still exact, because the threshold only falls, so
    an ID below the final threshold was counted from its first row."""

    def __init__(self, k: int):
        self.k = k
        self.keys = np.zeros(0, np.int64)  # sorted hashes
        self.counts = np.zeros(0, np.int64)
        self.saturated = False
        self.rows = 0  # rows with a non-null ID
        self._buf: list[tuple[np.ndarray, np.ndarray]] = []
        self._buf_n = 0

    def add(self, h: np.ndarray) -> None:
        self.rows += len(h)
        if self.saturated:
            h = h[h <= self.keys[-1]]
        if len(h) == 0:
            return
        u, c = np.unique(h, return_counts=True)
        self._buf.append((u, c))
        self._buf_n += len(u)
        # Merging costs O(k log k): batch row groups so the cost is paid per k new keys.
        if self._buf_n >= max(self.k, 1 << 16):
            self._merge()

    def _merge(self) -> None:
        if not self._buf:
            return
        keys = np.concatenate([self.keys] + [u for u, _ in self._buf])
        counts = np.concatenate([self.counts] + [c for _, c in self._buf])
        self._buf, self._buf_n = [], 0
        order = np.argsort(keys, kind="stable")
        keys, counts = keys[order], counts[order]
        starts = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])
        keys, counts = keys[starts], np.add.reduceat(counts, starts)
        if len(keys) > self.k:
            keys, counts, self.saturated = keys[: self.k], counts[: self.k], True
        self.keys, self.counts = keys, counts

    def distinct(self) -> int:
        self._merge()
        if not self.saturated:
            return len(self.keys)
        # KMV: the k-th smallest of n uniform hashes sits near k/n of the hash space.
        return int(round((self.k - 1) / ((int(self.keys[-1]) + 1) / _HASH_SPACE)))

    def sample(self) -> tuple[np.ndarray, float]:
        """Rows per ID for all IDs (exact) or the sampled ones, and how many IDs each stands for."""
        self._merge()
        scale = self.distinct() / len(self.counts) if len(self.counts) else 1.0
        return self.counts, scale

    def report(self) -> dict:
        n = self.distinct()
        counts, _ = self.sample()
        out = {
            "distinct": n,
            "method": "kmv" if self.saturated else "exact",
            "rows": self.rows,
            "rows_per_id": {
                "mean": self.rows / n if n else 0.0,
                "median": float(np.median(counts)) if len(counts) else 0.0,
                "p99": float(np.percentile(counts, 99)) if len(counts) else 0.0,
                "max": int(counts.max()) if len(counts) else 0,
            },
        }
        if self.saturated:
            out["sketch_k"] = self.k
            out["rel_std_error"] = 1.0 / math.sqrt(self.k - 2)
            out["rows_per_id"]["of"] = f"a uniform sample of {len(counts)} IDs"
        return out


def _id_hashes(col: pa.ChunkedArray) -> np.ndarray:
    arr = col.combine_chunks().drop_null()
    return hash_array(arr, 0, _HASH_SPACE)


def _ts_bounds(col: pa.ChunkedArray) -> tuple[int, int] | None:
    t = col.type
    if pa.types.is_timestamp(t) or pa.types.is_date(t):
        # unchecked, as training reads it (`encode._ts_seconds`): sub-second parts dropped
        col = pc.cast(pc.cast(col, pa.timestamp("s"), safe=False), pa.int64())
    elif not pa.types.is_integer(t):
        return None
    mm = pc.min_max(col)
    lo, hi = mm["min"].as_py(), mm["max"].as_py()
    return None if lo is None else (int(lo), int(hi))


@dataclass
class _Scan:
    files: int = 0
    empty_files: int = 0
    unreadable: list[list[str]] = field(default_factory=list)
    row_groups: int = 0
    rows: int = 0
    types: dict[str, list[str]] = field(default_factory=dict)
    nulls: dict[str, int] = field(default_factory=dict)
    id_kinds: dict[str, dict[str, str]] = field(default_factory=dict)  # column -> kind -> first file
    ts: tuple[int, int] | None = None
    bad: dict[str, np.ndarray] = field(default_factory=dict)
    checked: dict[str, int] = field(default_factory=dict)  # task -> rows counted
    refused: dict[str, list[str]] = field(default_factory=dict)  # task -> check_schema errors, one per file
    problems: list[str] = field(default_factory=list)

    def problem(self, msg: str) -> None:
        if msg not in self.problems:
            self.problems.append(msg)


def _kind(t: pa.DataType) -> str:
    if pa.types.is_dictionary(t):
        t = t.value_type
    return "integer" if pa.types.is_integer(t) else "string"


def _scan_file(afs, uri: str, specs: dict[str, ReadSpec], users: _IdCounts, items: _IdCounts, s: _Scan) -> None:
    path = split_uri(uri)[1]
    try:
        pf = pq.ParquetFile(afs.open_input_file(path))
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
        s.unreadable.append([uri, f"not a readable Parquet file ({type(e).__name__}: {e})"])
        return
    except OSError as e:
        raise StorageError(f"{uri}: cannot read footer: {e}") from e
    schema = pf.schema_arrow
    seq = is_sequence(schema)  # per-user sequences (`data sequences`): counted by event, as training reads them
    if not seq:
        s.rows += pf.metadata.num_rows
    s.row_groups += pf.metadata.num_row_groups
    for f in schema:
        seen = s.types.setdefault(f.name, [])
        if str(f.type) not in seen:
            seen.append(str(f.type))
    tasks = []
    for task, spec in specs.items():
        try:
            check_schema(schema, spec, uri, sequence=seq)
            tasks.append(task)
        except DataError as e:
            s.refused.setdefault(task, []).append(str(e))
    # IDs are counted whenever both ID columns are usable, even where a task refuses the
    # file for another column (e.g. a string label).
    try:
        id_fields = [schema.field(c) for c in ("user_id", "item_id") if c in schema.names]
        check_schema(pa.schema(id_fields), ReadSpec(), uri, sequence=seq)
        ids_ok = True
    except DataError:
        ids_ok = False
    if ids_ok:
        for col in ("user_id", "item_id"):
            kinds = s.id_kinds.setdefault(col, {})
            t = schema.field(col).type
            kinds.setdefault(_kind(t.value_type if seq and col != "user_id" else t), uri)
    for rg in range(pf.metadata.num_row_groups):
        try:
            t = pf.read_row_group(rg)
            if seq:
                t = expand(t, f"{uri} row group {rg}")[0]
                s.rows += t.num_rows
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError, DataError) as e:
            s.unreadable.append([uri, f"row group {rg}: {type(e).__name__}: {e}"])
            return
        for name in t.column_names:
            s.nulls[name] = s.nulls.get(name, 0) + t.column(name).null_count
        if ids_ok:
            users.add(_id_hashes(t.column("user_id")))
            items.add(_id_hashes(t.column("item_id")))
        if "ts" in t.column_names and (b := _ts_bounds(t.column("ts"))):
            s.ts = b if s.ts is None else (min(s.ts[0], b[0]), max(s.ts[1], b[1]))
        for task in tasks:
            spec = specs[task]
            enc = encode_table(t.select(spec.columns(t.schema)), EncodeSpec(read=spec, hash=_COUNT_ONLY))
            s.bad[task] += np.bincount(enc["_bad"], minlength=len(BAD_REASONS))
            s.checked[task] += t.num_rows


def _plot(users: _IdCounts, items: _IdCounts, title: str) -> bytes:
    # The object API with the Agg canvas: no pyplot, no global backend switch.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.2), dpi=100)
    ax_items, ax_users = fig.subplots(1, 2)
    counts, scale = items.sample()
    if len(counts):
        c = np.sort(counts)[::-1]
        ax_items.loglog((np.arange(len(c)) + 1) * scale, c, marker=".", markersize=2, linewidth=0.8)
    ax_items.set_xlabel("item rank" + (" (estimated from a sample of IDs)" if items.saturated else ""))
    ax_items.set_ylabel("rows per item")
    ax_items.set_title(f"item popularity: {items.distinct():,} items")
    ax_items.grid(True, which="major", alpha=0.3)
    counts, scale = users.sample()
    if len(counts):
        bins = np.unique(np.geomspace(1, counts.max() + 1, 40).astype(np.int64))
        if len(bins) < 2:
            bins = np.array([1, 2])
        ax_users.hist(counts, bins=bins, weights=np.full(len(counts), scale))
        ax_users.set_xscale("log")
        ax_users.set_yscale("log")
    ax_users.set_xlabel("rows per user")
    ax_users.set_ylabel("users")
    ax_users.set_title(f"user activity: {users.distinct():,} users")
    ax_users.grid(True, which="major", alpha=0.3)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    FigureCanvasAgg(fig).print_png(buf)
    return buf.getvalue()


def inspect(
    store: Store,
    uri: str,
    *,
    table_rows: dict[str, int] | None = None,
    plot: str | None = None,
    rating_range: tuple[float, float] = (1.0, 5.0),
    sketch_k: int = SKETCH_K,
) -> dict:
    """Report on the interaction log under `uri` (see the module docstring).

    `table_rows` ({"user": N, "item": M}, default the model defaults) sizes the
    collision estimate; `rating_range` is the job's `data.rating_range`; `plot` is a
    path or URI for the PNG."""
    if sketch_k < 16:
        raise ValueError(f"sketch_k must be >= 16, got {sketch_k}")
    defaults = ModelConfig()
    rows_for = {"user": defaults.user_rows, "item": defaults.item_rows, **(table_rows or {})}
    files = list_files(store, uri)
    if not files:
        raise DataError(f"{uri}: no data files found (names starting with '_' or '.' are ignored)")
    specs = {task: ReadSpec.for_task(task, (), rating_range) for task in TASKS}
    s = _Scan(files=len(files), bad={t: np.zeros(len(BAD_REASONS), np.int64) for t in TASKS}, checked=dict.fromkeys(TASKS, 0))
    users, items = _IdCounts(sketch_k), _IdCounts(sketch_k)
    afs, _ = store.arrow_fs(uri)
    for f in files:
        if f.size == 0:
            s.empty_files += 1
            continue
        _scan_file(afs, f.uri, specs, users, items, s)
    for col, kinds in s.id_kinds.items():
        if len(kinds) > 1:
            where = ", ".join(f"{k} in {u}" for k, u in kinds.items())
            s.problem(f"column '{col}' holds {where}; training refuses mixed ID kinds (123 and '123' hash differently)")

    # A task is reported when some file carries its column (label / rating); retrieval
    # takes a log without labels as all positives.
    present = {"pretrain": True, "ctr": "label" in s.types, "rating": "rating" in s.types, "retrieval": True}
    bad_rows = {}
    for task in TASKS:
        if not present[task]:
            continue
        if refused := s.refused.get(task):
            more = f" (and {len(refused) - 1} more files)" if len(refused) > 1 else ""
            s.problem(f"task {task} would refuse this data: {refused[0]}{more}")
        counts = {BAD_REASONS[i]: int(n) for i, n in enumerate(s.bad[task]) if i and n}
        total = budgeted(s.bad[task])  # retrieval's label-0 rows are dropped outside the budget
        checked = s.checked[task]
        bad_rows[task] = {**counts, "total": total, "rows_checked": checked, "fraction": total / checked if checked else 0.0}

    report = {
        "uri": uri,
        "files": s.files,
        "empty_files": s.empty_files,
        "unreadable_files": s.unreadable,
        "row_groups": s.row_groups,
        "rows": s.rows,
        "schema": {name: " | ".join(types) for name, types in s.types.items()},
        "null_counts": {name: s.nulls.get(name, 0) for name in s.types},
        "users": users.report(),
        "items": items.report(),
        "ts_range": list(s.ts) if s.ts else None,
        "bad_rows": bad_rows,
        "rating_range": list(rating_range),
        "collisions": {
            table: {"rows": int(rows_for[table]), **expected_collisions(ids.distinct(), int(rows_for[table]))}
            for table, ids in (("user", users), ("item", items))
        },
        "problems": s.problems,
    }
    for name, types in s.types.items():
        if len(types) > 1:
            report["problems"].append(f"column '{name}' has different types across files: {' and '.join(types)}")
    if plot:
        store.write_bytes(plot, _plot(users, items, f"{uri}: {s.rows:,} rows in {s.files} files"))
        report["plot"] = plot
    return report


COLLISION_WARN_SHARE = 0.05  # past this share of IDs sharing a row, a run starts with a warning


def rows_for_share(distinct: int, share: float = COLLISION_WARN_SHARE) -> int:
    """The smallest power of two of rows for which at most `share` of `distinct`
    uniformly hashed IDs share their row with another ID."""
    rows = 1
    while expected_collisions(distinct, rows)["ids_colliding"] > share:
        rows *= 2
    return rows


def id_counts(store: Store, plan, columns: list[str], max_rows: int = 8 << 20, threads: int = 4, stop=None) -> dict:
    """Distinct IDs of `columns` over the plan's read units (at most `max_rows` rows,
    units spread over the whole plan): {"complete": every row read, "columns": {column:
    {"distinct": n, "saturated": a K-minimum-values estimate past 2^20 distinct IDs}}}.
    JSON-able: launch caches it by the data's fingerprint. `stop` (a threading.Event)
    set: the units not yet read are dropped and the scan raises."""
    units = plan.units
    if sum(u.rows for u in units) > max_rows:
        step = sum(u.rows for u in units) / max_rows
        units = [units[int(i * step)] for i in range(int(len(units) / step))] or units[:1]
    counts = {c: _IdCounts(SKETCH_K) for c in columns}

    def scan(unit):
        from flm_dist.data.plan import read_unit

        if stop is not None and stop.is_set():
            raise RuntimeError("the ID count was stopped")
        t = read_unit(store, plan, unit, columns)
        # per-user sequences: the IDs of every event
        return {c: _id_hashes(pc.list_flatten(t.column(c)) if plan.sequence and c != "user_id" else t.column(c)) for c in columns if c in t.column_names}

    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(threads) as pool:
        for hashes in pool.map(scan, units):
            for c, h in hashes.items():
                counts[c].add(h)
    return {"complete": len(units) == len(plan.units), "columns": {c: {"distinct": ids.distinct(), "saturated": ids.saturated} for c, ids in counts.items()}}


def collision_warnings(counts: dict, tables: dict[str, tuple[str, int, str]]) -> list[str]:
    """One warning per table whose hashed rows are shared by more than 5% of its IDs.

    `counts`: `id_counts` of the tables' columns; `tables`: table -> (column, rows, the
    job key that sizes it). Counts from a sample of the data are a lower bound, said as
    such (never a false alarm)."""
    out = []
    for table, (col, rows, key) in tables.items():
        ids = counts["columns"][col]
        n = ids["distinct"]
        share = expected_collisions(n, rows)["ids_colliding"]
        if share > COLLISION_WARN_SHARE:
            how = "about " if ids["saturated"] else "" if counts["complete"] else "at least "
            out.append(
                f"table '{table}': {key}={rows:,} rows for {how}{n:,} distinct '{col}' values: about {share:.0%} of them "
                f"share a hashed row with another ID (their embeddings are mixed); set {key} >= {rows_for_share(n):,} "
                f"to bring that under {COLLISION_WARN_SHARE:.0%}"
            )
    return out


def summary(report: dict) -> str:
    """The report as a few readable lines (for the CLI)."""
    r = report
    lines = [
        f"data      {r['uri']}: {r['files']} files ({r['empty_files']} empty, {len(r['unreadable_files'])} unreadable), "
        f"{r['row_groups']} row groups, {r['rows']:,} rows",
        "schema    " + ", ".join(f"{k} {v}" for k, v in r["schema"].items()),
    ]
    for side in ("users", "items"):
        d = r[side]
        how = "exact" if d["method"] == "exact" else f"estimated, ±{100 * d['rel_std_error']:.1f}%"
        per = d["rows_per_id"]
        lines.append(
            f"{side:<9} {d['distinct']:,} distinct ({how}); rows per {side[:-1]}: mean {per['mean']:.1f}, "
            f"median {per['median']:g}, p99 {per['p99']:g}, max {per['max']:,}"
        )
    if r["ts_range"]:
        lo, hi = r["ts_range"]
        dates = ""
        if lo >= 100_000_000:  # seconds since 1973: show dates (sequence positions are small numbers)
            dates = f"  ({datetime.fromtimestamp(lo, UTC):%Y-%m-%d} .. {datetime.fromtimestamp(hi, UTC):%Y-%m-%d} UTC)"
        lines.append(f"ts        {lo} .. {hi}{dates}")
    nulls = {k: v for k, v in r["null_counts"].items() if v}
    lines.append("nulls     " + (", ".join(f"{k} {v:,}" for k, v in nulls.items()) if nulls else "none"))
    lines.append(f"bad rows  (what training drops; rating_range {r['rating_range']})")
    for task, d in r["bad_rows"].items():
        reasons = ", ".join(f"{k} {v:,}" for k, v in d.items() if k not in ("total", "rows_checked", "fraction"))
        lines.append(f"  {task:<8} {d['total']:,} ({100 * d['fraction']:.3f}%)" + (f": {reasons}" if reasons else ""))
    lines.append("hashing   expected collisions for the table sizes:")
    for table, d in r["collisions"].items():
        lines.append(
            f"  {table:<8} {d['rows']:,} rows: {100 * d['ids_colliding']:.2f}% of IDs share a row, "
            f"{100 * d['rows_used']:.2f}% of rows used"
        )
    for p in r["problems"]:
        lines.append(f"problem   {p}")
    for uri, why in r["unreadable_files"]:
        lines.append(f"unreadable {uri}: {why}")
    if r.get("plot"):
        lines.append(f"plot      {r['plot']}")
    return "\n".join(lines)
