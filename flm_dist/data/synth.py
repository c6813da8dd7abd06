"""Synthetic interaction logs with a planted structure and a known quality ceiling.

The generative story (all seeded):
- users and items have latent vectors u, v (dim 8). Each user belongs to a segment and
  each item to a category; segment/category centroids explain most of u/v, so the
  categorical features (`u_segment`, `u_region`, `i_category`, `i_brand`) correlate
  with the latents (`feature_share` of their variance; the rest is per user / item).
- item popularity is Zipf-like (exponent 1.05). A user's logged items are drawn with
  p(item | user) ∝ popularity(item) · exp(gamma · affinity(u, v)): what a user
  interacts with reveals their taste, which is what pretraining can learn without labels.
- `label` (a click) ~ Bernoulli(sigmoid(alpha · affinity + bias)) — the known logistic
  model; `rating` in 1..5 from the same affinity plus noise.
- eval rows are a random 10% of rows; the planted model's own AUC on them is the
  ceiling, written to `_planted.json`.
- label scarcity: `labeled_users` < 1 keeps labels only for that share of users in
  `train/`; `pretrain/` (no labels) and `eval/` cover all users.
"""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from flm_dist.metrics import auc
from flm_dist.storage import Store, join, split_uri

__all__ = ["auc", "synth"]

LATENT = 8
USER_SEGMENTS = 24
ITEM_CATEGORIES = 32
ALPHA = 2.2  # click logit scale on affinity
GAMMA = 1.0  # how strongly affinity drives which items a user interacts with
USER_ID_BASE = 10_000_000
ITEM_ID_BASE = 5_000_000_000


def _latents(rng, n: int, groups: int, share: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    centroids = rng.normal(size=(groups, LATENT))
    group = rng.integers(0, groups, size=n)
    noise = rng.normal(size=(n, LATENT))
    lat = math.sqrt(share) * centroids[group] + math.sqrt(1 - share) * noise
    return lat, group, centroids


def _sample_items(rng, user_lat, item_lat, log_pop, counts) -> np.ndarray:
    """For each user, `counts[u]` items ~ softmax(log_pop + gamma * affinity), vectorised
    over chunks of users with the offset-CDF trick (one searchsorted for all rows)."""
    out = np.empty(int(counts.sum()), dtype=np.int64)
    n_items = len(item_lat)
    pos = 0
    chunk = max(1, 4_000_000 // n_items)
    for s in range(0, len(user_lat), chunk):
        lat = user_lat[s : s + chunk]
        c = counts[s : s + chunk]
        logits = log_pop[None, :] + GAMMA * (lat @ item_lat.T) / math.sqrt(LATENT)
        logits -= logits.max(axis=1, keepdims=True)
        p = np.exp(logits)
        cdf = np.cumsum(p, axis=1)
        cdf /= cdf[:, -1:]
        cdf[:, -1] = 1.0
        flat = (cdf + np.arange(len(lat))[:, None]).ravel()
        owners = np.repeat(np.arange(len(lat)), c)
        draws = rng.random(len(owners)) * 0.999999 + owners
        idx = np.searchsorted(flat, draws) - owners * n_items
        out[pos : pos + len(idx)] = np.clip(idx, 0, n_items - 1)
        pos += len(idx)
    return out


def _write_parts(store: Store, t: pa.Table, prefix: str, n_files: int, row_group_rows: int) -> int:
    """`t` as `n_files` Parquet parts under `prefix`, in row order."""
    afs, base = store.arrow_fs(prefix)
    store.ensure_bucket(prefix)
    if split_uri(prefix)[0] == "file":
        afs.create_dir(base, recursive=True)
    n_files = max(1, min(n_files, max(1, t.num_rows)))
    bounds = np.linspace(0, t.num_rows, n_files + 1).astype(int)
    for k in range(n_files):
        part = t.slice(bounds[k], bounds[k + 1] - bounds[k])
        pq.write_table(part, f"{base}/part-{k:05d}.parquet", filesystem=afs, row_group_size=row_group_rows)
    return n_files


def synth(
    store: Store,
    out: str,
    rows: int,
    users: int,
    items: int,
    seed: int = 0,
    files: int = 8,
    eval_fraction: float = 0.1,
    labeled_users: float = 1.0,
    row_group_rows: int = 65536,
    feature_share: float = 0.9,
) -> dict:
    """Write `out/pretrain/`, `out/train/`, `out/eval/` and `out/_planted.json`; return the report."""
    if rows < 1 or users < 1 or items < 1:
        raise ValueError("rows, users and items must be >= 1")
    if not 0 < labeled_users <= 1:
        raise ValueError("labeled_users must be in (0, 1]")
    rng = np.random.default_rng(seed)
    if not 0 <= feature_share <= 1:
        raise ValueError("feature_share must be in [0, 1]")
    user_lat, user_seg, _ = _latents(rng, users, USER_SEGMENTS, feature_share)
    item_lat, item_cat, _ = _latents(rng, items, ITEM_CATEGORIES, feature_share)
    # Zipf-like popularity over a random permutation of items.
    ranks = rng.permutation(items) + 1
    log_pop = -1.05 * np.log(ranks)
    # User activity: lognormal, at least one row each when rows allow.
    activity = rng.lognormal(0.0, 0.8, size=users)
    counts = np.floor(activity / activity.sum() * rows).astype(np.int64)
    short = rows - int(counts.sum())
    if short > 0:
        counts += np.bincount(rng.choice(users, size=short, p=activity / activity.sum()), minlength=users)
    user_idx = np.repeat(np.arange(users), counts)
    item_idx = _sample_items(rng, user_lat, item_lat, log_pop, counts)
    perm = rng.permutation(rows)
    user_idx, item_idx = user_idx[perm], item_idx[perm]

    affinity = np.einsum("ij,ij->i", user_lat[user_idx], item_lat[item_idx]) / math.sqrt(LATENT)
    bias = -1.5
    logit = ALPHA * affinity + bias
    p_click = 1.0 / (1.0 + np.exp(-logit))
    label = (rng.random(rows) < p_click).astype(np.int8)
    rating = np.clip(np.rint(3.0 + 1.1 * affinity + rng.normal(0, 0.6, rows)), 1, 5).astype(np.float32)
    ts = 1_700_000_000 + rng.integers(0, 30 * 86400, size=rows)

    # Categorical features: exact group plus a coarser, noisier one per side.
    u_region = np.where(rng.random(users) < 0.8, user_seg % 6, rng.integers(0, 6, users))
    i_brand = item_cat * 5 + rng.integers(0, 5, items)

    in_eval = rng.random(rows) < eval_fraction
    labeled = rng.random(users) < labeled_users

    def table(mask: np.ndarray, with_labels: bool) -> pa.Table:
        u, i = user_idx[mask], item_idx[mask]
        cols = {
            "user_id": pa.array(USER_ID_BASE + u, pa.int64()),
            "item_id": pa.array(ITEM_ID_BASE + i, pa.int64()),
            "ts": pa.array(ts[mask], pa.int64()),
            "u_segment": pa.array([f"seg{x}" for x in range(USER_SEGMENTS)]).take(pa.array(user_seg[u])),
            "u_region": pa.array([f"r{x}" for x in range(6)]).take(pa.array(u_region[u])),
            "i_category": pa.array([f"cat{x}" for x in range(ITEM_CATEGORIES)]).take(pa.array(item_cat[i])),
            "i_brand": pa.array(i_brand[i], pa.int64()),
        }
        if with_labels:
            cols["label"] = pa.array(label[mask], pa.int8())
            cols["rating"] = pa.array(rating[mask], pa.float32())
        return pa.table(cols)

    train_mask = ~in_eval
    n_files = max(files, 8)
    _write_parts(store, table(train_mask, with_labels=False), join(out, "pretrain"), n_files, row_group_rows)
    _write_parts(store, table(train_mask & labeled[user_idx], with_labels=True), join(out, "train"), n_files, row_group_rows)
    _write_parts(store, table(in_eval, with_labels=True), join(out, "eval"), max(2, n_files // 4), row_group_rows)

    eval_auc = auc(p_click[in_eval], label[in_eval])
    eval_rmse = float(np.sqrt(np.mean((rating[in_eval] - np.clip(3.0 + 1.1 * affinity[in_eval], 1, 5)) ** 2)))
    report = {
        "out": out,
        "rows": rows,
        "users": users,
        "items": items,
        "seed": seed,
        "labeled_users": labeled_users,
        "rows_pretrain": int(train_mask.sum()),
        "rows_train": int((train_mask & labeled[user_idx]).sum()),
        "rows_eval": int(in_eval.sum()),
        "click_rate": float(label.mean()),
        "ceiling_auc": eval_auc,
        "ceiling_rmse": eval_rmse,
        "model": {"latent_dim": LATENT, "alpha": ALPHA, "bias": bias, "gamma": GAMMA, "feature_share": feature_share},
    }
    store.write_json(join(out, "_planted.json"), report)
    return report
