"""Issue 5 — what a checkpoint costs the training loop, and how fast it moves bytes.

State: FLM with user/item tables of a few million rows (a few hundred MB with the
row-wise Adagrad state), saved exactly as the train loop saves it (`Checkpointer.save`
of the DCP state: DTensor row blocks for sharded tables, optimiser state by name).
Ranks are real processes in a gloo group (spawned like tests/dist.py, no Ray);
`--world 1` (the default) leaves this 2-core machine's second core to the background
writer, as a GPU node leaves its CPUs free; `--world 2` shards the tables.

Part 1, step time while saving (arms interleaved: none, async, sync; pretraining
steps on in-memory batches). Each arm runs steps, calls `save` once, and steps on
until the checkpoint is committed:
  none   no save: the normal step time.
  async  `Checkpointer(async_save=True)`: the loop blocks while DCP stages the state,
         then steps while a thread writes the files and commits.
  sync   `Checkpointer(async_save=False)`: the loop blocks for the whole save.
Figures: the stall (time `save` blocked the loop), the window (save call to commit),
and the mean step time inside the window, stall included, as a ratio to the normal
step time (target for async: <= 1.2x).

Part 2, throughput (MB/s = 1e6 bytes of tensor data per second), local disk and the
embedded S3 endpoint (moto), arms interleaved:
  dcp-save   `Checkpointer(async_save=False).save` (write, manifest, sha256 of local
             files, commit marker, prune);   torch-save: `torch.save` of the same state.
  dcp-load   `checkpoint.load_state` (verify sizes and sha256, then DCP load in place);
             torch-load: `torch.load`. The verification alone is timed too.
Local files are written without fsync (neither path syncs) and read back from the page
cache; S3 baselines serialise in memory and PUT/GET one object.

    python bench/checkpoint.py [--quick] [--world 1|2] [--no-s3] [--repeats N] [--dir PATH]
                               [--out bench/results/checkpoint.json]
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402 - the benchmarks' shared helpers live next to this file

from flm_dist import checkpoint as ckpt  # noqa: E402
from flm_dist.batch import Batch  # noqa: E402
from flm_dist.config import ModelConfig  # noqa: E402
from flm_dist.data.hashing import HashSpec  # noqa: E402
from flm_dist.model import FLM, table_sizes  # noqa: E402
from flm_dist.objectives import PopularityEstimator, compute_loss, forward_flags, used_modules  # noqa: E402
from flm_dist.optim import build_optimizers, optimizer_state  # noqa: E402
from flm_dist.sharding import global_view, parallelize, plan_tables, unwrap  # noqa: E402
from flm_dist.storage import EmbeddedS3, Store, join  # noqa: E402

BATCH_SIZE = 4096
SEED = 0
TASK = "pretrain"


@dataclass(frozen=True)
class Sizes:
    user_rows: int
    item_rows: int
    dim: int
    normal_steps: int  # steps of the no-save arm
    save_at: int  # steps before the save in the save arms
    after_commit: int  # steps after the commit (the window's end must be seen)
    max_steps: int  # cap on an arm's steps, should the save never finish
    rounds: int  # step-time rounds and local throughput rounds
    s3_rounds: int  # throughput rounds on the embedded S3 endpoint (slow: moto is Python)


FULL = Sizes(user_rows=2_000_000, item_rows=1_000_000, dim=32, normal_steps=30, save_at=5, after_commit=5, max_steps=600, rounds=3, s3_rounds=2)
QUICK = Sizes(user_rows=200_000, item_rows=100_000, dim=32, normal_steps=8, save_at=2, after_commit=2, max_steps=200, rounds=1, s3_rounds=1)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="small state, few steps, one round: a smoke test")
    p.add_argument("--world", type=int, default=1, choices=(1, 2), help="ranks (2: row-wise sharded tables, one core each)")
    p.add_argument("--pinned", action="store_true", help="pinned run (ranks already use one thread; sets OMP/Arrow too)")
    p.add_argument("--no-s3", action="store_true", help="skip the embedded S3 endpoint")
    p.add_argument("--dir", default=None, help="local folder for checkpoints (default: a temporary folder)")
    p.add_argument("--repeats", type=int, default=None, help="interleaved rounds (default: 3 full, 1 quick)")
    p.add_argument("--out", default="bench/results/checkpoint.json")
    return p.parse_args()


# ------------------------------------------------------------------ the model and its state


def model_config(sizes: Sizes) -> ModelConfig:
    return ModelConfig(user_rows=sizes.user_rows, item_rows=sizes.item_rows, embedding_dim=sizes.dim)


class Trainer:
    """The train loop's model, optimisers and step (train_loop.Worker), minus ingest."""

    def __init__(self, sizes: Sizes, rank: int, world: int):
        cfg = model_config(sizes)
        torch.manual_seed(SEED)
        model = FLM(cfg, [], init_seed=SEED, table_device="meta")
        used = used_modules(TASK, 1.0)
        for name, mod in model.named_children():
            mod.requires_grad_(name in used)
        plan = plan_tables({n: t.num_embeddings for n, t in model.tables.items()}, cfg.embedding_dim, world, 64 << 20)
        self.model = parallelize(model, plan, torch.device("cpu"), seed=SEED)
        self.dense_opt, self.sparse_opt = build_optimizers(unwrap(self.model), 1e-3, 0.0, 0.05, "adagrad")
        self.popularity = PopularityEstimator()
        self.flags = forward_flags(TASK, 1.0)
        rng = np.random.default_rng([SEED, rank])
        hs = HashSpec.build(table_sizes(cfg, []), 0)
        n = 16 * BATCH_SIZE
        users = hs.hash("user", common.ids_from_ranks(common.draw_ranks(rng, n, 4_000_000, "zipf"), 1))
        items = hs.hash("item", common.ids_from_ranks(common.draw_ranks(rng, n, 1_000_000, "zipf"), 2))
        self.batches = [Batch(user=torch.from_numpy(users[k : k + BATCH_SIZE]), item=torch.from_numpy(items[k : k + BATCH_SIZE]))
                        for k in range(0, n, BATCH_SIZE)]
        self.i = 0
        for _ in range(2):  # allocate gradients and the optimisers' state before anything is timed
            self.step()

    def step(self) -> None:
        batch = self.batches[self.i % len(self.batches)]
        self.i += 1
        self.popularity.update(batch.item)
        out = self.model(batch, **self.flags)
        lp = compute_loss(TASK, out, batch, 1.0, 1.0, 0.1, self.popularity, 512)
        loss = lp.total * (1.0 / BATCH_SIZE)
        for opt in (self.dense_opt, self.sparse_opt):
            opt.zero_grad(set_to_none=True)
        loss.backward()
        for opt in (self.dense_opt, self.sparse_opt):
            opt.step()

    def state(self) -> dict:
        """The DCP state, as train_loop._state builds it."""
        m = unwrap(self.model)
        return {
            "model": {k: global_view(m, k, v) for k, v in m.state_dict().items()},
            "dense_optim": optimizer_state(m, self.dense_opt),
            "sparse_optim": optimizer_state(m, self.sparse_opt, wrap=lambda n, v: global_view(m, n, v)),
        }

    def local_state(self) -> dict:
        """The same tensors as plain local tensors (this rank's rows), for torch.save."""

        def local(x):
            if isinstance(x, dict):
                return {k: local(v) for k, v in x.items()}
            return x.to_local() if hasattr(x, "to_local") else x

        return local(self.state())


def tensor_bytes(state) -> int:
    if isinstance(state, dict):
        return sum(tensor_bytes(v) for v in state.values())
    if hasattr(state, "to_local"):
        state = state.to_local()
    return state.numel() * state.element_size() if torch.is_tensor(state) else 0


# ------------------------------------------------------------------ part 1: step time while saving


COMMITS: list[float] = []  # seconds per commit on this rank (rank 0 commits)


def _time_commits() -> None:
    """Wrap checkpoint.commit (manifest, sha256 of local files, marker; looked up as a
    module global when a save commits) to time that part of each save."""
    orig = ckpt.commit

    def timed(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return orig(*args, **kwargs)
        finally:
            COMMITS.append(time.perf_counter() - t0)

    ckpt.commit = timed


def _take_commit_time() -> float | None:
    total = sum(COMMITS) if COMMITS else None
    COMMITS.clear()
    return total


def step_arm(tr: Trainer, mode: str, checkpointer: ckpt.Checkpointer | None, step_no: int, sizes: Sizes) -> dict:
    """Steps, one save at step `save_at` (unless mode == "none"), then steps until the
    save has committed and `after_commit` more. A step's time includes a save called
    at its top, as in the train loop (which saves before the step's forward)."""
    starts, times = [], []
    stall, t_save, t_commit = 0.0, None, None
    _take_commit_time()
    n = sizes.normal_steps if mode == "none" else sizes.max_steps
    dist.barrier()
    for i in range(n):
        t0 = time.perf_counter()
        if mode != "none" and i == sizes.save_at:
            t_save = t0
            checkpointer.save(step_no, tr.state(), {"step": step_no, "bench": True})
            stall = time.perf_counter() - t0
            if mode == "sync":
                t_commit = time.perf_counter()  # a blocking save returns once committed
        tr.step()
        # Every rank must leave the loop at the same step (what follows is collective), so
        # they agree each step whether the save has committed everywhere: one small
        # all-reduce per step, in every arm, like the train loop's own `_agree`.
        # `_pending` is the save in flight (a Future): polling it does not block.
        mine = mode == "async" and t_save is not None and checkpointer._pending.done()
        flag = torch.tensor([1.0 if mine else 0.0])
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        t1 = time.perf_counter()
        starts.append(t0)
        times.append(t1 - t0)
        if mode == "async" and t_commit is None and flag.item() > 0:
            t_commit = t1
        if t_commit is not None and i >= sizes.save_at + sizes.after_commit:
            break
    if checkpointer is not None:
        checkpointer.finish()  # collective: every rank agrees the save succeeded
    if mode != "none" and t_commit is None:
        raise RuntimeError(f"the {mode} save did not commit within {n} steps; raise Sizes.max_steps")
    in_window = [dt for t, dt in zip(starts, times, strict=True) if t_save is not None and t_save <= t < t_commit]
    return {
        "mode": mode,
        # the normal step: the no-save arm after 2 steps, or the save arms' steps before the save
        "step_median_s": float(np.median(times[2:] if mode == "none" else times[: sizes.save_at])),
        "stall_s": stall,
        "window_s": (t_commit - t_save) if t_save is not None else None,
        "steps_in_window": len(in_window),
        "window_step_mean_s": float(np.mean(in_window)) if in_window else None,
        "commit_s": _take_commit_time(),
    }


# ------------------------------------------------------------------ part 2: throughput


def dcp_save(tr: Trainer, checkpointer: ckpt.Checkpointer, step_no: int) -> float:
    dist.barrier()
    t0 = time.perf_counter()
    checkpointer.save(step_no, tr.state(), {"step": step_no, "bench": True})  # sync: returns once committed
    dist.barrier()
    return time.perf_counter() - t0


def dcp_load(tr: Trainer, store: Store, run_dir: str) -> tuple[float, float]:
    ref = ckpt.find_latest(store, run_dir)
    dist.barrier()
    t0 = time.perf_counter()
    ckpt.verify_contents(store, ref)
    verify = time.perf_counter() - t0
    dist.barrier()
    t0 = time.perf_counter()
    ckpt.load_state(store, ref, tr.state())  # verifies again, then loads in place
    dist.barrier()
    return time.perf_counter() - t0, verify


def torch_save(tr: Trainer, store: Store, uri: str) -> float:
    dist.barrier()
    t0 = time.perf_counter()
    state = tr.local_state()
    if uri.startswith("s3://"):
        buf = io.BytesIO()
        torch.save(state, buf)
        fs, path = store.fs(uri)
        fs.pipe_file(path, buf.getvalue())
    else:
        torch.save(state, uri)
    dist.barrier()
    return time.perf_counter() - t0


def torch_load(store: Store, uri: str) -> float:
    dist.barrier()
    t0 = time.perf_counter()
    if uri.startswith("s3://"):
        fs, path = store.fs(uri)
        torch.load(io.BytesIO(fs.cat_file(path)), weights_only=True)
    else:
        torch.load(uri, weights_only=True)
    dist.barrier()
    return time.perf_counter() - t0


# ------------------------------------------------------------------ one rank


def rank_main(rank: int, world: int, sizes: Sizes, targets: dict[str, tuple[Store, str]]) -> dict:
    """Everything runs here, in the same order on every rank (the saves are collective)."""
    _time_commits()
    tr = Trainer(sizes, rank, world)
    nbytes = tensor_bytes(tr.state())
    local_store, local_root = targets["local"]
    steps_res: list[dict] = []
    step_no = 0
    savers = {
        "async": ckpt.Checkpointer(local_store, join(local_root, "async"), keep_last=1, async_save=True),
        "sync": ckpt.Checkpointer(local_store, join(local_root, "sync"), keep_last=1, async_save=False),
    }
    for rd in range(sizes.rounds):
        for mode in ("none", "async", "sync"):
            step_no += 1
            res = step_arm(tr, mode, savers.get(mode), step_no, sizes)
            res["round"] = rd
            steps_res.append(res)
            if rank == 0:
                print(f"  steps round {rd + 1}/{sizes.rounds} {mode:<5} step {res['step_median_s'] * 1e3:7.1f} ms  "
                      f"stall {res['stall_s']:6.2f}s  window {common.fmt(res['window_s'])}s", flush=True)

    tput: list[dict] = []
    for target, (store, root) in targets.items():
        saver = ckpt.Checkpointer(store, join(root, "tput"), keep_last=1, async_save=False)
        baseline = join(root, "baseline", f"rank-{rank}.pt")
        if target == "local":
            os.makedirs(os.path.dirname(baseline), exist_ok=True)
        rounds = sizes.rounds if target == "local" else sizes.s3_rounds
        for rd in range(rounds):
            step_no += 1
            res = {"target": target, "round": rd}
            _take_commit_time()
            res["dcp_save_s"] = dcp_save(tr, saver, step_no)
            res["commit_s"] = _take_commit_time() or 0.0
            res["torch_save_s"] = torch_save(tr, store, baseline)
            res["dcp_load_s"], res["verify_s"] = dcp_load(tr, store, join(root, "tput"))
            res["torch_load_s"] = torch_load(store, baseline)
            tput.append(res)
            if rank == 0:
                print(f"  throughput {target:<5} round {rd + 1}/{rounds}: " + " ".join(f"{k}={v:.2f}" for k, v in res.items() if k.endswith("_s")), flush=True)
        saver.close()
    for s in savers.values():
        s.close()
    return {"rank": rank, "bytes": nbytes, "steps": steps_res, "throughput": tput}


# ------------------------------------------------------------------ driver


def summarize(results: list[dict]) -> tuple[dict, dict]:
    """Step figures from rank 0 (every rank steps in lockstep); throughput from the
    slowest rank per round, over the sum of the ranks' bytes."""
    r0 = results[0]
    total_bytes = sum(r["bytes"] for r in results)
    # Each round's save arms against the same round's no-save arm (interleaved neighbours).
    normal = {s["round"]: s["step_median_s"] for s in r0["steps"] if s["mode"] == "none"}
    steps = {}
    for mode in ("none", "async", "sync"):
        runs = [s for s in r0["steps"] if s["mode"] == mode]
        per = []
        for s in runs:
            w = s["window_step_mean_s"]
            per.append({
                "step_ms": s["step_median_s"] * 1e3,
                "stall_s": s["stall_s"],
                "window_s": s["window_s"],
                "steps_in_window": s["steps_in_window"],
                "window_step_ms": w * 1e3 if w else None,
                "window_step_ratio": w / normal[s["round"]] if w else 1.0,
                "commit_s": s["commit_s"],
            })
        steps[mode] = common.medians(per)
    tput = {}
    for target in dict.fromkeys(t["target"] for t in r0["throughput"]):
        per = []
        rounds = [t["round"] for t in r0["throughput"] if t["target"] == target]
        for rd in rounds:
            rs = [next(t for t in r["throughput"] if t["target"] == target and t["round"] == rd) for r in results]
            slowest = {k: max(t[k] for t in rs) for k in rs[0] if k.endswith("_s")}
            ops = ("dcp_save", "torch_save", "dcp_load", "torch_load")
            per.append({f"{op}_mb_s": total_bytes / 1e6 / slowest[f"{op}_s"] for op in ops} | slowest)
        tput[target] = common.medians(per)
    return steps, tput


def main() -> None:
    args = parse_args()
    common.pin_threads(args.pinned)
    sizes = QUICK if args.quick else FULL
    if args.repeats:
        sizes = replace(sizes, rounds=args.repeats)
    info = common.machine_info()
    common.print_header("checkpoint: step time while saving, save/load throughput", info, args)
    root = args.dir or tempfile.mkdtemp(prefix="flm-bench-ckpt-")
    os.makedirs(root, exist_ok=True)
    fs_type = _fs_type(root)
    print(f"state: FLM, user {sizes.user_rows:,} + item {sizes.item_rows:,} rows x {sizes.dim} dims, "
          f"world {args.world}; local folder {root} ({fs_type})", flush=True)
    endpoint = None
    targets: dict[str, tuple[Store, str]] = {"local": (Store(), root)}
    try:
        if not args.no_s3:
            endpoint = EmbeddedS3().start()
            store = Store.from_config(endpoint.storage_config())
            store.ensure_bucket("s3://flm-bench/ckpt")
            targets["s3"] = (store, "s3://flm-bench/ckpt")
        t0 = time.monotonic()
        results = common.run_ranks(rank_main, args.world, sizes, targets, timeout=1800)
        print(f"ranks finished in {time.monotonic() - t0:.0f}s", flush=True)
    finally:
        if endpoint is not None:
            endpoint.stop()
        if args.dir is None:
            shutil.rmtree(root, ignore_errors=True)
    steps, tput = summarize(results)
    with common.captured() as cap:
        report(args, info, sizes, results, steps, tput, fs_type)
    if not args.quick:
        common.update_benchmarks_md('checkpoint', cap.text(), "python bench/checkpoint.py" + (" --quick" if args.quick else "") + (f" --world {args.world}" if args.world != 1 else ""), info)


def _fs_type(path: str) -> str:
    """The filesystem type of `path` from /proc/mounts (longest matching mount point)."""
    best, kind = "", "unknown"
    try:
        with open("/proc/mounts") as f:
            for line in f:
                _, mnt, typ, *_ = line.split()
                if os.path.abspath(path).startswith(mnt) and len(mnt) > len(best):
                    best, kind = mnt, typ
    except OSError:
        pass
    return kind


def report(args, info: dict, sizes: Sizes, results: list[dict], steps: dict, tput: dict, fs_type: str) -> None:
    mb = sum(r["bytes"] for r in results) / 1e6
    print()
    print(f"## checkpoint: {mb:,.0f} MB of tensors, world {args.world}, medians of {sizes.rounds} interleaved round(s) "
          f"(S3: {sizes.s3_rounds}); nproc={info['nproc']}, loadavg at start {info['loadavg_at_start']}")
    print(common.markdown_table(
        ["arm", "step ms", "stall s", "save window s", "of which commit s", "steps in window", "step ms in window", "ratio to normal step"],
        [[mode, m["step_ms"], m["stall_s"], m["window_s"], m["commit_s"], m["steps_in_window"], m["window_step_ms"], m["window_step_ratio"]]
         for mode, m in steps.items()],
    ))
    print()
    rows = []
    for target, m in tput.items():
        rows.append([target, m["dcp_save_mb_s"], m["commit_s"], m["torch_save_mb_s"], common.ratio(m["dcp_save_mb_s"], m["torch_save_mb_s"]),
                     m["dcp_load_mb_s"], m["verify_s"], m["torch_load_mb_s"], common.ratio(m["dcp_load_mb_s"], m["torch_load_mb_s"])])
    print(common.markdown_table(
        ["target", "DCP save MB/s", "of which commit s", "torch.save MB/s", "DCP/torch save", "DCP load MB/s", "of which verify s", "torch.load MB/s", "DCP/torch load"],
        rows,
    ))
    ratios = {
        "async step in window / normal step (target <= 1.2)": steps["async"]["window_step_ratio"],
        "sync step with save / normal step": steps["sync"]["window_step_ratio"],
        "async stall / sync stall": common.ratio(steps["async"]["stall_s"], steps["sync"]["stall_s"]),
        **{f"{t} DCP/torch save MB/s": common.ratio(m["dcp_save_mb_s"], m["torch_save_mb_s"]) for t, m in tput.items()},
        **{f"{t} DCP/torch load MB/s": common.ratio(m["dcp_load_mb_s"], m["torch_load_mb_s"]) for t, m in tput.items()},
    }
    print()
    print(common.markdown_table(["ratio", "value"], [[k, v] for k, v in ratios.items()]))
    print(f"\nlocal: {fs_type}, no fsync in either path, loads from the page cache; DCP save includes the manifest, sha256 of "
          "each local file and the commit marker; DCP load includes verification (sizes, and sha256 locally). "
          "MB = 1e6 bytes of tensor data.")
    common.write_result(args.out, {
        "benchmark": "checkpoint",
        "machine": info,
        "args": vars(args),
        "sizes": vars(sizes),
        "state_mb": mb,
        "local_fs": fs_type,
        "steps": steps,
        "throughput": tput,
        "ratios": ratios,
        "runs": results,
    })
    labels = [f"{t} {k}" for t in tput for k in ("DCP save", "torch.save", "DCP load", "torch.load")]
    values = [tput[t][k] for t in tput for k in ("dcp_save_mb_s", "torch_save_mb_s", "dcp_load_mb_s", "torch_load_mb_s")]
    common.bar_plot(os.path.splitext(args.out)[0] + "_throughput.png", f"checkpoint throughput, {mb:,.0f} MB state", "MB/s", labels, values)


if __name__ == "__main__":
    main()
