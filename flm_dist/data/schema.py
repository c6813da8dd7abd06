"""The interaction-log schema and the checks that name the file and column at fault.

| column    | type                          | required            |
|-----------|-------------------------------|---------------------|
| user_id   | integer or string             | yes                 |
| item_id   | integer or string             | yes                 |
| ts        | integer (seconds) or timestamp| no (yes for split.by=time) |
| label     | numeric or bool in [0, 1]     | task ctr            |
| rating    | numeric                       | task rating         |
| features  | string / int / list / float   | when declared       |

Undeclared columns are ignored.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pyarrow as pa

from flm_dist.config import FeatureConfig

__all__ = ["BAD_REASONS", "NOT_BUDGETED", "DataError", "ReadSpec", "budgeted", "check_schema"]


class DataError(ValueError):
    """The data does not fit the job; the message names the file, column or row."""


# Row-level reasons a row is dropped; index = code stored in the `_bad` column (0 = good).
BAD_REASONS = (
    "ok",
    "null_user_id",
    "null_item_id",
    "null_label",
    "nonfinite_label",
    "label_out_of_range",
    "null_rating",
    "nonfinite_rating",
    "rating_out_of_range",
    "null_ts",
    "bad_file",  # a whole read unit skipped under on_bad_file=skip (one marker row per unit)
    "nonfinite_feature",  # a numeric feature is NaN or +-Inf (null is a value: 0)
    "not_positive",  # retrieval: label <= 0, not a positive interaction (filtered, not bad)
    "empty_sequence",  # per-user sequence data: a user row with an empty or null item list
)
BAD_FILE_CODE = BAD_REASONS.index("bad_file")
# Counted per reason but outside data.max_bad_fraction: skipped files have their own
# budget (data.max_bad_files), and a retrieval job on a click log drops its non-clicks
# by design.
NOT_BUDGETED = (BAD_FILE_CODE, BAD_REASONS.index("not_positive"))


def budgeted(counts) -> int:
    """Of per-reason counts (indexed by code), the rows that count against
    data.max_bad_fraction."""
    return int(counts[1:].sum() - counts[list(NOT_BUDGETED)].sum())


def is_id_type(t: pa.DataType) -> bool:
    if pa.types.is_dictionary(t):
        return is_id_type(t.value_type)
    return pa.types.is_integer(t) or pa.types.is_string(t) or pa.types.is_large_string(t)


def _is_numeric(t: pa.DataType) -> bool:
    return pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t) or pa.types.is_decimal(t)


def is_ts_type(t: pa.DataType) -> bool:
    return pa.types.is_integer(t) or pa.types.is_timestamp(t) or pa.types.is_date(t)


@dataclass(frozen=True)
class ReadSpec:
    """What a job reads from each file: the columns, which are required, how they are checked."""

    need_label: bool = False
    need_rating: bool = False
    need_ts: bool = False
    read_label: bool = False  # read if present
    positives_only: bool = False  # retrieval: rows with label <= 0 are dropped (counted as not_positive)
    read_rating: bool = False
    read_ts: bool = False
    keys: bool = False  # also emit 64-bit user/item identity keys (evaluation slices, retrieval)
    rating_range: tuple[float, float] = (1.0, 5.0)
    features: tuple[FeatureConfig, ...] = field(default_factory=tuple)
    sequence: bool = False  # the files hold per-user sequences (set by the plan, see data/sequences.py)
    history_len: int = 0  # each example carries the hashed rows of up to this many previous items

    @classmethod
    def for_task(cls, task: str, features, rating_range, need_ts: bool = False, evaluate: bool = False, history_len: int = 0) -> ReadSpec:
        return cls(
            need_label=task == "ctr",
            need_rating=task == "rating",
            need_ts=need_ts,
            read_label=task in ("ctr", "retrieval"),
            positives_only=task == "retrieval",
            read_rating=task == "rating",
            read_ts=need_ts,
            keys=evaluate,
            rating_range=(float(rating_range[0]), float(rating_range[1])),
            features=tuple(features),
            history_len=history_len,
        )

    def columns(self, schema: pa.Schema) -> list[str]:
        cols = ["user_id", "item_id"]
        for name, want in (("ts", self.read_ts), ("label", self.read_label), ("rating", self.read_rating)):
            # a history holds only strictly earlier events: sequences read their times
            want = want or (name == "ts" and self.history_len > 0)
            if want and schema.get_field_index(name) >= 0:
                cols.append(name)
        cols += [f.name for f in self.features]
        return cols


def check_schema(schema: pa.Schema, spec: ReadSpec, where: str, sequence: bool = False) -> None:
    """Raise DataError naming `where` (a file) and the column when `schema` cannot serve
    `spec`. In per-user sequence files every column but user_id is a list of per-event
    values: the checks apply to the values."""

    def col(name: str) -> pa.DataType | None:
        i = schema.get_field_index(name)
        if i < 0:
            return None
        t = schema.field(i).type
        if sequence and name != "user_id":
            if not (pa.types.is_list(t) or pa.types.is_large_list(t)):
                raise DataError(f"{where}: column '{name}' has type {t}; in per-user sequence files every column but user_id is a list of per-event values")
            return t.value_type
        return t

    required = [("user_id", is_id_type, "integer or string"), ("item_id", is_id_type, "integer or string")]
    if spec.need_label:
        required.append(("label", _is_numeric, "numeric 0/1 (task ctr)"))
    if spec.need_rating:
        required.append(("rating", _is_numeric, "numeric (task rating)"))
    if spec.need_ts:
        required.append(("ts", is_ts_type, "integer seconds or timestamp (data.split.by=time)"))
    for name, ok, what in required:
        t = col(name)
        if t is None:
            raise DataError(f"{where}: required column '{name}' ({what}) is missing; columns are {schema.names}")
        if not ok(t):
            raise DataError(f"{where}: column '{name}' has type {t}, expected {what}")
    # Optional columns are checked only when the job reads them: a pretraining job
    # does not care what type a `label` column has.
    optional = [
        ("ts", is_ts_type, "integer seconds or timestamp", spec.read_ts or spec.history_len > 0),
        ("label", _is_numeric, "numeric", spec.read_label),
        ("rating", _is_numeric, "numeric", spec.read_rating),
    ]
    for name, ok, what, read in optional:
        t = col(name) if read else None
        if t is not None and not ok(t):
            raise DataError(f"{where}: column '{name}' has type {t}, expected {what}")
    for f in spec.features:
        t = col(f.name)
        if t is None:
            raise DataError(
                f"{where}: feature column '{f.name}' declared in data.features is missing; columns are {schema.names}"
            )
        if f.kind == "categorical" and not is_id_type(t):
            raise DataError(f"{where}: feature column '{f.name}' has type {t}; kind=categorical needs string or integer")
        if f.kind == "numeric" and not _is_numeric(t):
            raise DataError(f"{where}: feature column '{f.name}' has type {t}; kind=numeric needs a number")
        if f.kind == "multi" and not (
            (pa.types.is_list(t) or pa.types.is_large_list(t)) and is_id_type(t.value_type)
        ):
            raise DataError(f"{where}: feature column '{f.name}' has type {t}; kind=multi needs list<string> or list<int>")
