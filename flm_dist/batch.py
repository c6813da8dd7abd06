"""The one typed object at the data/model boundary."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

__all__ = ["Batch"]


@dataclass
class Batch:
    """Hashed rows for one step. `features[name]` is int64 [B] (categorical), int64
    [B, L] with -1 padding (multi) or float32 [B] (numeric). `history`: int64 [B, H]
    item rows of the user's previous events, -1 padded on the left (the last column is
    the most recent), for models with `model.history_len`."""

    user: torch.Tensor
    item: torch.Tensor
    features: dict[str, torch.Tensor] = field(default_factory=dict)
    label: torch.Tensor | None = None
    rating: torch.Tensor | None = None
    history: torch.Tensor | None = None
    # sampled negative items (retrieval, pretraining): item rows [K] and their item-side features
    negatives: torch.Tensor | None = None
    negative_features: dict[str, torch.Tensor] = field(default_factory=dict)
    # item-side feature values of the history's items [B, H(, L)] (models with a history
    # and item features: the next-item targets need them)
    history_features: dict[str, torch.Tensor] = field(default_factory=dict)
    pos: torch.Tensor | None = None  # row positions (unit << 32 | row), for exact-once resume
    user_key: torch.Tensor | None = None  # 64-bit identity keys (evaluation only), host-side
    item_key: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.user.shape[0])

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        def mv(t):
            return None if t is None else t.to(device, non_blocking=non_blocking)

        return Batch(
            user=mv(self.user),
            item=mv(self.item),
            features={k: mv(v) for k, v in self.features.items()},
            label=mv(self.label),
            rating=mv(self.rating),
            history=mv(self.history),
            negatives=mv(self.negatives),
            negative_features={k: mv(v) for k, v in self.negative_features.items()},
            history_features={k: mv(v) for k, v in self.history_features.items()},
            # positions and keys stay on the host: only bookkeeping reads them
            pos=self.pos,
            user_key=self.user_key,
            item_key=self.item_key,
        )

    def pin_memory(self) -> Batch:
        def pin(t):
            return None if t is None else t.pin_memory()

        return Batch(
            user=pin(self.user),
            item=pin(self.item),
            features={k: pin(v) for k, v in self.features.items()},
            label=pin(self.label),
            rating=pin(self.rating),
            history=pin(self.history),
            pos=self.pos,
            user_key=self.user_key,
            item_key=self.item_key,
        )
