"""Evaluation on the workers: model outputs for every eval row, the catalog's item
vectors, and the validation criterion that early stopping follows.

Every rank holds the outputs of its own eval rows (and, for ranking, its chunks of
the catalog's item vectors); exact metrics need all of them in one place, so they are
gathered to rank 0 (an average of per-rank AUCs or recalls is not the metric).
Forward passes follow the train loop's step agreement: sharded lookups are
collectives, so a rank without rows joins with an empty batch.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from flm_dist.batch import Batch
from flm_dist.objectives import compute_loss
from flm_dist.sharding import unwrap

__all__ = ["OUTPUT_DTYPES", "catalog_matrix", "catalog_vectors", "eval_outputs", "gather_outputs", "local_outputs", "validation_loss", "validation_ranking"]

# Per-row outputs and their dtypes. A rank with no eval rows must still send arrays of
# these dtypes: concatenating a float64 `np.zeros(0)` with int64 identity keys turns
# the keys into floats, which loses their low bits (64-bit hashes) and silently breaks
# slices and the exclusion of each user's training items.
OUTPUT_DTYPES = {"user_key": np.int64, "item_key": np.int64, "pred": np.float32, "target": np.float32, "user_vec": np.float32}


def local_outputs(parts: dict[str, list[np.ndarray]], latent_dim: int) -> dict[str, np.ndarray]:
    """Concatenate one rank's per-batch outputs, with typed empties for a rank that saw none."""
    out = {}
    for key, dtype in OUTPUT_DTYPES.items():
        chunks = parts.get(key) or []
        empty = np.zeros((0, latent_dim) if key == "user_vec" else 0, dtype)
        out[key] = np.concatenate(chunks).astype(dtype, copy=False) if chunks else empty
    return out


def gather_outputs(local: dict, group=None) -> dict | None:
    """Every rank's outputs on rank 0, rows in rank order; None on the other ranks.
    `local` may carry "catalog": [(chunk index, item vectors)] from each rank, which
    comes back as one `catalog_vec` array in chunk order. Collective: every rank calls it."""
    gathered = [local]
    rank = 0
    if dist.is_initialized():
        # to rank 0 only: an all-gather put every rank's rows and catalog chunk on every
        # rank, world-size times the memory for outputs only rank 0 reads
        rank = dist.get_rank()
        gathered = [None] * dist.get_world_size() if rank == 0 else None
        dist.gather_object(local, gathered, dst=0, group=group)
    if rank != 0:
        return None
    result = {k: np.concatenate([g[k] for g in gathered]).astype(dtype, copy=False) for k, dtype in OUTPUT_DTYPES.items()}
    if any("catalog" in g for g in gathered):
        chunks = sorted((i, v) for g in gathered for i, v in g.get("catalog", []))
        result["catalog_vec"] = np.concatenate([v for _, v in chunks]) if chunks else np.zeros((0, 0), np.float32)
    return result


@torch.no_grad()
def eval_outputs(model, batches, task: str, device, empty: Batch, latent_dim: int) -> dict[str, np.ndarray]:
    """This rank's outputs for the agreed eval batches (`batches` yields this rank's
    batch or None, for as many steps as the rank with the most rows needs): predictions
    and targets for ctr / rating, unit user vectors for retrieval and pretraining."""
    m = unwrap(model)
    retrieval = task in ("retrieval", "pretrain")
    out: dict[str, list[np.ndarray]] = {k: [] for k in OUTPUT_DTYPES}
    for batch in batches:
        b = (batch or empty).to(device)
        if retrieval:
            out["user_vec"].append(F.normalize(m.user_vector(b), dim=-1).float().cpu().numpy())
        else:
            out["pred"].append(model(b, score=True).score.float().cpu().numpy())
            target = b.label if task == "ctr" else b.rating
            out["target"].append(target.float().cpu().numpy())
        if batch is not None:
            out["user_key"].append(batch.user_key.numpy())
            out["item_key"].append(batch.item_key.numpy())
    return local_outputs(out, latent_dim)


@torch.no_grad()
def catalog_vectors(model, catalog: dict | None, features, batch_size: int, device, empty: Batch, rank: int, world: int) -> list[tuple[int, np.ndarray]]:
    """Unit item vectors of the catalog, chunk i on rank i % world. Every rank makes
    the same number of forward passes (an empty one when out of chunks)."""
    m = unwrap(model)
    cat = catalog or {}
    n = len(cat.get("item", ()))
    chunks = -(-n // batch_size)
    mine = []
    for k in range(-(-chunks // world)):
        i = k * world + rank
        b = empty
        if i < chunks:
            sl = slice(i * batch_size, min(n, (i + 1) * batch_size))
            feats = {}
            for f in features:
                if f.side != "item":
                    continue
                if f.kind == "multi":
                    feats[f.name] = torch.from_numpy(np.stack([cat[f"f_{f.name}__{j}"][sl] for j in range(f.max_len)], axis=1))
                else:
                    feats[f.name] = torch.from_numpy(cat[f"f_{f.name}"][sl])
            item = torch.from_numpy(cat["item"][sl])
            b = Batch(user=torch.zeros_like(item), item=item, features=feats)
        v = F.normalize(m.item_vector(b.to(device)), dim=-1).float().cpu().numpy()
        if i < chunks:
            mine.append((i, v))
    return mine


@torch.no_grad()
def validation_loss(model, batches, task: str, device, empty: Batch, popularity, train_cfg) -> tuple[float, int]:
    """(sum of the task loss over this rank's validation rows, rows): the objective
    itself without the reconstruction term, so every task is followed by the quantity
    it trains on (log loss, squared error, sampled softmax)."""
    from flm_dist.objectives import forward_flags

    flags = forward_flags(task, 0.0)
    flags["corrupt"] = False  # the clean view: what serving sees
    flags["next_item"] = False  # the example's own item: what evaluation ranks
    total, rows = 0.0, 0
    model.eval()
    for batch in batches:
        b = (batch or empty).to(device)
        out = model(b, **flags).float()
        if batch is not None and len(batch):
            lp = compute_loss(task, out, b, 0.0, train_cfg.contrastive_weight, train_cfg.temperature, popularity, train_cfg.num_negatives)
            total += float(lp.total)
            rows += len(batch)
    model.train()
    return total, rows


def catalog_matrix(model, catalog: dict, features, batch_size: int, device, empty: Batch, group=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole catalog on every rank: (item rows sorted, their unit vectors).
    Collective: each rank computes its chunks (`catalog_vectors`), then all gather them."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    model.eval()
    chunks = [catalog_vectors(model, catalog, features, batch_size, device, empty, rank, world)]
    model.train()
    if dist.is_initialized():
        mine, chunks = chunks[0], [None] * world
        dist.all_gather_object(chunks, mine, group=group)
    order = sorted((i, v) for c in chunks for i, v in c)
    rows, perm = torch.sort(torch.from_numpy(np.asarray(catalog["item"], np.int64)))
    vecs = torch.from_numpy(np.concatenate([v for _, v in order])) if order else torch.zeros(0, 1)
    return rows, vecs[perm] if len(rows) else vecs


@torch.no_grad()
def validation_ranking(model, batches, catalog: tuple[torch.Tensor, torch.Tensor], device, empty: Batch, k: int = 10, chunk: int = 65536,
                       seen: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[float, float, int]:
    """(sum of NDCG@k, sum of Recall@k, rows) over this rank's validation rows, each
    row's item ranked by full ranking against `catalog` (item rows sorted, their unit
    vectors), as the final evaluation ranks: the user's other items are excluded, the
    item itself not (`_excluded`), and an item outside the catalog, or whose score is
    not finite, is a miss; ties count against the row's item, as in the final
    evaluation. One difference, to spare a pass over the product: another item's NaN
    score is not counted above it (the final evaluation counts it; training stops before
    a non-finite state is saved, so no validated model has one).

    Early stopping for retrieval follows this, not the sampled softmax loss: on Toys the
    validation loss rose from the third epoch while Recall@10 rose for six more
    (docs/RESULTS.md). The catalog is scored in chunks of `chunk` items, twice: once
    to take each row's own score from the very product the counts compare against."""
    m = unwrap(model)
    rows_sorted, cvec = catalog[0].to(device), catalog[1].to(device)
    n = len(rows_sorted)
    ndcg = recall = 0.0
    count = 0
    model.eval()
    for batch in batches:
        b = (batch or empty).to(device)
        u = F.normalize(m.user_vector(b), dim=-1).float()
        if batch is None or not len(batch):
            continue
        pos = torch.searchsorted(rows_sorted, b.item).clamp_max(max(n - 1, 0))
        in_cat = rows_sorted[pos] == b.item if n else torch.zeros_like(b.item, dtype=torch.bool)
        ex_row, ex_pos = _excluded(b, batch.user_key, seen, rows_sorted)
        # A catalog of one chunk (most) is scored once; larger ones chunk by chunk, twice.
        whole = u @ cvec.T if n <= chunk else None
        own = torch.full((len(u),), float("nan"), device=device)  # items outside the catalog: a miss
        for lo in range(0, n, chunk):  # the row's own score, from the catalog's product
            sc = whole if whole is not None else u @ cvec[lo : lo + chunk].T
            here = in_cat & (pos >= lo) & (pos < lo + chunk)
            own = torch.where(here, sc.gather(1, (pos - lo).clamp(0, sc.shape[1] - 1)[:, None]).squeeze(1), own)
        above = torch.zeros(len(u), dtype=torch.long, device=device)
        for lo in range(0, n, chunk):
            sc = whole if whole is not None else u @ cvec[lo : lo + chunk].T
            # a bool sum accumulates in int64 by default, 3x slower than int32: on Toys'
            # catalog that sum took 81 ms of 1,024 rows' 131 (the product: 50)
            above += (sc >= own[:, None]).sum(1, dtype=torch.int32)
            inside = (ex_pos >= lo) & (ex_pos < lo + chunk)
            r, c = ex_row[inside], ex_pos[inside] - lo
            above -= torch.bincount(r[sc[r, c] >= own[r]], minlength=len(u))
        rank = above - in_cat.long()  # items scored at or above the row's own, itself not counted
        hit = (rank < k) & torch.isfinite(own)
        ndcg += float(torch.where(hit, 1 / torch.log2(rank.clamp_min(0).double() + 2), 0.0).sum())
        recall += float(hit.sum())
        count += len(batch)
    model.train()
    return ndcg, recall, count


def _excluded(b: Batch, user_key: torch.Tensor | None, seen: tuple[np.ndarray, np.ndarray] | None, rows_sorted: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, catalog position) of each row's user's other distinct catalog items, which
    a ranking excludes: the user's known pairs, `seen` (user keys sorted, their item
    rows; trained on or held out for validation), found by `user_key`, as the final
    evaluation excludes them; without them, the row's history (only its last
    `history_len` items, and also events a retrieval run does not train on: label 0).
    So each held-out item is ranked against items the user never chose, as the
    leave-one-out test ranks its target. Ranked against the user's known items, a model
    was judged worse the better it had learned them: on LastFM (47 items a user) a
    pretrained model validated at NDCG@10 0.008 against scratch's 0.019 and tested
    within 0.006 of it, and on Toys early stopping ended scratch's fine-tune at epoch 2
    of 10 (docs/RESULTS.md)."""
    n, dev = len(rows_sorted), rows_sorted.device
    if seen is not None:
        if user_key is None:
            raise ValueError("validation rows without user_key: a ranking validation with the known pairs (`seen`) finds a row's user by key (ReadSpec.keys)")
        users, rows = seen
        keys = user_key.numpy()
        first = np.searchsorted(users, keys, side="left")
        cnt = np.searchsorted(users, keys, side="right") - first
        at = np.repeat(first - (np.cumsum(cnt) - cnt), cnt) + np.arange(int(cnt.sum()))
        row = torch.from_numpy(np.repeat(np.arange(len(keys)), cnt)).to(dev)
        items = torch.from_numpy(np.asarray(rows[at], np.int64)).to(dev)
    elif b.history is not None:
        row = torch.arange(len(b.history), device=dev)[:, None].expand_as(b.history).reshape(-1)
        items = b.history.reshape(-1)
    else:
        row = items = torch.zeros(0, dtype=torch.long, device=dev)
    pos = torch.searchsorted(rows_sorted, items.clamp_min(0)).clamp_max(max(n - 1, 0))
    keep = (items >= 0) & (rows_sorted[pos] == items if n else torch.zeros_like(items, dtype=torch.bool)) & (items != b.item[row])
    key = torch.unique(row[keep] * max(n, 1) + pos[keep])  # distinct (row, position) pairs
    return key // max(n, 1), key % max(n, 1)
