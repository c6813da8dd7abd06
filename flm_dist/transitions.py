"""Transition counts: which items followed which in the training sequences, kept beside
a sequence model's export and blended into its ranking.

Why: the sequence model ranks by a 64-dimensional factorisation of its items. That
generalises across items but smooths away the exact memory of each pair, which is
what most of a long-tail catalog has (an Amazon Toys item has 14 events on average).
Counts keep that memory; a classical "next items" count beat the model alone on every
real file here, and the blend of the two beats both (docs/RESULTS.md), as production
systems blend co-visitation counts with learned models.

- Counts: C[i, j] = how often item j came 1..`window` events after item i in a user's
  training events, plus `backward` times how often it came 1..`window` events before
  it: co-visitation either way round, the forward direction first. Two events at the
  same time have no order (training keeps them out of each other's history): each
  counts (1 + `backward`) / 2 for the other. The run's own split decides what is
  training: its validation and eval events are never counted. Each item keeps its
  `keep` most frequent followers.
- A user's transition score for item j: m_j = sum over their `recent` most recent items
  h_r (r = 0 the most recent) of C[h_r, j] / (1 + r).
- The served score: cos(user, item) + weight * log1p(m_j). `weight` is fitted at export
  on the run's validation events (NDCG@10 over every item, the user's training items
  excluded, ties counted against the blend); 0 where the counts do not help.

The counts are made in the export's process, one pass over the training files: the
distinct pairs (24 bytes each) must fit in its memory (Amazon Toys: 0.6M pairs counted both ways, 0.3M forward only). The
weight's fit gives the user tower each validation user's history and no other user
feature (those score as nulls): the sequence job files have none.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

# the split exactly as training reads it
from flm_dist.data.encode import EncodeSpec, event_times, history_events, split_mask
from flm_dist.data.hashing import prehash_ids
from flm_dist.data.sequences import expand, history_rows, is_sequence
from flm_dist.storage import Store, split_uri

__all__ = ["Transitions", "count", "fit_weight"]

# candidate weights: 0 and a geometric grid over the scale of a cosine (at 0.0125 the
# counts break the model's near-ties; at 3.2 they rank and the model breaks theirs)
WEIGHTS = (0.0,) + tuple(round(0.0125 * 2 ** (k / 2), 5) for k in range(17))
_REDUCE = 1 << 22  # pairs gathered before they are summed (at least; see `count`)
_BATCH_USERS = 1 << 14  # sequences read at a time
# Scores held at once over the whole catalog ([users, items] float32, and as many again
# for the counts and the blend): 64 MB each, whatever the catalog (at 5M items, 512
# users at a time were 10 GB an array).
SCORE_BLOCK = 1 << 24


@dataclass
class Counted:
    """What one pass over the training files gives: the counts (`table`: item_key,
    follower_keys, counts; keys as the export's graphs take IDs: the ID itself for
    integer IDs, prehash(s) for strings) and the validation examples the weight is
    fitted on."""

    table: pa.Table
    pairs: int
    valid_users: np.ndarray  # prehash keys
    valid_history: list[np.ndarray]  # prehash keys of the training items before, oldest first
    valid_target: np.ndarray
    valid_seen: list[np.ndarray]  # the user's training items (excluded from the ranking)


def _sum_pairs(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    if not len(a):
        return a, b, c
    order = np.lexsort((b, a))
    a, b, c = a[order], b[order], c[order]
    start = np.flatnonzero(np.r_[True, (a[1:] != a[:-1]) | (b[1:] != b[:-1])])
    return a[start], b[start], np.add.reduceat(c, start)


def count(store: Store, data_files: list[dict], split_spec: EncodeSpec, window: int, keep: int, history_len: int, fit_users: int, backward: float = 0.0) -> Counted:
    """Stream the training files once (the columns training read): the transition counts
    of the training side of `split_spec`'s split (j after i: 1 for i's row, `backward`
    for j's), and up to `fit_users` validation events with the items before them (at
    most `history_len`, strictly earlier in time). `split_spec` is the run's training
    read: its checks (`read`, `hash`) decide which events count, as in training."""
    acc = (np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0))
    pend: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    pending = 0
    tied = (1.0 + backward) / 2  # either way round, for events at one time: neither came first

    def reduce() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        a = np.concatenate([acc[0]] + [p[0] for p in pend])
        b = np.concatenate([acc[1]] + [p[1] for p in pend])
        return _sum_pairs(a, b, np.concatenate([acc[2]] + [p[2] for p in pend]))

    vu, vh, vt, vs = [], [], [], []
    for info in data_files:
        uri = info["uri"]
        afs, path = store.arrow_fs(uri)[0], split_uri(uri)[1]
        with afs.open_input_file(path) as handle:
            pf = pq.ParquetFile(handle)
            if not is_sequence(pf.schema_arrow):
                raise ValueError(f"{uri}: transition counts read per-user sequences (an item_id list column); run `flm-dist data sequences` or set transitions.window: 0")
            cols = split_spec.read.columns(pf.schema_arrow)
            for batch in pf.iter_batches(batch_size=_BATCH_USERS, columns=cols, use_threads=False):
                flat, user_of, index, seq_len, placeholder = expand(pa.Table.from_batches([batch]), uri)
                # the events training trains on and builds histories from: a retrieval
                # run's label-0 events and bad rows are neither counted nor in a history
                encoded, usable = history_events(flat, placeholder, split_spec)
                good = encoded["_bad"] == 0
                train = good & split_mask(flat, replace(split_spec, side="train"), index, seq_len)
                valid = good & split_mask(flat, replace(split_spec, side="valid"), index, seq_len)
                keys = prehash_ids(flat.column("item_id"))
                times = event_times(flat, index) if "ts" in flat.column_names else None
                # pairs among each user's training events, in sequence order; events at
                # the same time are in each other's history neither (training's rule)
                # nor in a direction here: the file's order among them is item order
                k, u = keys[train], user_of[train]
                t = times[train] if times is not None else None
                timed = usable[train]
                for d in range(1, window + 1):
                    same = u[d:] == u[:-d]
                    tie = np.zeros(int(same.sum()), dtype=bool)
                    if t is not None:
                        tie = ((t[d:] == t[:-d]) & timed[d:] & timed[:-d])[same]
                    pend.append((k[:-d][same], k[d:][same], np.where(tie, tied, 1.0)))
                    back = np.where(tie, tied, backward)
                    pend.append((k[d:][same][back > 0], k[:-d][same][back > 0], back[back > 0]))
                    pending += int(same.sum()) * 2
                # summed once the new pairs are as many as the distinct pairs so far: each
                # pair is sorted a few times in all, where a fixed threshold re-sorted the
                # whole accumulator every 4M pairs (quadratic: days at 10^9 events)
                if pending >= max(_REDUCE, len(acc[0])):
                    acc = reduce()
                    pend, pending = [], 0
                if len(vu) < fit_users and valid.any():
                    # histories exactly as training builds a validation example's: strictly
                    # earlier times, every usable event but the test's
                    known = split_mask(flat, replace(split_spec, side="known"), index, seq_len)
                    past = usable if known is None else usable & known
                    pos = history_rows(np.arange(len(keys)), index, history_len, usable=past, times=times)
                    users = prehash_ids(flat.column("user_id"))
                    for e in np.flatnonzero(valid)[: fit_users - len(vu)]:
                        h = pos[e][pos[e] >= 0]
                        vu.append(users[e]), vh.append(keys[h]), vt.append(keys[e])
                        first = e - index[e]  # the user's events are contiguous
                        own = slice(first, first + seq_len[e])
                        vs.append(np.unique(keys[own][train[own]]))
    a, b, c = reduce()
    # each item's `keep` most frequent followers (ties: the smaller key, so runs agree)
    order = np.lexsort((b, -c, a))
    a, b, c = a[order], b[order], c[order]
    first = np.r_[0, np.flatnonzero(a[1:] != a[:-1]) + 1]
    rank = np.arange(len(a)) - np.repeat(first, np.diff(np.r_[first, len(a)]))
    top = rank < keep
    a, b, c = a[top], b[top], c[top]
    starts = np.r_[np.flatnonzero(np.r_[True, a[1:] != a[:-1]]), len(a)] if len(a) else np.zeros(1, np.int64)
    offsets = pa.array(starts.astype(np.int32))
    table = pa.table({
        "item_key": pa.array(a[starts[:-1]], pa.int64()),
        "follower_keys": pa.ListArray.from_arrays(offsets, pa.array(b, pa.int64())),
        "counts": pa.ListArray.from_arrays(offsets, pa.array(c.astype(np.float32))),
    })
    return Counted(table, int(len(order)), np.array(vu, np.int64), vh, np.array(vt, np.int64), vs)


class Transitions:
    """Counts as compressed follower rows over a ranking's item rows: an item row is the
    item's index in `item_keys` (prehash keys, the item matrix's order)."""

    def __init__(self, table: pa.Table, item_keys: np.ndarray, recent: int, weight: float):
        self.recent, self.weight = recent, float(weight)
        order = np.argsort(item_keys, kind="stable")
        self._sorted, self._rows = torch.from_numpy(item_keys[order].copy()), torch.from_numpy(order.astype(np.int64))
        n = self.n = len(item_keys)
        lens = pc.list_value_length(table.column("follower_keys")).to_numpy(zero_copy_only=False).astype(np.int64) if table.num_rows else np.zeros(0, np.int64)
        src = np.repeat(self.rows(torch.from_numpy(table.column("item_key").to_numpy().copy())).numpy(), lens)
        fr = self.rows(torch.from_numpy(pc.list_flatten(table.column("follower_keys")).to_numpy().copy())).numpy() if table.num_rows else np.zeros(0, np.int64)
        cnt = pc.list_flatten(table.column("counts")).to_numpy(zero_copy_only=False).astype(np.float32) if table.num_rows else np.zeros(0, np.float32)
        ok = (src >= 0) & (fr >= 0)  # pairs of items outside the ranking are dropped
        # compressed rows (CSR): item row i's followers are followers[start[i]:start[i + 1]];
        # an item has 50 followers on average on Toys against `keep` 200, so rows padded
        # to `keep` would gather and scatter 4x the pairs
        order = np.argsort(src[ok], kind="stable")
        self.followers = torch.from_numpy(fr[ok][order].copy())
        self.counts = torch.from_numpy(cnt[ok][order].copy())
        self.start = torch.from_numpy(np.searchsorted(src[ok][order], np.arange(n + 1)).astype(np.int64))

    def rows(self, keys: torch.Tensor) -> torch.Tensor:
        """Item rows of prehash keys; -1 for an item outside the ranking."""
        if not len(self._sorted):
            return torch.full_like(keys, -1)
        pos = torch.searchsorted(self._sorted, keys).clamp(max=len(self._sorted) - 1)
        return torch.where(self._sorted[pos] == keys, self._rows[pos], -1)

    def scores(self, history: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """m [B, items] of histories given as prehash keys [B, L], oldest first, the first
        `lengths` of each row real."""
        b, width = history.shape
        r = lengths.view(-1, 1) - 1 - torch.arange(width).view(1, -1)  # 0: the most recent
        rows = self.rows(history)
        at_b, at_l = torch.nonzero((r >= 0) & (r < self.recent) & (rows >= 0), as_tuple=True)
        # only the real slots' followers: most histories are far shorter than the width
        src, w = rows[at_b, at_l], 1.0 / (1.0 + r[at_b, at_l].float())
        per = self.start[src + 1] - self.start[src]
        owner = torch.repeat_interleave(torch.arange(len(src)), per)
        pos = torch.arange(len(owner)) - torch.repeat_interleave(torch.cumsum(per, 0) - per, per) + self.start[src][owner]
        out = torch.zeros(b * self.n)
        out.scatter_add_(0, at_b[owner] * self.n + self.followers[pos], self.counts[pos] * w[owner])
        return out.view(b, self.n)

    def blend(self, cosine: torch.Tensor, history: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """The served score of every item: cosine [B, items] + weight * log1p(m)."""
        return cosine + self.weight * torch.log1p(self.scores(history, lengths)) if self.weight else cosine

    def blend_items(self, scores: torch.Tensor, history: torch.Tensor, lengths: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """One user's served scores of some items (/score): the model's `scores` [n] of the
        items with prehash keys `items` [n] + weight * log1p(m); an item outside the ranking
        adds nothing. `history` [1, L] and `lengths` [1] as in `scores`."""
        if not self.weight:
            return scores
        m, rows = self.scores(history, lengths)[0], self.rows(items)
        return scores + self.weight * torch.where(rows >= 0, torch.log1p(m[rows.clamp(min=0)]), 0.0)


def _padded(hist: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(1, max((len(h) for h in hist), default=1))
    out = np.zeros((len(hist), width), np.int64)
    for i, h in enumerate(hist):
        out[i, : len(h)] = h
    return torch.from_numpy(out), torch.tensor([len(h) for h in hist], dtype=torch.int64)


@torch.no_grad()
def fit_weight(counted: Counted, trans: Transitions, user_vectors, item_matrix: torch.Tensor, chunk: int = 512) -> tuple[float, dict]:
    """The weight of the blend with the best validation NDCG@10 (the smallest on a tie),
    and every weight's NDCG@10. `user_vectors(user_keys, history, lengths)` -> unit
    vectors; `item_matrix` [items, d] in `trans`'s item rows."""
    n = len(counted.valid_target)
    chunk = max(1, min(chunk, SCORE_BLOCK // max(len(item_matrix), 1)))
    targets = trans.rows(torch.from_numpy(counted.valid_target))
    dcg = torch.zeros(len(WEIGHTS))
    for lo in range(0, n, chunk):
        hi = min(lo + chunk, n)
        hist, lens = _padded(counted.valid_history[lo:hi])
        cos = user_vectors(torch.from_numpy(counted.valid_users[lo:hi].copy()), hist, lens) @ item_matrix.T
        mem = torch.log1p(trans.scores(hist, lens))
        t = targets[lo:hi]
        # every row's training items at once (the row's own item stays in the ranking)
        seen = counted.valid_seen[lo:hi]
        owner = torch.from_numpy(np.repeat(np.arange(hi - lo), [len(x) for x in seen]))
        s = trans.rows(torch.from_numpy(np.concatenate(seen) if seen else np.zeros(0, np.int64)))
        drop = (s >= 0) & (s != t[owner])
        cos[owner[drop], s[drop]], mem[owner[drop], s[drop]] = -math.inf, 0.0
        ok = t >= 0  # a target outside the ranking is a miss for every weight
        cos, mem, t = cos[ok], mem[ok], t[ok]
        rows = torch.arange(len(t))
        for k, w in enumerate(WEIGHTS):
            s = torch.add(cos, mem, alpha=w)
            # items above or tied with the target, the target included: ties against the blend
            # (a bool sum's default int64 accumulation is 5x slower here)
            rank = torch.ge(s, s[rows, t].unsqueeze(1)).sum(1, dtype=torch.int32) - 1
            dcg[k] += torch.where(rank < 10, 1.0 / torch.log2(rank.float() + 2.0), 0.0).sum()
    ndcg = (dcg / max(n, 1)).tolist()
    best = max(range(len(WEIGHTS)), key=lambda k: (round(ndcg[k], 9), -k))
    return WEIGHTS[best], {str(w): round(v, 5) for w, v in zip(WEIGHTS, ndcg, strict=True)}
