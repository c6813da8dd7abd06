"""How the model is distributed: row-wise embedding sharding with all-to-all lookups,
replicated tables, and DDP for everything else. The model (model.py) knows nothing of
it. The other collectives are the train loop's control calls (step agreement, resume
decision, validation and evaluation sums) and the checkpoint's DCP save/load; every
rank makes each of them in the same order.

`parallelize(model, plan, ...)` takes a plain `FLM` and, in place:
- replaces each `row_wise` table with a `RowWiseEmbedding` holding one contiguous
  block of rows (the `torch.chunk` layout: ceil(rows / world) rows per rank);
- gives each `replicated` table a whole copy per rank, kept identical by all-gathering
  only the rows a step touched (`ReplicatedEmbedding`: DDP would all-reduce and update
  the whole table every step, ~100x slower for a 4M-row table in bench/sharding.py);
- wraps the dense layers in DDP, telling DDP to ignore every table.

Lookup, per table and step (every rank makes the same calls in the same order):
  1. dedup the batch's rows; owner = row // block
  2. all_to_all the per-owner counts, then the row ids (the counts must reach the host:
     all_to_all_single needs split sizes; this is the one sync per table per step)
  3. owners gather their rows; all_to_all the vectors back; scatter to the batch
  backward: all_to_all the row gradients back to the owners, who receive a sparse
  gradient (rows touched only) for their block.
Gradients of sharded rows are divided by the world size, matching DDP's averaging of
dense gradients, so for a loss that is a sum over rows (ctr, rating, reconstruction)
the sharded model takes exactly the steps of a single process training on the union
of the ranks' batches. The contrastive loss of pretraining and retrieval is not such a
sum: each rank contrasts its rows with its own batch's items, and corrects them with
its own item counts between saves (which make the counts global, `objectives`), as
per-device in-batch negatives do elsewhere.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from flm_dist.model import init_rows_, table_init_seed

__all__ = [
    "ReplicatedEmbedding",
    "RowWiseEmbedding",
    "TablePlan",
    "describe_plan",
    "global_view",
    "parallelize",
    "plan_tables",
]


@dataclass(frozen=True)
class TablePlan:
    kind: Literal["row_wise", "replicated"]
    rows: int
    dim: int
    world: int

    @property
    def block(self) -> int:
        """Rows per rank (the last ranks may hold fewer, possibly none)."""
        return math.ceil(self.rows / self.world) if self.kind == "row_wise" else self.rows

    def local_range(self, rank: int) -> tuple[int, int]:
        if self.kind == "replicated":
            return 0, self.rows
        lo = min(rank * self.block, self.rows)
        return lo, min(lo + self.block, self.rows)

    def bytes_per_worker(self, rank: int = 0) -> int:
        lo, hi = self.local_range(rank)
        # weights + one row-wise Adagrad accumulator per row
        return (hi - lo) * (self.dim * 4 + 4)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "rows": self.rows, "dim": self.dim, "world": self.world}


def plan_tables(sizes: dict[str, int], dim: int, world: int, threshold_bytes: int, overrides: dict[str, str] | None = None) -> dict[str, TablePlan]:
    """Per table: the job's choice, else row_wise when larger than `threshold_bytes`
    (and there is more than one worker), else replicated."""
    overrides = overrides or {}
    unknown = set(overrides) - set(sizes)
    if unknown:
        raise ValueError(f"scaling.plan names unknown tables {sorted(unknown)}; tables are {sorted(sizes)}")
    plan = {}
    for name, rows in sizes.items():
        kind = overrides.get(name) or ("row_wise" if rows * dim * 4 > threshold_bytes else "replicated")
        if world == 1:
            kind = "replicated"  # one process: nothing to shard
        plan[name] = TablePlan(kind=kind, rows=rows, dim=dim, world=world)
    return plan


def describe_plan(plan: dict[str, TablePlan]) -> str:
    lines = ["sharding plan (per worker):"]
    total = 0
    for name, p in plan.items():
        b = p.bytes_per_worker(0)
        total += b
        lines.append(f"  {name:<16} {p.kind:<10} rows={p.rows:>12,} dim={p.dim:<4} {b / 2**20:10.1f} MiB/worker")
    lines.append(f"  {'total':<16} {'':<10} {'':>17} {'':<8} {total / 2**20:10.1f} MiB/worker")
    return "\n".join(lines)


class _Exchange(torch.autograd.Function):
    """Owners' rows -> requesters (forward); requesters' gradients -> owners (backward)."""

    @staticmethod
    def forward(ctx, weight, local_rows, send_counts, recv_counts, group, world):
        vecs = weight.index_select(0, local_rows)
        out = vecs.new_empty((sum(send_counts), weight.shape[1]))
        dist.all_to_all_single(out, vecs, output_split_sizes=send_counts, input_split_sizes=recv_counts, group=group)
        ctx.save_for_backward(local_rows)
        ctx.meta = (send_counts, recv_counts, group, world, weight.shape)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        (local_rows,) = ctx.saved_tensors
        send_counts, recv_counts, group, world, shape = ctx.meta
        grad_rows = grad_out.new_empty((len(local_rows), shape[1]))
        dist.all_to_all_single(grad_rows, grad_out.contiguous(), output_split_sizes=recv_counts, input_split_sizes=send_counts, group=group)
        grad_rows.div_(world)
        grad_w = torch.sparse_coo_tensor(local_rows.unsqueeze(0), grad_rows, shape, check_invariants=False)
        return grad_w, None, None, None, None, None


class RowWiseEmbedding(nn.Module):
    """One rank's block of a row-wise sharded table; called like `nn.Embedding`."""

    def __init__(self, plan: TablePlan, rank: int, group, mesh, device: torch.device, seed: int, std: float):
        super().__init__()
        self.plan = plan
        self.mesh = mesh  # for the DTensor (global) view used by checkpoints
        self.rank = rank
        self.group = group
        self.offset, hi = plan.local_range(rank)
        self.weight = nn.Parameter(torch.empty(hi - self.offset, plan.dim, device=device))
        init_rows_(self.weight, self.offset, seed, std)

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        p = self.plan
        flat = rows.reshape(-1)
        uniq, inverse = torch.unique(flat, sorted=True, return_inverse=True)
        owner = torch.div(uniq, p.block, rounding_mode="floor")
        send = torch.bincount(owner, minlength=p.world)
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send, group=self.group)
        send_counts, recv_counts = send.tolist(), recv.tolist()  # host sync: split sizes
        asked = uniq.new_empty(sum(recv_counts))
        dist.all_to_all_single(asked, uniq, output_split_sizes=recv_counts, input_split_sizes=send_counts, group=self.group)
        vecs = _Exchange.apply(self.weight, asked - self.offset, send_counts, recv_counts, self.group, p.world)
        return vecs[inverse].view(*rows.shape, p.dim)


class _GatherGrads(torch.autograd.Function):
    """Forward: a local lookup. Backward: every rank's row gradients are all-gathered,
    so every replica applies the same sparse update to the same rows."""

    @staticmethod
    def forward(ctx, weight, rows, group, world):
        ctx.save_for_backward(rows)
        ctx.meta = (group, world, weight.shape)
        return weight.index_select(0, rows)

    @staticmethod
    def backward(ctx, grad_out):
        (rows,) = ctx.saved_tensors
        group, world, shape = ctx.meta
        n = torch.tensor([len(rows)], device=rows.device)
        sizes = [torch.zeros_like(n) for _ in range(world)]
        dist.all_gather(sizes, n, group=group)
        sizes = [int(x) for x in sizes]  # host sync: padded all_gather needs the sizes
        m = max(sizes)
        pad_rows = torch.zeros(m, dtype=rows.dtype, device=rows.device)
        pad_grad = grad_out.new_zeros((m, shape[1]))
        pad_rows[: len(rows)] = rows
        pad_grad[: len(rows)] = grad_out
        all_rows = [torch.empty_like(pad_rows) for _ in range(world)]
        all_grad = [torch.empty_like(pad_grad) for _ in range(world)]
        dist.all_gather(all_rows, pad_rows, group=group)
        dist.all_gather(all_grad, pad_grad, group=group)
        r = torch.cat([x[:k] for x, k in zip(all_rows, sizes, strict=True)])
        g = torch.cat([x[:k] for x, k in zip(all_grad, sizes, strict=True)]).div_(world)
        return torch.sparse_coo_tensor(r.unsqueeze(0), g, shape, check_invariants=False), None, None, None


class ReplicatedEmbedding(nn.Module):
    """A whole table on every rank, kept identical by exchanging only the rows a step
    touched (DDP would all-reduce and update the whole table every step)."""

    def __init__(self, plan: TablePlan, group, device: torch.device, seed: int, std: float):
        super().__init__()
        self.plan = plan
        self.group = group
        self.weight = nn.Parameter(torch.empty(plan.rows, plan.dim, device=device))
        init_rows_(self.weight, 0, seed, std)

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        flat = rows.reshape(-1)
        uniq, inverse = torch.unique(flat, sorted=True, return_inverse=True)
        vecs = _GatherGrads.apply(self.weight, uniq, self.group, self.plan.world)
        return vecs[inverse].view(*rows.shape, self.plan.dim)


def parallelize(
    model: nn.Module,
    plan: dict[str, TablePlan],
    device: torch.device,
    seed: int,
    std: float = 0.05,
) -> nn.Module:
    """Shard and wrap `model` (an FLM whose tables may still be on the meta device).

    Returns the module to call in the train loop: DDP(model) when the process group
    has more than one rank, else `model`. Table rows are initialised deterministically
    per row (`init_rows_`), so any sharding yields the same initial table."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    sharded = world > 1 and any(tp.kind == "row_wise" for tp in plan.values())
    # The embedding exchange gets its own group so its collectives never interleave
    # with DDP's asynchronous gradient all-reduces on the default group.
    group = dist.new_group(backend=dist.get_backend()) if world > 1 else None
    mesh = None
    if sharded:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh(device.type, (world,))
    ignore = []
    for name, tp in plan.items():
        old = model.tables[name]
        if tp.kind == "row_wise" and world > 1:
            model.tables[name] = RowWiseEmbedding(tp, rank, group, mesh, device, seed=table_init_seed(seed, name), std=std)
            model.tables[name].weight.requires_grad_(old.weight.requires_grad)
            ignore.append(f"tables.{name}.weight")
        elif world > 1:
            model.tables[name] = ReplicatedEmbedding(tp, group, device, seed=table_init_seed(seed, name), std=std)
            model.tables[name].weight.requires_grad_(old.weight.requires_grad)
            ignore.append(f"tables.{name}.weight")
        else:
            emb = nn.Embedding(tp.rows, tp.dim, sparse=True, _weight=torch.empty(tp.rows, tp.dim, device=device))
            init_rows_(emb.weight, 0, table_init_seed(seed, name), std)
            emb.weight.requires_grad_(old.weight.requires_grad)
            model.tables[name] = emb
    model.to(device)
    if world == 1 or not any(p.requires_grad for p in model.parameters()):
        return model  # one process, or inference only: nothing for DDP to synchronise
    # The tables synchronise their own gradients (the exchange above): DDP must not
    # all-reduce them. This static method is DDP's documented hook for that (its
    # docstring, and TorchRec's data-parallel wrapper); it has no public spelling.
    DDP._set_params_and_buffers_to_ignore_for_model(model, ignore)
    return DDP(
        model,
        device_ids=[device] if device.type == "cuda" else None,
        forward_sync_buffers=False,  # buffers are constants, synced once at construction
        gradient_as_bucket_view=True,
    )


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, DDP) else model


def global_view(module: nn.Module, name: str, local: torch.Tensor):
    """A DTensor view (global shape, this rank's rows) of a sharded table's parameter or
    per-row state, for torch.distributed.checkpoint; plain tensors pass through."""
    table = name.split(".")[1] if name.startswith("tables.") else None
    emb = unwrap(module).tables[table] if table else None
    if not isinstance(emb, RowWiseEmbedding):
        return local
    from torch.distributed.tensor import DTensor, Shard

    p = emb.plan
    shape = (p.rows, *local.shape[1:])
    stride = torch.empty(shape, device="meta").stride()
    return DTensor.from_local(local, emb.mesh, [Shard(0)], run_check=False, shape=torch.Size(shape), stride=stride)
