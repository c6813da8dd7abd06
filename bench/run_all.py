"""Issue 10 — the full harness: arms L, A, B, C in modes skip / train / sleep-step
(5, 20, 50 ms) at 1 and 2 workers, and the sequence model's L and C; interleaved
rounds, medians; then C's time to first batch on a 1,000-file dataset in the embedded
S3 endpoint, a torch.profiler profile of C in train mode, and the constants of the
scaling model. Rewrites its section of BENCHMARKS.md, the results JSON and the PNG
plots.

Arms (same model, optimiser, batch size, seed and step code in every arm: the train
loop's step, `train_loop.Worker.train`, timed in parts):
  L  the limit: the whole dataset hashed into memory first, sliced per step (no reader).
  A  plain reader: ParquetFile.iter_batches -> flm_dist's encode_table -> torch.from_numpy,
     one prefetch thread, no Ray. L and A run as spawned processes in a gloo group.
  B  vanilla Ray: TorchTrainer + ray.data.read_parquet + map_batches(encode_table) +
     get_dataset_shard(...).iter_torch_batches(batch_size=...), defaults elsewhere.
  C  flm_dist: plan_read -> InteractionDatasource per-rank shares (FLMDataConfig) ->
     BatchStream (shuffle window) -> the train loop's prefetch thread and per-step
     `_agree` all-reduce, in a TorchTrainer worker with launch.resources' CPUs.
  L-seq, C-seq  the sequence model of `jobs/pretrain_sequence.yaml` (issues 17, 18): L and C
     as above on Amazon Toys as per-user sequences, in modes skip, train and sleep20;
     and the history stage's throughput on the harness's log.
Modes, each one pass over the worker's share (train and sleep passes stop at a step
cap, the same in every arm): skip (touch every batch), train (a real optimiser step),
sleepN (time.sleep(N ms) instead of compute, as a fast accelerator would leave the CPU).

    python bench/run_all.py [--quick] [--pinned] [--repeats N] [--no-ttfb] [--no-profile] [--no-sequence]
                            [--out bench/results/run_all.json]      # `make bench`
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402 - the benchmarks' shared helpers live next to this file

from flm_dist.batch import Batch  # noqa: E402
from flm_dist.config import FeatureConfig, ModelConfig, TrainConfig, load_job  # noqa: E402
from flm_dist.data.encode import EncodeSpec, encode_table  # noqa: E402
from flm_dist.data.hashing import HashSpec  # noqa: E402
from flm_dist.data.schema import ReadSpec  # noqa: E402
from flm_dist.model import FLM, table_sizes  # noqa: E402
from flm_dist.objectives import (  # noqa: E402
    NegativeSampler,
    PopularityEstimator,
    compute_loss,
    forward_flags,
    used_modules,
)
from flm_dist.optim import build_optimizers  # noqa: E402
from flm_dist.sharding import parallelize, plan_tables, unwrap  # noqa: E402

TASK = "pretrain"
FEATURES = (FeatureConfig(name="u_segment", side="user"), FeatureConfig(name="i_category", side="item"))
BATCH_SIZE = 4096  # data.batch_size's default
PREFETCH = 4  # data.prefetch_batches's default; arm A's queue depth too
SHUFFLE_WINDOW = 8  # data.shuffle_window's default
BLOCK_ROWS = 65536  # data.read_block_rows's default
SHARD_THRESHOLD = 64 << 20  # scaling.shard_threshold_bytes's default: user and item tables row-wise at 2 workers
SEED = 0
MODES = ("skip", "train", "sleep5", "sleep20", "sleep50")


@dataclass(frozen=True)
class Setup:
    """What the arms of one comparison train, the same in each: task, model, optimiser
    settings, features, batch size, and the modes they run."""

    task: str
    model: ModelConfig
    train: TrainConfig
    features: tuple[FeatureConfig, ...]
    batch_size: int
    modes: tuple[str, ...]


FLM_SETUP = Setup(TASK, ModelConfig(), TrainConfig(), FEATURES, BATCH_SIZE, MODES)


def sequence_setup() -> Setup:
    """The sequence model as `jobs/pretrain_sequence.yaml` pretrains it (a causal
    Transformer over the last 50 items, next-item sampled softmax with in-batch and
    uniform negatives, the job's batch of 1,024), on per-user sequences (issues 17, 18)."""
    job = load_job(os.path.join(common.REPO, "jobs", "pretrain_sequence.yaml"))
    return Setup(job.task, job.model, job.train, tuple(job.data.features), job.data.batch_size, ("skip", "train", "sleep20"))


@dataclass(frozen=True)
class Sizes:
    rows: int
    files: int
    row_group_rows: int
    repeats: int
    caps: tuple[tuple[str, int], ...]  # steps per rank and pass, per mode (skip: the whole share)
    ttfb_files: int
    profile_steps: int


# Train passes of 120 steps (~9 s here): the Ray arms read ahead greedily at a pass's
# start (C reads the rank's whole share), and a 40-step pass ended inside that
# transient, which an epoch of thousands of steps pays once (2026-12-05: C/L at 1
# worker 0.88 over 40 steps; C alone 48.5k rows/s over 40, 56.6-56.9k over 120).
# Sleep-20 passes of 240 steps (4.8 s; 80 before): issue 18's scaling bar is read
# there, and over 80 steps (1.6 s) C's 2-worker rate moved by 4% between runs
# (0.846-0.885 of twice 1 worker) where 250-step passes gave 0.89-0.92.
FULL = Sizes(rows=1 << 21, files=16, row_group_rows=1 << 16, repeats=2,
             caps=(("train", 120), ("sleep5", 120), ("sleep20", 240), ("sleep50", 48)), ttfb_files=1000, profile_steps=12)
QUICK = Sizes(rows=1 << 18, files=8, row_group_rows=1 << 15, repeats=1,
              caps=(("train", 8), ("sleep5", 16), ("sleep20", 12), ("sleep50", 8)), ttfb_files=50, profile_steps=4)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="small data, few steps, one round: a smoke test")
    p.add_argument("--pinned", action="store_true", help="one thread per process (OMP/torch/Arrow), as the protocol's pinned run")
    p.add_argument("--repeats", type=int, default=None, help="interleaved rounds (default: 2 full, 1 quick)")
    p.add_argument("--arms", type=lambda v: v.split(","), default=None, help="subset, e.g. L-1w,C-1w")
    p.add_argument("--no-ttfb", action="store_true", help="skip the 1,000-file time-to-first-batch run")
    p.add_argument("--no-profile", action="store_true", help="skip the torch.profiler run of C")
    p.add_argument("--no-sequence", action="store_true", help="skip the sequence model's arms and the history stage")
    p.add_argument("--data-dir", default=os.path.join(tempfile.gettempdir(), "flm-bench-run-all"))
    p.add_argument("--out", default="bench/results/run_all.json")
    p.add_argument("--no-md", action="store_true", help="do not rewrite BENCHMARKS.md")
    p.add_argument("--report-from", default=None, help="rewrite the report from a results JSON of an earlier run (no measuring)")
    return p.parse_args()


def encode_spec(setup: Setup = FLM_SETUP) -> EncodeSpec:
    hs = HashSpec.build(table_sizes(setup.model, setup.features), setup.model.hash_seed)
    read = ReadSpec.for_task(setup.task, setup.features, (1.0, 5.0), history_len=setup.model.history_len)
    return EncodeSpec(read=replace(read, sequence=setup.model.history_len > 0), hash=hs)


def cols_to_batch(cols: dict, features: tuple[FeatureConfig, ...] = FEATURES) -> Batch:
    t = {k: (torch.as_tensor(v) if not isinstance(v, torch.Tensor) else v) for k, v in cols.items()}
    width = sum(k.startswith("hist__") for k in t)  # sequence examples: the history's slots
    history = torch.stack([t[f"hist__{j}"] for j in range(width)], dim=1) if width else None
    return Batch(user=t["user"], item=t["item"], features={f.name: t[f"f_{f.name}"] for f in features}, history=history)


# ------------------------------------------------------------------ the step, timed in parts


class Timers:
    """Seconds inside collectives during a step: the row-wise tables' all-to-alls,
    the replicated tables' all-gathers and DDP's all-reduce (each including the wait
    for the peer), and the per-step control all-reduce."""

    def __init__(self):
        self.t = dict.fromkeys(("exchange", "ddp_allreduce"), 0.0)
        self.patched = False

    def reset(self) -> dict:
        out, self.t = self.t, dict.fromkeys(self.t, 0.0)
        return out

    def patch(self) -> None:
        """sharding.py looks the collectives up on torch.distributed at call time."""
        if self.patched:
            return
        for name in ("all_to_all_single", "all_gather"):
            orig = getattr(dist, name)

            def timed(*a, _orig=orig, **kw):
                t0 = time.perf_counter()
                try:
                    return _orig(*a, **kw)
                finally:
                    self.t["exchange"] += time.perf_counter() - t0

            setattr(dist, name, timed)
        self.patched = True

    def ddp_hook(self, state, bucket):
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        t0 = time.perf_counter()

        def done(fut):
            self.t["ddp_allreduce"] += time.perf_counter() - t0
            return fut.value()

        return allreduce_hook(state, bucket).then(done)


TIMERS = Timers()


class Stepper:
    """The model, optimisers and step of the train loop (train_loop.Worker.build/train)
    for `world` ranks and one Setup (default: pretraining, default ModelConfig and
    TrainConfig)."""

    def __init__(self, world: int, setup: Setup = FLM_SETUP):
        TIMERS.patch()
        self.world, self.tc, self.task = world, setup.train, setup.task
        torch.manual_seed(SEED)
        cfg = setup.model
        model = FLM(cfg, list(setup.features), init_seed=SEED, table_device="meta")
        used = used_modules(self.task, self.tc.recon_weight)
        for name, mod in model.named_children():
            mod.requires_grad_(name in used)
        self.plan = plan_tables({n: t.num_embeddings for n, t in model.tables.items()}, cfg.embedding_dim, world, SHARD_THRESHOLD, {})
        self.model = parallelize(model, self.plan, torch.device("cpu"), seed=SEED)
        if hasattr(self.model, "register_comm_hook"):
            self.model.register_comm_hook(None, TIMERS.ddp_hook)
        self.dense, self.sparse = build_optimizers(unwrap(self.model), self.tc.lr, self.tc.weight_decay, self.tc.sparse_lr, self.tc.sparse_optimizer)
        self.flags = forward_flags(self.task, self.tc.recon_weight, all_positions=self.tc.next_item_positions == "all")
        self.popularity = PopularityEstimator()
        rank = dist.get_rank() if dist.is_initialized() else 0
        seed = SEED * 7919 + rank  # the train loop's seed for a rank's negatives
        self.negatives = NegativeSampler(cfg.item_rows, setup.features, self.tc.uniform_negatives, torch.device("cpu"), seed) if self.tc.uniform_negatives else None

    def step(self, batch: Batch, global_rows: int) -> dict:
        tc = self.tc
        TIMERS.reset()
        t0 = time.perf_counter()
        share = 0.0
        if self.negatives is not None:  # uniform negatives, as the train loop draws them
            self.negatives.observe(batch)
            batch.negatives, batch.negative_features, share = self.negatives.sample()
        self.popularity.update(batch.item)
        out = self.model(batch, **self.flags)
        lp = compute_loss(self.task, out, batch, tc.recon_weight, tc.contrastive_weight, tc.temperature, self.popularity, tc.num_negatives, share)
        loss = lp.total * (self.world / global_rows)
        t1 = time.perf_counter()
        for opt in (self.dense, self.sparse):
            if opt is not None:
                opt.zero_grad(set_to_none=True)
        loss.backward()
        t2 = time.perf_counter()
        for opt in (self.dense, self.sparse):
            if opt is not None:
                opt.step()
        _ = float(lp.total.detach())  # the loop reads the loss back each step
        t3 = time.perf_counter()
        return {"forward": t1 - t0, "backward": t2 - t1, "optimizer": t3 - t2, **TIMERS.reset()}


def touch(batch: Batch) -> None:
    _ = int(batch.user.sum()) + int(batch.item.sum())


def run_pass(batches, mode: str, cap: int | None, stepper: Stepper | None, world: int, agree) -> dict:
    """One pass: pull, agree (every rank stops when any rank runs dry), work, record.
    `agree(rows) -> global rows` is one small all-reduce per step in every arm."""
    t_start = time.monotonic()
    ends, rows, waits, parts = [], [], [], []
    sleep_s = float(mode[5:]) / 1e3 if mode.startswith("sleep") else 0.0
    it = iter(batches)
    while True:
        t0 = time.monotonic()
        b = next(it, None)
        t1 = time.monotonic()
        n = len(b) if b is not None else 0
        t_sync = time.perf_counter()
        g = agree(n, world)
        t_sync = time.perf_counter() - t_sync
        if g is None:
            break
        if mode == "skip":
            touch(b)
        elif mode == "train":
            p = stepper.step(b, g)
            p["data_wait"], p["sync"] = t1 - t0, t_sync
            parts.append(p)
        else:
            touch(b)
            time.sleep(sleep_s)
        ends.append(time.monotonic())
        rows.append(n)
        waits.append(t1 - t0)
        if cap and len(ends) >= cap:
            break
    close = getattr(batches, "close", None)
    if close:
        close()
    return {"mode": mode, "t_start": t_start, "ends": ends, "rows": rows, "waits": waits, "parts": parts}


def agree_rows(n: int, world: int) -> int | None:
    """Global rows, or None when any rank has no batch (MIN of has-batch is 0)."""
    if world == 1:
        return n or None
    t = torch.tensor([float(n), float(n > 0)], dtype=torch.float64)
    both = torch.tensor([float(n > 0)], dtype=torch.float64)
    dist.all_reduce(t)
    dist.all_reduce(both, op=dist.ReduceOp.MIN)
    return int(t[0]) if both.item() > 0 else None


def all_modes(rank: int, world: int, caps: dict, make_batches, profile_steps: int = 0, out_dir: str | None = None, setup: Setup = FLM_SETUP) -> list[dict]:
    stepper = Stepper(world, setup)
    # One untimed step: lazy allocation (optimiser state, gloo buffers) is not a mode's cost.
    source = make_batches("warm")
    first = next(iter(source))
    t_first = time.monotonic()  # the run's first batch: what a time to first batch is
    stepper.step(first, setup.batch_size * world)
    if hasattr(source, "close"):
        source.close()
    recs = []
    for mode in setup.modes:
        dist.barrier() if world > 1 else None
        recs.append({**run_pass(make_batches(mode), mode, caps.get(mode), stepper, world, agree_rows), "t_first_batch": t_first})
    if profile_steps:
        recs_prof = profile(stepper, make_batches("profile"), profile_steps, world)
        with open(os.path.join(out_dir, f"profile-rank{rank}.json"), "w") as f:
            json.dump(recs_prof, f)
    return recs


def profile(stepper: Stepper, batches, steps: int, world: int) -> dict:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    it = iter(batches)
    with torch_profile(activities=[ProfilerActivity.CPU], record_shapes=False) as prof:
        for _ in range(steps):
            b = next(it, None)
            if agree_rows(len(b) if b is not None else 0, world) is None:
                break
            stepper.step(b, len(b) * world)
    close = getattr(batches, "close", None)
    if close:
        close()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    top = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:15]
    return {
        "steps": steps,
        "total_self_cpu_ms": total / 1e3,
        "top": [{"op": e.key, "self_cpu_ms": e.self_cpu_time_total / 1e3, "share": e.self_cpu_time_total / total, "calls": e.count} for e in top],
    }


# ------------------------------------------------------------------ L and A: spawned gloo ranks


class ClosableQueueReader:
    """Arm A's reader: one thread reads, hashes and queues PREFETCH batches."""

    def __init__(self, files: list[str], columns: list[str], spec: EncodeSpec):
        import queue

        self._q: queue.Queue = queue.Queue(maxsize=PREFETCH)
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, args=(files, columns, spec), daemon=True)
        self._t.start()

    def _run(self, files, columns, spec) -> None:
        try:
            for path in files:
                for rb in pq.ParquetFile(path).iter_batches(batch_size=BATCH_SIZE, columns=columns):
                    if self._stop.is_set():
                        return
                    self._q.put(cols_to_batch(encode_table(pa.Table.from_batches([rb]), spec)))
        finally:
            self._q.put(None)

    def __iter__(self):
        while (b := self._q.get()) is not None:
            yield b

    def close(self) -> None:
        import queue

        self._stop.set()
        while self._t.is_alive():
            try:
                self._q.get(timeout=0.1)
            except queue.Empty:
                pass


def local_rank(rank: int, world: int, arm: str, files: list[str], columns: list[str], caps: dict, setup: Setup = FLM_SETUP) -> list[dict]:
    spec = encode_spec(setup)
    mine = files[rank::world]
    if arm == "L":
        # Sequence files expand into one example per event here, as in the read tasks;
        # rows the read tasks would drop as bad are dropped here too.
        tables = [encode_table(pq.read_table(p, columns=columns), spec) for p in mine]
        good = np.concatenate([t["_bad"] == 0 for t in tables])
        cols = {k: torch.from_numpy(np.concatenate([t[k] for t in tables])[good]) for k in tables[0] if k in ("user", "item") or k.startswith(("f_", "hist__"))}
        n, bs = len(cols["user"]), setup.batch_size

        def make(_mode):
            return (cols_to_batch({k: v[i : i + bs] for k, v in cols.items()}, setup.features) for i in range(0, n, bs))
    else:
        def make(_mode):
            return ClosableQueueReader(mine, columns, spec)

    return all_modes(rank, world, caps, make, setup=setup)


def run_local(arm: str, world: int, files: list[str], columns: list[str], caps: dict, setup: Setup = FLM_SETUP) -> dict:
    # Only the spawned ranks count: the idle Ray runtime is not this arm's cost.
    with common.TreeSampler(os.getpid(), only_new=True) as sampler:
        ranks = common.run_ranks(local_rank, world, arm, files, columns, caps, setup)
    return figures(ranks, sampler, startup_s=None, workers=world, modes=setup.modes)


# ------------------------------------------------------------------ B and C: Ray Train workers


def ray_worker(config: dict) -> None:
    import ray.train

    from flm_dist.data.batches import BatchStream
    from flm_dist.train_loop import Fetcher

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(config["threads"])
    setup = config["setup"]
    shard = ray.train.get_dataset_shard("train")
    if config["arm"] == "B":
        def make(_mode):
            return (cols_to_batch(d, setup.features) for d in shard.iter_torch_batches(batch_size=setup.batch_size))
    else:
        stream = BatchStream(shard, setup.batch_size, setup.features, shuffle_window=SHUFFLE_WINDOW, seed=SEED * 1000 + rank, prefetch_batches=PREFETCH)
        epoch = iter(range(1000))

        class Fetch:
            """The train loop's prefetch thread over one epoch of the stream."""

            def __init__(self):
                self.f = Fetcher(stream, next(epoch))

            def __iter__(self):
                while (b := self.f.next()[0]) is not None:
                    yield b

            def close(self):
                self.f.close()

        # As worker_main: the first epoch's data starts before the model is built.
        early = [Fetch()]

        def make(_mode):
            return early.pop() if early else Fetch()

    recs = all_modes(rank, world, config["caps"], make, config["profile_steps"] if rank == 0 else 0, config["out_dir"], setup)
    with open(os.path.join(config["out_dir"], f"rank-{rank}.json"), "w") as f:
        json.dump(recs, f)


@dataclass
class RayData:
    uri: str
    columns: list[str]
    store: object


def run_ray(arm: str, workers: int, data: RayData, caps: dict, profile_steps: int = 0, setup: Setup = FLM_SETUP) -> dict:
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from flm_dist.config import ScalingConfig as FLMScaling
    from flm_dist.launch import resources

    node_cpus = [float(n["Resources"].get("CPU", 0.0)) for n in ray.nodes() if n.get("Alive")]
    cpw, threads = resources(FLMScaling(num_workers=workers), node_cpus)
    out_dir = tempfile.mkdtemp(prefix="flm-bench-ranks-")
    storage = tempfile.mkdtemp(prefix="flm-bench-train-")
    spec = encode_spec(setup)
    t_setup = time.monotonic()
    kwargs = common.ray_train_data(arm, data.store, data.uri, data.columns, spec, True, SEED, BLOCK_ROWS, cpw)
    plan_s = time.monotonic() - t_setup  # listing and footers (C), or building the dataset (B)
    config = {"arm": arm, "threads": threads, "caps": caps, "profile_steps": profile_steps, "out_dir": out_dir, "setup": setup}
    trainer = TorchTrainer(
        ray_worker,
        train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=workers, resources_per_worker={"CPU": cpw}),
        run_config=RunConfig(name=f"run-all-{arm}-{workers}w-{time.time_ns()}", storage_path=storage),
        **kwargs,
    )
    with common.TreeSampler(os.getpid()) as sampler:
        trainer.fit()
    ranks = []
    for r in range(workers):
        with open(os.path.join(out_dir, f"rank-{r}.json")) as f:
            ranks.append(json.load(f))
    prof = None
    if profile_steps:
        with open(os.path.join(out_dir, "profile-rank0.json")) as f:
            prof = json.load(f)
    shutil.rmtree(out_dir, ignore_errors=True)
    shutil.rmtree(storage, ignore_errors=True)
    res = figures(ranks, sampler, startup_s=t_setup, workers=workers, modes=setup.modes)
    res["cpus_per_worker"] = cpw
    res["plan_s"] = plan_s
    if prof:
        res["profile"] = prof
    return res


# ------------------------------------------------------------------ figures


def figures(ranks: list[list[dict]], sampler: common.TreeSampler, startup_s: float | None, workers: int, modes: tuple[str, ...] = MODES) -> dict:
    """Per mode: steady-state global rows/s over the union of the ranks' windows (each
    from the end of its last warm-up step to the end of its last step; rows of the
    steps in between), the share of that window spent waiting for data, batch waits,
    CPU cores the process tree used, and (train) the step's parts."""
    out = {"workers": workers, "peak_pss_mib": sampler.peak("pss") / common.MiB}
    for k, mode in enumerate(modes):
        recs = [r[k] for r in ranks]
        starts, ends, steady, waits, wait_in = [], [], 0, [], 0.0
        for r in recs:
            e = r["ends"]
            if len(e) < 4:
                raise RuntimeError(f"{mode}: too few steps ({len(e)}) for a steady-state window")
            warm = max(2, len(e) // 10)
            starts.append(e[warm - 1])
            ends.append(e[-1])
            steady += sum(r["rows"][warm:])
            waits += r["waits"][1:]
            wait_in += sum(r["waits"][warm:])
        t0, t1 = min(starts), max(ends)
        m = {
            "rows_per_s": steady / (t1 - t0),
            "data_wait_share": wait_in / (len(recs) * (t1 - t0)),
            "wait_p50_ms": common.percentile(waits, 50) * 1e3,
            "wait_p95_ms": common.percentile(waits, 95) * 1e3,
            "wait_max_ms": max(waits) * 1e3,
            "cores_used": sampler.cpu_between(t0, t1) / (t1 - t0),
            "ttfb_s": max(r["ends"][0] - r["t_start"] for r in recs),
        }
        if mode == "skip" and startup_s is not None:
            # fit() (and listing) to every rank's first batch: the warm-up step's, not this
            # pass's (a second epoch's opening would add its own start, ~3.7 s on 1,000 files)
            m["startup_s"] = max(r["t_first_batch"] for r in recs) - startup_s
        if mode == "train":
            parts = [p for r in recs[:1] for p in r["parts"][max(2, len(r["parts"]) // 10):]]
            m["parts_ms"] = {key: 1e3 * float(np.median([p[key] for p in parts])) for key in parts[0]}
        out[mode] = m
    return out


def medians(runs: list[dict]) -> dict:
    med = {"workers": runs[0]["workers"], "peak_pss_mib": common.median([r["peak_pss_mib"] for r in runs])}
    for mode in (m for m in MODES if m in runs[0]):
        keys = [k for k in runs[0][mode] if k != "parts_ms"]
        med[mode] = {k: common.median([r[mode].get(k) for r in runs]) for k in keys}
        if "parts_ms" in runs[0][mode]:
            med[mode]["parts_ms"] = {k: common.median([r[mode]["parts_ms"][k] for r in runs]) for k in runs[0][mode]["parts_ms"]}
    return med


# ------------------------------------------------------------------ time to first batch, 1,000 files on S3


def ttfb_many_files(n_files: int, rows_per_file: int) -> dict:
    """C at 1 worker over `n_files` small files in the embedded S3 endpoint: seconds
    from the driver's listing (plan_read) to the worker's first batch."""
    from flm_dist.storage import EmbeddedS3, Store

    with EmbeddedS3() as endpoint:
        store = Store.from_config(endpoint.storage_config())
        uri = "s3://flm-bench/many"
        store.ensure_bucket(uri)
        fs, base = store.arrow_fs(uri)
        local = tempfile.mkdtemp(prefix="flm-bench-many-")
        t0 = time.monotonic()
        names = common.write_interaction_log(local, n_files * rows_per_file, n_files, rows_per_file, "zipf")
        def put(p: str) -> None:
            with open(p, "rb") as src, fs.open_output_stream(f"{base}/{os.path.basename(p)}") as dst:
                dst.write(src.read())

        with ThreadPoolExecutor(8) as pool:
            list(pool.map(put, names))
        upload_s = time.monotonic() - t0
        shutil.rmtree(local, ignore_errors=True)
        data = RayData(uri=uri, columns=[], store=store)  # C reads the columns its plan needs
        caps = {"train": 4, "sleep5": 4, "sleep20": 4, "sleep50": 4}
        res = run_ray("C", 1, data, caps)
        # The whole `flm-dist train` path, which also checks hash collisions and writes
        # the run's caches: the first run over these files, then one that finds them cached.
        cli = [cli_two_steps(store, endpoint.url, uri, f"ttfb-{i}") for i in range(2)]
    return {"files": n_files, "rows_per_file": rows_per_file, "upload_s": upload_s, "plan_s": res["plan_s"], "ttfb_s": res["skip"]["startup_s"],
            "cli_two_steps_s": cli[0], "cli_cached_two_steps_s": cli[1]}


def cli_two_steps(store, endpoint_url: str, uri: str, name: str) -> float:
    """Seconds from launch.train (what `flm-dist train jobs/pretrain.yaml` runs, 1
    worker, 2 steps) to the end of rank 0's second step: the step audit trail's file,
    appended once per step, was last written then."""
    import glob

    from flm_dist import launch
    from flm_dist.config import load_job

    trace = tempfile.mkdtemp(prefix="flm-bench-trace-")
    job = load_job(os.path.join(common.REPO, "jobs", "pretrain.yaml"), [
        f"data.pretrain={uri}", "run.storage=s3://flm-bench/runs", f"run.name={name}", "train.epochs=1", "train.max_steps=2",
        "scaling.num_workers=1", "model.user_rows=1048576", "model.item_rows=1048576", f"storage.endpoint_url={endpoint_url}"])
    t0 = time.time()
    launch.train(job, store, progress=False, trace_rows=trace)
    first = min(os.path.getmtime(p) for p in glob.glob(os.path.join(trace, "*.bin")))
    shutil.rmtree(trace, ignore_errors=True)
    return first - t0


# ------------------------------------------------------------------ the sequence model (issues 17, 18)


SEQ_ARMS = ("L-seq-1w", "C-seq-1w", "L-seq-2w", "C-seq-2w")
TOYS = os.path.join(common.REPO, "..", "shared", "data", "Toys_and_Games.txt")


def run_sequence(data_dir: str, log_files: list[str], caps: dict, repeats: int, arms: list[str]) -> dict:
    """The sequence model (`sequence_setup`), the bare loop L against flm_dist's C at 1
    and 2 workers, on Amazon Toys as per-user sequences (real history lengths: most
    users have a handful of events); and the throughput of the history stage
    (`flm-dist data sequences`) on this harness's interaction log."""
    import glob

    from flm_dist.data.convert import convert
    from flm_dist.data.sequences import build_sequences
    from flm_dist.storage import Store

    store, root = Store(), os.path.join(data_dir, "sequences")
    shutil.rmtree(root, ignore_errors=True)  # the stage refuses to write over sequences
    print(f"history stage: {len(log_files)} files of the interaction log -> per-user sequences", flush=True)
    stage = build_sequences(store, os.path.dirname(log_files[0]), f"{root}/log")
    convert(store, "sequence", TOYS, f"{root}/toys-log", files=4)
    toys = build_sequences(store, f"{root}/toys-log", f"{root}/toys", files=4)
    setup = sequence_setup()
    files = sorted(glob.glob(f"{root}/toys/*.parquet"))
    columns = encode_spec(setup).read.columns(pq.read_schema(files[0]))
    data = RayData(uri=f"{root}/toys", columns=columns, store=store)
    make = {}
    for w in (1, 2):
        make[f"L-seq-{w}w"] = functools.partial(run_local, "L", w, files, columns, caps, setup)
        make[f"C-seq-{w}w"] = functools.partial(run_ray, "C", w, data, caps, 0, setup)
    runs = common.interleaved({a: make[a] for a in arms}, repeats)
    keep = ("input_rows", "users", "events", "files", "seconds")
    return {"stage": {k: stage[k] for k in keep}, "toys": {k: toys[k] for k in keep}, "batch_size": setup.batch_size, "cores": os.cpu_count(),
            "history_len": setup.model.history_len, "medians": {a: medians(rs) for a, rs in runs.items()}, "runs": runs}


# ------------------------------------------------------------------ main


def main() -> None:
    args = parse_args()
    if args.report_from:
        with open(args.report_from) as f:
            saved = json.load(f)
        sizes = Sizes(**{**saved["sizes"], "caps": tuple(tuple(c) for c in saved["sizes"]["caps"])})
        report(args, saved["machine"], sizes, saved["medians"], saved["runs"], saved["extra"])
        return
    common.pin_threads(args.pinned)
    sizes = QUICK if args.quick else FULL
    if args.repeats:
        sizes = replace(sizes, repeats=args.repeats)
    caps = dict(sizes.caps)
    seq_arms = [] if args.no_sequence else [a for a in SEQ_ARMS if not args.arms or a in args.arms]
    if seq_arms and not os.path.exists(TOYS):  # before an hour of the other arms, not after
        raise SystemExit(f"{TOYS} not found: the sequence arms read Amazon Toys from ../shared/data (or pass --no-sequence)")
    info = common.machine_info()
    common.print_header("run_all: arms L/A/B/C x modes x 1, 2 workers", info, args)
    t_all = time.monotonic()
    files = common.write_interaction_log(os.path.join(args.data_dir, "zipf"), sizes.rows, sizes.files, sizes.row_group_rows, "zipf")
    warm = common.warm_page_cache(files)
    columns = encode_spec().read.columns(pq.read_schema(files[0]))
    print(f"data: {sizes.rows:,} rows (Zipf 1.05 IDs), {sizes.files} files, {sizes.row_group_rows:,}-row row groups, "
          f"{warm / common.MiB:.0f} MiB read once to warm the page cache", flush=True)

    from flm_dist.storage import Store

    common.start_ray()
    data = RayData(uri=os.path.dirname(files[0]), columns=columns, store=Store())
    arms = {}
    for w in (1, 2):
        arms[f"L-{w}w"] = functools.partial(run_local, "L", w, files, columns, caps)
        arms[f"A-{w}w"] = functools.partial(run_local, "A", w, files, columns, caps)
        arms[f"B-{w}w"] = functools.partial(run_ray, "B", w, data, caps)
        arms[f"C-{w}w"] = functools.partial(run_ray, "C", w, data, caps)
    if args.arms:
        unknown = set(args.arms) - set(arms) - set(SEQ_ARMS)
        if unknown:
            raise SystemExit(f"--arms: unknown arm(s) {sorted(unknown)}; known: {sorted(arms) + list(SEQ_ARMS)}")
        arms = {k: v for k, v in arms.items() if k in args.arms}
    if arms:
        print("warm-up (untimed): C-1w", flush=True)
        run_ray("C", 1, data, dict(sizes.caps))
    runs = common.interleaved(arms, sizes.repeats)
    med = {arm: medians(rs) for arm, rs in runs.items()}
    # Saved before anything else can fail: `--report-from` rewrites the report from it.
    common.write_result(args.out, {"benchmark": "run_all", "machine": info, "args": vars(args), "sizes": asdict(sizes), "medians": med, "runs": runs, "extra": {}})

    extra = {}
    if seq_arms:
        extra["sequence"] = run_sequence(args.data_dir, files, caps, sizes.repeats, seq_arms)
        common.write_result(args.out, {"benchmark": "run_all", "machine": info, "args": vars(args), "sizes": asdict(sizes), "medians": med, "runs": runs, "extra": extra})
    if not args.no_profile:
        print("profile: C-1w, train mode, torch.profiler", flush=True)
        extra["profile"] = run_ray("C", 1, data, caps, profile_steps=sizes.profile_steps)["profile"]
    if not args.no_ttfb:
        print(f"time to first batch: C-1w over {sizes.ttfb_files} files in the embedded S3 endpoint", flush=True)
        extra["ttfb_many_files"] = ttfb_many_files(sizes.ttfb_files, 1024)
    extra["wall_s"] = time.monotonic() - t_all
    report(args, info, sizes, med, runs, extra)


# ------------------------------------------------------------------ report


def scaling_constants(med: dict) -> dict:
    """This machine's constants for T(N) ≈ min(N·r_compute, ingest, storage, N·B/(t_step + t_comm(N)))."""
    sizes = table_sizes(ModelConfig(), FEATURES)
    dim = ModelConfig().embedding_dim
    out = {}
    l1, l2, c1, c2 = (med.get(k, {}) for k in ("L-1w", "L-2w", "C-1w", "C-2w"))
    if l1:
        out["r_compute_rows_per_s_per_worker"] = l1["train"]["rows_per_s"]
        out["t_step_ms_1w"] = sum(v for k, v in l1["train"]["parts_ms"].items() if k in ("forward", "backward", "optimizer"))
    if c1:
        out["ingest_rows_per_s_per_core_C"] = c1["skip"]["rows_per_s"] / max(c1["skip"]["cores_used"], 1e-9)
    if c2 and "parts_ms" in c2["train"]:
        out["t_comm_ms_2w"] = c2["train"]["parts_ms"].get("exchange", 0.0) + c2["train"]["parts_ms"].get("ddp_allreduce", 0.0)
    # Bytes each worker sends per step, worst case (no repeated IDs in its batch): for each
    # row-wise table, IDs (8 B) out and their vectors back (dim·4 B) in the forward, the
    # row gradients (dim·4 B) in the backward, all but 1/N of them to other workers.
    row_wise = [n for n, rows in sizes.items() if rows * dim * 4 > SHARD_THRESHOLD]
    out["row_wise_tables"] = row_wise
    out["a2a_bytes_per_row_per_table"] = 8 + 2 * dim * 4
    out["a2a_bytes_per_step_upper"] = BATCH_SIZE * len(row_wise) * (8 + 2 * dim * 4)
    dense = sum(p.numel() for n, p in FLM(ModelConfig(), list(FEATURES), table_device="meta").named_parameters() if not n.startswith("tables"))
    out["dense_params"] = dense
    out["allreduce_bytes_per_step"] = 2 * dense * 4  # ring all-reduce moves ~2x the gradient bytes
    return out


def report(args, info: dict, sizes: Sizes, med: dict, runs: dict, extra: dict) -> None:
    def rate(arm, mode):
        return med.get(arm, {}).get(mode, {}).get("rows_per_s")

    r = common.ratio
    ratios = {
        "C/L train 1w (target >= 0.85)": r(rate("C-1w", "train"), rate("L-1w", "train")),
        "C/L train 2w": r(rate("C-2w", "train"), rate("L-2w", "train")),
        "C/A skip 1w": r(rate("C-1w", "skip"), rate("A-1w", "skip")),
        "C/A skip 2w": r(rate("C-2w", "skip"), rate("A-2w", "skip")),
        "C/B skip 1w": r(rate("C-1w", "skip"), rate("B-1w", "skip")),
        "C/B skip 2w": r(rate("C-2w", "skip"), rate("B-2w", "skip")),
        "C/B train 1w (target >= 1.5)": r(rate("C-1w", "train"), rate("B-1w", "train")),
        "C/B train 2w": r(rate("C-2w", "train"), rate("B-2w", "train")),
    }
    for arm in ("L", "A", "B", "C"):
        for mode in ("sleep5", "sleep20", "sleep50", "train"):
            one, two = rate(f"{arm}-1w", mode), rate(f"{arm}-2w", mode)
            if one and two:
                tag = " (target >= 0.9)" if arm == "C" and mode == "sleep20" else ""
                ratios[f"{arm} scaling 1->2w {mode}{tag}"] = two / (2 * one)
    for arm in med:
        for mode in ("sleep5", "sleep20", "sleep50"):
            limit = (1 if arm.endswith("1w") else 2) * BATCH_SIZE / (float(mode[5:]) / 1e3)
            if rate(arm, mode):
                ratios[f"{arm} {mode} / sleep-only limit"] = rate(arm, mode) / limit
    seq = extra.get("sequence")
    if seq:
        sm = seq["medians"]

        def srate(arm, mode):
            return sm.get(arm, {}).get(mode, {}).get("rows_per_s")

        ratios["C-seq/L-seq train 1w (target >= 0.8)"] = r(srate("C-seq-1w", "train"), srate("L-seq-1w", "train"))
        ratios["C-seq/L-seq train 2w"] = r(srate("C-seq-2w", "train"), srate("L-seq-2w", "train"))
        for arm in ("L-seq", "C-seq"):
            for mode in ("train", "sleep20"):
                one, two = srate(f"{arm}-1w", mode), srate(f"{arm}-2w", mode)
                if one and two:
                    ratios[f"{arm} scaling 1->2w {mode}"] = two / (2 * one)
    ratios = {k: v for k, v in ratios.items() if v is not None}

    with common.captured() as cap:
        print(f"### rows/s by arm and mode (medians of {sizes.repeats} interleaved rounds; batch {BATCH_SIZE}, "
              f"{sizes.rows:,} rows in {sizes.files} local Parquet files; steps per pass: {dict(sizes.caps)}, skip = whole share)\n")
        print(common.markdown_table(["arm", *MODES, "skip TTFB s", "startup s", "peak PSS MiB"],
              [[a, *(m[mode]["rows_per_s"] for mode in MODES), m["skip"]["ttfb_s"], m["skip"].get("startup_s"), m["peak_pss_mib"]] for a, m in med.items()]))
        print("\n### data wait, CPU (share of each window spent waiting for a batch; cores the process tree used)\n")
        print(common.markdown_table(["arm", *(f"{mode} wait" for mode in MODES), "skip cores", "train cores", "train wait p95 ms"],
              [[a, *(m[mode]["data_wait_share"] for mode in MODES), m["skip"]["cores_used"], m["train"]["cores_used"], m["train"]["wait_p95_ms"]] for a, m in med.items()]))
        print("\n### step-time breakdown, train mode (rank 0, ms, medians)\n")
        keys = ["data_wait", "forward", "backward", "optimizer", "exchange", "ddp_allreduce", "sync"]
        print(common.markdown_table(["arm", *keys], [[a, *(m["train"]["parts_ms"].get(k) for k in keys)] for a, m in med.items() if "parts_ms" in m["train"]]))
        print("\nexchange: row-wise all-to-alls and replicated-table all-gathers, inside forward/backward; ddp_allreduce: "
              "DDP's gradient buckets (overlaps backward; an upper bound); sync: the per-step control all-reduce.\n")
        if seq:
            sequence_section(seq)
        print("### ratios\n")
        print(common.markdown_table(["ratio", "value"], [[k, v] for k, v in ratios.items()]))
        if "ttfb_many_files" in extra:
            t = extra["ttfb_many_files"]
            print(f"\n### time to first batch, many files on the embedded S3 endpoint\n\nC-1w over {t['files']:,} files "
                  f"({t['rows_per_file']:,} rows each): {t['ttfb_s']:.1f} s from listing to the worker's first batch "
                  f"(target <= 10 s), of which {t['plan_s']:.1f} s listing the files and reading their footers; the rest "
                  f"starts the Ray Train worker group and reads the first blocks.")
            if "cli_two_steps_s" in t:
                print(f"\nThe whole `flm-dist train` path (`launch.train`, `jobs/pretrain.yaml`, 1 worker) over the same files, to the "
                      f"end of its second step: {t['cli_two_steps_s']:.1f} s for the first run over them, {t['cli_cached_two_steps_s']:.1f} s "
                      f"for a run that finds their footers and ID counts in `run.storage/_cache`.")
        if "profile" in extra:
            p = extra["profile"]
            print(f"\n### profile of C-1w, train mode (torch.profiler, {p['steps']} steps, self CPU time)\n")
            print(common.markdown_table(["op", "self CPU ms", "share", "calls"], [[e["op"], e["self_cpu_ms"], e["share"], e["calls"]] for e in p["top"]]))
        sc = scaling_constants(med)
        print("\n### scaling-model constants (this machine)\n")
        print(common.markdown_table(["constant", "value"], [[k, v if not isinstance(v, list) else ", ".join(v)] for k, v in sc.items()]))
        print(f"\nwhole run: {extra['wall_s'] / 60:.1f} min")
    result = {"benchmark": "run_all", "machine": info, "args": vars(args), "sizes": asdict(sizes), "batch_size": BATCH_SIZE,
              "medians": med, "ratios": ratios, "extra": extra, "scaling_constants": sc, "runs": runs}
    common.write_result(args.out, result)
    stem = os.path.splitext(args.out)[0]
    plots(stem, med, info)
    if not args.no_md:
        cmd = "python bench/run_all.py" + (" --quick" if args.quick else "") + (" --pinned" if args.pinned else "")
        common.update_benchmarks_md("run_all", cap.text() + f"\n\n![rows/s by arm and mode]({os.path.relpath(stem, common.REPO)}_rows_per_s.png)"
                                    f"\n![step breakdown]({os.path.relpath(stem, common.REPO)}_step_parts.png)", cmd, info)


def sequence_section(seq: dict) -> None:
    sm = seq["medians"]
    modes = [m for m in MODES if m in next(iter(sm.values()))]
    toys, stage = seq["toys"], seq["stage"]
    print(f"### sequence model: bare loop (L-seq) vs flm_dist (C-seq)\n\n`jobs/pretrain_sequence.yaml`'s model and "
          f"objective (a causal Transformer over the last {seq['history_len']} items, next-item sampled softmax with "
          f"in-batch and uniform negatives, batch {seq['batch_size']:,}) on Amazon Toys as per-user sequences "
          f"({toys['events']:,} events of {toys['users']:,} users, expanded into one example per event in the read "
          f"tasks; L expands them in memory first). rows/s, medians:\n")
    print(common.markdown_table(["arm", *modes, "train cores", "train wait share", "skip TTFB s"],
          [[a, *(m[mode]["rows_per_s"] for mode in modes), m["train"]["cores_used"], m["train"]["data_wait_share"], m["skip"]["ttfb_s"]] for a, m in sm.items()]))
    keys = ["data_wait", "forward", "backward", "optimizer", "exchange", "ddp_allreduce", "sync"]
    print("\nstep breakdown, train mode (rank 0, ms, medians):\n")
    print(common.markdown_table(["arm", *keys], [[a, *(m["train"]["parts_ms"].get(k) for k in keys)] for a, m in sm.items() if "parts_ms" in m["train"]]))
    print(f"\nhistory stage (`flm-dist data sequences`, a Ray Data hash shuffle by user, {seq.get('cores', '?')} cores): "
          f"this harness's log, {stage['input_rows']:,} events of {stage['users']:,} users into {stage['files']} files in "
          f"{stage['seconds']:.1f} s = {stage['input_rows'] / stage['seconds']:,.0f} events/s; Toys, {toys['input_rows']:,} "
          f"events in {toys['seconds']:.1f} s (its fixed start dominates).\n")


def plots(stem: str, med: dict, info: dict) -> None:
    if not med:  # only the sequence arms ran
        return
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6), sharey=True)
    for ax, w in zip(axes, (1, 2), strict=True):
        arms = [a for a in med if a.endswith(f"{w}w")]
        x = np.arange(len(MODES))
        width = 0.8 / max(1, len(arms))
        for k, a in enumerate(arms):
            ax.bar(x + k * width, [med[a][m]["rows_per_s"] for m in MODES], width, label=a)
        ax.set_xticks(x + 0.4 - width / 2, MODES)
        ax.set_title(f"{w} worker{'s' if w > 1 else ''}: rows/s (nproc {info['nproc']})", fontsize=10)
        ax.set_yscale("log")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(stem + "_rows_per_s.png", dpi=110)
    plt.close(fig)
    keys = ["data_wait", "forward", "backward", "optimizer", "sync"]
    arms = [a for a in med if "parts_ms" in med[a]["train"]]
    fig, ax = plt.subplots(figsize=(7, 3.4))
    bottom = np.zeros(len(arms))
    for k in keys:
        vals = np.array([med[a]["train"]["parts_ms"].get(k, 0.0) for a in arms])
        ax.bar(arms, vals, bottom=bottom, label=k)
        bottom += vals
    ax.set_ylabel("ms per step (rank 0)")
    ax.set_title("train-mode step breakdown (exchange is inside forward/backward)", fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(stem + "_step_parts.png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
