"""Export a committed checkpoint (any world size) to a portable serving artifact:

    scorer.pt        TorchScript: forward(user_id, item_id, features=None) -> scores,
                     taking RAW int64 IDs and hashing them inside the graph
    tables/<t>.safetensors   one unsharded embedding table per file
    manifest.json    task, inputs/outputs, hash spec, features, lineage, checksums

Loading it needs torch only (`torch.jit.load`). String IDs are passed as
`prehash(s)` (see manifest "inputs"), an int64 the graph maps to the same row as
training mapped the string.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time

import torch
import torch.nn.functional as F
from torch import nn

from flm_dist import __version__
from flm_dist import checkpoint as ckpt
from flm_dist.config import JobConfig, from_dict
from flm_dist.data.hashing import HashSpec, prehash_str, to_signed, torch_hash_int64
from flm_dist.model import FLM
from flm_dist.storage import Store

__all__ = ["Scorer", "export", "load_model"]


def load_model(store: Store, checkpoint: str) -> tuple[FLM, dict, ckpt.CheckpointRef]:
    """The unsharded model of a checkpoint, in this process (no process group): DCP
    gathers the row blocks of every shard, whatever the world size that saved them."""
    ref = ckpt.resolve(store, checkpoint)
    manifest = ckpt.load_manifest(store, ref)
    job = from_dict(JobConfig, manifest["config"])
    lo, hi = job.data.rating_range
    center = (lo + hi) / 2 if manifest["task"] == "rating" else 0.0
    model = FLM(job.model, job.data.features, rating_center=center)
    state = {"model": model.state_dict()}
    ckpt.load_state(store, ref, state)
    model.eval()
    return model, manifest, ref


class _Field(nn.Module):
    """One input field: raw int64 values -> hash -> embedding row (or a numeric value
    times a learned direction). A missing input scores as the training-time null."""

    def __init__(self, name: str, weight: torch.Tensor, numeric: bool, seed: int, rows: int, null_value: int, primary: bool = False):
        super().__init__()
        self.name = name
        self.primary = primary  # the user_id / item_id field of its side
        self.numeric = numeric
        self.seed = to_signed(seed)
        self.rows = rows
        self.null_value = null_value
        self.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)

    def forward(self, ids: torch.Tensor, features: dict[str, torch.Tensor] | None) -> torch.Tensor:
        n = ids.shape[0]
        values: torch.Tensor | None = None
        if self.primary:
            values = ids
        elif features is not None and self.name in features:
            values = features[self.name]
        if self.numeric:
            v = values if values is not None else torch.zeros([n])
            return v.to(self.weight.dtype).unsqueeze(-1) * self.weight
        ids = values if values is not None else torch.full([n], self.null_value, dtype=torch.long)
        return F.embedding(torch_hash_int64(ids.long(), self.seed, self.rows), self.weight)


class Scorer(nn.Module):
    """The FLM scoring path with hashing inside; TorchScript-able."""

    def __init__(self, model: FLM, spec: HashSpec, task: str, id_kinds: dict[str, str]):
        super().__init__()

        def field(name: str) -> _Field:
            if name in model.numeric:
                return _Field(name, model.numeric[name], True, 0, 1, 0)
            table = spec.tables[name]
            col = {"user": "user_id", "item": "item_id"}.get(name, name)
            null = prehash_str("") if id_kinds.get(col) == "string" else 0
            return _Field(name, model.tables[name].weight, False, table["seed"], table["rows"], null, primary=name in ("user", "item"))

        self.user_fields = nn.ModuleList([field(n) for n in model.user_fields])
        self.item_fields = nn.ModuleList([field(n) for n in model.item_fields])
        self.user_encoder = model.user_encoder
        self.item_encoder = model.item_encoder
        self.head = model.head
        self.rating_center = float(model.rating_center)
        self.task = {"ctr": 0, "rating": 1}.get(task, 2)

    def forward(self, user_id: torch.Tensor, item_id: torch.Tensor, features: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        # TorchScript unrolls loops over a ModuleList attribute (not over an argument).
        xu: list[torch.Tensor] = []
        for f in self.user_fields:
            xu.append(f(user_id, features))
        xi: list[torch.Tensor] = []
        for f in self.item_fields:
            xi.append(f(item_id, features))
        zu = self.user_encoder(torch.cat(xu, dim=1))
        zi = self.item_encoder(torch.cat(xi, dim=1))
        if self.task == 2:
            return (F.normalize(zu, dim=-1) * F.normalize(zi, dim=-1)).sum(-1)
        s = self.head(torch.cat([zu, zi, zu * zi], dim=1)).squeeze(-1) + self.rating_center
        if self.task == 0:
            return torch.sigmoid(s)
        return s


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def export(store: Store, checkpoint: str, out: str, dtype: str = "fp32") -> dict:
    """Write the serving artifact for `checkpoint` to `out`; returns the manifest."""
    from safetensors.torch import save_file

    model, manifest, ref = load_model(store, checkpoint)
    if dtype == "fp16":
        model = model.half()
    elif dtype != "fp32":
        raise ValueError(f"--dtype must be fp32 or fp16, got {dtype!r}")
    spec = HashSpec.from_dict(manifest["hash_spec"])
    task = manifest["task"]
    id_kinds = manifest.get("data_columns", {})
    scorer = torch.jit.script(Scorer(model, spec, task, id_kinds))
    job = from_dict(JobConfig, manifest["config"])
    with tempfile.TemporaryDirectory(prefix="flm-export-") as tmp:
        scorer.save(os.path.join(tmp, "scorer.pt"))
        os.makedirs(os.path.join(tmp, "tables"))
        for name, table in model.tables.items():
            save_file({"weight": table.weight.detach().contiguous()}, os.path.join(tmp, "tables", f"{name}.safetensors"))
        files = {}
        for root, _, names in os.walk(tmp):
            for n in names:
                p = os.path.join(root, n)
                files[os.path.relpath(p, tmp)] = {"bytes": os.path.getsize(p), "sha256": _sha256(p)}
        features = [
            {"name": f.name, "side": f.side, "kind": f.kind, "id_kind": id_kinds.get(f.name, "int")}
            for f in job.data.features
        ]
        out_manifest = {
            "format": "flm-export-v1",
            "task": task,
            "dtype": dtype,
            "output": {"ctr": "click probability", "rating": "predicted rating"}.get(task, "cosine similarity of user and item vectors"),
            "inputs": {
                "user_id": "int64 tensor [N]: raw user IDs (string IDs: prehash(s))",
                "item_id": "int64 tensor [N]: raw item IDs (string IDs: prehash(s))",
                "features": "optional dict name -> tensor [N]: raw int64 values (strings: prehash(s)) "
                "for categorical fields, float for numeric; a missing field scores as null",
                "prehash(s)": "int64 bits of fnv1a64(utf8(s)) ^ 0x9e3779b97f4a7c15",
            },
            "id_kinds": id_kinds,
            "features": features,
            "hash_spec": spec.to_dict(),
            "embedding_dim": job.model.embedding_dim,
            "lineage": {
                "checkpoint": ref.uri,
                "step": manifest.get("step"),
                "run": manifest.get("run"),
                "data": manifest.get("data"),
                "parent": manifest.get("parent"),
            },
            "exported_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "flm_dist": __version__,
            "files": files,
        }
        with open(os.path.join(tmp, "manifest.json"), "w") as f:
            json.dump(out_manifest, f, indent=2, sort_keys=True)
        store.ensure_bucket(out)
        store.upload_dir(tmp, out)
    return out_manifest


