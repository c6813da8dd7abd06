"""What the training data of a model looked like, for evaluation: which users and
items it saw (cold-start slices), how popular each item was (long tail, the
most-popular baseline), the item catalog with features (retrieval candidates) and the
(user, item) pairs (items to exclude from a user's ranking)."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from flm_dist.data.encode import EncodeSpec, encode_table
from flm_dist.data.plan import DataPlan, read_unit
from flm_dist.storage import Store

__all__ = ["Reference", "scan_reference"]


@dataclass
class Reference:
    users: np.ndarray  # sorted unique user keys
    items: np.ndarray  # sorted unique item keys
    item_counts: np.ndarray  # interactions per item, aligned with `items`
    catalog: dict[str, np.ndarray] | None = None  # per catalog item: item_key, item row, item-side feature columns
    pair_users: np.ndarray | None = None  # (user key, item key) pairs seen, sorted by user
    pair_items: np.ndarray | None = None

    def popular(self, share: float = 0.2) -> np.ndarray:
        """Sorted keys of the top `share` of items by training popularity."""
        n = int(np.ceil(len(self.items) * share))
        top = np.argsort(-self.item_counts, kind="stable")[:n]
        return np.sort(self.items[top])


def scan_reference(store: Store, plan: DataPlan, spec: EncodeSpec, *, catalog: bool = False, pairs: bool = False, threads: int = 4,
                   stop: threading.Event | None = None) -> Reference:
    """One streaming pass over the training data (row group by row group, in threads).
    `stop` set: the units not yet read are dropped and the scan raises (a run that
    failed while its reference was read in the background; queued units would
    otherwise hold the process at exit until every one was read)."""
    item_features = [f for f in spec.read.features if f.side == "item"]

    def scan(unit):
        if stop is not None and stop.is_set():
            raise RuntimeError("the reference scan was stopped")
        cols = encode_table(read_unit(store, plan, unit), spec, unit.index)
        good = cols["_bad"] == 0
        u, i = cols["user_key"][good], cols["item_key"][good]
        ik, first, cnt = np.unique(i, return_index=True, return_counts=True)
        out = {"users": np.unique(u), "items": ik, "counts": cnt}
        if catalog:
            rows = np.flatnonzero(good)[first]
            out["catalog"] = {"item_key": ik, "item": cols["item"][rows]}
            for f in item_features:
                if f.kind == "multi":
                    for j in range(f.max_len):
                        out["catalog"][f"f_{f.name}__{j}"] = cols[f"f_{f.name}__{j}"][rows]
                else:
                    out["catalog"][f"f_{f.name}"] = cols[f"f_{f.name}"][rows]
        if pairs:
            p = np.unique(np.stack([u, i], axis=1), axis=0) if len(u) else np.zeros((0, 2), np.int64)
            out["pairs"] = p
        return out

    with ThreadPoolExecutor(threads) as pool:
        parts = list(pool.map(scan, plan.units))
    users = np.unique(np.concatenate([p["users"] for p in parts])) if parts else np.zeros(0, np.int64)
    all_items = np.concatenate([p["items"] for p in parts]) if parts else np.zeros(0, np.int64)
    all_counts = np.concatenate([p["counts"] for p in parts]) if parts else np.zeros(0, np.int64)
    items, inverse = np.unique(all_items, return_inverse=True)
    counts = np.bincount(inverse, weights=all_counts, minlength=len(items)).astype(np.int64)
    ref = Reference(users=users, items=items, item_counts=counts)
    if catalog:
        cat = {k: np.concatenate([p["catalog"][k] for p in parts]) for k in parts[0]["catalog"]} if parts else {}
        keys, first = np.unique(cat.get("item_key", np.zeros(0, np.int64)), return_index=True)
        ref.catalog = {k: v[first] for k, v in cat.items()}
    if pairs:
        p = np.unique(np.concatenate([x["pairs"] for x in parts]), axis=0) if parts else np.zeros((0, 2), np.int64)
        ref.pair_users, ref.pair_items = p[:, 0].copy(), p[:, 1].copy()
    return ref
