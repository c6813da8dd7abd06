"""FLM, the Feature Learning Model: plain PyTorch, nothing distributed.

    fields (user, item, features) --embedding tables--> x_user, x_item   [B, fields, d]
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

__all__ = ["FLM", "FLMOutput", "init_rows_", "table_init_seed", "table_sizes"]

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


@dataclass
class FLMOutput:
    z_user: torch.Tensor  # [B, latent] from the clean (or corrupted, in `corrupt` mode) view
    z_item: torch.Tensor
    score: torch.Tensor | None = None  # [B] head output (logit for ctr, rating for rating)
    x_user: torch.Tensor | None = None  # clean field embeddings [B, F_u, d]
    x_item: torch.Tensor | None = None
    recon_user: torch.Tensor | None = None  # decoder outputs [B, F_u, d]
    recon_item: torch.Tensor | None = None

    def float(self) -> FLMOutput:
        """The same outputs in fp32 (losses are computed in fp32 under bf16 autocast)."""
        return FLMOutput(**{k: (v.float() if v is not None else None) for k, v in self.__dict__.items()})


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
        self.user_fields = ["user"] + [f.name for f in features if f.side == "user"]
        self.item_fields = ["item"] + [f.name for f in features if f.side == "item"]
        nu, ni = len(self.user_fields) * d, len(self.item_fields) * d
        self.user_encoder = _mlp([nu, *cfg.hidden, cfg.latent_dim])
        self.item_encoder = _mlp([ni, *cfg.hidden, cfg.latent_dim])
        self.user_decoder = _mlp([cfg.latent_dim, *reversed(cfg.hidden), nu])
        self.item_decoder = _mlp([cfg.latent_dim, *reversed(cfg.hidden), ni])
        self.head = _mlp([3 * cfg.latent_dim, *cfg.head_hidden, 1])
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
            }
        )
        for name, t in self.tables.items():
            if t.weight.device.type != "meta":
                init_rows_(t.weight, 0, table_init_seed(init_seed, name))

    # -- pieces -------------------------------------------------------------------

    def _field(self, name: str, batch: Batch) -> torch.Tensor:
        if name == "user":
            return self.tables["user"](batch.user)
        if name == "item":
            return self.tables["item"](batch.item)
        x = batch.features[name]
        if name in self.numeric:
            return x.unsqueeze(-1).float() * self.numeric[name]
        if x.dim() == 2:  # multi-valued: mean over the non-padding values
            valid = (x >= 0).unsqueeze(-1).float()
            v = self.tables[name](x.clamp_min(0)) * valid
            return v.sum(1) / valid.sum(1).clamp_min(1.0)
        return self.tables[name](x)

    def embed(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        xu = torch.stack([self._field(n, batch) for n in self.user_fields], dim=1)
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
        return self.head(torch.cat([zu, zi, zu * zi], dim=1)).squeeze(-1) + self.rating_center

    def similarity(self, zu: torch.Tensor, zi: torch.Tensor) -> torch.Tensor:
        return (F.normalize(zu, dim=-1) * F.normalize(zi, dim=-1)).sum(-1)

    # -- whole passes ---------------------------------------------------------------

    def forward(self, batch: Batch, corrupt: bool = False, reconstruct: bool = False, score: bool = True) -> FLMOutput:
        """`corrupt`: encode a corrupted view (pretraining); `reconstruct`: also decode it
        back and return the clean embeddings as targets; `score`: run the task head."""
        xu, xi = self.embed(batch)
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
        if score:
            out.score = self.fuse(zu, zi)
        return out

    def backbone_keys(self) -> list[str]:
        """State-dict keys a fine-tune takes from a pretraining checkpoint (all but the head)."""
        return [k for k in self.state_dict() if not k.startswith("head.") and k != "rating_center"]
