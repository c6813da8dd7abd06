"""FLM, the Feature Learning Model: plain PyTorch, nothing distributed.

    fields (user, item, features) --embedding tables--> x_user, x_item   [B, fields, d]
    (history: the user's previous items --item table--> causal Transformer --> one user field)
    corrupt(x) --encoder MLP--> z (latent)  --decoder MLP--> x_hat ≈ x  (denoising)
    fuse(z_user, z_item) = [z_u, z_i, z_u * z_i] --head MLP--> task output

Embedding tables are ordinary `nn.Embedding`s in `self.tables`, called as
`table(rows) -> vectors`; `sharding.parallelize` swaps them for sharded modules with
the same call signature from outside.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from flm_dist.batch import Batch
from flm_dist.config import FeatureConfig, ModelConfig

__all__ = ["FLM", "FLMOutput", "HistoryEncoder", "init_rows_", "table_init_seed", "table_sizes"]

_INIT_CHUNK = 1 << 16


def table_init_seed(seed: int, table: str) -> int:
    return (seed * 1_000_003 + sum(ord(c) * 31**i for i, c in enumerate(table))) % (1 << 62)


@torch.no_grad()
def init_rows_(weight: torch.Tensor, row_offset: int, seed: int, std: float = 0.05) -> None:
    """Initialise rows [row_offset, row_offset + len(weight)) of a table as N(0, std²),
    deterministically per block of 65,536 rows: a shard of any size gets exactly the
    rows the whole table would have, without materialising the whole table."""
    n, d = weight.shape
    if n == 0:
        return
    first, last = row_offset // _INIT_CHUNK, (row_offset + n - 1) // _INIT_CHUNK
    for c in range(first, last + 1):
        g = torch.Generator().manual_seed((seed * 7919 + c) % (1 << 63))
        block = torch.randn(_INIT_CHUNK, d, generator=g) * std
        lo = max(row_offset, c * _INIT_CHUNK)
        hi = min(row_offset + n, (c + 1) * _INIT_CHUNK)
        weight[lo - row_offset : hi - row_offset].copy_(block[lo - c * _INIT_CHUNK : hi - c * _INIT_CHUNK])


def table_sizes(cfg: ModelConfig, features: list[FeatureConfig] | tuple[FeatureConfig, ...]) -> dict[str, int]:
    """Rows of every embedding table (hash-space sizes)."""
    sizes = {"user": cfg.user_rows, "item": cfg.item_rows}
    for f in features:
        if f.kind != "numeric":
            sizes[f.name] = f.rows or cfg.feature_rows
    return sizes


def _mlp(sizes: list[int], last_act: bool = False) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2 or last_act:
            layers.append(nn.GELU())
    return nn.Sequential(*layers)


class _Block(nn.Module):
    """A pre-LayerNorm Transformer block; attention through
    `scaled_dot_product_attention`, so GPUs get the fused (flash) kernels. Dropout on
    the residual branches (not on the attention weights: on CPU, a mask per head and
    position pair cost a sixth of the step)."""

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.ff = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        """`x` [B, n, d] -> [B, n, d], or with `last_only` the last position alone
        [B, 1, d]: it still attends over every position's keys and values, but its
        query, projection and feed-forward run on one position instead of n (the same
        values; a model read at its most recent position needs no more from its last
        block)."""
        b, n, d = x.shape
        h, dh = self.ln1(x), d // self.heads
        if last_only:
            q = F.linear(h[:, -1:], self.qkv.weight[:d], self.qkv.bias[:d]).view(b, 1, self.heads, dh).transpose(1, 2)
            kv = F.linear(h, self.qkv.weight[d:], self.qkv.bias[d:]).view(b, n, 2, self.heads, dh).permute(2, 0, 3, 1, 4)
            k, v = kv[0], kv[1]
            x, mask = x[:, -1:], mask[:, -1:]
        else:
            qkv = self.qkv(h).view(b, n, 3, self.heads, dh).permute(2, 0, 3, 1, 4)
            q, k, v = qkv[0], qkv[1], qkv[2]
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.unsqueeze(1))
        x = x + self.drop(self.proj(a.transpose(1, 2).reshape(b, x.shape[1], d)))
        return x + self.drop(self.ff(self.ln2(x)))


class HistoryEncoder(nn.Module):
    """The user's previous items -> one vector: a causal Transformer (SASRec's encoder)
    over their embeddings plus learned positions (slot j of the left-padded window; the
    last slot is the most recent item), read at the most recent position. An empty slot
    is a learned vector and attends only to itself, so a user without history gets a
    learned "no history" state, never NaN."""

    def __init__(self, dim: int, length: int, layers: int, heads: int, dropout: float):
        super().__init__()
        self.pos = nn.Parameter(torch.randn(length, dim) * 0.02)
        self.empty = nn.Parameter(torch.zeros(dim))
        self.blocks = nn.ModuleList([_Block(dim, heads, dropout) for _ in range(layers)])
        self.norm = nn.LayerNorm(dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, vectors: torch.Tensor, index: torch.Tensor, all_positions: bool = False) -> torch.Tensor:
        """`vectors` [U, d]: the embeddings of the distinct items of the batch's history;
        `index` [B, L]: each slot's row in `vectors`, -1 for an empty slot. -> the state
        at the most recent position [B, d], or with `all_positions` the state at every
        position [B, L, d] (position p has seen the history up to p, causally).

        Most histories are much shorter than L: rows are grouped by length into buckets
        of power-of-two widths and each bucket runs on its last `width` slots only (an
        empty slot contributes nothing to the others), so the cost follows the real
        lengths, not L. Slots gather from the distinct vectors, so backward scatters
        into [U, d], never into [B, L, d] per bucket."""
        b, n = index.shape
        if b == 0:
            # an empty batch still runs the encoder on the looked-up vectors: every parameter
            # and every table lookup takes part in backward, whose collectives (DDP, the
            # replicated tables' gradient gather) every rank must call alike
            states = self._encode(vectors[index.clamp_min(0)], index >= 0, last_only=not all_positions)
            return states if all_positions else states[:, -1]
        valid = index >= 0
        lengths = valid.sum(1)
        parts, order = [], []
        width, low = 1, -1
        while low < n:
            high = min(width, n)
            rows = torch.nonzero((lengths > low) & (lengths <= high)).flatten()
            if len(rows):
                idx = index[rows, n - high :]
                states = self._encode(vectors[idx.clamp_min(0)], idx >= 0, last_only=not all_positions)
                if all_positions:
                    states = torch.cat([states.new_zeros(len(rows), n - high, states.shape[2]), states], dim=1)
                else:
                    states = states[:, -1]
                parts.append(states)
                order.append(rows)
            low, width = high, width * 2
        inverse = torch.empty(b, dtype=torch.long, device=index.device)
        inverse[torch.cat(order)] = torch.arange(b, device=index.device)
        return torch.cat(parts)[inverse]

    def last_state(self, items: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """The state at the most recent position, at full width (static shapes: the
        exported graphs)."""
        return self._encode(items, valid, last_only=True)[:, -1]

    def _encode(self, items: torch.Tensor, valid: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        """The states [B, n, d], or with `last_only` the most recent one [B, 1, d]."""
        n = items.shape[1]
        x = self.drop(torch.where(valid.unsqueeze(-1), items, self.empty) + self.pos[-n:])
        causal = torch.ones(n, n, dtype=torch.bool, device=items.device).tril()
        eye = torch.eye(n, dtype=torch.bool, device=items.device)
        mask = causal & (valid.unsqueeze(1) | eye)  # [B, query, key]
        for i, block in enumerate(self.blocks):
            x = block(x, mask, last_only=last_only and i == len(self.blocks) - 1)
        return self.norm(x)


@dataclass
class FLMOutput:
    z_user: torch.Tensor  # [B, latent] from the clean (or corrupted, in `corrupt` mode) view
    z_item: torch.Tensor
    score: torch.Tensor | None = None  # [B] head output (logit for ctr, rating for rating)
    x_user: torch.Tensor | None = None  # clean field embeddings [B, F_u, d]
    x_item: torch.Tensor | None = None
    recon_user: torch.Tensor | None = None  # decoder outputs [B, F_u, d]
    recon_item: torch.Tensor | None = None
    z_negative: torch.Tensor | None = None  # [K, latent] item tower of sampled negative items
    # [B, latent] the batch's items in the interaction loss's view, its in-batch candidates
    z_candidate: torch.Tensor | None = None
    # next-item prediction at every position of the history (sequence models)
    z_next_user: torch.Tensor | None = None  # [P, latent] user tower at each position
    z_next_item: torch.Tensor | None = None  # [P, latent] item tower of the item that came next
    next_rows: torch.Tensor | None = None  # [P] that item's row

    def float(self) -> FLMOutput:
        """The same outputs in fp32 (losses are computed in fp32 under bf16 autocast)."""
        return FLMOutput(**{k: (v.float() if v is not None and v.is_floating_point() else v) for k, v in self.__dict__.items()})


class FLM(nn.Module):
    def __init__(self, cfg: ModelConfig, features: list[FeatureConfig] | tuple[FeatureConfig, ...], rating_center: float = 0.0, init_seed: int = 0, table_device: str | None = None):
        super().__init__()
        self.cfg = cfg
        self.features = tuple(features)
        d = cfg.embedding_dim
        # sparse=True: a step's gradient covers only the rows it touched.
        # Numeric features enter as a learned direction scaled by the value.
        self.numeric = nn.ParameterDict(
            {f.name: nn.Parameter(torch.randn(d) * 0.05) for f in features if f.kind == "numeric"}
        )
        self.user_fields = (["user"] if cfg.user_id else []) + [f.name for f in features if f.side == "user"] + (["history"] if cfg.history_len else [])
        self.item_fields = ["item"] + [f.name for f in features if f.side == "item"]
        nu, ni = len(self.user_fields) * d, len(self.item_fields) * d
        self.user_encoder = _mlp([nu, *cfg.hidden, cfg.latent_dim])
        self.item_encoder = _mlp([ni, *cfg.hidden, cfg.latent_dim])
        self.user_decoder = _mlp([cfg.latent_dim, *reversed(cfg.hidden), nu])
        self.item_decoder = _mlp([cfg.latent_dim, *reversed(cfg.hidden), ni])
        self.head = _mlp([3 * cfg.latent_dim, *cfg.head_hidden, 1])
        if cfg.history_len:  # created after the dense layers: with it off, they draw the same init
            self.history = HistoryEncoder(d, cfg.history_len, cfg.history_layers, cfg.history_heads, cfg.history_dropout)
        # The head predicts around this value (the middle of the rating range for `rating`).
        self.register_buffer("rating_center", torch.tensor(float(rating_center)))
        # Tables last, so the dense layers draw the same random init whether or not the
        # tables are materialised here. table_device="meta": allocate nothing;
        # `sharding.parallelize` materialises the rows each worker owns.
        self.tables = nn.ModuleDict(
            {
                # _weight: skip nn.Embedding's own init, init_rows_ below sets every row
                name: nn.Embedding(rows, d, sparse=True, _weight=torch.empty(rows, d, device=table_device))
                for name, rows in table_sizes(cfg, features).items()
                if name != "user" or cfg.user_id
            }
        )
        for name, t in self.tables.items():
            if t.weight.device.type != "meta":
                init_rows_(t.weight, 0, table_init_seed(init_seed, name))

    # -- pieces -------------------------------------------------------------------

    def _field(self, name: str, batch: Batch, states: torch.Tensor | None = None) -> torch.Tensor:
        if name == "user":
            return self.tables["user"](batch.user)
        if name == "item":
            return self.tables["item"](batch.item)
        if name == "history":
            if states is not None:
                return states[:, -1]
            return self.history(*self._history_rows(batch))
        x = batch.features[name]
        if name in self.numeric:
            return x.unsqueeze(-1).float() * self.numeric[name]
        if x.dim() == 2:  # multi-valued: mean over the non-padding values
            valid = (x >= 0).unsqueeze(-1).float()
            v = self.tables[name](x.clamp_min(0)) * valid
            return v.sum(1) / valid.sum(1).clamp_min(1.0)
        return self.tables[name](x)

    def embed(self, batch: Batch, states: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        xu = torch.stack([self._field(n, batch, states) for n in self.user_fields], dim=1)
        xi = torch.stack([self._field(n, batch) for n in self.item_fields], dim=1)
        return xu, xi

    def user_vector(self, batch: Batch) -> torch.Tensor:
        """The user tower alone (clean view): z_user [B, latent]."""
        return self.user_encoder(torch.stack([self._field(n, batch) for n in self.user_fields], dim=1).flatten(1))

    def item_vector(self, batch: Batch) -> torch.Tensor:
        """The item tower alone (clean view): z_item [B, latent]."""
        return self.item_encoder(torch.stack([self._field(n, batch) for n in self.item_fields], dim=1).flatten(1))

    def corrupt(self, x: torch.Tensor) -> torch.Tensor:
        """Mask whole fields with probability `corruption` and add Gaussian noise."""
        keep = (torch.rand(x.shape[:2], device=x.device) >= self.cfg.corruption).unsqueeze(-1)
        return x * keep + torch.randn_like(x) * self.cfg.noise_std

    def encode(self, xu: torch.Tensor, xi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.user_encoder(xu.flatten(1)), self.item_encoder(xi.flatten(1))

    def fuse(self, zu: torch.Tensor, zi: torch.Tensor) -> torch.Tensor:
        # in fp32: under bf16 autocast a 0-dim fp32 center does not promote the head's
        # output, and ratings near 4 came in steps of 1/32
        return self.head(torch.cat([zu, zi, zu * zi], dim=1)).squeeze(-1).float() + self.rating_center

    def similarity(self, zu: torch.Tensor, zi: torch.Tensor) -> torch.Tensor:
        return (F.normalize(zu, dim=-1) * F.normalize(zi, dim=-1)).sum(-1)

    # -- whole passes ---------------------------------------------------------------

    def forward(self, batch: Batch, corrupt: bool = False, reconstruct: bool = False, score: bool = True, next_item: bool = False) -> FLMOutput:
        """`corrupt`: encode a corrupted view (pretraining); `reconstruct`: also decode it
        back and return the clean embeddings as targets; `score`: run the task head;
        `next_item` (models with a history): the user tower at every position of the
        history and the item tower of the item that followed it."""
        states = None
        if next_item and self.cfg.history_len:
            states = self.history(*self._history_rows(batch), all_positions=True)
        xu, xi = self.embed(batch, states)
        if corrupt or reconstruct:
            zu, zi = self.encode(self.corrupt(xu), self.corrupt(xi))
        else:
            zu, zi = self.encode(xu, xi)
        out = FLMOutput(z_user=zu, z_item=zi)
        if reconstruct:
            b = xu.shape[0]
            out.x_user, out.x_item = xu, xi
            out.recon_user = self.user_decoder(zu).view(b, len(self.user_fields), self.cfg.embedding_dim)
            out.recon_item = self.item_decoder(zi).view(b, len(self.item_fields), self.cfg.embedding_dim)
            if not corrupt:  # score on the clean view, reconstruct from the corrupted one
                zu, zi = self.encode(xu, xi)
                out.z_user, out.z_item = zu, zi
        # The interaction loss compares a user with the true item and its negatives in one
        # view: the corrupted one in pretraining, clean in next-item prediction (which
        # reads the history's states) and in fine-tuning. A negative in another view than
        # the true item is told apart by its noise alone.
        loss_view_corrupt = corrupt and states is None
        out.z_candidate = out.z_item
        if states is not None:
            self._next_item(batch, states, out)
            if corrupt:
                out.z_candidate = self.item_encoder(xi.flatten(1))
        if batch.negatives is not None:  # the item tower on sampled negatives
            neg = Batch(user=batch.negatives, item=batch.negatives, features=batch.negative_features)
            xn = torch.stack([self._field(n, neg) for n in self.item_fields], dim=1)
            out.z_negative = self.item_encoder((self.corrupt(xn) if loss_view_corrupt else xn).flatten(1))
        if score:
            out.score = self.fuse(zu, zi)
        return out

    def _history_rows(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(embeddings of the distinct history rows, each slot's index among them): one
        table lookup per step, whatever the histories (sharded lookups are collectives)."""
        rows, index = torch.unique(batch.history.clamp_min(0), return_inverse=True)
        return self.tables["item"](rows), torch.where(batch.history >= 0, index, -1)

    def _next_item(self, batch: Batch, states: torch.Tensor, out: FLMOutput) -> None:
        """Every position p of the history predicts the item at p + 1; the most recent
        one (also for an empty history) predicts the example's item. The user tower
        runs on each such position (the example's other user fields, the history state
        at p), the item tower on each next item (its features: the example's, or those
        the batch carries for its history, `history_features`), clean views."""
        hist = batch.history
        valid = hist >= 0
        last = torch.zeros_like(valid)
        last[:, -1] = True
        has_next = torch.cat([valid[:, 1:], torch.ones_like(valid[:, :1])], dim=1)
        b, p = torch.nonzero((valid & has_next) | last, as_tuple=True)
        fields = [self._field(n, batch)[b] for n in self.user_fields if n != "history"]
        out.z_next_user = self.user_encoder(torch.stack([*fields, states[b, p]], dim=1).flatten(1))
        final = p == hist.shape[1] - 1
        nxt = torch.where(final, batch.item[b], hist[b, (p + 1).clamp_max(hist.shape[1] - 1)])
        feats = {}
        for f in self.features:
            if f.side == "item":
                now = batch.features[f.name][b]
                later = batch.history_features[f.name][b, (p + 1).clamp_max(hist.shape[1] - 1)]
                feats[f.name] = torch.where(final.view(-1, *[1] * (now.dim() - 1)), now, later)
        out.next_rows = nxt
        out.z_next_item = self.item_vector(Batch(user=nxt, item=nxt, features=feats))

    def backbone_keys(self) -> list[str]:
        """State-dict keys a fine-tune takes from a pretraining checkpoint (all but the head)."""
        return [k for k in self.state_dict() if not k.startswith("head.") and k != "rating_center"]
