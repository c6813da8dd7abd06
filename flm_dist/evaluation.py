"""Evaluation outputs on the workers, gathered for exact metrics on the driver.

Every rank holds the outputs of its own eval rows (and, for ranking, its chunks of
the catalog's item vectors); exact metrics need all of them in one place, so they are
gathered to rank 0 (an average of per-rank AUCs or recalls is not the metric).
"""

from __future__ import annotations

import numpy as np
import torch.distributed as dist

__all__ = ["OUTPUT_DTYPES", "gather_outputs", "local_outputs"]

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
        rank = dist.get_rank()
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, local, group=group)
    if rank != 0:
        return None
    result = {k: np.concatenate([g[k] for g in gathered]).astype(dtype, copy=False) for k, dtype in OUTPUT_DTYPES.items()}
    if any("catalog" in g for g in gathered):
        chunks = sorted((i, v) for g in gathered for i, v in g.get("catalog", []))
        result["catalog_vec"] = np.concatenate([v for _, v in chunks]) if chunks else np.zeros((0, 0), np.float32)
    return result
