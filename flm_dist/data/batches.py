"""Worker side of ingest: a rank's Ray Data iterator -> fixed-size `Batch`es.

Bad rows (tagged by the read tasks, `pipeline.py`) are dropped and counted here; a
window of batches is mixed; numpy columns become tensors. The read side stays in
`pipeline.py`, free of torch, because Ray Data's processes import it.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from flm_dist.batch import Batch
from flm_dist.config import FeatureConfig
from flm_dist.data.schema import BAD_REASONS, NOT_BUDGETED

__all__ = ["BatchStream", "empty_batch"]


def empty_batch(features: tuple[FeatureConfig, ...], label: bool, rating: bool, history_len: int = 0) -> Batch:
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
        history=torch.zeros(0, history_len, dtype=torch.int64) if history_len else None,
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
        # read unit -> its rows on this side of the split (`_side_rows`), as units arrive
        self.side_rows: dict[int, int] = {}

    def _to_batch(self, cols: dict[str, np.ndarray]) -> Batch:
        feats = {}
        for f in self._features:
            if f.kind == "multi":
                feats[f.name] = torch.from_numpy(np.stack([cols[f"f_{f.name}__{j}"] for j in range(f.max_len)], axis=1))
            else:
                feats[f.name] = torch.from_numpy(np.ascontiguousarray(cols[f"f_{f.name}"]))

        def t(name):
            return torch.from_numpy(np.ascontiguousarray(cols[name])) if name in cols else None

        history = None
        if "hist__0" in cols:
            width = sum(1 for k in cols if k.startswith("hist__"))
            history = torch.from_numpy(np.stack([cols[f"hist__{j}"] for j in range(width)], axis=1))

        return Batch(
            user=t("user"),
            item=t("item"),
            features=feats,
            label=t("label"),
            rating=t("rating"),
            history=history,
            pos=t("_pos"),
            user_key=t("user_key"),
            item_key=t("item_key"),
        )

    def epoch(self, epoch: int) -> Iterator[tuple[Batch | None, np.ndarray, np.ndarray]]:
        """Yields (batch, bad counts since the last yield, the positions of those bad
        rows). The final batch may be short; a last (None, counts, positions) may follow."""
        counts = np.zeros(len(BAD_REASONS), dtype=np.int64)
        dropped: list[np.ndarray] = []

        def taken() -> np.ndarray:
            nonlocal dropped
            out, dropped = (np.concatenate(dropped) if dropped else np.zeros(0, np.int64)), []
            return out

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
            side = raw.pop("_side_rows", None)
            if side is not None and len(side):
                units, first = np.unique(raw["_pos"] >> 32, return_index=True)
                self.side_rows.update(zip(units.tolist(), side[first].tolist(), strict=True))
            bad = raw.pop("_bad")
            counts += np.bincount(bad, minlength=len(BAD_REASONS))
            keep = bad == 0
            if len(self.bad_examples) < 5 and not keep.all():
                budgeted = ~keep & ~np.isin(bad, NOT_BUDGETED)
                idx = np.flatnonzero(budgeted)[: 5 - len(self.bad_examples)]
                self.bad_examples += [(int(raw["_pos"][i]), int(bad[i])) for i in idx]
            if not keep.all():
                dropped.append(raw["_pos"][~keep])
                raw = {k: v[keep] for k, v in raw.items()}
            if len(raw["_pos"]) == 0:
                continue
            pending.append(raw)
            pending_rows += len(raw["_pos"])
            if pending_rows >= window_rows:
                for cols in flush(final=False):
                    yield self._to_batch(cols), counts, taken()
                    counts = np.zeros_like(counts)
        if pending_rows:
            for cols in flush(final=True):
                yield self._to_batch(cols), counts, taken()
                counts = np.zeros_like(counts)
        if counts.any():
            yield None, counts, taken()
