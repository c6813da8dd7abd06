"""Training objectives. Each returns per-row losses summed over the local batch; the
train loop divides by the global row count so every rank's share adds up to the
global mean.

- pretrain:  reconstruction (denoising) + in-batch sampled softmax between the user
             and item towers with a log-popularity correction (needs no labels)
- ctr:       binary cross-entropy on `label` (+ optional reconstruction)
- rating:    squared error on `rating` (+ optional reconstruction)
- retrieval: in-batch sampled softmax with popularity correction (+ reconstruction)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from flm_dist.batch import Batch
from flm_dist.model import FLMOutput

__all__ = ["LossParts", "PopularityEstimator", "compute_loss", "forward_flags", "used_modules"]


class PopularityEstimator:
    """Streaming estimate of each item's sampling probability q(item), for the logQ
    correction of in-batch negatives (Yi et al., RecSys 2019). A hashed count table of
    fixed size. Each rank counts its own batches (its negatives come from them); at
    every checkpoint the ranks add up what they counted since the last one (`sync`), so
    the saved estimate covers all of the run's data and a resumed run starts from it."""

    def __init__(self, buckets: int = 1 << 20, device: torch.device | str = "cpu"):
        self.buckets = buckets
        # float64: a float32 count stops growing at 2**24
        self.counts = torch.zeros(buckets, dtype=torch.float64, device=device)
        self.total = 0.0
        self._synced = torch.zeros(buckets, dtype=torch.float64)  # the global counts at the last sync (host)
        self._synced_total = 0.0

    def update(self, item_rows: torch.Tensor) -> None:
        b = item_rows % self.buckets
        self.counts.index_add_(0, b, torch.ones_like(b, dtype=self.counts.dtype))
        self.total += float(item_rows.numel())

    def log_q(self, item_rows: torch.Tensor) -> torch.Tensor:
        c = self.counts[item_rows % self.buckets]
        return torch.log((c + 1.0) / (self.total + self.buckets)).float()

    def sync(self, group=None) -> dict[str, torch.Tensor]:
        """Collective: add every rank's counts since the last sync; returns the global
        state (identical on every rank) to checkpoint."""
        delta = torch.cat([self.counts.cpu() - self._synced, torch.tensor([self.total - self._synced_total])]).double()
        if dist.is_initialized():
            dist.all_reduce(delta, group=group)
        self._synced += delta[:-1]
        self._synced_total += float(delta[-1])
        self.load({"counts": self._synced, "total": torch.tensor(self._synced_total)})
        return self.state()

    def state(self) -> dict[str, torch.Tensor]:
        return {"counts": self._synced.clone(), "total": torch.tensor(self._synced_total, dtype=torch.float64)}

    def load(self, state: dict[str, torch.Tensor]) -> None:
        self._synced = state["counts"].detach().double().cpu().clone()
        self._synced_total = float(state["total"])
        self.counts = self._synced.to(self.counts.device).clone()
        self.total = self._synced_total


@dataclass
class LossParts:
    total: torch.Tensor  # sum over local rows, weighted
    parts: dict[str, torch.Tensor]  # unweighted per-part sums (detached), for logging


def forward_flags(task: str, recon_weight: float) -> dict[str, bool]:
    """How the model runs for a task: which views and heads the loss needs."""
    if task in ("pretrain", "retrieval"):
        return {"corrupt": task == "pretrain", "reconstruct": recon_weight > 0, "score": False}
    return {"corrupt": False, "reconstruct": recon_weight > 0, "score": True}


def used_modules(task: str, recon_weight: float) -> set[str]:
    """Top-level modules that receive gradients; the rest are frozen for the task so
    DDP sees every trainable parameter used in every step."""
    mods = {"tables", "numeric", "user_encoder", "item_encoder"}
    if recon_weight > 0:
        mods |= {"user_decoder", "item_decoder"}
    if task in ("ctr", "rating"):
        mods.add("head")
    return mods


def _recon(out: FLMOutput) -> torch.Tensor:
    # Cosine distance per field against the clean embeddings, which are a target only
    # (detached), so reconstruction cannot pull the tables toward a trivial solution.
    lu = 1 - F.cosine_similarity(out.recon_user, out.x_user.detach(), dim=-1).mean(1)
    li = 1 - F.cosine_similarity(out.recon_item, out.x_item.detach(), dim=-1).mean(1)
    return lu + li


def _in_batch_softmax(out: FLMOutput, item_rows: torch.Tensor, temperature: float, log_q: torch.Tensor | None, num_negatives: int) -> torch.Tensor:
    """Sampled softmax: each row's item against the items of the first `num_negatives`
    rows of the (shuffled) batch, a uniform sample of in-batch items. Every logit is
    corrected by -log q(item) so popular items are not over-penalised as negatives.
    Cost O(B * num_negatives) instead of O(B^2)."""
    zu = F.normalize(out.z_user, dim=-1)
    zi = F.normalize(out.z_item, dim=-1)
    k = min(num_negatives, len(item_rows))
    pos = (zu * zi).sum(-1, keepdim=True) / temperature
    neg = zu @ zi[:k].T / temperature
    if log_q is not None:
        pos = pos - log_q[:, None]
        neg = neg - log_q[None, :k]
    # The row's own item (and any duplicate of it) is not a negative.
    neg = neg.masked_fill(item_rows[:, None] == item_rows[None, :k], float("-inf"))
    logits = torch.cat([pos, neg], dim=1)
    target = torch.zeros(len(item_rows), dtype=torch.long, device=logits.device)
    return F.cross_entropy(logits, target, reduction="none")


def compute_loss(task: str, out: FLMOutput, batch: Batch, recon_weight: float, contrastive_weight: float, temperature: float, popularity: PopularityEstimator | None, num_negatives: int = 512) -> LossParts:
    parts: dict[str, torch.Tensor] = {}
    total = out.z_user.new_zeros(())
    if task in ("pretrain", "retrieval"):
        log_q = popularity.log_q(batch.item) if popularity is not None else None
        ce = _in_batch_softmax(out, batch.item, temperature, log_q, num_negatives).sum()
        parts["contrastive"] = ce.detach()
        total = total + contrastive_weight * ce
    elif task == "ctr":
        bce = F.binary_cross_entropy_with_logits(out.score, batch.label.to(out.score.dtype), reduction="sum")
        parts["bce"] = bce.detach()
        total = total + bce
    elif task == "rating":
        se = F.mse_loss(out.score, batch.rating.to(out.score.dtype), reduction="sum")
        parts["mse"] = se.detach()
        total = total + se
    else:
        raise ValueError(f"unknown task {task!r}")
    if recon_weight > 0:
        rec = _recon(out).sum()
        parts["recon"] = rec.detach()
        total = total + recon_weight * rec
    return LossParts(total=total, parts=parts)
