"""Issue 4 — row-wise sharded embedding tables vs replicated ones, at 2 workers.

Model: FLM with 2 tables (user, item) x ROWS rows x 64 dims, pretraining objective
(denoising + in-batch sampled softmax), batch 4096 rows per worker, the same batches
(pre-hashed, in memory, sliced per step: no ingest) and seed in every arm. Two real
processes in a gloo group (spawned like tests/dist.py, no Ray), one core each.

Arms, run interleaved inside the same two processes:
  S         flm_dist's row-wise plan: each rank holds half of each table
            (`sharding.RowWiseEmbedding`, all-to-all lookups), DDP for the rest.
  R-ddp     flm_dist's replicated plan (`scaling.plan: {user: replicated, ...}`):
            full tables on every rank (`sharding.ReplicatedEmbedding`: the touched
            rows' gradients are all-gathered; DDP keeps the dense layers only). The
            name is historical: before ReplicatedEmbedding, DDP all-reduced the whole
            tables densely and a step took seconds.
  R-sparse  a reference written here, not in flm_dist: full tables on every rank with
            sparse gradients (rows touched only), all-gathered and applied on every
            rank. The cheapest replication there is: the bar row-wise sharding must
            approach in speed (target S >= 0.8x) while halving memory.
  S-uniform, R-sparse-uniform: the same with uniformly drawn IDs (fewer repeats in a
            batch, so more rows to exchange) instead of Zipf-like ones (exponent 1.05).

Figures: rows/s (both workers' rows over the wall time of the timed steps), step time
split into forward / backward / optimiser, and the exchange inside them (all-to-all in
the lookups and their backward, DDP's all-reduce, R-sparse's gradient all-gather,
each including the wait for the other rank); per-worker memory: the plan's tensor
bytes (`TablePlan.bytes_per_worker`: weights + row-wise Adagrad state) and the
measured RSS growth of each worker over the arm (steady and peak).

    python bench/sharding.py [--quick] [--pinned] [--repeats N] [--out bench/results/sharding.json]
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import os
import sys
import time
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402 - the benchmarks' shared helpers live next to this file

from flm_dist.batch import Batch  # noqa: E402
from flm_dist.config import ModelConfig  # noqa: E402
from flm_dist.data.hashing import HashSpec  # noqa: E402
from flm_dist.model import FLM, init_rows_, table_init_seed, table_sizes  # noqa: E402
from flm_dist.objectives import PopularityEstimator, compute_loss, forward_flags, used_modules  # noqa: E402
from flm_dist.optim import build_optimizers  # noqa: E402
from flm_dist.sharding import parallelize, plan_tables, unwrap  # noqa: E402

WORLD = 2
BATCH_SIZE = 4096
DIM = 64
SEED = 0
TASK = "pretrain"
SHARD_THRESHOLD = 64 << 20  # scaling.shard_threshold_bytes's default


@dataclass(frozen=True)
class Sizes:
    rows: int  # per table
    warmup: int  # untimed steps per arm (allocations, optimiser state)
    steps: int  # timed steps per arm
    ddp_steps: int  # timed steps for R-ddp, whose steps move whole tables (first round only)
    repeats: int


FULL = Sizes(rows=4_000_000, warmup=3, steps=30, ddp_steps=2, repeats=3)
QUICK = Sizes(rows=500_000, warmup=1, steps=5, ddp_steps=1, repeats=1)
ARMS = ("S", "R-ddp", "R-sparse", "S-uniform", "R-sparse-uniform")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="small tables, few steps, one round: a smoke test")
    p.add_argument("--pinned", action="store_true", help="pinned run (each rank already uses one thread; sets OMP/Arrow too)")
    p.add_argument("--repeats", type=int, default=None, help="interleaved rounds (default: 3 full, 1 quick)")
    p.add_argument("--out", default="bench/results/sharding.json")
    return p.parse_args()


def model_config(rows: int) -> ModelConfig:
    return ModelConfig(user_rows=rows, item_rows=rows, embedding_dim=DIM, hidden=[128], latent_dim=64, head_hidden=[64])


# ------------------------------------------------------------------ data


def make_batches(rank: int, sizes: Sizes, dist_name: str, steps: int) -> list[Batch]:
    """This rank's batches: raw 64-bit IDs hashed to table rows, as ingest would deliver them."""
    rng = np.random.default_rng([SEED, rank, 0 if dist_name == "zipf" else 1])
    hs = HashSpec.build(table_sizes(model_config(sizes.rows), []), 0)
    n = steps * BATCH_SIZE
    users = common.ids_from_ranks(common.draw_ranks(rng, n, 4_000_000, dist_name), 1)
    items = common.ids_from_ranks(common.draw_ranks(rng, n, 1_000_000, dist_name), 2)
    u = torch.from_numpy(hs.hash("user", users))
    i = torch.from_numpy(hs.hash("item", items))
    return [Batch(user=u[k : k + BATCH_SIZE], item=i[k : k + BATCH_SIZE]) for k in range(0, n, BATCH_SIZE)]


# ------------------------------------------------------------------ timing hooks


class Timers:
    """Seconds spent in collectives during a step, by kind."""

    def __init__(self):
        self.t = {"all_to_all": 0.0, "ddp_allreduce": 0.0, "sparse_allgather": 0.0}

    def reset(self) -> dict:
        out, self.t = self.t, {k: 0.0 for k in self.t}
        return out


TIMERS = Timers()


def _timed_all_to_all():
    """Wrap torch.distributed.all_to_all_single (sharding.py looks it up on the module at
    call time) to add its duration, including the wait for the peer, to TIMERS."""
    orig = dist.all_to_all_single

    def timed(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return orig(*args, **kwargs)
        finally:
            TIMERS.t["all_to_all"] += time.perf_counter() - t0

    dist.all_to_all_single = timed


def _timed_allreduce_hook(state, bucket):
    """DDP's default all-reduce, timed from the bucket being ready to the reduce done.
    With several buckets in flight the durations overlap, so the sum is an upper bound."""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    t0 = time.perf_counter()

    def done(fut):
        TIMERS.t["ddp_allreduce"] += time.perf_counter() - t0
        return fut.value()

    return allreduce_hook(state, bucket).then(done)


# ------------------------------------------------------------------ the models of each arm


def build(arm: str, cfg: ModelConfig, rank: int, world: int) -> nn.Module:
    """The model of an arm, as the train loop builds it (train_loop.Worker.build)."""
    torch.manual_seed(SEED)  # dense layers start equal on every rank
    if arm.startswith("R-sparse"):
        return _replicated_sparse(cfg)
    model = FLM(cfg, [], init_seed=SEED, table_device="meta")
    used = used_modules(TASK, 1.0)
    for name, mod in model.named_children():
        mod.requires_grad_(name in used)
    overrides = {"user": "replicated", "item": "replicated"} if arm == "R-ddp" else {}
    plan = plan_tables({n: t.num_embeddings for n, t in model.tables.items()}, DIM, world, SHARD_THRESHOLD, overrides)
    model = parallelize(model, plan, torch.device("cpu"), seed=SEED)
    model.register_comm_hook(None, _timed_allreduce_hook)
    model.plan = plan  # for the memory figures
    return model


def _replicated_sparse(cfg: ModelConfig) -> nn.Module:
    """Full tables on every rank (sparse gradients, synchronised by `sync_sparse`);
    DDP for the dense layers, told to ignore the tables."""
    model = FLM(cfg, [], init_seed=SEED, table_device="meta")
    for name, emb in model.tables.items():
        # Materialise and initialise each row once, exactly as parallelize's tables are.
        emb.to_empty(device="cpu")
        init_rows_(emb.weight, 0, table_init_seed(SEED, name), 0.05)
    used = used_modules(TASK, 1.0)
    for name, mod in model.named_children():
        mod.requires_grad_(name in used)
    DDP._set_params_and_buffers_to_ignore_for_model(model, [f"tables.{n}.weight" for n in model.tables])
    ddp = DDP(model, forward_sync_buffers=False, gradient_as_bucket_view=True)
    ddp.register_comm_hook(None, _timed_allreduce_hook)
    rows = {n: t.num_embeddings for n, t in model.tables.items()}
    ddp.plan = plan_tables(rows, DIM, 1, SHARD_THRESHOLD, {n: "replicated" for n in rows})
    return ddp


def sync_sparse(model: nn.Module, world: int) -> None:
    """R-sparse: every rank gets the sum of all ranks' sparse table gradients / world
    (DDP's averaging), by all-gathering (rows, values) padded to the longest."""
    t0 = time.perf_counter()
    for emb in unwrap(model).tables.values():
        g = emb.weight.grad.coalesce()
        idx, val = g.indices()[0], g.values()
        n = torch.tensor([len(idx)])
        counts = [torch.zeros_like(n) for _ in range(world)]
        dist.all_gather(counts, n)
        m = int(max(c.item() for c in counts))
        pad_idx = torch.zeros(m, dtype=idx.dtype)
        pad_val = torch.zeros(m, val.shape[1], dtype=val.dtype)
        pad_idx[: len(idx)], pad_val[: len(idx)] = idx, val
        all_idx = [torch.empty_like(pad_idx) for _ in range(world)]
        all_val = [torch.empty_like(pad_val) for _ in range(world)]
        dist.all_gather(all_idx, pad_idx)
        dist.all_gather(all_val, pad_val)
        idx = torch.cat([a[: int(c)] for a, c in zip(all_idx, counts, strict=True)])
        val = torch.cat([a[: int(c)] for a, c in zip(all_val, counts, strict=True)])
        emb.weight.grad = torch.sparse_coo_tensor(idx.unsqueeze(0), val / world, emb.weight.shape, check_invariants=False)
    TIMERS.t["sparse_allgather"] += time.perf_counter() - t0


# ------------------------------------------------------------------ one arm on one rank


def _release_memory() -> None:
    """Free what the previous arm left, and hand glibc's free heap back to the OS, so
    an arm's RSS growth is its own and not hidden by memory an earlier arm freed."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def run_arm(arm: str, sizes: Sizes, rank: int, world: int, batches: list[Batch]) -> dict:
    cfg = model_config(sizes.rows)
    _release_memory()
    rss0 = common.current_rss()
    common.reset_peak_rss()
    model = build(arm, cfg, rank, world)
    dense_opt, sparse_opt = build_optimizers(unwrap(model), 1e-3, 0.0, 0.05, "adagrad")
    popularity = PopularityEstimator()
    flags = forward_flags(TASK, 1.0)
    global_rows = world * BATCH_SIZE
    n_steps = sizes.ddp_steps if arm == "R-ddp" else sizes.steps
    warmup = 1 if arm == "R-ddp" else sizes.warmup  # one step allocates everything; each takes seconds
    parts: list[dict] = []
    dist.barrier()
    t_start = 0.0
    for step in range(warmup + n_steps):
        if step == warmup:
            dist.barrier()  # both ranks start the timed steps together
            t_start = time.perf_counter()
            rss_steady = common.current_rss()
        batch = batches[step % len(batches)]
        TIMERS.reset()
        # The train loop's step (train_loop.Worker.train), timed in parts.
        t0 = time.perf_counter()
        popularity.update(batch.item)
        out = model(batch, **flags)
        lp = compute_loss(TASK, out, batch, 1.0, 1.0, 0.1, popularity, 512)
        loss = lp.total * (world / global_rows)
        t1 = time.perf_counter()
        for opt in (dense_opt, sparse_opt):
            opt.zero_grad(set_to_none=True)
        loss.backward()
        t2 = time.perf_counter()
        if arm.startswith("R-sparse"):
            sync_sparse(model, world)
        for opt in (dense_opt, sparse_opt):
            opt.step()
        t3 = time.perf_counter()
        comm = TIMERS.reset()
        if step >= warmup:
            parts.append({"forward": t1 - t0, "backward": t2 - t1, "optimizer": t3 - t2, "step": t3 - t0, **comm})
    wall = time.perf_counter() - t_start
    peak = common.peak_rss()
    plan_bytes = sum(p.bytes_per_worker(rank) for p in model.plan.values())
    del model, dense_opt, sparse_opt, popularity, out, lp, loss
    _release_memory()
    return {
        "arm": arm,
        "rank": rank,
        "wall_s": wall,
        "steps": n_steps,
        "global_rows": global_rows * n_steps,
        "parts_ms": {k: 1e3 * float(np.median([p[k] for p in parts])) for k in parts[0]},
        "plan_bytes": plan_bytes,
        "rss_steady_bytes": rss_steady - rss0,
        "rss_peak_bytes": peak - rss0,
    }


def rank_main(rank: int, world: int, sizes: Sizes, arms: tuple[str, ...]) -> list[dict]:
    """All arms, interleaved, `repeats` rounds, in this one process (every rank runs
    the same sequence, so their collectives match)."""
    _timed_all_to_all()
    data = {d: make_batches(rank, sizes, d, min(sizes.warmup + sizes.steps, 64)) for d in ("zipf", "uniform")}
    # One untimed pass over every arm with small tables: lazy initialisation (gloo
    # buffers, DDP, allocator arenas) would otherwise be charged to the first arm.
    tiny = Sizes(rows=1 << 16, warmup=1, steps=1, ddp_steps=1, repeats=1)
    for arm in arms:
        run_arm(arm, tiny, rank, world, [make_batches(rank, tiny, "zipf", 1)[0]])
    out = []
    for rep in range(sizes.repeats):
        for arm in arms:
            if arm == "R-ddp" and rep > 0:
                continue  # seconds per step, tens of times the others: one round says enough
            res = run_arm(arm, sizes, rank, world, data["uniform" if arm.endswith("uniform") else "zipf"])
            res["round"] = rep
            out.append(res)
            if rank == 0:
                print(f"  round {rep + 1}/{sizes.repeats} {arm:<18} {res['wall_s']:6.1f}s "
                      f"step {res['parts_ms']['step']:8.1f} ms  rss +{res['rss_steady_bytes'] / common.MiB:,.0f} MiB", flush=True)
    return out


# ------------------------------------------------------------------ driver


def summarize(results: list[list[dict]], arms: tuple[str, ...]) -> dict[str, dict]:
    """Per arm: medians over rounds of rows/s (rows of both ranks over the slower
    rank's wall time), step parts (rank 0) and memory (the larger rank)."""
    out = {}
    for arm in arms:
        rounds = sorted({r["round"] for r in results[0] if r["arm"] == arm})
        per_round = []
        for rd in rounds:
            rs = [next(r for r in rank_res if r["arm"] == arm and r["round"] == rd) for rank_res in results]
            per_round.append(
                {
                    "rows_per_s": rs[0]["global_rows"] / max(r["wall_s"] for r in rs),
                    **{f"{k}_ms": v for k, v in rs[0]["parts_ms"].items()},
                    "plan_mib_per_worker": max(r["plan_bytes"] for r in rs) / common.MiB,
                    "rss_steady_mib_per_worker": max(r["rss_steady_bytes"] for r in rs) / common.MiB,
                    "rss_peak_mib_per_worker": max(r["rss_peak_bytes"] for r in rs) / common.MiB,
                    # what the worker holds beyond the plan's tables: activations, buffers, gradients
                    "rss_beyond_plan_mib": max(r["rss_steady_bytes"] - r["plan_bytes"] for r in rs) / common.MiB,
                }
            )
        out[arm] = common.medians(per_round)
    return out


def main() -> None:
    args = parse_args()
    common.pin_threads(args.pinned)
    sizes = QUICK if args.quick else FULL
    if args.repeats:
        sizes = replace(sizes, repeats=args.repeats)
    info = common.machine_info()
    common.print_header("sharding: row-wise vs replicated tables, 2 workers", info, args)
    print(f"model: 2 tables x {sizes.rows:,} rows x {DIM} dims ({2 * sizes.rows * DIM * 4 / 2**30:.2f} GiB of weights), "
          f"task {TASK}, batch {BATCH_SIZE}/worker; {sizes.steps} timed steps per arm (R-ddp {sizes.ddp_steps}) "
          f"after {sizes.warmup} warm-up, {sizes.repeats} round(s)", flush=True)
    t0 = time.monotonic()
    results = common.run_ranks(rank_main, WORLD, sizes, ARMS, timeout=1800)
    print(f"ranks finished in {time.monotonic() - t0:.0f}s", flush=True)
    med = summarize(results, ARMS)
    with common.captured() as cap:
        report(args, info, sizes, med, results)
    if not args.quick:
        common.update_benchmarks_md('sharding', cap.text(), "python bench/sharding.py" + (" --quick" if args.quick else ""), info)


def report(args, info: dict, sizes: Sizes, med: dict[str, dict], results) -> None:
    def r(a: str, b: str, key: str) -> float | None:
        return common.ratio(med[a].get(key), med[b].get(key))

    ratios = {
        "memory S/R plan bytes per worker (target <= 0.55)": r("S", "R-ddp", "plan_mib_per_worker"),
        "memory S/R-ddp RSS per worker": r("S", "R-ddp", "rss_steady_mib_per_worker"),
        "memory S/R-sparse RSS per worker": r("S", "R-sparse", "rss_steady_mib_per_worker"),
        "memory S/R-ddp peak RSS per worker": r("S", "R-ddp", "rss_peak_mib_per_worker"),
        "memory S/R-sparse peak RSS per worker": r("S", "R-sparse", "rss_peak_mib_per_worker"),
        "rows/s S/R-ddp (target >= 0.8)": r("S", "R-ddp", "rows_per_s"),
        "rows/s S/R-sparse (target >= 0.8)": r("S", "R-sparse", "rows_per_s"),
        "rows/s S/R-sparse, uniform IDs": r("S-uniform", "R-sparse-uniform", "rows_per_s"),
        "rows/s S uniform/zipf": r("S-uniform", "S", "rows_per_s"),
    }
    header = ["arm", "rows/s", "step ms", "forward ms", "backward ms", "optimiser ms", "all-to-all ms", "DDP all-reduce ms",
              "sparse all-gather ms", "plan MiB/worker", "RSS MiB/worker", "RSS beyond plan MiB", "peak RSS MiB/worker"]
    rows = [
        [arm, m["rows_per_s"], m["step_ms"], m["forward_ms"], m["backward_ms"], m["optimizer_ms"], m["all_to_all_ms"],
         m["ddp_allreduce_ms"], m["sparse_allgather_ms"], m["plan_mib_per_worker"], m["rss_steady_mib_per_worker"],
         m["rss_beyond_plan_mib"], m["rss_peak_mib_per_worker"]]
        for arm, m in med.items()
    ]
    print()
    print(f"## sharding at {WORLD} workers (gloo, 1 thread each): medians of {sizes.repeats} interleaved round(s); "
          f"2 x {sizes.rows:,} x {DIM} tables, batch {BATCH_SIZE}/worker; nproc={info['nproc']}, loadavg at start {info['loadavg_at_start']}")
    print(common.markdown_table(header, rows))
    print()
    print(common.markdown_table(["ratio", "value"], [[k, v] for k, v in ratios.items()]))
    print("\nStep parts are rank 0's medians; all-to-all, DDP all-reduce and the all-gather include waiting for the "
          "other rank and lie inside forward/backward/optimiser (the DDP figure sums overlapping buckets). "
          "RSS: growth of each worker over the arm (steady after warm-up; peak during it), the larger worker.")
    common.write_result(args.out, {
        "benchmark": "sharding",
        "machine": info,
        "args": vars(args),
        "sizes": vars(sizes),
        "world": WORLD,
        "batch_size": BATCH_SIZE,
        "medians": med,
        "ratios": ratios,
        "runs": results,
    })
    plot(os.path.splitext(args.out)[0] + "_steps.png", med, sizes)


def plot(path: str, med: dict[str, dict], sizes: Sizes) -> None:
    """Step time per arm, stacked forward / backward / optimiser."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    arms = list(med)
    x = np.arange(len(arms))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.6))
    # R-ddp's step is tens of times the others: left out of the step chart so they stay readable.
    fast = [a for a in arms if a != "R-ddp"]
    xf = np.arange(len(fast))
    bottom = np.zeros(len(fast))
    for part, color in (("forward_ms", "#4C72B0"), ("backward_ms", "#DD8452"), ("optimizer_ms", "#55A868")):
        vals = np.array([med[a][part] for a in fast])
        ax1.bar(xf, vals, bottom=bottom, label=part.removesuffix("_ms"), color=color)
        bottom += vals
    for xi, total in zip(xf, bottom, strict=True):
        ax1.text(xi, total, f"{total:,.0f}", ha="center", va="bottom", fontsize=7)
    ax1.set_xticks(xf, fast, rotation=30, fontsize=8)
    ax1.set_ylabel("ms per step")
    ddp = f"; R-ddp {med['R-ddp']['step_ms']:,.0f} ms, not shown" if "R-ddp" in med else ""
    ax1.set_title(f"step time, 2 workers, 2 x {sizes.rows:,} x {DIM}{ddp}", fontsize=9)
    ax1.legend(fontsize=8)
    ax2.bar(x - 0.2, [med[a]["plan_mib_per_worker"] for a in arms], width=0.4, label="plan (tables + Adagrad)", color="#8172B3")
    ax2.bar(x + 0.2, [med[a]["rss_steady_mib_per_worker"] for a in arms], width=0.4, label="measured RSS growth", color="#937860")
    ax2.set_ylabel("MiB per worker")
    ax2.set_title("memory per worker", fontsize=9)
    ax2.legend(fontsize=8)
    ax2.set_xticks(x, arms, rotation=30, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
