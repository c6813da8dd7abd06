"""Export a committed checkpoint (any world size) to a portable serving artifact:

    scorer.pt                 TorchScript: forward(user_id, item_id, features=None) -> scores,
                              plus user_vectors(...) / item_vectors(...); raw int64 IDs in,
                              the ID hash inside the graph
    scorer.onnx               the same forward for onnxruntime; features are named graph inputs
    tables/<t>.safetensors    one unsharded embedding table per file
    user_vectors.parquet      retrieval / pretrain: raw ID -> unit vector, for an ANN index
    item_vectors.parquet      (inner product of a user and an item vector = the score)
    features/users.parquet    models with feature fields: raw ID -> last-seen feature values
    features/items.parquet    in the training data, so a server can score known IDs alone
    transitions.parquet       a retrieval / pretrain model with a history: each item's most frequent
                              followers in the run's training events, blended into the ranking with
                              a weight fitted on its validation events (flm_dist.transitions)
    manifest.json             task, inputs/outputs, hash spec, features, lineage, sha256s

Loading needs torch only (`torch.jit.load`) or onnxruntime only. String IDs enter
both graphs as `prehash(s)`, an int64 that the in-graph hash maps to the same row
training mapped the string to (recipe in the manifest). The vectors and the feature
snapshot are computed by streaming the checkpoint's training data files once.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from dataclasses import replace

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from torch import nn

from flm_dist import __version__, transitions
from flm_dist import checkpoint as ckpt
from flm_dist.config import (
    DataConfig,
    FeatureConfig,
    ModelConfig,
    TransitionsConfig,
    from_dict,
)
from flm_dist.data.encode import EncodeSpec, encode_table, history_events, split_mask, training_read
from flm_dist.data.hashing import HashSpec, prehash_ids, prehash_str, to_signed
from flm_dist.data.plan import list_files
from flm_dist.data.schema import DataError
from flm_dist.data.sequences import expand, is_sequence
from flm_dist.model import FLM
from flm_dist.storage import Store, join, sha256_file, split_uri

__all__ = [
    "FORMATS",
    "Scorer",
    "export",
    "feature_inputs",
    "load_model",
    "write_export",
]


def torch_hash_int64(ids: torch.Tensor, seed_signed: int, rows: int) -> torch.Tensor:
    """flm-hash-v1 for int64 IDs in torch ops (TorchScript-able). `seed_signed` is the
    table seed as int64 (`to_signed`). torch's >> on int64 is arithmetic, so each
    logical shift masks off the sign copies; int64 multiplication wraps mod 2**64 in
    two's complement, matching the unsigned spec bit for bit."""
    # Literals, not module constants: TorchScript cannot close over globals.
    # -49064778989728563 == int64(0xff51afd7ed558ccd), -4265267296055464877 == int64(0xc4ceb9fe1a85ec53)
    k = ids ^ seed_signed
    k = k ^ ((k >> 33) & 2147483647)
    k = k * -49064778989728563
    k = k ^ ((k >> 33) & 2147483647)
    k = k * -4265267296055464877
    k = k ^ ((k >> 33) & 2147483647)
    return ((k >> 1) & 9223372036854775807) % rows


log = logging.getLogger(__name__)

FORMATS = ("torchscript", "onnx")
EXPORT_FORMAT = "flm-export-v1"
ONNX_OPSET = 18
LEN_SUFFIX = "__len"  # multi-valued feature `f`: values in `f` [N, L], valid counts in `f__len` [N]
_VECTOR_TASKS = ("retrieval", "pretrain")
_BATCH = 8192  # rows per tower call when computing vectors

PREHASH_DEFINITION = "prehash(s) = int64 with the bits of fnv1a64(utf8(s)) ^ 0x9e3779b97f4a7c15"
PREHASH_NUMPY = '''\
import numpy as np

def prehash(values):
    """String IDs -> the int64 inputs the exported graphs hash like training hashed the strings."""
    out = np.empty(len(values), dtype=np.uint64)
    for i, s in enumerate(values):
        h = 0xCBF29CE484222325
        for byte in s.encode("utf-8"):
            h = ((h ^ byte) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
        out[i] = h ^ 0x9E3779B97F4A7C15
    return out.view(np.int64)
'''


def load_model(store: Store, checkpoint: str) -> tuple[FLM, dict, ckpt.CheckpointRef]:
    """The unsharded model of a checkpoint, in this process (no process group): DCP
    gathers the row blocks of every shard, whatever the world size that saved them. A
    run folder stands for the run's result (`checkpoint.resolve_result`)."""
    ref = ckpt.resolve_result(store, checkpoint)
    manifest = ckpt.load_manifest(store, ref)
    # the model's own configs, not the whole job: its data, storage and cluster keys are
    # not this function's business
    cfg = manifest["config"]
    lo, hi = cfg["data"]["rating_range"]
    center = (lo + hi) / 2 if manifest["task"] == "rating" else 0.0
    features = [from_dict(FeatureConfig, f) for f in cfg["data"]["features"]]
    model = FLM(from_dict(ModelConfig, cfg["model"]), features, rating_center=center)
    state = {"model": model.state_dict()}
    ckpt.load_state(store, ref, state)
    model.eval()
    return model, manifest, ref


# ------------------------------------------------------------------ the scoring graph

_CATEGORICAL, _NUMERIC, _MULTI = 0, 1, 2


class _Field(nn.Module):
    """One input field: raw int64 values -> hash -> embedding row (categorical), the mean
    of the rows of the first `max_len` values (multi), or a numeric value times a
    learned direction. A missing input scores as training scored a null value."""

    def __init__(self, name: str, weight: torch.Tensor, kind: int, seed: int, rows: int, null_value: int, max_len: int = 1, primary: bool = False):
        super().__init__()
        self.name = name
        self.len_name = name + LEN_SUFFIX
        # Booleans, not module constants: TorchScript cannot close over globals.
        self.numeric = kind == _NUMERIC
        self.multi = kind == _MULTI
        self.primary = primary  # the user_id / item_id field of its side
        self.seed = to_signed(seed)
        self.rows = rows
        self.null_value = null_value
        self.max_len = max_len
        self.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)

    def forward(self, ids: torch.Tensor, features: dict[str, torch.Tensor] | None) -> torch.Tensor:
        n = ids.shape[0]
        values: torch.Tensor | None = None
        if self.primary:
            values = ids
        elif features is not None and self.name in features:
            values = features[self.name]
        if self.numeric:
            v = values.float() if values is not None else torch.zeros([n])
            # training encodes NaN / inf as 0
            v = torch.nan_to_num(v, nan=0.0, posinf=0.0, neginf=0.0)
            return v.unsqueeze(-1) * self.weight.float()
        if self.multi:
            if values is None:  # a null list: no values, a zero vector
                return torch.zeros([n, self.weight.shape[1]])
            v = values.long()[:, : self.max_len]
            width = v.shape[1]
            lengths = torch.full([n], width, dtype=torch.long)
            if features is not None and self.len_name in features:
                lengths = features[self.len_name].long()
            valid = (torch.arange(width).unsqueeze(0) < lengths.unsqueeze(1)).unsqueeze(-1).float()
            e = F.embedding(torch_hash_int64(v, self.seed, self.rows), self.weight).float() * valid
            return e.sum(1) / valid.sum(1).clamp_min(1.0)
        v = values.long() if values is not None else torch.full([n], self.null_value, dtype=torch.long)
        # Tables may be stored in fp16; everything after the row gather runs in fp32.
        return F.embedding(torch_hash_int64(v, self.seed, self.rows), self.weight).float()


class _HistoryField(nn.Module):
    """The user's history: `history` int64 [N, W] raw item IDs, oldest first, the first
    `history__len` of each row valid (a missing input: an empty history) -> the last
    `length` of them, right-aligned as in training -> hashed item rows -> the model's
    history encoder at full width (static shapes, for ONNX)."""

    def __init__(self, weight: torch.Tensor, seed: int, rows: int, encoder: nn.Module, length: int):
        super().__init__()
        self.seed = to_signed(seed)
        self.rows = rows
        self.length = length
        self.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
        self.encoder = encoder

    def forward(self, ids: torch.Tensor, features: dict[str, torch.Tensor] | None) -> torch.Tensor:
        n, h = ids.shape[0], self.length
        values = torch.zeros([n, 1], dtype=torch.long)
        lengths = torch.zeros([n], dtype=torch.long)
        if features is not None and "history" in features:
            values = features["history"].long()
            lengths = torch.full([n], values.shape[1], dtype=torch.long)
            if "history__len" in features:
                lengths = features["history__len"].long()
        # slot j of the window holds item len - h + j (the last h, the most recent at the end)
        src = lengths.unsqueeze(1) - h + torch.arange(h).unsqueeze(0)
        valid = (src >= 0) & (src < values.shape[1])
        items = torch.gather(values, 1, src.clamp(0, values.shape[1] - 1))
        emb = F.embedding(torch_hash_int64(items, self.seed, self.rows), self.weight).float()
        return self.encoder.last_state(emb, valid)


class Scorer(nn.Module):
    """The FLM scoring path with hashing inside; TorchScript-able and ONNX-exportable.

    `dtype=torch.float16` stores the tables (nearly all the bytes) in fp16; the dense
    layers and all arithmetic stay fp32, so any backend runs it."""

    def __init__(self, model: FLM, spec: HashSpec, task: str, id_kinds: dict[str, str], dtype: torch.dtype = torch.float32):
        super().__init__()
        features = {f.name: f for f in model.features}

        def field(name: str) -> nn.Module:
            if name == "history":
                item = spec.tables["item"]
                return _HistoryField(model.tables["item"].weight.to(dtype), item["seed"], item["rows"], model.history, model.cfg.history_len)
            if name in model.numeric:
                return _Field(name, model.numeric[name].float(), _NUMERIC, 0, 1, 0)
            table = spec.tables[name]
            weight = model.tables[name].weight.to(dtype)
            f = features.get(name)
            if f is not None and f.kind == "multi":
                return _Field(name, weight, _MULTI, table["seed"], table["rows"], 0, max_len=f.max_len)
            col = {"user": "user_id", "item": "item_id"}.get(name, name)
            null = prehash_str("") if id_kinds.get(col) == "string" else 0
            return _Field(name, weight, _CATEGORICAL, table["seed"], table["rows"], null, primary=name in ("user", "item"))

        self.user_fields = nn.ModuleList([field(n) for n in model.user_fields])
        self.item_fields = nn.ModuleList([field(n) for n in model.item_fields])
        self.user_encoder = model.user_encoder
        self.item_encoder = model.item_encoder
        self.head = model.head
        self.rating_center = float(model.rating_center)
        self.task = {"ctr": 0, "rating": 1}.get(task, 2)

    def _user(self, user_id: torch.Tensor, features: dict[str, torch.Tensor] | None) -> torch.Tensor:
        # TorchScript unrolls loops over a ModuleList attribute (not over an argument).
        xs: list[torch.Tensor] = []
        for f in self.user_fields:
            xs.append(f(user_id, features))
        return self.user_encoder(torch.cat(xs, dim=1))

    def _item(self, item_id: torch.Tensor, features: dict[str, torch.Tensor] | None) -> torch.Tensor:
        xs: list[torch.Tensor] = []
        for f in self.item_fields:
            xs.append(f(item_id, features))
        return self.item_encoder(torch.cat(xs, dim=1))

    def forward(self, user_id: torch.Tensor, item_id: torch.Tensor, features: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        return self.score_latents(self._user(user_id, features), self._item(item_id, features))

    # The towers and the head apart, so that a caller scoring many items for one user (the
    # server's /score) runs the user tower (a history's Transformer) once, not once per item.
    @torch.jit.export
    def user_latents(self, user_id: torch.Tensor, features: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """The user tower's output [N, latent] (not normalised): score_latents' input."""
        return self._user(user_id, features)

    @torch.jit.export
    def item_latents(self, item_id: torch.Tensor, features: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        return self._item(item_id, features)

    @torch.jit.export
    def score_latents(self, zu: torch.Tensor, zi: torch.Tensor) -> torch.Tensor:
        """forward's score of rows of user and item latents."""
        if self.task == 2:
            return (F.normalize(zu, dim=-1) * F.normalize(zi, dim=-1)).sum(-1)
        s = self.head(torch.cat([zu, zi, zu * zi], dim=1)).squeeze(-1) + self.rating_center
        if self.task == 0:
            return torch.sigmoid(s)
        return s

    @torch.jit.export
    def user_vectors(self, user_id: torch.Tensor, features: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Unit user vectors [N, latent]; for retrieval / pretrain, score = user . item."""
        return F.normalize(self._user(user_id, features), dim=-1)

    @torch.jit.export
    def item_vectors(self, item_id: torch.Tensor, features: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        return F.normalize(self._item(item_id, features), dim=-1)


class _OnnxScorer(nn.Module):
    """forward(user_id, item_id, *feature inputs): ONNX graphs take named positional
    inputs, not a dict."""

    def __init__(self, scorer: Scorer, names: list[str]):
        super().__init__()
        self.scorer = scorer
        self.names = names

    def forward(self, user_id: torch.Tensor, item_id: torch.Tensor, *features: torch.Tensor) -> torch.Tensor:
        return self.scorer(user_id, item_id, dict(zip(self.names, features, strict=True)))


def graph_inputs(features: list[dict]) -> list[dict]:
    """The scorer's inputs in ONNX order: user_id, item_id, then per feature (config
    order) its values (and `<name>__len` for multi-valued ones)."""
    out = [
        {"name": "user_id", "dtype": "int64", "shape": ["N"], "meaning": "raw user IDs (string IDs: prehash(s))"},
        {"name": "item_id", "dtype": "int64", "shape": ["N"], "meaning": "raw item IDs (string IDs: prehash(s))"},
    ]
    for f in features:
        if f["kind"] == "numeric":
            out.append({"name": f["name"], "dtype": "float32", "shape": ["N"], "meaning": f"{f['side']} feature value (null, NaN: 0)", "null": 0.0})
        elif f["kind"] == "categorical":
            out.append({"name": f["name"], "dtype": "int64", "shape": ["N"], "meaning": f"{f['side']} feature value (strings: prehash(s))", "null": f["null"]})
        elif f["kind"] == "history":
            out.append({"name": "history", "dtype": "int64", "shape": ["N", "L"], "meaning": f"the user's previous item IDs, oldest first, the last {f['max_len']} used (strings: prehash(s)); pad with anything"})
            out.append({"name": "history" + LEN_SUFFIX, "dtype": "int64", "shape": ["N"], "meaning": "number of valid item IDs per row of history (0: no history)"})
        else:
            out.append({"name": f["name"], "dtype": "int64", "shape": ["N", "L"], "meaning": f"{f['side']} feature values, first {f['max_len']} used (strings: prehash(s)); pad with anything"})
            out.append({"name": f["name"] + LEN_SUFFIX, "dtype": "int64", "shape": ["N"], "meaning": f"number of valid values per row of {f['name']} (0: a null list)"})
    return out


def _export_onnx(scorer: Scorer, features: list[dict], path: str) -> None:
    """torch.export + the ONNX exporter. The hash becomes int64 Mul (wrapping, as
    onnxruntime's CPU kernel does) and BitwiseXor / BitwiseAnd, and the logical shifts
    become BitShift on uint64: all onnxruntime CPU kernels (checked in the tests)."""
    import warnings

    inputs = graph_inputs(features)
    names = [i["name"] for i in inputs]
    n = torch.export.Dim("N")
    args, shapes = [], []
    for i in inputs:
        if i["shape"] == ["N", "L"]:
            args.append(torch.zeros(3, 2, dtype=torch.int64))
            shapes.append({0: n, 1: torch.export.Dim(f"L_{len(args)}", min=1)})
        else:
            args.append(torch.zeros(3, dtype=torch.float32 if i["dtype"] == "float32" else torch.int64))
            shapes.append({0: n})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            _OnnxScorer(scorer, names[2:]).eval(),
            tuple(args),
            input_names=names,
            output_names=["score"],
            opset_version=ONNX_OPSET,
            dynamo=True,
            # torch.export groups *features into one tuple after user_id and item_id;
            # an IDs-only model has no such tuple
            dynamic_shapes=(shapes[0], shapes[1], tuple(shapes[2:])) if len(shapes) > 2 else (shapes[0], shapes[1]),
            verbose=False,
        )
    # One self-contained file, unless the weights pass protobuf's 2 GiB limit (then the
    # exporter writes them next to it as scorer.onnx.data).
    program.save(path)


# ------------------------------------------------------------------ raw values -> graph inputs


def feature_inputs(table: pa.Table, features: list[dict]) -> dict[str, torch.Tensor]:
    """Scorer inputs for the feature columns of `table` that `features` (manifest
    entries) declare, encoded as training encoded them."""
    out: dict[str, torch.Tensor] = {}
    n = table.num_rows
    for f in features:
        if f["name"] not in table.column_names:
            continue
        col = table.column(f["name"])
        col = col.combine_chunks() if col.num_chunks else pa.array([], col.type)
        if f["kind"] == "numeric":
            v = pc.cast(col, pa.float64(), safe=False).fill_null(0.0).to_numpy(zero_copy_only=False)
            out[f["name"]] = torch.from_numpy(np.nan_to_num(v, nan=0.0, posinf=0.0, neginf=0.0).astype(np.float32))
        elif f["kind"] == "categorical":
            out[f["name"]] = torch.from_numpy(prehash_ids(col).copy())
        else:
            col = col.fill_null(pa.scalar([], type=col.type)) if col.null_count else col
            if col.offset:
                col = pa.concat_arrays([col])  # rebase offsets at 0
            offsets = col.offsets.to_numpy(zero_copy_only=False).astype(np.int64)
            keys = prehash_ids(col.values)
            full = offsets[1:] - offsets[:-1]
            lengths = np.minimum(full, f["max_len"])
            # a history keeps its most recent values, other multi-valued features their first
            start = offsets[:-1] + (full - lengths if f["kind"] == "history" else 0)
            width = max(1, int(lengths.max()) if n else 1)
            vals = np.zeros((n, width), dtype=np.int64)
            for j in range(width):
                has = lengths > j
                vals[has, j] = keys[start[has] + j]
            out[f["name"]] = torch.from_numpy(vals)
            out[f["name"] + LEN_SUFFIX] = torch.from_numpy(lengths.astype(np.int64))
    return out


# ------------------------------------------------------------------ the ID universe


def _canonical(col: pa.ChunkedArray, kind: str) -> pa.ChunkedArray:
    """One type per column across files: int64, string, float64 or list of those."""
    if pa.types.is_dictionary(col.type):
        col = col.cast(col.type.value_type)
    t = col.type
    if kind == "numeric":
        return pc.cast(col, pa.float64(), safe=False)
    if kind in ("multi", "history"):
        v = t.value_type
        if pa.types.is_dictionary(v):
            v = v.value_type
        return pc.cast(col, pa.list_(pa.int64() if pa.types.is_integer(v) else pa.string()), safe=False)
    # An integer is its 64 bits, as training hashes it: a uint64 from 2^63 on (a 64-bit
    # fingerprint) becomes the int64 of the same bits, and `_as_given` turns it back.
    return pc.cast(col, pa.int64() if pa.types.is_integer(t) else pa.string(), safe=False)


def _unsigned(t: pa.DataType) -> bool:
    """A uint64 column (a list of them, dictionary-encoded or not)."""
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        t = t.value_type
    if pa.types.is_dictionary(t):
        t = t.value_type
    return t == pa.uint64()


def _as_given(table: pa.Table | None, unsigned: set[str]) -> pa.Table | None:
    """The columns the data gives as uint64 back in that type (by their bits), so that
    the exported IDs are the ones the data and the clients use."""
    if table is None:
        return None
    for c in unsigned & set(table.column_names):
        t = table.schema.field(c).type
        table = table.set_column(table.column_names.index(c), c, pc.cast(table.column(c), pa.list_(pa.uint64()) if pa.types.is_list(t) else pa.uint64(), safe=False))
    return table


def _last_per_id(t: pa.Table, id_col: str) -> pa.Table:
    """The last row of each ID (rows are in data order)."""
    t = t.append_column("__row", pa.array(np.arange(t.num_rows, dtype=np.int64)))
    last = t.group_by(id_col, use_threads=False).aggregate([("__row", "max")]).column("__row_max")
    return t.take(np.sort(last.to_numpy())).drop_columns(["__row"])


class _LastSeen:
    """Distinct IDs of one side with their last-seen feature values, built from a stream
    of row blocks. Memory is O(distinct IDs): each block is reduced to its last row per
    ID, and the reduced blocks are merged whenever they outgrow the merged table."""

    def __init__(self, id_col: str, merge_rows: int = 1 << 16):
        self.id_col = id_col
        self.merge_rows = merge_rows
        self.merged: pa.Table | None = None
        self.pending: list[pa.Table] = []
        self.pending_rows = 0

    def add(self, block: pa.Table) -> None:
        block = block.filter(pc.is_valid(block.column(self.id_col)))  # training drops null IDs
        if block.num_rows == 0:
            return
        block = _last_per_id(block, self.id_col)
        self.pending.append(block)
        self.pending_rows += block.num_rows
        if self.pending_rows > max(self.merge_rows, self.merged.num_rows if self.merged is not None else 0):
            self._merge()

    def _merge(self) -> None:
        parts = ([self.merged] if self.merged is not None else []) + self.pending
        if parts:
            self.merged = _last_per_id(pa.concat_tables(parts), self.id_col)
        self.pending, self.pending_rows = [], 0

    def table(self) -> pa.Table | None:
        self._merge()
        if self.merged is None:
            return None
        return self.merged.take(pc.sort_indices(self.merged, [(self.id_col, "ascending")]))


def _universe(store: Store, data_files: list[dict], sides: dict[str, list[dict]], read: EncodeSpec) -> tuple[dict[str, pa.Table], list[str]]:
    """Stream the training data files once (block by block, only the needed columns);
    per side ("user" / "item") the table of distinct raw IDs with last-seen features,
    over the rows training took (`read`'s checks and its split's training side, as the
    evaluation's catalog: not a row it dropped for a NaN feature or a non-click, nor an
    eval row), and with a history each user's last items as training's histories hold
    them. Returns the tables and the files that changed since training (their size or
    version differs)."""
    changed, unsigned = [], set()
    seen = {side: _LastSeen(f"{side}_id") for side in sides}
    history = next((f for f in sides.get("user", []) if f["kind"] == "history"), None)
    for info in data_files:
        uri = info["uri"]
        afs, _ = store.arrow_fs(uri)
        _, path = split_uri(uri)
        try:
            now = list_files(store, uri)[0]  # size and version (ETag, mtime), as the run's plan took them
            handle = afs.open_input_file(path)
        except (FileNotFoundError, OSError, DataError) as e:
            raise FileNotFoundError(
                f"{uri}: a training data file of the checkpoint cannot be read ({e}); the item/user "
                f"vectors and the feature snapshot are built from the training data: restore the file"
            ) from None
        if now.size != info.get("size", now.size) or (info.get("version") and now.version and now.version != info["version"]):
            changed.append(uri)
        with handle:
            pf = pq.ParquetFile(handle)
            sequence = is_sequence(pf.schema_arrow)
            columns = {f"{s}_id" for s in sides} | {f["name"] for fs in sides.values() for f in fs if f["kind"] != "history"}
            columns |= set(read.read.columns(pf.schema_arrow))  # what the checks and the split read
            known = replace(read, side="known")
            for batch in pf.iter_batches(batch_size=1 << 16, columns=sorted(columns), use_threads=False):
                block = pa.Table.from_batches([batch])
                if sequence:  # one row per event, each carrying its user's most recent items
                    flat, user_of, index, seq_len, placeholder = expand(block, uri)
                    encoded, usable = history_events(flat, placeholder, read)
                    if history:
                        tails = _tails(flat.column("item_id"), user_of, usable, block.num_rows, history["max_len"])
                        flat = flat.append_column("history", tails.take(pa.array(user_of)))
                    taken = split_mask(flat, known, index, seq_len)
                    block = flat
                else:
                    encoded, taken = encode_table(block, replace(read, side="all")), split_mask(block, known)
                good = encoded["_bad"] == 0
                block = block.filter(pa.array(good if taken is None else good & taken))
                for side, feats in sides.items():
                    cols = [f"{side}_id"] + [f["name"] for f in feats]
                    kinds = ["id"] + [f["kind"] for f in feats]
                    unsigned |= {c for c in cols if _unsigned(block.schema.field(c).type)}
                    seen[side].add(pa.table({c: _canonical(block.column(c), k) for c, k in zip(cols, kinds, strict=True)}))
    return {side: _as_given(s.table(), unsigned) for side, s in seen.items()}, changed


def _tails(items: pa.ChunkedArray, user_of: np.ndarray, usable: np.ndarray, users: int, length: int) -> pa.Array:
    """Per user, the last `length` of their `usable` events' items (events of a user
    are contiguous and in order): the most recent items a history of theirs holds."""
    idx = np.flatnonzero(usable)
    owner = user_of[idx]
    ends = np.cumsum(np.bincount(owner, minlength=users))
    idx = idx[ends[owner] - np.arange(len(idx)) <= length]  # within `length` of the user's last
    offsets = np.concatenate([[0], np.cumsum(np.bincount(user_of[idx], minlength=users))]).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), items.take(pa.array(idx, pa.int64())).combine_chunks())


def _write_vectors(scorer, table: pa.Table, side: str, features: list[dict], path: str) -> int:
    """Unit vectors of every ID of `table`, computed by the exported graph in batches."""
    fn = scorer.user_vectors if side == "user" else scorer.item_vectors
    writer = None
    try:
        for start in range(0, table.num_rows, _BATCH):
            part = table.slice(start, _BATCH)
            ids = torch.from_numpy(prehash_ids(part.column(f"{side}_id")).copy())
            with torch.no_grad():
                vec = fn(ids, feature_inputs(part, features)).float().numpy()
            dim = vec.shape[1]
            out = pa.table({
                f"{side}_id": part.column(f"{side}_id"),
                "vector": pa.FixedSizeListArray.from_arrays(pa.array(vec.reshape(-1)), dim),
            })
            if writer is None:
                writer = pq.ParquetWriter(path, out.schema)
            writer.write_table(out)
    finally:
        if writer is not None:
            writer.close()
    return table.num_rows


def _feature_meta(features: list[FeatureConfig], id_kinds: dict[str, str], first_schema: pa.Schema | None, history_len: int = 0) -> list[dict]:
    """The manifest's feature entries (graph inputs); a model with a history gets a
    user-side "history" entry (the user's previous item IDs)."""
    out = []
    sequence = first_schema is not None and is_sequence(first_schema)
    for f in features:
        if f.kind == "numeric":
            kind = "float"
        elif f.kind == "categorical":
            kind = id_kinds.get(f.name, "int")
        else:
            t = first_schema.field(f.name).type.value_type if first_schema is not None else pa.int64()
            t = t.value_type if sequence else t  # sequence files: a list of per-event lists
            t = t.value_type if pa.types.is_dictionary(t) else t
            kind = "int" if pa.types.is_integer(t) else "string"
        entry = {"name": f.name, "side": f.side, "kind": f.kind, "id_kind": kind}
        if f.kind == "categorical":
            entry["null"] = prehash_str("") if kind == "string" else 0
        if f.kind == "multi":
            entry["max_len"] = f.max_len
        out.append(entry)
    if history_len:
        out.append({"name": "history", "side": "user", "kind": "history", "id_kind": id_kinds.get("item_id", "int"), "max_len": history_len})
    return out


def _parse_formats(formats) -> tuple[str, ...]:
    if isinstance(formats, str):
        formats = [s.strip() for s in formats.split(",") if s.strip()]
    bad = [f for f in formats if f not in FORMATS]
    if bad or not formats:
        raise ValueError(f"--format takes a comma-separated subset of {','.join(FORMATS)}, got {','.join(formats) or 'nothing'}")
    return tuple(dict.fromkeys(formats))


# ------------------------------------------------------------------ export


def export(store: Store, checkpoint: str, out: str, dtype: str = "fp32", formats=FORMATS) -> dict:
    """Write the serving artifact for `checkpoint` to `out`; returns the manifest."""
    model, manifest, ref = load_model(store, checkpoint)
    return write_export(store, model, manifest, out, dtype=dtype, formats=formats, checkpoint=ref.uri)


def write_export(store: Store, model: FLM, source: dict, out: str, dtype: str = "fp32", formats=FORMATS, checkpoint: str | None = None) -> dict:
    """Write the artifact of an unsharded `model` whose checkpoint manifest is `source`
    (task, config, hash_spec, data_files, data_columns, lineage fields) to `out`.
    Files are uploaded first and manifest.json last: an export is complete once its
    manifest exists, and the manifest lists (with sha256) exactly the files it owns."""
    formats = _parse_formats(formats)
    if dtype not in ("fp32", "fp16"):
        raise ValueError(f"--dtype must be fp32 or fp16, got {dtype!r}")
    table_dtype = torch.float16 if dtype == "fp16" else torch.float32
    model = model.float().eval()
    spec = HashSpec.from_dict(source["hash_spec"])
    task, id_kinds = source["task"], source.get("data_columns", {})
    data_files = source.get("data_files") or []
    first_schema = None
    if data_files and any(f.kind == "multi" for f in model.features):  # their value kind
        afs, path = store.arrow_fs(data_files[0]["uri"])
        first_schema = pq.read_schema(path, filesystem=afs)
    features = _feature_meta(list(model.features), id_kinds, first_schema, model.cfg.history_len)

    with tempfile.TemporaryDirectory(prefix="flm-export-") as tmp:
        t0 = time.perf_counter()
        scorer = torch.jit.script(Scorer(model, spec, task, id_kinds, table_dtype))
        # the ONNX graph traces a Scorer of its own (a copy of every table): only when asked for
        onnx_scorer = Scorer(model, spec, task, id_kinds, table_dtype) if "onnx" in formats else None
        onnx_info = _write_model_files(tmp, model, scorer, onnx_scorer, features, formats, table_dtype)
        vectors, snapshot, changed = _write_data_files(tmp, store, scorer, source, features, model.cfg.latent_dim, checkpoint)
        counts = _write_transitions(tmp, store, scorer, source, model.cfg, data_files) if vectors and model.cfg.history_len else None
        files = {}
        for root, _, names in os.walk(tmp):
            for n in names:
                p = os.path.join(root, n)
                files[os.path.relpath(p, tmp)] = {"bytes": os.path.getsize(p), "sha256": sha256_file(p)}
        out_manifest = _manifest(source, model.cfg, spec, task, dtype, formats, id_kinds, features, onnx_info, vectors, snapshot, changed, checkpoint, files)
        out_manifest["transitions"] = counts
        out_manifest["export_seconds"] = round(time.perf_counter() - t0, 3)
        store.ensure_bucket(out)
        # Into a folder that holds an export: its manifest goes first, so that while the
        # files change the folder is no export (a replica refuses it; under the old
        # manifest it would mix both), and its files this export does not write (an ONNX
        # graph, transition counts) go once the new ones are up.
        before = _exported_files(store, out)
        if before:
            store.rm(join(out, "manifest.json"), recursive=False)
        for rel in sorted(files):
            store.put_file(os.path.join(tmp, rel), join(out, rel))  # streamed: item vectors can be GBs
        for rel in sorted(set(before) - set(files)):
            store.rm(join(out, rel), recursive=False)
        store.write_bytes(join(out, "manifest.json"), json.dumps(out_manifest, indent=2, sort_keys=True).encode())
    return out_manifest


# What an export writes besides manifest.json: these names, and its tables and snapshots.
_EXPORT_NAMES = ("scorer.pt", "scorer.onnx", "scorer.onnx.data", "user_vectors.parquet", "item_vectors.parquet", "transitions.parquet",
                 "features/users.parquet", "features/items.parquet")


def _exported_files(store: Store, out: str) -> list[str]:
    """The files of an export in `out`: those its manifest lists, and those of an
    export's names there (a re-export that failed midway deleted the manifest first)."""
    try:
        listed = set(store.read_json(join(out, "manifest.json")).get("files", {}))
    except FileNotFoundError:
        listed = set()
    present = {n for n in _EXPORT_NAMES if store.exists(join(out, n))}
    present |= {f"tables/{name}" for e in store.ls(join(out, "tables")) if (name := e.rstrip("/").rsplit("/", 1)[-1]).endswith(".safetensors")}
    return sorted(listed | present)


def _write_model_files(tmp: str, model: FLM, scorer, onnx_scorer: Scorer | None, features: list[dict], formats, table_dtype) -> dict | None:
    """scorer.pt, scorer.onnx and the tables as safetensors; returns the manifest's ONNX entry."""
    from safetensors.torch import save_file

    if "torchscript" in formats:
        scorer.save(os.path.join(tmp, "scorer.pt"))
    onnx_info = None
    if "onnx" in formats:
        _export_onnx(onnx_scorer, features, os.path.join(tmp, "scorer.onnx"))
        onnx_info = {
            "file": "scorer.onnx",
            "opset": ONNX_OPSET,
            "inputs": [i["name"] for i in graph_inputs(features)],
            "outputs": ["score"],
            "hash": "inside the graph (int64 Mul / BitwiseXor / BitwiseAnd, BitShift on uint64); "
            "string IDs and values enter as prehash(s)",
            "optional_inputs": "none: pass every input; the null of each feature is in 'inputs'",
        }
    os.makedirs(os.path.join(tmp, "tables"))
    for name, table in model.tables.items():
        save_file({"weight": table.weight.detach().to(table_dtype).contiguous()}, os.path.join(tmp, "tables", f"{name}.safetensors"))
    return onnx_info


def _write_data_files(tmp: str, store: Store, scorer, source: dict, features: list[dict], latent_dim: int, checkpoint: str | None) -> tuple[dict, dict, list]:
    """The vectors of every user and item of the training data (retrieval-style tasks)
    and the feature snapshot (the last values of each ID): (vectors, snapshot, changed files)."""
    task, data_files = source["task"], source.get("data_files") or []
    sides = {s: [f for f in features if f["side"] == s] for s in ("user", "item")}
    want_vectors = task in _VECTOR_TASKS
    vectors, snapshot, changed = {}, {}, []
    if not (want_vectors or features):
        return vectors, snapshot, changed
    if not data_files:
        raise ValueError(
            f"{checkpoint or 'the checkpoint'} records no training data files (manifest 'data_files'); "
            f"its vectors / feature snapshot cannot be built"
        )
    need = {s: sides[s] for s in ("user", "item") if want_vectors or sides[s]}
    universe, changed = _universe(store, data_files, need, _training_read(source))
    for side, table in universe.items():
        if table is None:
            continue
        if sides[side]:
            rel = f"features/{side}s.parquet"
            os.makedirs(os.path.join(tmp, "features"), exist_ok=True)
            pq.write_table(table, os.path.join(tmp, rel))
            snapshot[f"{side}s"] = {"file": rel, "rows": table.num_rows, "key": f"{side}_id", "columns": table.column_names[1:]}
        if want_vectors:
            rel = f"{side}_vectors.parquet"
            rows = _write_vectors(scorer, table, side, sides[side], os.path.join(tmp, rel))
            vectors[f"{side}s"] = {"file": rel, "rows": rows, "dim": latent_dim, "id_column": f"{side}_id", "vector_column": "vector"}
    if changed:
        log.warning("%d training data file(s) changed since the checkpoint (first: %s); vectors reflect the files now", len(changed), changed[0])
    return vectors, snapshot, changed


def _training_read(source: dict) -> EncodeSpec:
    """The run's read of its training data (`data.encode.training_read`): which rows the
    vectors and the snapshot cover, which events a history may hold and a transition
    count may pair. A pretraining never reads data.eval, so its split stands."""
    cfg = source["config"]  # the parts it needs, as load_model rebuilds the model's
    data = from_dict(DataConfig, cfg["data"])
    return training_read(data, source["task"], cfg["model"]["history_len"], HashSpec.from_dict(source["hash_spec"]), cfg["run"]["seed"],
                         eval_given=bool(data.eval) and source["task"] != "pretrain")


def _write_transitions(tmp: str, store: Store, scorer, source: dict, cfg: ModelConfig, data_files: list[dict]) -> dict | None:
    """transitions.parquet (`flm_dist.transitions`) for a model with a history: counts of
    the run's training events, and the blend weight fitted on its validation events."""
    job = source["config"]
    tc = from_dict(TransitionsConfig, job.get("transitions") or {})
    if not tc.window:
        return None
    t0 = time.perf_counter()
    # the split and validation carve exactly as the run's training read them
    counted = transitions.count(store, data_files, _training_read(source), tc.window, tc.keep, cfg.history_len, tc.fit_users, tc.backward)
    items = pq.read_table(os.path.join(tmp, "item_vectors.parquet"))
    flat = items.column("vector").combine_chunks().flatten().to_numpy(zero_copy_only=False)
    matrix = torch.from_numpy(np.array(flat, np.float32).reshape(items.num_rows, -1))
    trans = transitions.Transitions(counted.table, prehash_ids(items.column("item_id")), tc.recent, 0.0)
    fit: dict = {"validation_events": len(counted.valid_target)}
    if len(counted.valid_target):

        def user_vectors(users, hist, lens):
            return scorer.user_vectors(users, {"history": hist, "history__len": lens})

        weight, fit["ndcg@10_by_weight"] = transitions.fit_weight(counted, trans, user_vectors, matrix)
    else:  # nothing to fit on: the counts are kept, and the blend is off until a run with validation events
        weight, fit["why_zero"] = 0.0, "no validation events in the training files (data.valid_fraction = 0 or data.valid set)"
        log.warning("transition counts exported with weight 0: %s", fit["why_zero"])
    pq.write_table(counted.table, os.path.join(tmp, "transitions.parquet"))
    return {
        "file": "transitions.parquet", "window": tc.window, "backward": tc.backward, "keep": tc.keep, "recent": tc.recent, "weight": weight,
        "items": counted.table.num_rows, "pairs": counted.pairs, "fit": fit, "seconds": round(time.perf_counter() - t0, 3),
        "score": "cosine + weight * log1p(m), m_j = sum over the user's `recent` most recent items h_r (r = 0 the "
        "most recent) of counts[h_r -> j] / (1 + r); what the server's /recommend and /score answer",
        "counts": "item j counted as a follower of item i (1) when it came 1..window events after i in a user's "
        "training events, and (`backward`) when it came 1..window events before i (the run's split: validation and "
        "eval events are not counted); each item's `keep` most frequent",
    }


def _manifest(source, cfg: ModelConfig, spec, task, dtype, formats, id_kinds, features, onnx_info, vectors, snapshot, changed, checkpoint, files) -> dict:
    return {
        "format": EXPORT_FORMAT,
        "formats": list(formats),
        "task": task,
        "dtype": dtype,
        "dtype_note": "fp16: tables stored in fp16; dense layers and all arithmetic in fp32" if dtype == "fp16" else "fp32",
        "output": {"ctr": "click probability", "rating": "predicted rating"}.get(task, "cosine similarity of user and item vectors"),
        "torchscript": {
            "file": "scorer.pt",
            "forward": "forward(user_id int64[N], item_id int64[N], features: dict[str, Tensor] | None) -> float32[N]",
            "methods": {
                "user_vectors": "user_vectors(user_id int64[N], features=None) -> float32[N, latent], unit norm",
                "item_vectors": "item_vectors(item_id int64[N], features=None) -> float32[N, latent], unit norm",
            },
            "features": "optional dict: keys as the ONNX inputs below; a missing key scores as null",
        } if "torchscript" in formats else None,
        "onnx": onnx_info,
        "inputs": graph_inputs(features),
        "outputs": [{"name": "score", "dtype": "float32", "shape": ["N"]}],
        "id_kinds": id_kinds,
        "features": features,
        "hash_spec": {
            **spec.to_dict(),
            "prehash": {"definition": PREHASH_DEFINITION, "numpy": PREHASH_NUMPY},
            "where": "inside scorer.pt and scorer.onnx for int64 inputs; strings need prehash(s) first",
        },
        "feature_snapshot": {
            **snapshot,
            "policy": "distinct raw IDs of the training data files, each with the feature values of its "
            "last row in file order (files sorted, rows in file order)",
        } if snapshot else None,
        "vectors": {
            **vectors,
            "normalized": True,
            "score": "inner product of a user vector and an item vector = the scorer's output",
        } if vectors else None,
        "universe": {"files": len(source.get("data_files") or []), "changed_since_training": changed} if (vectors or snapshot) else None,
        "embedding_dim": cfg.embedding_dim,
        "latent_dim": cfg.latent_dim,
        "lineage": {"checkpoint": checkpoint, "step": source.get("step"), "run": source.get("run"), "data": source.get("data"), "parent": source.get("parent")},
        "exported_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "flm_dist": __version__,
        "versions": {"torch": torch.__version__, **_onnx_versions(formats)},
        "files": files,
    }


def _onnx_versions(formats) -> dict:
    if "onnx" not in formats:
        return {}
    import onnx

    return {"onnx": onnx.__version__}
