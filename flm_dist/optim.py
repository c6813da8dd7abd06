"""Optimisers: row-wise Adagrad / SGD for embedding rows, AdamW for dense layers.

Embedding gradients arrive sparse (only the rows a step touched, as a COO tensor) for
sharded tables and for the single-process model, or dense for small replicated tables
under DDP. Row-wise Adagrad keeps ONE accumulator per row (the mean of the squared
gradient over the row), so its state is 1/dim of the table and is sharded like the
rows; rows a step did not touch are left exactly as they were.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.optim import Optimizer

__all__ = ["RowWiseAdagrad", "build_optimizers", "optimizer_state", "load_optimizer_state"]


class RowWiseAdagrad(Optimizer):
    """Per row r touched in a step, with g_r the row's gradient (duplicates summed):
        state_r += mean(g_r ** 2);  w_r -= lr * g_r / (sqrt(state_r) + eps)
    With `sgd=True` it is plain SGD: w_r -= lr * g_r."""

    def __init__(self, params, lr: float = 0.05, eps: float = 1e-8, sgd: bool = False):
        super().__init__(params, {"lr": lr, "eps": eps, "sgd": sgd})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            lr, eps, sgd = group["lr"], group["eps"], group["sgd"]
            for p in group["params"]:
                g = p.grad
                if g is None:
                    continue
                if g.is_sparse:
                    g = g.coalesce()
                    rows, vals = g.indices()[0], g.values()
                else:
                    rows = None
                    vals = g
                if sgd:
                    if rows is None:
                        p.add_(vals, alpha=-lr)
                    else:
                        p.index_add_(0, rows, vals, alpha=-lr)
                    continue
                state = self.state[p]
                if "sum" not in state:
                    state["sum"] = torch.zeros(p.shape[0], dtype=torch.float32, device=p.device)
                acc = state["sum"]
                sq = vals.float().pow(2).mean(1)
                if rows is None:
                    acc.add_(sq)
                    p.addcdiv_(vals, (acc.sqrt() + eps).unsqueeze(1), value=-lr)
                else:
                    acc.index_add_(0, rows, sq)
                    upd = vals / (acc[rows].sqrt() + eps).unsqueeze(1)
                    p.index_add_(0, rows, upd.to(p.dtype), alpha=-lr)
        return None


def build_optimizers(model: nn.Module, lr: float, weight_decay: float, sparse_lr: float, sparse_kind: str) -> tuple[Optimizer | None, Optimizer | None]:
    """(dense AdamW, sparse row-wise optimiser) over the trainable parameters of `model`;
    embedding tables are the parameters under `tables.`."""
    dense, sparse = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (sparse if name.split(".")[0] == "tables" or ".tables." in name else dense).append(p)
    dense_opt = torch.optim.AdamW(dense, lr=lr, weight_decay=weight_decay) if dense else None
    sparse_opt = RowWiseAdagrad(sparse, lr=sparse_lr, sgd=sparse_kind == "sgd") if sparse else None
    return dense_opt, sparse_opt


def optimizer_state(model: nn.Module, opt: Optimizer | None, wrap=None) -> dict:
    """Optimiser state keyed by parameter name (not position), so it survives a change
    of which parameters are trainable and can be resharded by DCP. `wrap(name, tensor)`
    may turn a local shard into a global (DTensor) view."""
    if opt is None:
        return {}
    names = {id(p): n for n, p in model.named_parameters()}
    out: dict = {}
    for p, st in opt.state.items():
        name = names[id(p)]
        out[name] = {k: (wrap(name, v) if wrap and torch.is_tensor(v) and v.dim() > 0 else v) for k, v in st.items()}
    return out


def load_optimizer_state(model: nn.Module, opt: Optimizer | None, state: dict) -> None:
    if opt is None:
        return
    params = dict(model.named_parameters())
    for name, st in state.items():
        p = params.get(name)
        if p is None or not any(p is q for g in opt.param_groups for q in g["params"]):
            continue
        opt.state[p] = {k: (v.to(p.device) if torch.is_tensor(v) else v) for k, v in st.items()}
