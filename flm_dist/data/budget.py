"""The bad-row budget: rows dropped per reason, summed over every rank, checked
against `data.max_bad_fraction` at the same step on every rank."""

from __future__ import annotations

import numpy as np
import pyarrow.compute as pc
import torch.distributed as dist

from flm_dist.data.plan import DataPlan, read_unit
from flm_dist.data.schema import BAD_REASONS, DataError, budgeted
from flm_dist.storage import Store

__all__ = ["BadRows"]


class BadRows:
    """Global per-reason counts of one run's dropped rows. The budget is a share of an
    epoch's rows: `check` compares the current window (an epoch's training rows, and
    the validation pass before it) with it, raising on every rank at once (the counts
    are global): mid-epoch only once the whole epoch could no longer stay under the
    budget, at the end of an epoch against the rows read. A checkpoint carries the
    window (`window`), so a resumed epoch goes on counting where it stopped."""

    def __init__(self, store: Store, plan: DataPlan | None, max_fraction: float, group=None):
        self.store, self.plan, self.max_fraction, self.group = store, plan, max_fraction, group
        self.counts = np.zeros(len(BAD_REASONS), dtype=np.int64)
        self.other_rows = 0  # good rows read besides the training rows (validation)
        self._base, self._other_base, self._trained = self.counts.copy(), 0, 0  # the window's start

    def add(self, global_counts: np.ndarray, rows: int = 0, trained: int = 0) -> None:
        """Global bad counts of a step; `rows`: good rows read that training does not
        count; `trained`: the rows it trained on."""
        self.counts += global_counts
        self.other_rows += rows
        self._trained += trained

    def next_window(self) -> None:
        """An epoch's checks are done: count the next one apart."""
        self._base, self._other_base, self._trained = self.counts.copy(), self.other_rows, 0

    def window(self) -> dict:
        return {"bad": (self.counts - self._base).tolist(), "trained": self._trained, "other": self.other_rows - self._other_base}

    def resume(self, window: dict | None) -> None:
        """Go on with a checkpoint's window (its epoch's counts until then)."""
        if window:
            self.counts += np.asarray(window["bad"], dtype=np.int64)
            self._trained += int(window["trained"])
            self.other_rows += int(window["other"])

    def check(self, final: bool, examples: list[tuple[int, int]]) -> None:
        """Collective only when over budget (then on every rank, from the same counts)."""
        n_bad = budgeted(self.counts - self._base)
        rows_read = self._trained + self.other_rows - self._other_base
        limit = self.max_fraction * (rows_read + n_bad if final or self.plan is None else self.plan.total_rows)
        if n_bad <= limit or n_bad == 0:
            return
        gathered = [examples]
        if dist.is_initialized():
            gathered = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, examples, group=self.group)
        ex = [e for g in gathered for e in (g or [])][:5]
        where = []
        for pos, code in ex:
            if self.plan is not None:
                f, row = self.plan.locate(int(pos))
                what = "event" if self.plan.sequence else "row"  # a sequence file's positions count events
                where.append(f"{f} {what} {row}: {BAD_REASONS[code]} {self._row_values(int(pos))}")
        counts = ", ".join(f"{BAD_REASONS[i]}={int(c)}" for i, c in enumerate(self.counts - self._base) if i and c)
        raise DataError(
            f"bad rows exceed data.max_bad_fraction={self.max_fraction}: {n_bad} bad of "
            f"{rows_read + n_bad} rows read in this epoch ({counts}); examples: " + "; ".join(where)
        )

    def report(self) -> dict[str, int]:
        """The run's counts, every epoch's."""
        return {BAD_REASONS[i]: int(c) for i, c in enumerate(self.counts) if i and c}

    def _row_values(self, pos: int) -> dict:
        """The raw columns of one row (for error messages), read back from its file."""
        try:
            t = read_unit(self.store, self.plan, self.plan.units[pos >> 32])
            slot = pos & 0xFFFFFFFF
            if not self.plan.sequence:
                return t.slice(slot, 1).to_pylist()[0]
            # the event's user row (an empty or null list takes one slot) and its values there
            ends = np.cumsum(np.maximum(pc.fill_null(pc.list_value_length(t.column("item_id").combine_chunks()), 0).to_numpy(zero_copy_only=False), 1))
            r = int(np.searchsorted(ends, slot, side="right"))
            k = slot - (int(ends[r - 1]) if r else 0)
            row = t.slice(r, 1).to_pylist()[0]
            return {"user_id": row.pop("user_id"), "event": k, **{c: v[k] if isinstance(v, list) and k < len(v) else v for c, v in row.items()}}
        except Exception as e:  # the message is still useful without the values
            return {"unavailable": str(e)}

