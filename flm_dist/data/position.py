"""The data position of an epoch: exactly which rows have been trained on.

Rows are identified by their position (`unit << 32 | row`, see pipeline.encode_table).
A row is consumed once trained on or dropped as bad (counted in the bad-row budget), so
a resumed epoch neither trains nor counts it again. A checkpoint stores, for the epoch
in progress, the read units consumed in full and, for the few units in flight, a bitmap
of their consumed rows; units are keyed by `file URI#row group`, so the state survives
a re-plan that adds files. Resuming drops exactly those rows from the epoch: over both
attempts every row is trained on once.
"""

from __future__ import annotations

import base64

import numpy as np

from flm_dist.data.plan import DataPlan

__all__ = ["ConsumedRows"]


class ConsumedRows:
    """`side_rows` (unit -> its rows on the read's side of the split, which the read
    tasks report, `BatchStream.side_rows`): a unit with rows held out (an eval split,
    the validation carve) is done once its side's rows are, not never."""

    def __init__(self, plan: DataPlan, side_rows: dict[int, int] | None = None):
        self._side = side_rows if side_rows is not None else {}
        self._rows = [u.rows for u in plan.units]
        self._keys = [f"{plan.files[u.file].uri}#{u.row_group}" for u in plan.units]
        self._index = {k: i for i, k in enumerate(self._keys)}
        self.done: set[int] = set()
        self.partial: dict[int, np.ndarray] = {}

    def add(self, pos: np.ndarray) -> None:
        if len(pos) == 0:
            return
        units = pos >> 32
        rows = pos & 0xFFFFFFFF
        for u in np.unique(units).tolist():
            if u in self.done:
                continue
            mask = self.partial.get(u)
            if mask is None:
                mask = self.partial[u] = np.zeros(self._rows[u], dtype=bool)
            mask[rows[units == u]] = True
            if mask.sum() >= self._side.get(u, self._rows[u]):
                self.done.add(u)
                del self.partial[u]

    @property
    def count(self) -> int:
        return sum(self._rows[u] for u in self.done) + sum(int(m.sum()) for m in self.partial.values())

    def skip_map(self) -> dict[int, np.ndarray | None]:
        """unit -> None (all rows consumed) or the bool mask of consumed rows."""
        out: dict[int, np.ndarray | None] = {u: None for u in self.done}
        out.update({u: m.copy() for u, m in self.partial.items()})
        return out

    def state(self) -> dict:
        return {
            "done": sorted(self._keys[u] for u in self.done),
            "partial": {self._keys[u]: base64.b64encode(np.packbits(m).tobytes()).decode() for u, m in sorted(self.partial.items())},
        }

    def merge_state(self, state: dict | None) -> ConsumedRows:
        """Union with a saved state (another rank's, or a checkpoint's). Keys for units
        this plan does not have are an error: the data changed under the run."""
        if not state:
            return self
        for key in state.get("done", []):
            u = self._unit(key)
            self.done.add(u)
            self.partial.pop(u, None)
        for key, b64 in state.get("partial", {}).items():
            u = self._unit(key)
            if u in self.done:
                continue
            bits = np.unpackbits(np.frombuffer(base64.b64decode(b64), dtype=np.uint8))[: self._rows[u]].astype(bool)
            mask = self.partial.get(u)
            self.partial[u] = bits if mask is None else (mask | bits)
            if self.partial[u].all():
                self.done.add(u)
                del self.partial[u]
        return self

    def _unit(self, key: str) -> int:
        if key not in self._index:
            raise KeyError(f"read unit {key} of the checkpoint's data position is not in the current data plan")
        return self._index[key]

    def reset(self) -> None:
        self.done.clear()
        self.partial.clear()
