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

__all__ = ["LossParts", "NegativeSampler", "PopularityEstimator", "compute_loss", "forward_flags", "used_modules"]


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
        self.seen = torch.zeros((), dtype=torch.float64, device=device)  # buckets counted at least once
        self._synced = torch.zeros(buckets, dtype=torch.float64)  # the global counts at the last sync (host)
        self._synced_total = 0.0

    def update(self, item_rows: torch.Tensor) -> None:
        b = item_rows % self.buckets
        self.seen += (self.counts[torch.unique(b)] == 0).sum()  # a tensor: no host sync
        self.counts.index_add_(0, b, torch.ones_like(b, dtype=self.counts.dtype))
        self.total += float(item_rows.numel())

    def log_q(self, item_rows: torch.Tensor) -> torch.Tensor:
        # Add-one smoothing over the buckets seen, not over all of them: with 2^20 buckets
        # and a log of a few hundred thousand events, (c + 1) / (total + buckets) put q
        # several times too low, and beside uniform negatives (k q + K / n) the in-batch
        # term's correction shrank with it (without them it is one shift of every logit).
        c = self.counts[item_rows % self.buckets]
        return torch.log((c + 1.0) / (self.total + self.seen)).float()

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
        self.seen = (self.counts > 0).sum().double()


@dataclass
class LossParts:
    total: torch.Tensor  # sum over local rows, weighted
    parts: dict[str, torch.Tensor]  # unweighted per-part sums (detached), for logging


def forward_flags(task: str, recon_weight: float, all_positions: bool = False) -> dict[str, bool]:
    """How the model runs for a task: which views and heads the loss needs."""
    if task in ("pretrain", "retrieval"):
        # next_item: with a history, next-item prediction at every position of it
        return {"corrupt": task == "pretrain", "reconstruct": recon_weight > 0, "score": False, "next_item": all_positions}
    return {"corrupt": False, "reconstruct": recon_weight > 0, "score": True}


def used_modules(task: str, recon_weight: float) -> set[str]:
    """Top-level modules that receive gradients; the rest are frozen for the task so
    DDP sees every trainable parameter used in every step."""
    mods = {"tables", "numeric", "user_encoder", "item_encoder", "history"}
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


def _sampled_softmax(z_user: torch.Tensor, z_item: torch.Tensor, item_rows: torch.Tensor, cand_z: torch.Tensor, cand_rows: torch.Tensor, temperature: float, popularity: PopularityEstimator | None, k: int, uniform_share: float) -> torch.Tensor:
    """Sampled softmax: each user vector's item (`z_item`, rows `item_rows`) against the
    candidates: k in-batch items (drawn in proportion to popularity) and K items drawn
    uniformly from the catalog (`uniform_share` = K / catalog). Every logit is corrected
    by -log of the item's expected count among the candidates, k q(item) + K / catalog,
    so popular items are not over-penalised as negatives (Yi et al. 2019; Yang et al.
    2020 for the mixture). Cost O(rows * (k + K)) instead of O(rows * catalog)."""
    zu = F.normalize(z_user, dim=-1)
    zi = F.normalize(z_item, dim=-1)
    cz = F.normalize(cand_z, dim=-1)
    pos = (zu * zi).sum(-1, keepdim=True) / temperature
    neg = zu @ cz.T / temperature
    if popularity is not None:
        def log_count(rows):
            return torch.log(k * popularity.log_q(rows).exp() + uniform_share)

        pos = pos - log_count(item_rows)[:, None]
        neg = neg - log_count(cand_rows)[None, :]
    # The row's own item (and any duplicate of it) is not a negative.
    neg = neg.masked_fill(item_rows[:, None] == cand_rows[None, :], float("-inf"))
    logits = torch.cat([pos, neg], dim=1)
    target = torch.zeros(len(item_rows), dtype=torch.long, device=logits.device)
    return F.cross_entropy(logits, target, reduction="none")


def _contrastive(out: FLMOutput, batch: Batch, temperature: float, popularity: PopularityEstimator | None, num_negatives: int, uniform_share: float) -> torch.Tensor:
    """The interaction objective of pretraining and retrieval (a sum over rows): the
    user tower against the item tower, or with a history, next-item prediction at every
    position of it."""
    k = min(num_negatives, len(batch.item))
    cand_z, cand_rows = out.z_candidate[:k], batch.item[:k]
    if batch.negatives is not None and out.z_negative is not None:
        cand_z, cand_rows = torch.cat([cand_z, out.z_negative]), torch.cat([cand_rows, batch.negatives])
    if out.z_next_user is not None:
        return _sampled_softmax(out.z_next_user, out.z_next_item, out.next_rows, cand_z, cand_rows, temperature, popularity, k, uniform_share).sum()
    return _sampled_softmax(out.z_user, out.z_item, batch.item, cand_z, cand_rows, temperature, popularity, k, uniform_share).sum()


class NegativeSampler:
    """Uniform negatives for the sampled softmax: item rows drawn uniformly from the
    rows this rank has seen in training so far (the catalog, as hashed), with the
    item-side feature values last seen with each row.

    The candidate list grows with every step that brings new rows, so a run's first
    steps draw from every item seen so far, not from the first batch's few hundred
    (drawn from those alone, the negatives train a softmax over a tiny catalog and
    undo a pretrained model's ranking within an epoch). Without item features the
    history items count as seen too, so the list covers most of the catalog at the
    first step; with them, only rows whose features have been seen are drawn.
    Memory: one byte per item row, one int64 per row seen, and the cached feature values."""

    def __init__(self, item_rows: int, features, count: int, device, seed: int):
        self.count, self.device = count, device
        self.seen = torch.zeros(item_rows, dtype=torch.bool, device=device)
        self.cache: dict[str, torch.Tensor] = {}
        for f in features:
            if f.side != "item":
                continue
            if f.kind == "numeric":
                self.cache[f.name] = torch.zeros(item_rows, device=device)
            elif f.kind == "multi":
                self.cache[f.name] = torch.full((item_rows, f.max_len), -1, dtype=torch.long, device=device)
            else:
                self.cache[f.name] = torch.zeros(item_rows, dtype=torch.long, device=device)
        self.gen = torch.Generator(device=device).manual_seed(seed)
        # The seen rows in the order first seen; [:n] is valid. Doubles when full.
        self._rows = torch.empty(1024, dtype=torch.long, device=device)
        self._n = 0

    def observe(self, batch: Batch) -> None:
        rows = batch.item
        if batch.history is not None and not self.cache:
            rows = torch.cat([rows, batch.history[batch.history >= 0]])
        new = rows[~self.seen[rows]].unique()  # few once the catalog is known: sort only those
        self.seen[new] = True
        self._append(new)
        for name, table in self.cache.items():
            table[batch.item] = batch.features[name].to(table.dtype)

    def _append(self, new: torch.Tensor) -> None:
        if self._n + len(new) > len(self._rows):
            grown = torch.empty(max(2 * len(self._rows), self._n + len(new)), dtype=torch.long, device=self.device)
            grown[: self._n] = self._rows[: self._n]
            self._rows = grown
        self._rows[self._n : self._n + len(new)] = new
        self._n += len(new)

    def history_features(self, history: torch.Tensor) -> dict[str, torch.Tensor]:
        """The last-seen item features of a batch's history items [B, H(, L)]."""
        rows = history.clamp_min(0)
        return {name: table[rows] for name, table in self.cache.items()}

    def state(self, group=None) -> dict:
        """Collective: the rows any rank has seen, each with the item features of the
        highest rank that saw it; identical on every rank, to checkpoint, so that a
        resumed run does not draw its negatives from the few items of its first batch
        again. The live sampler stays as it is: a save does not change training."""
        rank = dist.get_rank() if dist.is_initialized() else 0
        owner = self.seen.cpu().to(torch.int32) * (rank + 1)
        if dist.is_initialized():
            dist.all_reduce(owner, op=dist.ReduceOp.MAX, group=group)
        features = {}
        for name, table in self.cache.items():
            mine = (owner == rank + 1).view(-1, *[1] * (table.dim() - 1))
            features[name] = torch.where(mine, table.cpu(), torch.zeros((), dtype=table.dtype))
            if dist.is_initialized():
                dist.all_reduce(features[name], group=group)  # one owner per row: the sum is its value
        return {"seen": (owner > 0).to(torch.uint8), "features": features}

    def load(self, state: dict) -> None:
        """Add a checkpoint's rows (`state`) to those seen, with their item features."""
        seen = state["seen"].to(self.device).bool()
        new = torch.nonzero(seen & ~self.seen).flatten()
        self.seen |= seen
        self._append(new)
        for name, table in self.cache.items():
            table[new] = state["features"][name].to(self.device, table.dtype)[new]

    def sample(self) -> tuple[torch.Tensor, dict[str, torch.Tensor], float]:
        """(rows [count], their item features, count / catalog size)."""
        n = max(self._n, 1)
        pick = torch.randint(0, n, (self.count,), generator=self.gen, device=self.device)
        rows = self._rows[pick] if self._n else torch.zeros(self.count, dtype=torch.long, device=self.device)
        return rows, {name: table[rows] for name, table in self.cache.items()}, self.count / n


def compute_loss(task: str, out: FLMOutput, batch: Batch, recon_weight: float, contrastive_weight: float, temperature: float, popularity: PopularityEstimator | None, num_negatives: int = 512, uniform_share: float = 0.0) -> LossParts:
    """`uniform_share`: the batch's uniform negatives (`batch.negatives`) over the catalog size."""
    parts: dict[str, torch.Tensor] = {}
    total = out.z_user.new_zeros(())
    if task in ("pretrain", "retrieval"):
        ce = _contrastive(out, batch, temperature, popularity, num_negatives, uniform_share)
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
