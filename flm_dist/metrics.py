"""Evaluation metrics, computed exactly on the full set of predictions (gathered from
all workers before computing: an average of per-worker AUCs is not the AUC)."""

from __future__ import annotations

import math

import numpy as np

from flm_dist.data.synth import auc

__all__ = ["auc", "ctr_metrics", "group_auc", "rating_metrics"]


def group_auc(scores: np.ndarray, labels: np.ndarray, groups: np.ndarray) -> float:
    """Per-group (user) AUC, averaged with weights = group size, over groups that have
    both positives and negatives (the usual GAUC)."""
    order = np.argsort(groups, kind="mergesort")
    g, s, y = groups[order], scores[order], labels[order]
    bounds = np.flatnonzero(np.diff(g)) + 1
    num = den = 0.0
    for a, b in zip(np.concatenate([[0], bounds]), np.concatenate([bounds, [len(g)]]), strict=True):
        yy = y[a:b]
        pos = int((yy > 0.5).sum())
        if 0 < pos < b - a:
            num += (b - a) * auc(s[a:b], yy)
            den += b - a
    return num / den if den else float("nan")


def ctr_metrics(logits: np.ndarray, labels: np.ndarray, users: np.ndarray | None = None) -> dict:
    p = 1.0 / (1.0 + np.exp(-logits.astype(np.float64)))
    y = labels.astype(np.float64)
    eps = 1e-7
    pc = np.clip(p, eps, 1 - eps)
    out = {
        "rows": int(len(y)),
        "auc": auc(p, y),
        "logloss": float(-np.mean(y * np.log(pc) + (1 - y) * np.log(1 - pc))) if len(y) else float("nan"),
        "calibration": float(p.mean() / y.mean()) if len(y) and y.mean() > 0 else float("nan"),
    }
    if users is not None:
        out["gauc"] = group_auc(p, y, users)
    return out


def rating_metrics(pred: np.ndarray, rating: np.ndarray) -> dict:
    err = pred.astype(np.float64) - rating.astype(np.float64)
    return {
        "rows": int(len(err)),
        "rmse": float(math.sqrt(np.mean(err**2))) if len(err) else float("nan"),
        "mae": float(np.mean(np.abs(err))) if len(err) else float("nan"),
    }
