"""A plain SASRec (Kang & McAuley, "Self-Attentive Sequential Recommendation", ICDM
2018) as a baseline for the sequence protocols of bench/quality.py: the model the
field's anchors on these files are measured against (`../shared/data/README.md`).

The paper's architecture (learned positions, pre-norm causal blocks whose feed-forward
layer is as wide as the model, ReLU, a shared input and output item table) with the
settings of the S3-Rec repository's SASRec, which published the LastFM and Toys
anchors: 64 dimensions, 2 blocks, 2 heads, dropout 0.5, 50 items of history, a binary
cross-entropy on the next item against one negative at every position (drawn
uniformly from the items outside the sequence), Adam at 0.001, 256 sequences a
batch. Early stopping on validation NDCG@10 with a patience of 30 epochs instead of
the repository's 10: LastFM's validation curve is noisy enough that with 10 a run
stopped at epoch 27 (best 17) where the same seed with 30 peaked at epoch 120.

Plain PyTorch in one process: a reference, not a part of the system."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from flm_dist.metrics import ranking_rows


@dataclass(frozen=True)
class SASRecConfig:
    dim: int = 64
    max_len: int = 50
    layers: int = 2
    heads: int = 2
    dropout: float = 0.5
    lr: float = 1e-3
    batch: int = 256
    epochs: int = 300
    patience: int = 30


class SASRec(nn.Module):
    """Item embeddings (row 0: padding) + learned positions -> causal pre-norm
    Transformer blocks; the state at the last position scores every item by a dot
    product with its embedding (shared input and output table)."""

    def __init__(self, n_items: int, cfg: SASRecConfig):
        super().__init__()
        self.cfg = cfg
        self.item = nn.Embedding(n_items + 1, cfg.dim, padding_idx=0)
        self.pos = nn.Embedding(cfg.max_len, cfg.dim)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(cfg.dim, cfg.heads, cfg.dim, cfg.dropout, batch_first=True, norm_first=True) for _ in range(cfg.layers)
        )
        self.norm = nn.LayerNorm(cfg.dim)
        self.register_buffer("causal", torch.triu(torch.ones(cfg.max_len, cfg.max_len, dtype=torch.bool), 1), persistent=False)
        nn.init.normal_(self.item.weight, std=0.02)
        nn.init.normal_(self.pos.weight, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, max_len] item indices, left-padded with 0 -> states [B, max_len, dim]."""
        keep = (x > 0).unsqueeze(-1)
        # An item's position attends to the items up to it and never to padding, as the
        # paper's key masking does; a padding position (zeroed after each block) attends
        # causally to anything, so that no row of the mask is empty.
        blocked = self.causal | ((x == 0).unsqueeze(1) & (x > 0).unsqueeze(2))  # [B, query, key]
        mask = blocked.repeat_interleave(self.cfg.heads, dim=0)
        h = self.drop(self.item(x) * math.sqrt(self.cfg.dim) + self.pos.weight) * keep
        for block in self.blocks:
            h = block(h, src_mask=mask) * keep
        return self.norm(h)


def _left_pad(seq: np.ndarray, n: int) -> np.ndarray:
    seq = seq[-n:]
    return np.concatenate([np.zeros(n - len(seq), np.int64), seq])


def _negatives(batch: list[np.ndarray], max_len: int, n_items: int, rng: np.random.Generator) -> np.ndarray:
    """[len(batch), max_len] items drawn uniformly from those outside each sequence, as
    the reference implementations draw them (a drawn positive would be pushed down)."""
    out = rng.integers(1, n_items + 1, (len(batch), max_len))
    for r, s in enumerate(batch):
        if len(np.unique(s)) >= n_items:  # a sequence of every item: nothing lies outside it
            continue
        while (hit := np.isin(out[r], s)).any():
            out[r, hit] = rng.integers(1, n_items + 1, int(hit.sum()))
    return out


def _scores(model: SASRec, histories: list[np.ndarray], lo: int, hi: int) -> torch.Tensor:
    """[hi - lo, n_items] scores of item indices 1..n_items after each history."""
    x = torch.from_numpy(np.stack([_left_pad(h, model.cfg.max_len) for h in histories[lo:hi]]))
    with torch.no_grad():
        return model(x)[:, -1] @ model.item.weight[1:].T


class _Histories:
    """Each validation user's earlier items as the (user, item) pairs `ranking_rows`
    reads from a training reference: users are row numbers, items indices."""

    def __init__(self, histories: list[np.ndarray]):
        self.pair_users = np.repeat(np.arange(len(histories)), [len(h) for h in histories])
        self.pair_items = np.concatenate([np.asarray(h, np.int64) for h in histories]) if histories else np.zeros(0, np.int64)


def _validation_ndcg(model: SASRec, histories: list[np.ndarray], targets: np.ndarray) -> float:
    """Mean NDCG@10 of `targets` (item indices) ranked over every item by the system's
    own `ranking_rows`: each user's history excluded but the target, ties against."""
    n_items = model.item.num_embeddings - 1
    model.eval()
    _, dcg = ranking_rows(scores_for(model, histories), len(histories), np.arange(len(histories)), targets, np.arange(1, n_items + 1), _Histories(histories), ks=(10,))
    model.train()
    return float(dcg[10].mean()) if len(histories) else 0.0  # one target a user: the ideal DCG is 1


def fit(sequences: list[np.ndarray], n_items: int, cfg: SASRecConfig = SASRecConfig(), seed: int = 0, log=print) -> tuple[SASRec, dict]:
    """Trains on each sequence but its last two items (item indices 1..n_items), keeps
    the epoch with the best NDCG@10 on the second-to-last. Sequences too short to
    train on still validate."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = SASRec(n_items, cfg)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    train = [s[:-2] for s in sequences]
    trainable = [i for i, s in enumerate(train) if len(s) >= 2]
    valid = [i for i, s in enumerate(sequences) if len(s) >= 2]
    v_hist, v_target = [sequences[i][:-2] for i in valid], np.array([sequences[i][-2] for i in valid], np.int64)
    best, best_epoch, best_state, curve, t0 = -1.0, -1, None, [], time.time()
    for epoch in range(cfg.epochs):
        loss_sum, order = 0.0, rng.permutation(trainable)
        for lo in range(0, len(order), cfg.batch):
            batch = [train[i] for i in order[lo : lo + cfg.batch]]
            x = torch.from_numpy(np.stack([_left_pad(s[:-1], cfg.max_len) for s in batch]))
            y = torch.from_numpy(np.stack([_left_pad(s[1:], cfg.max_len) for s in batch]))
            h = model(x)[y > 0]
            pos, neg = y[y > 0], torch.from_numpy(_negatives(batch, cfg.max_len, n_items, rng)[y.numpy() > 0])
            logits = torch.stack([(h * model.item(pos)).sum(-1), (h * model.item(neg)).sum(-1)], 1)
            loss = F.binary_cross_entropy_with_logits(logits, torch.tensor([1.0, 0.0]).expand_as(logits))
            opt.zero_grad()
            loss.backward()
            opt.step()
            loss_sum += float(loss.detach())
        ndcg = _validation_ndcg(model, v_hist, v_target)
        curve.append({"epoch": epoch, "loss": loss_sum, "valid_ndcg@10": ndcg})
        if ndcg > best:
            best, best_epoch, best_state = ndcg, epoch, {k: v.clone() for k, v in model.state_dict().items()}
        elif epoch - best_epoch >= cfg.patience:
            break
    model.load_state_dict(best_state)
    model.eval()
    log(f"SASRec: best epoch {best_epoch} of {len(curve)} (validation NDCG@10 {best:.4f}), {time.time() - t0:.0f} s")
    return model, {"best_epoch": best_epoch, "epochs": len(curve), "valid_ndcg@10": best, "seconds": round(time.time() - t0, 1), "curve": curve}


def scores_for(model: SASRec, histories: list[np.ndarray]):
    """scores_for(lo, hi) for `flm_dist.metrics.ranking_rows`: [hi - lo, n_items] over
    item indices 1..n_items (catalog positions 0..n_items-1)."""
    return lambda lo, hi: _scores(model, histories, lo, hi).numpy()
