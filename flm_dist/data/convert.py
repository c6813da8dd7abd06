"""Converters: public recommendation-data layouts -> the interaction-log schema.

`convert(store, fmt, src, out)` reads one of the layouts below from any URI and writes
the documented interaction-log schema (`flm_dist/data/schema.py`) as several
`part-NNNNN.parquet` files under `out`, plus `_convert.json` (the report; a `_` name,
so readers ignore it).

| format      | input                                                  | output columns |
|-------------|--------------------------------------------------------|----------------|
| `movielens` | `u.data` (`user\\titem\\trating\\ttimestamp`, 100K) or `ratings.dat` (`user::item::rating::timestamp`, 1M/10M); detected from the first line; `src` may be the file or the dataset folder | user_id, item_id (int64), rating (float32), ts (int64) |
| `recbole`   | RecBole atomic files: `X.inter` with a `name:type` header, plus `X.user` / `X.item` next to it when present; `src` is the `.inter` file or its folder | user_id, item_id (string), ts, label, rating, features |
| `sequence`  | one user per line, `user item item ...` (S3-Rec / SASRec files), items oldest first | user_id, item_id (int64), ts = position in the user's sequence (0, 1, ...) |
| `csv`       | any delimited file (or folder of them) with a header row and a column `mapping` | mapped columns; the rest kept as features |

RecBole tokens are strings, so its `user_id` / `item_id` stay strings (`"1"` and `1`
hash to different rows: do not mix a RecBole conversion with integer-ID data). In
`.inter`, `timestamp:float` becomes `ts` (int64 seconds, floored), `rating:float` and
`label:float` become `rating` / `label`; every other field is a feature column, as are
the other fields of `.user` / `.item` (joined on `user_id` / `item_id`): `token` ->
string, `token_seq` -> list<string> (split on RecBole's default `seq_separator`, a
space), `float` -> float64, `float_seq` -> list<float64>. Empty fields are nulls.

Bad input stops the conversion with a `DataError` naming the file, the line and the
field; nothing is coerced or dropped silently. Only empty (whitespace-only) lines are
skipped, and counted in the report (pyarrow skips empty CSV lines without counting
them). Text is parsed in chunks with pyarrow (no per-row Python except for the
one-line-per-user `sequence` format, and to locate an error once pyarrow reports one),
and written out as it is read, so memory is bounded by `files * row_group_rows` rows.
Inputs ending in `.gz`, `.bz2` or `.zst` are decompressed on the fly.
"""

from __future__ import annotations

import csv
import io
import itertools
import re
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv
import pyarrow.parquet as pq

from flm_dist.data.plan import list_files
from flm_dist.data.schema import DataError
from flm_dist.storage import StorageError, Store, join, split_uri

__all__ = ["FORMATS", "convert"]

FORMATS = ("movielens", "recbole", "sequence", "csv")
SCHEMA_COLUMNS = ("user_id", "item_id", "ts", "label", "rating")
RECBOLE_TYPES = ("token", "token_seq", "float", "float_seq")
RECBOLE_SEQ_SEPARATOR = " "  # RecBole's default `seq_separator`
CHUNK_BYTES = 16 << 20  # text parsed per step: bounds memory, not a format limit
CSV_BLOCK_BYTES = 16 << 20  # pyarrow decides CSV column types from the first block

_EMPTY_LINE = re.compile(rb"^[ \t\r\f\v]*\n", re.M)
_CANONICAL_INT = r"^-?(0|[1-9][0-9]*)$"  # no leading zeros: "007" stays a string ID


# ------------------------------------------------------------------ output


class _PartWriter:
    """Spreads a stream of tables over `files` Parquet parts under `out`.

    Rows are buffered until every part can get one full row group; a smaller input is
    cut into min(files, rows) contiguous parts instead. After that, each further
    `row_group_rows` rows go to the next part in turn, so every row group is full,
    every part gets rows, and at most `files * row_group_rows` rows wait in memory."""

    def __init__(self, store: Store, out: str, files: int, row_group_rows: int):
        self._store = store
        self._out = out
        self._afs, self._base = store.arrow_fs(out)
        self._files = files
        self._rg = row_group_rows
        self._pending: list[pa.Table] = []
        self._pending_rows = 0
        self._writers: list[pq.ParquetWriter] = []
        self._next = 0
        self.parts: list[str] = []
        self.schema: pa.Schema | None = None
        self.rows = 0
        self.null_ids = {"user_id": 0, "item_id": 0}

    def _part(self, k: int) -> pq.ParquetWriter:
        if not self.parts:
            self._store.ensure_bucket(self._out)
            if split_uri(self._out)[0] == "file":
                self._afs.create_dir(self._base, recursive=True)
        name = f"part-{k:05d}.parquet"
        self.parts.append(join(self._out, name))
        return pq.ParquetWriter(f"{self._base}/{name}", self.schema, filesystem=self._afs)

    def _take(self, n: int) -> pa.Table:
        t = pa.concat_tables(self._pending)
        head, rest = t.slice(0, n), t.slice(n)
        self._pending = [rest] if rest.num_rows else []
        self._pending_rows -= head.num_rows
        return head

    def write(self, t: pa.Table) -> None:
        if t.num_rows == 0:
            return
        if self.schema is None:
            self.schema = t.schema
        elif not t.schema.equals(self.schema):
            t = t.cast(self.schema)  # same columns; a chunk may have typed an all-null column differently
        self.rows += t.num_rows
        for col in self.null_ids:
            self.null_ids[col] += t.column(col).null_count
        self._pending.append(t)
        self._pending_rows += t.num_rows
        if not self._writers and self._pending_rows >= self._files * self._rg:
            self._writers = [self._part(k) for k in range(self._files)]
            for w in self._writers:
                w.write_table(self._take(self._rg))
        while self._writers and self._pending_rows >= self._rg:
            self._writers[self._next].write_table(self._take(self._rg))
            self._next = (self._next + 1) % self._files

    def close(self) -> None:
        if self._writers:
            if self._pending_rows:
                self._writers[self._next].write_table(self._take(self._pending_rows))
        elif self._pending_rows:
            n = min(self._files, self._pending_rows)
            bounds = np.linspace(0, self._pending_rows, n + 1).astype(np.int64)
            t = self._take(self._pending_rows)
            for k in range(n):
                w = self._part(k)
                self._writers.append(w)
                w.write_table(t.slice(bounds[k], bounds[k + 1] - bounds[k]), row_group_size=self._rg)
        for w in self._writers:
            w.close()

    def abort(self) -> None:
        """Remove the parts written so far: a failed conversion leaves no partial output."""
        for w in self._writers:
            try:
                w.close()
            except Exception:
                pass
        for uri in self.parts:
            self._store.rm(uri, recursive=False)


# ------------------------------------------------------------------ reading text


def _open(store: Store, uri: str):
    afs, path = store.arrow_fs(uri)
    try:
        return afs.open_input_stream(path)  # compression detected from the extension
    except FileNotFoundError:
        raise DataError(f"{uri}: no such file") from None
    except OSError as e:
        raise StorageError(f"cannot read {uri}: {e}") from e


def _line_chunks(store: Store, uri: str) -> Iterator[tuple[int, bytes]]:
    """(number of the chunk's first line, whole lines each ending in b'\\n')."""
    line, rest = 1, b""
    with _open(store, uri) as stream:
        while block := stream.read(CHUNK_BYTES):
            data = rest + block
            cut = data.rfind(b"\n") + 1
            chunk, rest = data[:cut], data[cut:]
            if chunk:
                yield line, chunk
                line += chunk.count(b"\n")
    if rest:
        yield line, rest + b"\n"


def _lines(first_line: int, chunk: bytes) -> Iterator[tuple[int, bytes]]:
    """Non-empty lines of a chunk with their line numbers (error path and small formats)."""
    for i, raw in enumerate(chunk.split(b"\n")[:-1]):
        line = raw.rstrip(b"\r")
        if line.strip():
            yield first_line + i, line


def _first_unparsable(values: list[str | None], t: pa.DataType) -> int | None:
    """Index of the first value pyarrow cannot parse as `t`, by bisection (log n casts)."""

    def ok(a: pa.Array) -> bool:
        try:
            a.cast(t)
            return True
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            return False

    arr = pa.array(values, pa.string())
    if ok(arr):
        return None
    lo, hi = 0, len(arr)  # arr[lo:hi] holds a bad value
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if ok(arr[lo:mid]):
            lo = mid
        else:
            hi = mid
    return lo


def _what(t: pa.DataType) -> str:
    if pa.types.is_integer(t):
        return "an integer"
    if pa.types.is_floating(t):
        return "a number"
    if pa.types.is_boolean(t):
        return "true/false"
    return f"a {t} value"


@dataclass(frozen=True)
class _Field:
    """One column of a delimited text layout, as parsed and as named in errors."""

    name: str
    type: pa.DataType  # what pyarrow parses the text as
    label: str = ""  # how an error names it, e.g. "field 2 'item_id'"


def _locate(uri: str, rows: Iterator[tuple[int, list[str]]], fields: list[_Field], sep: str, detail: str) -> DataError:
    """Find the first line that pyarrow refused and say which field is wrong; `rows`
    yields (line number, fields split the way the format splits them)."""
    batch: list[tuple[int, list[str]]] = []

    def check(batch: list[tuple[int, list[str]]]) -> DataError | None:
        for line, parts in batch:
            if len(parts) != len(fields):
                names = ", ".join(f.name for f in fields)
                return DataError(
                    f"{uri} line {line}: expected {len(fields)} fields ({names}) separated by {sep!r}, "
                    f"got {len(parts)}: {sep.join(parts)[:200]!r}"
                )
        for j, f in enumerate(fields):
            if pa.types.is_string(f.type):
                continue
            bad = _first_unparsable([p[j] or None for _, p in batch], f.type)
            if bad is not None:
                line, parts = batch[bad]
                return DataError(f"{uri} line {line}, {f.label or repr(f.name)}: {parts[j]!r} is not {_what(f.type)}")
        return None

    for row in rows:
        batch.append(row)
        if len(batch) >= 65536:
            if err := check(batch):
                return err
            batch = []
    if batch and (err := check(batch)):
        return err
    return DataError(f"{uri}: {detail}")


def _read_chunk(
    uri: str, first_line: int, chunk: bytes, fields: list[_Field], sep: bytes, nulls: bool
) -> tuple[pa.Table, int]:
    """Parse one chunk of a delimited, unquoted layout; (table, empty lines skipped)."""
    body, empty = _EMPTY_LINE.subn(b"", chunk)
    if not body:
        return pa.table({f.name: pa.array([], f.type) for f in fields}), empty
    try:
        t = pcsv.read_csv(
            pa.BufferReader(body.replace(sep, b"\t") if sep != b"\t" else body),
            read_options=pcsv.ReadOptions(column_names=[f.name for f in fields], use_threads=False),
            parse_options=pcsv.ParseOptions(delimiter="\t", quote_char=False, double_quote=False),
            convert_options=pcsv.ConvertOptions(
                column_types={f.name: f.type for f in fields},
                null_values=[""] if nulls else [],
                strings_can_be_null=nulls,
            ),
        )
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
        text = sep.decode()
        rows = ((n, line.decode("utf-8", "replace").split(text)) for n, line in _lines(first_line, chunk))
        raise _locate(uri, rows, fields, text, str(e)) from None
    return t, empty


# ------------------------------------------------------------------ formats


@dataclass
class _Report:
    inputs: list[str] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=dict)
    extra: dict = field(default_factory=dict)

    def skip(self, reason: str, n: int) -> None:
        if n:
            self.skipped[reason] = self.skipped.get(reason, 0) + n


def _is_dir(store: Store, uri: str) -> bool:
    fs, path = store.fs(uri)
    try:
        return fs.isdir(path)
    except Exception as e:
        raise StorageError(f"cannot read {uri}: {e}") from e


def _movielens(store: Store, src: str, rep: _Report) -> Iterator[pa.Table]:
    if _is_dir(store, src):
        found = [f.uri for f in list_files(store, src) if f.uri.rsplit("/", 1)[-1] in ("u.data", "ratings.dat")]
        if len(found) != 1:
            raise DataError(f"{src}: expected one MovieLens ratings file (u.data or ratings.dat) in the folder, found {found or 'none'}")
        src = found[0]
    rep.inputs.append(src)
    fields = [
        _Field("user_id", pa.int64(), "field 1 (user_id)"),
        _Field("item_id", pa.int64(), "field 2 (item_id)"),
        _Field("rating", pa.float64(), "field 3 (rating)"),
        _Field("ts", pa.int64(), "field 4 (timestamp)"),
    ]
    sep = None
    for first, chunk in _line_chunks(store, src):
        if sep is None:
            line, text = next(_lines(first, chunk), (first, b""))
            if not text:  # only empty lines so far
                rep.skip("empty_line", chunk.count(b"\n"))
                continue
            if b"::" in text:
                sep, rep.extra["layout"] = b"::", "ratings.dat"
            elif b"\t" in text:
                sep, rep.extra["layout"] = b"\t", "u.data"
            else:
                raise DataError(
                    f"{src} line {line}: not a MovieLens ratings layout: expected `user<TAB>item<TAB>rating<TAB>timestamp` "
                    f"(u.data) or `UserID::MovieID::Rating::Timestamp` (ratings.dat), got {text[:80].decode('utf-8', 'replace')!r}. "
                    f"For ratings.csv (ML-20M/25M) use --format csv --map user_id=userId,item_id=movieId,ts=timestamp"
                )
        t, empty = _read_chunk(src, first, chunk, fields, sep, nulls=False)
        rep.skip("empty_line", empty)
        yield t.set_column(2, "rating", t.column("rating").cast(pa.float32()))


def _sequence(store: Store, src: str, rep: _Report) -> Iterator[pa.Table]:
    rep.inputs.append(src)
    seen: dict[bytes, int] = {}  # user -> line, to refuse a user split over two lines
    for first, chunk in _line_chunks(store, src):
        tokens: list[bytes] = []
        lengths: list[int] = []
        lines: list[int] = []
        for i, raw in enumerate(chunk.split(b"\n")[:-1]):
            parts = raw.split()
            if not parts:
                rep.skip("empty_line", 1)
            else:
                if len(parts) == 1:
                    rep.skip("user_without_items", 1)  # still parsed: its ID must be an integer
                user = parts[0].lstrip(b"0") or b"0"  # "007" is user 7, as the IDs are read
                if user in seen:
                    raise DataError(
                        f"{src} line {first + i}: user {parts[0].decode('utf-8', 'replace')} already has a sequence on "
                        f"line {seen[user]}; the sequence format has one line per user"
                    )
                seen[user] = first + i
                tokens += parts
                lengths.append(len(parts))
                lines.append(first + i)
        if not tokens:
            continue
        try:
            ids = pa.array(tokens, pa.binary()).cast(pa.string()).cast(pa.int64()).to_numpy()
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
            off = 0
            for line, n in zip(lines, lengths, strict=True):
                words = [w.decode("utf-8", "replace") for w in tokens[off : off + n]]
                bad = _first_unparsable(words, pa.int64())
                if bad is not None:
                    what = "field 1 (user_id)" if bad == 0 else f"field {bad + 1} (item {bad} of the sequence)"
                    raise DataError(f"{src} line {line}, {what}: {words[bad]!r} is not an integer ID") from None
                off += n
            raise DataError(f"{src} lines {lines[0]}-{lines[-1]}: {e}") from None  # e.g. bytes that are not UTF-8
        n_items = np.asarray(lengths, np.int64) - 1
        starts = np.cumsum(n_items + 1) - (n_items + 1)
        is_item = np.ones(len(ids), bool)
        is_item[starts] = False
        item_starts = np.cumsum(n_items) - n_items
        yield pa.table(
            {
                "user_id": pa.array(np.repeat(ids[starts], n_items)),
                "item_id": pa.array(ids[is_item]),
                "ts": pa.array(np.arange(int(n_items.sum()), dtype=np.int64) - np.repeat(item_starts, n_items)),
            }
        )


# -- RecBole


@dataclass(frozen=True)
class _Atomic:
    uri: str
    names: list[str]
    types: list[str]

    def fields(self) -> list[_Field]:
        return [
            _Field(n, pa.float64() if t == "float" else pa.string(), f"field {i + 1} '{n}:{t}'")
            for i, (n, t) in enumerate(zip(self.names, self.types, strict=True))
        ]


def _atomic_header(store: Store, uri: str, key: str) -> tuple[_Atomic, Iterator[tuple[int, bytes]]]:
    """Parse line 1 (`name:type` fields, tab-separated) and return the body's chunks."""
    chunks = _line_chunks(store, uri)
    first, chunk = next(chunks, (1, b""))
    head, _, body = chunk.partition(b"\n")
    text = head.rstrip(b"\r").decode("utf-8", "replace")
    if not text.strip():
        raise DataError(f"{uri} line 1: missing the RecBole header (`{key}:token<TAB>name:type...`)")
    names, types = [], []
    for i, f in enumerate(text.split("\t")):
        name, colon, typ = f.rpartition(":")
        if not colon or not name or typ not in RECBOLE_TYPES:
            raise DataError(
                f"{uri} line 1, field {i + 1} {f!r}: a RecBole header field is `name:type` with type one of "
                f"{', '.join(RECBOLE_TYPES)}"
            )
        if name in names:
            raise DataError(f"{uri} line 1, field {i + 1}: '{name}' is declared twice")
        names.append(name)
        types.append(typ)
    if key not in names:
        raise DataError(f"{uri} line 1: the header has no `{key}:token` field; fields are {text.split(chr(9))}")
    if types[names.index(key)] != "token":
        raise DataError(f"{uri} line 1, field {names.index(key) + 1}: '{key}' must be declared `{key}:token`")

    def body_chunks() -> Iterator[tuple[int, bytes]]:
        if body:
            yield first + 1, body
        yield from chunks

    return _Atomic(uri, names, types), body_chunks()


def _bad_seconds(col: pa.ChunkedArray) -> int | None:
    """Index of the first value that is not a finite number within int64 seconds."""
    v = col.to_numpy(zero_copy_only=False)
    with np.errstate(invalid="ignore"):
        bad = ~(np.isnan(v) | (np.abs(v) < 9.2e18))  # NaN here is a null: kept as a null ts
        bad |= np.isinf(v)
    return int(np.flatnonzero(bad)[0]) if bad.any() else None


def _floor_seconds(col: pa.ChunkedArray) -> pa.ChunkedArray:
    """Whole seconds; a NaN is a null ts (`_bad_seconds` lets it through as one)."""
    return pc.cast(pc.floor(pc.if_else(pc.is_nan(col), None, col)), pa.int64())


def _timestamp_seconds(col: pa.ChunkedArray) -> pa.ChunkedArray:
    """Whole seconds of a timestamp or date, sub-second parts floored as numbers are."""
    if pa.types.is_timestamp(col.type):
        col = pc.floor_temporal(col, unit="second")
    return pc.cast(pc.cast(col, pa.timestamp("s")), pa.int64())


def _split_seq(col: pa.Array, value_type: pa.DataType) -> pa.Array:
    """`a b c` -> [a, b, c] (RecBole seq_separator; repeated separators give no empties)."""
    lists = pc.split_pattern(col, RECBOLE_SEQ_SEPARATOR)
    values = pc.list_flatten(lists)
    parent = pc.list_parent_indices(lists).to_numpy()
    keep = pc.not_equal(values, "").to_numpy(zero_copy_only=False)
    counts = np.bincount(parent[keep], minlength=len(col))
    offsets = pa.array(np.concatenate([[0], np.cumsum(counts)]).astype(np.int32))
    return pa.ListArray.from_arrays(offsets, values.filter(pa.array(keep)).cast(value_type), mask=col.is_null())


def _atomic_tables(store: Store, atomic: _Atomic, chunks, rep: _Report) -> Iterator[pa.Table]:
    fields = atomic.fields()
    for first, chunk in chunks:
        t, empty = _read_chunk(atomic.uri, first, chunk, fields, b"\t", nulls=True)
        rep.skip("empty_line", empty)
        for j, typ in enumerate(atomic.types):
            if typ in ("token_seq", "float_seq"):
                col = t.column(j).combine_chunks()
                try:
                    t = t.set_column(j, atomic.names[j], _split_seq(col, pa.string() if typ == "token_seq" else pa.float64()))
                except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                    for line, raw in _lines(first, chunk):
                        parts = raw.decode("utf-8", "replace").split("\t")
                        words = [w for w in parts[j].split(RECBOLE_SEQ_SEPARATOR) if w] if j < len(parts) else []
                        bad = _first_unparsable(words, pa.float64())
                        if bad is not None:
                            raise DataError(
                                f"{atomic.uri} line {line}, {fields[j].label}: element {bad + 1} {words[bad]!r} is not a number"
                            ) from None
                    last = first + chunk.count(b"\n") - 1
                    raise DataError(f"{atomic.uri} lines {first}-{last}, {fields[j].label}: cannot parse") from None
        if "timestamp" in t.column_names:
            ts = t.column("timestamp")
            bad = _bad_seconds(ts)
            if bad is not None:
                line = next(itertools.islice(_lines(first, chunk), bad, None))[0]
                label = fields[atomic.names.index("timestamp")].label
                raise DataError(f"{atomic.uri} line {line}, {label}: {ts[bad].as_py()} is not a time in seconds")
            t = t.set_column(t.column_names.index("timestamp"), "ts", _floor_seconds(ts))
        yield t


def _side_table(store: Store, uri: str, side: str, rep: _Report) -> tuple[pa.Table, _Atomic]:
    """A whole `.user` / `.item` file (`side`), keyed by `<side>_id` (unique, non-empty).
    Held in memory: one row per user / item, not per interaction."""
    key = f"{side}_id"
    atomic, chunks = _atomic_header(store, uri, key)
    side_rep = _Report()
    tables = list(_atomic_tables(store, atomic, chunks, side_rep))
    rep.skip(f"empty_line ({uri.rsplit('/', 1)[-1]})", side_rep.skipped.get("empty_line", 0))
    t = pa.concat_tables(tables).combine_chunks() if tables else pa.table({f.name: pa.array([], f.type) for f in atomic.fields()})
    keys = t.column(key)
    if keys.null_count:
        raise DataError(f"{uri}: {keys.null_count} rows have an empty '{key}'; every row of a .{side} file needs one")
    if pc.count_distinct(keys).as_py() != len(keys):
        vc = pc.value_counts(keys)
        dup = vc.filter(pc.greater(vc.field("counts"), 1))[0]["values"].as_py()
        raise DataError(f"{uri}: '{key}' {dup!r} appears on more than one line; a .{side} file has one row per {side}")
    return t, atomic


def _recbole(store: Store, src: str, rep: _Report) -> Iterator[pa.Table]:
    if _is_dir(store, src):
        found = [f.uri for f in list_files(store, src) if f.uri.endswith(".inter")]
        if len(found) != 1:
            raise DataError(f"{src}: expected one RecBole .inter file in the folder, found {found or 'none'}")
        src = found[0]
    if not src.endswith(".inter"):
        raise DataError(f"{src}: a RecBole interaction file ends in .inter")
    rep.inputs.append(src)
    inter, chunks = _atomic_header(store, src, "user_id")
    if "item_id" not in inter.names:
        raise DataError(f"{src} line 1: the header has no `item_id:token` field; fields are {inter.names}")
    if inter.types[inter.names.index("item_id")] != "token":
        raise DataError(f"{src} line 1, field {inter.names.index('item_id') + 1}: 'item_id' must be declared `item_id:token`")
    rename = {"timestamp": "ts"}
    for name in ("timestamp", "rating", "label"):
        if name in inter.names and inter.types[inter.names.index(name)] != "float":
            i = inter.names.index(name)
            raise DataError(f"{src} line 1, field {i + 1}: '{name}' must be declared `{name}:float`, not `{name}:{inter.types[i]}`")
    if "ts" in inter.names:
        i = inter.names.index("ts")
        raise DataError(f"{src} line 1, field {i + 1}: declare the event time as `timestamp:float` (it becomes ts), not 'ts'")

    sides: list[tuple[str, pa.Table, list[str]]] = []
    taken = {rename.get(n, n): src for n in inter.names}
    stem = src[: -len(".inter")]
    for side in ("user", "item"):
        uri = f"{stem}.{side}"
        if not store.exists(uri):
            continue
        t, atomic = _side_table(store, uri, side, rep)
        cols = [n for n in atomic.names if n != f"{side}_id"]
        for n in cols:
            if n in taken or n in SCHEMA_COLUMNS:
                raise DataError(f"{uri} line 1: column '{n}' is also in {taken.get(n, 'the interaction-log schema')}; rename one")
            taken[n] = uri
        rep.inputs.append(uri)
        rep.extra.setdefault("joined", {})[side] = {"file": uri, "rows": t.num_rows, "columns": cols, "interactions_without_match": 0}
        sides.append((side, t, cols))

    for t in _atomic_tables(store, inter, chunks, rep):
        for name in ("rating", "label"):
            if name in t.column_names:
                t = t.set_column(t.column_names.index(name), name, t.column(name).cast(pa.float32()))
        for side, table, cols in sides:
            # index_in keeps the interactions' order (a hash join would not); no match -> null features.
            idx = pc.index_in(t.column(f"{side}_id"), value_set=table.column(f"{side}_id"))
            rep.extra["joined"][side]["interactions_without_match"] += idx.null_count
            matched = table.select(cols).take(idx)
            for n in cols:
                t = t.append_column(n, matched.column(n))
        yield _ordered(t)


# -- CSV


def _ordered(t: pa.Table) -> pa.Table:
    """Schema columns first, in schema order, then features in their input order."""
    first = [c for c in SCHEMA_COLUMNS if c in t.column_names]
    return t.select(first + [c for c in t.column_names if c not in first])


@dataclass(frozen=True)
class _CsvPlan:
    """What the first file decided: header, parse types per source column, renames."""

    header: list[str]
    types: dict[str, pa.DataType]
    rename: dict[str, str]  # source column -> output column


def _csv_options(delimiter: str, types: dict[str, pa.DataType] | None):
    return (
        pcsv.ReadOptions(block_size=CSV_BLOCK_BYTES),
        pcsv.ParseOptions(delimiter=delimiter),
        pcsv.ConvertOptions(column_types=types or {}, null_values=[""], strings_can_be_null=True),
    )


def _csv_plan(store: Store, uri: str, mapping: dict[str, str], delimiter: str) -> _CsvPlan:
    ids = {mapping.get(c, c) for c in ("user_id", "item_id")}
    ro, po, co = _csv_options(delimiter, {c: pa.string() for c in ids})
    with _open(store, uri) as stream:
        try:
            reader = pcsv.open_csv(stream, read_options=ro, parse_options=po, convert_options=co)
            peek = next(iter(reader), None)  # the first block decides the types
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
            raise _csv_error(store, uri, delimiter, None, str(e)) from None
    header = reader.schema.names
    dup = sorted({c for c in header if header.count(c) > 1})
    if dup:
        raise DataError(f"{uri} line 1: the header names {dup} more than once")
    hint = ""
    if len(header) == 1 and any(d in header[0] for d in ",;|\t" if d != delimiter):
        hint = f" (one column: is the delimiter {delimiter!r} right?)"
    for out, col in mapping.items():
        if col not in header:
            raise DataError(f"{uri} line 1: mapping {out}={col}: there is no column '{col}'; the header is {header}{hint}")
    rename = {col: out for out, col in mapping.items()}
    if len(rename) != len(mapping):
        raise DataError(f"mapping {mapping}: a source column is mapped twice")
    outputs = [rename.get(c, c) for c in header]
    clash = sorted({c for c in outputs if outputs.count(c) > 1})
    if clash:
        raise DataError(
            f"{uri} line 1: mapping {mapping} gives two columns the name(s) {clash}; map the other column to a new name too"
        )
    for need in ("user_id", "item_id"):
        if need not in outputs:
            raise DataError(f"{uri} line 1: no '{need}' column; map one with --map {need}=COLUMN (the header is {header}){hint}")
    types: dict[str, pa.DataType] = {}
    for col, out in zip(header, outputs, strict=True):
        inferred = reader.schema.field(col).type
        values = peek.column(col) if peek is not None else pa.array([], inferred)
        if out in ("user_id", "item_id"):
            nonnull = values.drop_null()
            integral = len(nonnull) > 0 and pc.all(pc.match_substring_regex(nonnull, _CANONICAL_INT)).as_py()
            if integral:
                try:
                    nonnull.cast(pa.int64())
                except pa.ArrowInvalid:  # beyond int64
                    integral = False
            types[col] = pa.int64() if integral else pa.string()
        elif out == "label":
            types[col] = pa.bool_() if pa.types.is_boolean(inferred) else pa.float64()
        elif out == "rating":
            types[col] = pa.float64()
        elif out == "ts":
            if pa.types.is_null(inferred) or pa.types.is_integer(inferred):
                types[col] = pa.int64()
            elif pa.types.is_floating(inferred) or pa.types.is_timestamp(inferred) or pa.types.is_date(inferred):
                types[col] = inferred
            else:
                example = values.drop_null()[0].as_py() if len(values.drop_null()) else ""
                raise DataError(
                    f"{uri}: column '{col}' (ts) holds {inferred} values such as {example!r}; ts must be integer "
                    f"seconds, a number of seconds or an ISO-8601 timestamp"
                )
        else:
            types[col] = pa.string() if pa.types.is_null(inferred) else inferred
    return _CsvPlan(header=header, types=types, rename=rename)


def _csv_error(store: Store, uri: str, delimiter: str, plan: _CsvPlan | None, detail: str) -> DataError:
    """Locate a pyarrow CSV error with Python's csv module (error path only)."""
    m = re.search(r"CSV column #(\d+)", detail)
    with _open(store, uri) as stream:
        # utf-8-sig: pyarrow skips a byte-order mark, so the header must read without it
        text = io.TextIOWrapper(stream, encoding="utf-8-sig", errors="replace", newline="")
        reader = csv.reader(text, delimiter=delimiter)
        header = next(reader, [])
        if plan is None:
            fields = [_Field(c, pa.string()) for c in header]
        else:
            cols = [int(m.group(1))] if m else range(len(header))
            fields = [
                _Field(c, plan.types[c] if j in cols else pa.string(), _csv_label(c, plan)) for j, c in enumerate(header)
            ]
        rows = ((reader.line_num, row) for row in reader if any(row))
        return _locate(uri, rows, fields, delimiter, detail)


def _non_integer_id(store: Store, uri: str, delimiter: str, plan: _CsvPlan, j: int, value: str) -> DataError:
    """The first line whose ID column `j` holds `value`, a string ID in a column the first
    block made integer (error path only)."""
    label = _csv_label(plan.header[j], plan)
    line = "?"
    with _open(store, uri) as stream:
        reader = csv.reader(io.TextIOWrapper(stream, encoding="utf-8-sig", errors="replace", newline=""), delimiter=delimiter)
        for row in reader:
            if len(row) > j and row[j] == value:
                line = str(reader.line_num)
                break
    return DataError(
        f"{uri} line {line}, {label}: {value!r} is not an integer in canonical form, where the IDs of the first "
        f"file's first block were integers; one ID column holds one kind: write every ID as a string (e.g. prefix "
        f"them) or every one as an integer without leading zeros"
    )


def _csv_label(col: str, plan: _CsvPlan) -> str:
    out = plan.rename.get(col, col)
    return f"column '{col}'" + (f" (mapped to {out})" if out != col else "")


def _csv_table(store: Store, uri: str, delimiter: str, batch: pa.RecordBatch, plan: _CsvPlan) -> pa.Table:
    # ID columns are read as strings in every block and cast here where the first block
    # made them integers: pyarrow would read a later "007" as 7, the ID of another user.
    for j, col in enumerate(batch.schema.names):
        if plan.rename.get(col, col) in ("user_id", "item_id") and pa.types.is_integer(plan.types[col]):
            values = batch.column(j)
            canonical = pc.fill_null(pc.match_substring_regex(values, _CANONICAL_INT), True)
            if not pc.all(canonical).as_py():
                bad = values.filter(pc.invert(canonical))[0].as_py()
                raise _non_integer_id(store, uri, delimiter, plan, j, bad)
            batch = batch.set_column(j, col, values.cast(pa.int64()))
    t = pa.Table.from_batches([batch]).rename_columns([plan.rename.get(c, c) for c in batch.schema.names])
    if "ts" in t.column_names:
        ts = t.column("ts")
        if pa.types.is_floating(ts.type):
            bad = _bad_seconds(ts)
            if bad is not None:
                col = next((c for c, out in plan.rename.items() if out == "ts"), "ts")
                raise DataError(f"{uri}: {_csv_label(col, plan)}: {ts[bad].as_py()} is not a time in seconds")
            ts = _floor_seconds(ts)
        elif pa.types.is_timestamp(ts.type) or pa.types.is_date(ts.type):
            ts = _timestamp_seconds(ts)
        t = t.set_column(t.column_names.index("ts"), "ts", ts)
    for name in ("label", "rating"):
        if name in t.column_names:
            t = t.set_column(t.column_names.index(name), name, t.column(name).cast(pa.float32()))
    return _ordered(t)


def _csv(store: Store, src: str, mapping: dict[str, str], delimiter: str, rep: _Report) -> Iterator[pa.Table]:
    if len(delimiter) != 1:
        raise DataError(f"delimiter {delimiter!r}: must be one character (use '\\t' for tabs)")
    plan: _CsvPlan | None = None
    for f in list_files(store, src):
        uri = f.uri
        rep.inputs.append(uri)
        if plan is None:
            plan = _csv_plan(store, uri, mapping, delimiter)
        ids = {c: pa.string() for c in plan.header if plan.rename.get(c, c) in ("user_id", "item_id")}
        ro, po, co = _csv_options(delimiter, {**plan.types, **ids})
        with _open(store, uri) as stream:
            try:
                reader = pcsv.open_csv(stream, read_options=ro, parse_options=po, convert_options=co)
                if reader.schema.names != plan.header:
                    raise DataError(
                        f"{uri} line 1: the header {reader.schema.names} differs from {rep.inputs[0]}'s {plan.header}; "
                        f"all files of one conversion need the same columns"
                    )
                for batch in reader:
                    yield _csv_table(store, uri, delimiter, batch, plan)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
                raise _csv_error(store, uri, delimiter, plan, str(e)) from None


# ------------------------------------------------------------------ entry point


def convert(
    store: Store,
    fmt: str,
    src: str,
    out: str,
    *,
    mapping: dict[str, str] | None = None,
    delimiter: str | None = None,
    files: int = 8,
    row_group_rows: int = 65536,
) -> dict:
    """Convert `src` (format `fmt`) into interaction-log Parquet parts under `out`.

    `out` must hold no data files yet. Returns (and writes to `out/_convert.json`) the
    report: rows, files and parts written, lines skipped per reason, null IDs, the
    output schema, and per format details (MovieLens layout, RecBole joins)."""
    if fmt not in FORMATS:
        raise DataError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if fmt != "csv" and (mapping or delimiter):
        raise DataError(f"--map and --delimiter apply to --format csv only, not {fmt}")
    if files < 1 or row_group_rows < 1:
        raise DataError(f"files ({files}) and row_group_rows ({row_group_rows}) must be >= 1")
    if store.exists(out):
        existing = list_files(store, out)
        if existing:
            raise DataError(
                f"{out} already holds {len(existing)} data files (first: {existing[0].uri}); convert writes to an "
                f"empty location: remove them or choose another output"
            )
    rep = _Report()
    if fmt == "movielens":
        tables = _movielens(store, src, rep)
    elif fmt == "sequence":
        tables = _sequence(store, src, rep)
    elif fmt == "recbole":
        tables = _recbole(store, src, rep)
    else:
        tables = _csv(store, src, dict(mapping or {}), "," if delimiter is None else delimiter, rep)

    writer = _PartWriter(store, out, files, row_group_rows)
    try:
        for t in tables:
            writer.write(t)
        if writer.rows == 0:
            skipped = ", ".join(f"{n} {r}" for r, n in rep.skipped.items()) or "nothing skipped"
            raise DataError(f"{src}: no interactions found ({skipped})")
        writer.close()
    except BaseException:
        writer.abort()
        raise
    report = {
        "format": fmt,
        "src": src,
        "inputs": rep.inputs,
        "out": out,
        "rows": writer.rows,
        "files": len(writer.parts),
        "parts": writer.parts,
        "skipped": rep.skipped,
        "null_ids": writer.null_ids,
        "schema": {f.name: str(f.type) for f in writer.schema},
        **rep.extra,
    }
    if mapping:
        report["mapping"] = dict(mapping)
    store.write_json(join(out, "_convert.json"), report)
    return report
