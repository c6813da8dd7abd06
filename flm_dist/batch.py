"""The one typed object at the data/model boundary."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

__all__ = ["Batch"]


@dataclass
class Batch:
    """Hashed rows for one step. `features[name]` is int64 [B] (categorical), int64
    [B, L] with -1 padding (multi) or float32 [B] (numeric)."""

    user: torch.Tensor
    item: torch.Tensor
    features: dict[str, torch.Tensor] = field(default_factory=dict)
    label: torch.Tensor | None = None
    rating: torch.Tensor | None = None
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
            pos=self.pos,
            user_key=self.user_key,
            item_key=self.item_key,
        )
