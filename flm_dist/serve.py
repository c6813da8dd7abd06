"""Reference scoring server: an export (flm_dist.export) behind Ray Serve, HTTP + JSON.

    flm-dist serve EXPORT_URI [--port 8000] [--host 127.0.0.1] [--config JOB.yaml]

The replica loads the artifact with torch only: `torch.jit.load("scorer.pt")`, the
item vectors and the feature snapshot (Parquet). No model code is rebuilt.

    POST /score      {"user_id": 7, "item_ids": [1, "b"], "user_features": {...}, "item_features": {...}}
                  -> {"user_id": 7, "item_ids": [1, "b"], "scores": [0.61, 0.13]}
    POST /recommend  {"user_id": 7, "k": 10, "exclude": [...]}            (retrieval / pretrain exports)
                  -> {"user_id": 7, "k": 10, "items": [{"item_id": 3, "score": 0.93}, ...]}
    GET  /healthz -> {"status": "ok", "task": ..., ...}

IDs are JSON integers or strings, coerced to the kind the column had in training: a
string ID column takes 123 as "123"; an integer column takes "123" as 123 (64-bit IDs
outgrow JSON numbers in many clients) and hashes any other string as a string, i.e.
an unseen ID. Feature values a request leaves out come from the snapshot for IDs seen
in training, else score as nulls. Unknown IDs go through the hash like any other
(cold start), never an index error. Bad requests get HTTP 4xx and
{"error": ..., "field": ...}; the replica keeps serving.

An export with transition counts (a model with a history, `flm_dist.transitions`)
answers both endpoints with cosine + weight * log1p(counts of what followed the user's
latest items), the ranking its weight was fitted for.

Requests are validated and encoded one by one, then batched (`@serve.batch`): one
TorchScript call for all pairs of a batch of /score requests, one user-tower call and
one matrix product for a batch of /recommend requests.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import tempfile
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from ray import serve

from flm_dist import transitions
from flm_dist.config import ConfigError, ServeConfig
from flm_dist.data.hashing import HASH_VERSION, prehash_ids, prehash_str
from flm_dist.export import LEN_SUFFIX, feature_inputs
from flm_dist.storage import Store, join, sha256_file
from flm_dist.transitions import Transitions

__all__ = ["LoadedExport", "RequestError", "ScoringServer", "build_app", "check_serve_config", "run", "top_k"]

log = logging.getLogger(__name__)

_INT64_MIN, _INT64_MAX, _UINT64_MAX = -(1 << 63), (1 << 63) - 1, (1 << 64) - 1
_FLOAT32_MAX = float(np.finfo(np.float32).max)
_CANONICAL_INT = re.compile(r"-?(0|[1-9][0-9]*)")


class RequestError(ValueError):
    """A request the server cannot answer; `field` names the part at fault."""

    def __init__(self, message: str, field: str | None, status: int = 400):
        super().__init__(message)
        self.field = field
        self.status = status

    def body(self) -> dict:
        return {"error": str(self), "field": self.field}


def check_serve_config(cfg: ServeConfig, source: str = "serve") -> ServeConfig:
    if cfg.max_items < 1:
        raise ConfigError(f"{source}: serve.max_items must be >= 1, got {cfg.max_items}")
    if cfg.max_batch_size < 1:
        raise ConfigError(f"{source}: serve.max_batch_size must be >= 1, got {cfg.max_batch_size}")
    if not cfg.batch_wait_timeout_s >= 0:
        raise ConfigError(f"{source}: serve.batch_wait_timeout_s must be >= 0, got {cfg.batch_wait_timeout_s}")
    return cfg


# ------------------------------------------------------------------ request values -> int64 keys


def _is_id(value) -> bool:
    return isinstance(value, (int, str)) and not isinstance(value, bool)


def id_key(value, kind: str, where: str) -> int:
    """A JSON ID or categorical value as the int64 the graph hashes (see module doc)."""
    if not _is_id(value):
        raise RequestError(f"{where} must be an integer or a string, got {type(value).__name__}", where)
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:  # JSON lets "\ud800" through; no ID is such a string
            raise RequestError(f"{where} is not valid Unicode (a lone surrogate)", where) from None
    if kind == "string":
        return prehash_str(value if isinstance(value, str) else str(value))
    if isinstance(value, str):
        if len(value) > 20 or not _CANONICAL_INT.fullmatch(value) or not _INT64_MIN <= int(value) <= _UINT64_MAX:
            return prehash_str(value)  # not an integer this column could hold: an unseen ID
        value = int(value)
    if not _INT64_MIN <= value <= _UINT64_MAX:
        raise RequestError(f"{where} = {value} is outside the int64 and uint64 ranges of this ID column", where)
    # An integer ID is its 64 bits, as training hashes it: a uint64 column's IDs from 2^63
    # on are the int64 of the same bits (a column is either signed or unsigned).
    return value - (1 << 64) if value > _INT64_MAX else value


@dataclass
class _Side:
    """The IDs of one side the export knows (snapshot or vectors), as sorted int64 keys,
    with their encoded snapshot features in the same order."""

    keys: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    inputs: dict[str, torch.Tensor] = field(default_factory=dict)

    def find(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(row in this side, found) per key."""
        if len(self.keys) == 0:
            return np.zeros(len(keys), np.int64), np.zeros(len(keys), bool)
        pos = np.searchsorted(self.keys, keys)
        pos = np.minimum(pos, len(self.keys) - 1)
        return pos, self.keys[pos] == keys


@dataclass
class ScoreRequest:
    user_id: object
    item_ids: list
    user: torch.Tensor  # [1] key
    items: torch.Tensor  # [n] keys
    features: dict[str, torch.Tensor]  # user-side [1, ...], item-side [n, ...]


@dataclass
class RecommendRequest:
    user_id: object
    k: int
    user: torch.Tensor  # [1]
    features: dict[str, torch.Tensor]  # user-side [1, ...]
    exclude: np.ndarray  # rows of the item matrix


# ------------------------------------------------------------------ request values -> graph inputs


def check_fields(body, allowed: set[str], required: set[str]) -> dict:
    if not isinstance(body, dict):
        raise RequestError(f"the body must be a JSON object, got {type(body).__name__}", "body")
    for k in body:
        if k not in allowed:
            raise RequestError(f"unknown field {k!r}; fields are {', '.join(sorted(allowed))}", k)
    for k in sorted(required):
        if k not in body:
            raise RequestError(f"missing field {k!r}", k)
    return body


def null_inputs(f: dict, n: int) -> dict[str, torch.Tensor]:
    if f["kind"] == "numeric":
        return {f["name"]: torch.zeros(n)}
    if f["kind"] in ("multi", "history"):  # a null list; an empty history
        return {f["name"]: torch.zeros(n, f["max_len"], dtype=torch.long), f["name"] + LEN_SUFFIX: torch.zeros(n, dtype=torch.long)}
    return {f["name"]: torch.full((n,), int(f["null"]), dtype=torch.long)}


def input_keys(f: dict) -> list[str]:
    return [f["name"], f["name"] + LEN_SUFFIX] if f["kind"] in ("multi", "history") else [f["name"]]


def encode_values(f: dict, values: list, where: str, per_row: bool) -> dict[str, torch.Tensor]:
    def at(i: int) -> str:
        return f"{where}[{i}]" if per_row else where

    name, n = f["name"], len(values)
    if f["kind"] == "numeric":
        out = []
        for i, v in enumerate(values):
            if v is None:
                v = 0.0
            if isinstance(v, bool):  # a boolean column trains as 0 / 1
                v = float(v)
            if not isinstance(v, (int, float)):
                raise RequestError(f"{at(i)} must be a number, a boolean or null", at(i))
            try:
                v = float(v)
            except OverflowError:
                raise RequestError(f"{at(i)} is too large for a float32 feature", at(i)) from None
            if not math.isfinite(v) or abs(v) > _FLOAT32_MAX:  # a bad row in training: never scored as a silent 0
                raise RequestError(f"{at(i)} must be a finite float32 number, got {v}", at(i))
            out.append(v)
        return {name: torch.tensor(out, dtype=torch.float32)}
    if f["kind"] == "categorical":
        keys = [int(f["null"]) if v is None else id_key(v, f["id_kind"], at(i)) for i, v in enumerate(values)]
        return {name: torch.tensor(keys, dtype=torch.long)}
    vals = torch.zeros(n, f["max_len"], dtype=torch.long)
    lens = torch.zeros(n, dtype=torch.long)
    for i, v in enumerate(values):
        v = [] if v is None else v
        if not isinstance(v, list):
            raise RequestError(f"{at(i)} must be a list of values (a multi-valued feature) or null", at(i))
        if f["kind"] == "history":
            # item IDs, oldest first: every one checked (a null is no item: training never
            # puts one in a history), the most recent kept
            keys = [id_key(x, f["id_kind"], f"{at(i)}[{j}]") for j, x in enumerate(v)][-f["max_len"] :]
        else:
            # a feature keeps its first values; a null value hashes as training hashes it: like "" / 0
            keys = [(prehash_str("") if f["id_kind"] == "string" else 0) if x is None else id_key(x, f["id_kind"], f"{at(i)}[{j}]") for j, x in enumerate(v[: f["max_len"]])]
        vals[i, : len(keys)] = torch.tensor(keys, dtype=torch.long)
        lens[i] = len(keys)
    return {name: vals, name + LEN_SUFFIX: lens}


def top_k(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The `k` best of a row of scores, ties in item order: the same answer whatever
    else is in the batch (`torch.topk` picks among tied items by its own k)."""
    vals, idx = torch.topk(scores, min(k + 1, len(scores)))
    if len(vals) > k and vals[k] == vals[k - 1]:  # a tie across the cut: every item tied at it, in order
        candidates = torch.nonzero(scores >= vals[k - 1]).flatten()
    else:  # the k best are these; only their order among ties is torch's
        candidates = torch.sort(idx[:k]).values
    order = torch.sort(scores[candidates], descending=True, stable=True).indices[:k]
    return scores[candidates[order]], candidates[order]


def _at_most(values: list, field: str, cap: int) -> None:
    """413 for a list of IDs past serve.max_items (named as the request sent it)."""
    if len(values) > cap:
        raise RequestError(f"{field} has {len(values)} items; at most serve.max_items = {cap}", field, 413)


class LoadedExport:
    """An export folder on local disk, loaded with torch + pyarrow; no Ray, no model code.
    Validates and encodes requests and answers batches of them."""

    def __init__(self, local_dir: str, cfg: ServeConfig, uri: str | None = None):
        self.uri = uri or local_dir
        self.cfg = cfg
        with open(os.path.join(local_dir, "manifest.json")) as f:
            self.manifest = m = json.load(f)
        if not str(m.get("format", "")).startswith("flm-export"):
            raise ValueError(f"{self.uri}: manifest.json is not an flm export (format {m.get('format')!r})")
        if m["hash_spec"].get("version") != HASH_VERSION:
            raise ValueError(f"{self.uri}: hash spec {m['hash_spec'].get('version')!r}; this server hashes strings as {HASH_VERSION}")
        if "scorer.pt" not in m["files"]:
            raise _onnx_only(self.uri)
        self.task = m["task"]
        self.stats = {"score": {"requests": 0, "batches": 0}, "recommend": {"requests": 0, "batches": 0}}
        self.scorer = torch.jit.load(os.path.join(local_dir, "scorer.pt"))
        self.scorer.eval()
        self.split_towers = hasattr(self.scorer, "score_latents")
        kinds = m.get("id_kinds", {})
        self.id_kind = {"user": kinds.get("user_id", "int"), "item": kinds.get("item_id", "int")}
        self.features = {side: [f for f in m.get("features", []) if f["side"] == side] for side in ("user", "item")}
        self.sides = {"user": _Side(), "item": _Side()}
        for side, info in (m.get("feature_snapshot") or {}).items():
            if isinstance(info, dict) and "file" in info:
                s = side.rstrip("s")
                self.sides[s] = self._load_side(pq.read_table(os.path.join(local_dir, info["file"])), s)
        self.item_ids: list | None = None
        self.item_matrix: torch.Tensor | None = None
        vec = (m.get("vectors") or {}).get("items")
        if vec:
            t = pq.read_table(os.path.join(local_dir, vec["file"]))
            self.item_ids = t.column("item_id").to_pylist()
            flat = t.column("vector").combine_chunks().flatten().to_numpy(zero_copy_only=False)
            self.item_matrix = torch.from_numpy(np.array(flat, dtype=np.float32).reshape(t.num_rows, vec["dim"]))
            keys = prehash_ids(t.column("item_id"))
            order = np.argsort(keys, kind="stable")
            self._item_keys, self._item_rows = keys[order], order
        # a sequence model's transition counts, blended into both endpoints' scores
        self.transitions: Transitions | None = None
        tr = m.get("transitions")
        if tr and self.item_matrix is not None and tr["weight"]:
            self.transitions = Transitions(pq.read_table(os.path.join(local_dir, tr["file"])), keys, tr["recent"], tr["weight"])

    def _load_side(self, table: pa.Table, side: str) -> _Side:
        keys = prehash_ids(table.column(f"{side}_id"))
        order = np.argsort(keys, kind="stable")
        inputs = feature_inputs(table, self.features[side])
        out = {}
        for f in self.features[side]:
            name = f["name"]
            if f["kind"] in ("multi", "history"):
                vals = inputs[name][order]
                pad = f["max_len"] - vals.shape[1]
                out[name] = torch.nn.functional.pad(vals, (0, pad)) if pad > 0 else vals[:, : f["max_len"]]
                out[name + LEN_SUFFIX] = inputs[name + LEN_SUFFIX][order]
            else:
                out[name] = inputs[name][order]
        return _Side(keys=keys[order], inputs=out)

    # -- request parsing (one request at a time, before batching) ------------------------

    def _keys(self, values: list, kind: str, where: str) -> np.ndarray:
        return np.array([id_key(v, kind, f"{where}[{i}]") for i, v in enumerate(values)], dtype=np.int64)

    def _side_inputs(self, side: str, keys: np.ndarray, given: dict | None, where: str, per_row: bool) -> dict[str, torch.Tensor]:
        """Feature inputs for `keys`: the request's values, else the snapshot's, else null."""
        feats = {f["name"]: f for f in self.features[side]}
        given = {} if given is None else given
        if not isinstance(given, dict):
            raise RequestError(f"{where} must be an object of feature name -> value", where)
        for name in given:
            if name not in feats:
                known = ", ".join(feats) or "none"
                raise RequestError(f"{where}.{name} is not a {side} feature of this export (known: {known})", f"{where}.{name}")
        n = len(keys)
        pos, found = self.sides[side].find(keys)
        rows = torch.from_numpy(pos[found])
        idx = torch.from_numpy(np.flatnonzero(found))
        snap = self.sides[side].inputs
        out: dict[str, torch.Tensor] = {}
        for name, f in feats.items():
            fw = f"{where}.{name}"
            if name in given:
                values = given[name]
                if per_row:
                    if not isinstance(values, list) or len(values) != n:
                        raise RequestError(f"{fw} must be a list with one value per item ({n})", fw)
                else:
                    values = [values]
                out.update(encode_values(f, values, fw, per_row))
                continue
            null = null_inputs(f, n)
            for key, t in null.items():
                if key in snap and len(idx):
                    t[idx] = snap[key][rows]
                out[key] = t
        return out

    def _with_history(self, body: dict):
        """The request's user features, with its "history" (a list of item IDs, oldest
        first) as the history input of a model that has one."""
        given = body.get("user_features")
        history = body.get("history", given.get("history") if isinstance(given, dict) else None)
        if isinstance(history, list):  # every entry is hashed and left out of the ranking, as exclude's
            _at_most(history, "history" if "history" in body else "user_features.history", self.cfg.max_items)
        if "history" not in body:
            return given
        if not any(f["kind"] == "history" for f in self.features["user"]):
            raise RequestError("history: this export's model does not read a user's history (model.history_len = 0)", "history")
        if not isinstance(body["history"], list):
            raise RequestError(f"history must be a list of item IDs, oldest first, got {type(body['history']).__name__}", "history")
        if given is not None and not isinstance(given, dict):
            return given  # refused with its own message
        if given and "history" in given:
            raise RequestError("history is given twice, as history and as user_features.history: send one", "history")
        self._keys(body["history"], self.id_kind["item"], "history")  # named as sent: history[j]
        return {**(given or {}), "history": body["history"]}

    def parse_score(self, body) -> ScoreRequest:
        body = check_fields(body, {"user_id", "item_ids", "user_features", "item_features", "history"}, {"user_id", "item_ids"})
        items = body["item_ids"]
        if not isinstance(items, list):
            raise RequestError(f"item_ids must be a list of IDs, got {type(items).__name__}", "item_ids")
        _at_most(items, "item_ids", self.cfg.max_items)
        user = np.array([id_key(body["user_id"], self.id_kind["user"], "user_id")], dtype=np.int64)
        item = self._keys(items, self.id_kind["item"], "item_ids")
        features = self._side_inputs("user", user, self._with_history(body), "user_features", per_row=False)
        features.update(self._side_inputs("item", item, body.get("item_features"), "item_features", per_row=True))
        return ScoreRequest(body["user_id"], items, torch.from_numpy(user), torch.from_numpy(item), features)

    def parse_recommend(self, body) -> RecommendRequest:
        if self.item_matrix is None:
            raise RequestError(
                f"/recommend needs an export with item vectors (task retrieval or pretrain); this export's task is {self.task}",
                "task",
            )
        body = check_fields(body, {"user_id", "k", "user_features", "exclude", "history", "exclude_history"}, {"user_id"})
        top = min(self.cfg.max_items, len(self.item_ids))
        k = body.get("k", min(10, top))  # a catalog of fewer than 10 items: all of them
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= top:
            raise RequestError(f"k must be an integer in [1, {top}] (serve.max_items and the number of items), got {k!r}", "k")
        user = np.array([id_key(body["user_id"], self.id_kind["user"], "user_id")], dtype=np.int64)
        exclude = body.get("exclude", [])
        if not isinstance(exclude, list):
            raise RequestError(f"exclude must be a list of item IDs, got {type(exclude).__name__}", "exclude")
        _at_most(exclude, "exclude", self.cfg.max_items)
        ex = self._keys(exclude, self.id_kind["item"], "exclude")
        features = self._side_inputs("user", user, self._with_history(body), "user_features", per_row=False)
        exclude_history = body.get("exclude_history", True)
        if not isinstance(exclude_history, bool):
            raise RequestError(f"exclude_history must be true or false, got {exclude_history!r}", "exclude_history")
        if exclude_history and "history" in features:
            # the items the user had (the whole history the request gives, not only the
            # items the model reads; or the snapshot's): a ranking of what comes next
            # leaves them out, as the evaluation and the blend weight's fit do; false
            # keeps them (repeat consumption, e.g. music)
            given = body.get("history", (body.get("user_features") or {}).get("history"))
            had = self._keys(given, self.id_kind["item"], "history") if given else features["history"][0, : int(features["history" + LEN_SUFFIX][0])].numpy()
            ex = np.concatenate([ex, had])
        pos = np.minimum(np.searchsorted(self._item_keys, ex), len(self._item_keys) - 1)
        rows = self._item_rows[pos[self._item_keys[pos] == ex]]
        return RecommendRequest(body["user_id"], k, torch.from_numpy(user), features, rows)

    # -- batches -------------------------------------------------------------------------

    @torch.no_grad()
    def score_batch(self, reqs: list[ScoreRequest]) -> list[dict]:
        """All (user, item) pairs of the batch: the user tower once per request, the item
        tower and the head once for the batch's items."""
        self._count("score", reqs)
        counts = [len(r.items) for r in reqs]
        items = torch.cat([r.items for r in reqs])
        user_features = {key: torch.cat([r.features[key] for r in reqs]) for f in self.features["user"] for key in input_keys(f)}
        item_features = {key: torch.cat([r.features[key] for r in reqs]) for f in self.features["item"] for key in input_keys(f)}
        if not len(items):
            scores = torch.zeros(0)
        elif self.split_towers:  # the user tower once per request, then each of its items
            zu = self.scorer.user_latents(torch.cat([r.user for r in reqs]), user_features)
            zu = zu.repeat_interleave(torch.tensor(counts), dim=0)
            scores = self.scorer.score_latents(zu, self.scorer.item_latents(items, item_features))
        else:  # an export made before the towers were exported apart: one row per item
            users = torch.cat([r.user.expand(c) for r, c in zip(reqs, counts, strict=True)])
            rows = {k: torch.repeat_interleave(v, torch.tensor(counts), dim=0) for k, v in user_features.items()}
            scores = self.scorer(users, items, {**rows, **item_features})
        if self.transitions is not None and len(items):
            # one request's counts at a time: [1, items] each, not [requests, items]
            blended, start = [], 0
            for r, c in zip(reqs, counts, strict=True):
                blended.append(self.transitions.blend_items(scores[start : start + c], r.features["history"], r.features["history" + LEN_SUFFIX], items[start : start + c]))
                start += c
            scores = torch.cat(blended)
        scores = scores.tolist()
        out, start = [], 0
        for r, c in zip(reqs, counts, strict=True):
            out.append({"user_id": r.user_id, "item_ids": r.item_ids, "scores": scores[start : start + c]})
            start += c
        return out

    @torch.no_grad()
    def recommend_batch(self, reqs: list[RecommendRequest]) -> list[dict]:
        """One user-tower call and one [B, d] x [d, items] product for as many of the
        batch's requests as `transitions.SCORE_BLOCK` scores allow (all of them, but on
        catalogs of millions of items)."""
        self._count("recommend", reqs)
        per = max(1, transitions.SCORE_BLOCK // max(len(self.item_ids), 1))
        return [out for lo in range(0, len(reqs), per) for out in self._recommend(reqs[lo : lo + per])]

    def _recommend(self, reqs: list[RecommendRequest]) -> list[dict]:
        users = torch.cat([r.user for r in reqs])
        features = {key: torch.cat([r.features[key] for r in reqs]) for f in self.features["user"] for key in input_keys(f)}
        scores = self.scorer.user_vectors(users, features) @ self.item_matrix.T
        if self.transitions is not None:
            scores = self.transitions.blend(scores, features["history"], features["history" + LEN_SUFFIX])
        for i, r in enumerate(reqs):
            if len(r.exclude):
                scores[i, torch.from_numpy(r.exclude)] = -math.inf
        out = []
        for i, r in enumerate(reqs):
            top_s, top_i = top_k(scores[i], r.k)
            items = [
                {"item_id": self.item_ids[j], "score": s}
                for j, s in zip(top_i.tolist(), top_s.tolist(), strict=True)
                if s != -math.inf  # fewer items than k once exclusions are removed
            ]
            out.append({"user_id": r.user_id, "k": r.k, "items": items})
        return out

    def _count(self, endpoint: str, reqs: list) -> None:
        self.stats[endpoint]["requests"] += len(reqs)
        self.stats[endpoint]["batches"] += 1

    def health(self) -> dict:
        m = self.manifest
        return {
            "status": "ok",
            "export": self.uri,
            "task": self.task,
            "output": m.get("output"),
            "dtype": m.get("dtype"),
            "items": len(self.item_ids) if self.item_ids is not None else None,
            "known_users": len(self.sides["user"].keys) or None,
            "known_items": len(self.sides["item"].keys) or (len(self.item_ids) if self.item_ids is not None else None),
            "recommend": self.item_matrix is not None,
            "transitions_weight": self.transitions.weight if self.transitions is not None else None,
            "serve": asdict(self.cfg),
            "batches": self.stats,
            "checkpoint": (m.get("lineage") or {}).get("checkpoint"),
        }


def _onnx_only(uri: str) -> ValueError:
    return ValueError(f"{uri} has no scorer.pt (exported with --format onnx only); re-export with --format torchscript")


def fetch_export(store: Store, uri: str, local_dir: str) -> None:
    """Download what a server reads (the scorer, which holds the tables; the feature
    snapshots, the item vectors and the transition counts; not the user vectors) and
    check every file against its sha256 in the manifest."""
    try:
        manifest = store.read_json(join(uri, "manifest.json"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{uri} has no manifest.json: not an export, or one still being written (`flm-dist export` writes it last)") from None
    with open(os.path.join(local_dir, "manifest.json"), "w") as f:
        json.dump(manifest, f)
    if "scorer.pt" not in manifest.get("files", {}):
        raise _onnx_only(uri)
    snapshots = [info["file"] for info in (manifest.get("feature_snapshot") or {}).values() if isinstance(info, dict) and "file" in info]
    items = (manifest.get("vectors") or {}).get("items")
    wanted = ["scorer.pt", *snapshots, *([items["file"]] if items else []), *([manifest["transitions"]["file"]] if manifest.get("transitions") else [])]
    for rel in wanted:
        if rel not in manifest.get("files", {}):
            raise ValueError(f"{uri}/manifest.json names {rel} but does not list it among its files (a partial export?)")
        dst = os.path.join(local_dir, rel)
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        store.get_file(join(uri, rel), dst)  # streamed: the item vectors can be GBs
        if sha256_file(dst) != manifest["files"][rel]["sha256"]:
            raise ValueError(f"{join(uri, rel)} does not match its sha256 in manifest.json (a partial or replaced export?)")


# ------------------------------------------------------------------ Ray Serve


def _json(body: dict, status: int = 200):
    from starlette.responses import JSONResponse

    return JSONResponse(body, status_code=status)


@serve.deployment
class ScoringServer:
    """One replica: the loaded export plus two batch queues (/score, /recommend)."""

    def __init__(self, export_uri: str, store: Store, cfg: dict, threads: int = 1):
        torch.set_num_threads(max(1, threads))
        self.cfg = ServeConfig(**cfg)
        with tempfile.TemporaryDirectory(prefix="flm-serve-") as tmp:
            fetch_export(store, export_uri, tmp)
            self.export = LoadedExport(tmp, self.cfg, uri=export_uri)
        for handler in (self._score, self._recommend):
            handler.set_max_batch_size(self.cfg.max_batch_size)
            handler.set_batch_wait_timeout_s(self.cfg.batch_wait_timeout_s)

    @serve.batch
    async def _score(self, reqs: list[ScoreRequest]) -> list[dict]:
        return self.export.score_batch(reqs)

    @serve.batch
    async def _recommend(self, reqs: list[RecommendRequest]) -> list[dict]:
        return self.export.recommend_batch(reqs)

    async def __call__(self, request):
        path = request.scope.get("path", request.url.path)
        root = request.scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root) :]
        path = "/" + path.strip("/")
        routes = {"/score": "POST", "/recommend": "POST", "/healthz": "GET"}
        if path not in routes:
            return _json({"error": f"no such endpoint {path}; endpoints are {', '.join(routes)}", "field": "path"}, 404)
        if request.method != routes[path]:
            return _json({"error": f"{path} takes {routes[path]}, not {request.method}", "field": "method"}, 405)
        if path == "/healthz":
            return _json(self.export.health())
        try:
            raw = await request.body()
            try:
                body = json.loads(raw)
            except (ValueError, RecursionError) as e:  # bad JSON, bad UTF-8, a number past Python's digit limit, deep nesting
                raise RequestError(f"the body is not valid JSON: {str(e)[:200]}", "body") from None
            if path == "/score":
                return _json(await self._score(self.export.parse_score(body)))
            return _json(await self._recommend(self.export.parse_recommend(body)))
        except RequestError as e:
            return _json(e.body(), e.status)


def build_app(export_uri: str, store: Store, cfg: ServeConfig, num_cpus: float = 1.0):
    """The Ray Serve application for one export (one replica)."""
    check_serve_config(cfg)
    # Each replica takes up to this many requests at once; the batch queue needs at
    # least max_batch_size of them in flight to fill a batch.
    ongoing = max(2 * cfg.max_batch_size, 16)
    return ScoringServer.options(
        ray_actor_options={"num_cpus": num_cpus},
        max_ongoing_requests=ongoing,
    ).bind(export_uri, store, asdict(cfg), max(1, int(num_cpus)))


def start(export_uri: str, store: Store, cfg: ServeConfig, host: str = "127.0.0.1", port: int = 8000, name: str = "flm",
          route_prefix: str = "/", num_cpus: float = 1.0, access_log: bool = False):
    """Deploy on the connected Ray cluster and wait until the replica answers. The
    per-request access log is off by default: on a small machine, logging each request
    (and shipping it to the driver) costs about as much as scoring it."""
    serve.start(http_options={"host": host, "port": port})
    serve.run(build_app(export_uri, store, cfg, num_cpus), name=name, route_prefix=route_prefix,
              logging_config={"enable_access_log": access_log})
    return f"http://{host}:{port}{route_prefix.rstrip('/')}"


def run(export_uri: str, store: Store, cfg: ServeConfig, host: str = "127.0.0.1", port: int = 8000, address: str | None = None) -> None:
    """`flm-dist serve`: start Ray (or join RAY_ADDRESS / `address`), serve until Ctrl-C
    or SIGTERM, then take the application down."""
    import signal

    from flm_dist.launch import ensure_ray

    ensure_ray(address)

    def stop(*_):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)  # after ray.init, which installs its own
    try:
        url = start(export_uri, store, cfg, host, port)
        print(f"serving {export_uri} on {url}  (POST /score, POST /recommend, GET /healthz); Ctrl-C stops", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
