"""Issue 3 — ingest cost in skip mode: every batch is pulled and touched, no model step.

Arms (same files, columns, hashing and batch size in every arm):
  A  plain reader: ParquetFile.iter_batches -> encode_table (flm_dist's hashing and
     validation) -> torch.from_numpy, one prefetch thread, no Ray; in its own process.
  B  vanilla Ray: TorchTrainer + ray.data.read_parquet(columns=...) + map_batches(the
     same encode_table) + get_dataset_shard(...).iter_torch_batches(batch_size=...),
     everything else at its defaults.
  C  flm_dist as `launch.train` runs it: plan_read -> InteractionDatasource per-rank
     shares through FLMDataConfig -> BatchStream (seeded shuffle of read units and a
     window of batches) in a TorchTrainer worker; `-noshuf` turns the shuffle off.
B and C run with 1 and 2 workers, sized by `launch.resources` so Ray Data keeps a CPU
(the Ray recipe's default of 1 CPU per worker would starve the read tasks on 2 cores).

Figures per arm (medians over interleaved repeats): steady-state rows/s (batches
after a warm-up share excluded; both ends of the window are batch arrival times),
CPU cores the whole process tree used in that window and rows/s per core, time to
first batch, p50/p95/max wait for a batch, peak memory of the process tree (summed
PSS, which counts Ray's shared-memory object store once; summed RSS as an upper
bound) and the object store's peak bytes in use (raylet store stats). End-to-end
rows/s (first request to last batch) shows what read-ahead hides from the steady
window. Also the raw hashing rate (IDs/s on one core) and the ratios C/A per core,
C/B, shuffle on/off, 2 workers/1 worker, uniform/Zipf IDs and (--s3) S3/local.

    python bench/ingest.py [--quick] [--pinned] [--s3] [--arms A,B-1w,...] [--repeats N] [--sleep-ms T]
                           [--out bench/results/ingest.json]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import queue
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, replace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402 - the benchmarks' shared helpers live next to this file

from flm_dist.config import FeatureConfig, ModelConfig  # noqa: E402
from flm_dist.data.batches import BatchStream  # noqa: E402
from flm_dist.data.encode import EncodeSpec, encode_table  # noqa: E402
from flm_dist.data.hashing import HashSpec  # noqa: E402
from flm_dist.data.schema import ReadSpec  # noqa: E402
from flm_dist.model import table_sizes  # noqa: E402

BATCH_SIZE = 4096  # data.batch_size's default
PREFETCH = 4  # data.prefetch_batches's default; arm A's queue depth too
SHUFFLE_WINDOW = 8  # data.shuffle_window's default
BLOCK_ROWS = 65536  # data.read_block_rows's default
SEED = 0
# A ctr job with two string features: IDs hashed as int64, features as strings, a label checked.
FEATURES = (FeatureConfig(name="u_segment", side="user"), FeatureConfig(name="i_category", side="item"))
TASK = "ctr"


@dataclass(frozen=True)
class Sizes:
    rows: int
    files: int
    row_group_rows: int
    repeats: int
    warmup: bool  # one untimed Ray run first, so no arm pays for cold worker processes


FULL = Sizes(rows=1 << 21, files=16, row_group_rows=65536, repeats=3, warmup=True)
QUICK = Sizes(rows=1 << 19, files=8, row_group_rows=65536, repeats=1, warmup=False)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="small data, one round, fewer arms: a smoke test")
    p.add_argument("--pinned", action="store_true", help="one thread per process (OMP/torch/Arrow), as the protocol's pinned run")
    p.add_argument("--s3", action="store_true", help="add C-2w reading from the embedded S3 endpoint (request overhead)")
    p.add_argument("--arms", type=lambda v: v.split(","), default=None, help="comma-separated subset of arms to run, e.g. A,B-1w,C-1w")
    p.add_argument("--sleep-ms", type=float, default=0.0, help="sleep-step mode: sleep this long per batch instead of only touching it")
    p.add_argument("--data-dir", default=os.path.join(tempfile.gettempdir(), "flm-bench-ingest"), help="where the Parquet files are written (reused when they match)")
    p.add_argument("--repeats", type=int, default=None, help="interleaved rounds (default: 3 full, 1 quick)")
    p.add_argument("--out", default="bench/results/ingest.json")
    return p.parse_args()


def encode_spec() -> EncodeSpec:
    hs = HashSpec.build(table_sizes(ModelConfig(), FEATURES), ModelConfig().hash_seed)
    return EncodeSpec(read=ReadSpec.for_task(TASK, FEATURES, (1.0, 5.0)), hash=hs)


# ------------------------------------------------------------------ touching batches


def touch(batch) -> int:
    """Read every user and item row once (as a model's lookup would); return the rows."""
    user, item = (batch["user"], batch["item"]) if isinstance(batch, dict) else (batch.user, batch.item)
    _ = int(user.sum()) + int(item.sum())
    return len(user)


def consume(batches, sleep_s: float) -> dict:
    """Pull every batch; per batch, when it arrived, its rows and how long we waited."""
    t_start = time.monotonic()
    arrivals, rows, waits = [], [], []
    it = iter(batches)
    while True:
        t0 = time.monotonic()
        try:
            b = next(it)
        except StopIteration:
            break
        t1 = time.monotonic()
        n = touch(b)
        arrivals.append(t1)
        waits.append(t1 - t0)
        rows.append(n)
        if sleep_s:
            time.sleep(sleep_s)
    return {"t_start": t_start, "arrivals": arrivals, "rows": rows, "waits": waits}


# ------------------------------------------------------------------ arm A: plain reader


def plain_batches(files: list[str], columns: list[str], spec: EncodeSpec):
    """ParquetFile.iter_batches -> encode_table -> torch.from_numpy, produced by one
    thread into a queue of PREFETCH batches."""
    q: queue.Queue = queue.Queue(maxsize=PREFETCH)

    def produce():
        try:
            for path in files:
                pf = pq.ParquetFile(path)
                for rb in pf.iter_batches(batch_size=BATCH_SIZE, columns=columns):
                    cols = encode_table(pa.Table.from_batches([rb]), spec)
                    q.put({k: torch.from_numpy(v) for k, v in cols.items()})
        finally:
            q.put(None)

    threading.Thread(target=produce, daemon=True, name="prefetch").start()
    while (b := q.get()) is not None:
        yield b


def _plain_reader_child(files: list[str], columns: list[str], sleep_s: float, out_path: str) -> None:
    """Arm A's process (spawned, no Ray runtime): read, hash, consume, write records."""
    rec = consume(plain_batches(files, columns, encode_spec()), sleep_s)
    with open(out_path, "w") as f:
        json.dump([rec], f)


def run_plain(files: list[str], columns: list[str], sleep_s: float) -> dict:
    out = tempfile.mktemp(suffix=".json", prefix="flm-bench-a-")
    proc = mp.get_context("spawn").Process(target=_plain_reader_child, args=(files, columns, sleep_s, out))
    proc.start()
    # The sampler watches only this process: the idle Ray runtime is not arm A's cost.
    with common.TreeSampler(proc.pid, include_root=True) as sampler:
        proc.join()
    if proc.exitcode != 0:
        raise RuntimeError(f"arm A exited with code {proc.exitcode}")
    with open(out) as f:
        ranks = json.load(f)
    os.unlink(out)
    return figures(ranks, sampler, t_launch=None, setup_s=0.0, workers=1)


# ------------------------------------------------------------------ arms B and C: Ray Train workers


def consume_worker(config: dict) -> None:
    """train_loop_per_worker for B and C: what the train loop does with its data,
    minus the model. Each rank writes its records to `out_dir`."""
    import ray.train

    rank = ray.train.get_context().get_world_rank()
    torch.set_num_threads(config["threads"])
    shard = ray.train.get_dataset_shard("train")
    if config["arm"] == "B":
        # The Ray recipe, defaults everywhere but the batch size.
        batches = shard.iter_torch_batches(batch_size=BATCH_SIZE)
    else:
        # As train_loop.Worker.train builds it (seed per rank, epoch 0).
        stream = BatchStream(
            shard,
            BATCH_SIZE,
            FEATURES,
            shuffle_window=config["shuffle_window"],
            seed=SEED * 1000 + rank,
            prefetch_batches=PREFETCH,
        )
        batches = (b for b, *_ in stream.epoch(0) if b is not None)
    rec = consume(batches, config["sleep_s"])
    with open(os.path.join(config["out_dir"], f"rank-{rank}.json"), "w") as f:
        json.dump(rec, f)


@dataclass
class RayData:
    uri: str  # directory or s3:// prefix
    columns: list[str]
    store: object  # flm_dist.storage.Store


def run_ray(arm: str, workers: int, data: RayData, shuffle: bool, sleep_s: float) -> dict:
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from flm_dist.config import ScalingConfig as FLMScaling
    from flm_dist.launch import resources

    node_cpus = [float(n["Resources"].get("CPU", 0.0)) for n in ray.nodes() if n.get("Alive")]
    cpw, threads = resources(FLMScaling(num_workers=workers), node_cpus)
    out_dir = tempfile.mkdtemp(prefix="flm-bench-ranks-")
    storage = tempfile.mkdtemp(prefix="flm-bench-train-")
    spec = encode_spec()
    t_setup = time.monotonic()
    kwargs = common.ray_train_data(arm, data.store, data.uri, data.columns, spec, shuffle, SEED, BLOCK_ROWS, cpw)
    setup_s = time.monotonic() - t_setup
    config = {"arm": arm, "threads": threads, "shuffle_window": SHUFFLE_WINDOW if shuffle else 1, "sleep_s": sleep_s, "out_dir": out_dir}
    trainer = TorchTrainer(
        consume_worker,
        train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=workers, resources_per_worker={"CPU": cpw}),
        run_config=RunConfig(name=f"ingest-{arm}-{workers}w-{time.time_ns()}", storage_path=storage),
        **kwargs,
    )
    # Descendants of this driver: every Ray process, including the object store.
    with common.TreeSampler(os.getpid(), extra=object_store_used()) as sampler:
        t_launch = time.monotonic()
        trainer.fit()
    ranks = []
    for r in range(workers):
        with open(os.path.join(out_dir, f"rank-{r}.json")) as f:
            ranks.append(json.load(f))
    shutil.rmtree(out_dir, ignore_errors=True)
    shutil.rmtree(storage, ignore_errors=True)
    res = figures(ranks, sampler, t_launch=t_launch, setup_s=setup_s, workers=workers)
    res["cpus_per_worker"] = cpw
    return res


def object_store_used():
    """A function returning the bytes in use in this node's Ray object store (the
    raylet's store stats, as `ray memory --stats-only` prints them), or None."""
    import ray
    from ray._private.internal_api import get_memory_info_reply

    node = next((n for n in ray.nodes() if n.get("Alive")), None)
    if node is None:
        return None

    def used() -> int:
        reply = get_memory_info_reply(None, node["NodeManagerAddress"], node["NodeManagerPort"], timeout_seconds=5)
        return int(reply.store_stats.object_store_bytes_used)

    return used


# ------------------------------------------------------------------ figures


def figures(ranks: list[dict], sampler: common.TreeSampler, t_launch: float | None, setup_s: float, workers: int) -> dict:
    """Steady-state rate over the union of the ranks' windows: each rank's window runs
    from the arrival of its last warm-up batch to the arrival of its last batch, and
    counts the rows of the batches that arrived after the start, up to and including
    the end (the same rule at both ends, and in every arm)."""
    starts, ends, steady_rows, waits, ttfb, first = [], [], 0, [], [], []
    total_rows = 0
    for r in ranks:
        arr, rows = r["arrivals"], r["rows"]
        if len(arr) < 4:
            raise RuntimeError(f"too few batches ({len(arr)}) for a steady-state window: use more rows")
        warm = max(2, len(arr) // 10)
        starts.append(arr[warm - 1])
        ends.append(arr[-1])
        steady_rows += sum(rows[warm:])
        total_rows += sum(rows)
        waits += r["waits"][1:]  # the first wait is the time to first batch
        ttfb.append(arr[0] - r["t_start"])
        first.append(arr[0])
    t0, t1 = min(starts), max(ends)
    rate = steady_rows / (t1 - t0)
    # From the first request for data to the last batch: includes the pipeline's
    # start and any read-ahead that a steady-state window would not see.
    e2e = total_rows / (max(ends) - min(r["t_start"] for r in ranks))
    cores = sampler.cpu_between(t0, t1) / (t1 - t0)
    return {
        "rows": total_rows,
        "rows_per_s": rate,
        "e2e_rows_per_s": e2e,
        "cores_used": cores,
        "rows_per_s_per_core": rate / cores if cores > 0 else None,
        # all ranks must have their first batch before a (collective) step can run
        "ttfb_s": max(ttfb),
        "startup_s": setup_s + (max(first) - t_launch if t_launch is not None else max(ttfb)),
        "wait_p50_ms": common.percentile(waits, 50) * 1e3,
        "wait_p95_ms": common.percentile(waits, 95) * 1e3,
        "wait_max_ms": max(waits) * 1e3,
        "peak_pss_mib": sampler.peak("pss") / common.MiB,
        "peak_rss_sum_mib": sampler.peak("rss") / common.MiB,
        "idle_pss_mib": sampler.first("pss") / common.MiB,
        "object_store_peak_mib": sampler.peak("store") / common.MiB if sampler.peak("store") else None,
        "shm_growth_mib": (sampler.peak("shm") - sampler.first("shm")) / common.MiB,
        "workers": workers,
    }


def hash_throughput(n: int, repeats: int) -> dict:
    """IDs/s of `HashSpec.hash` on one core (numpy's element-wise ops are single-threaded),
    for int64 IDs and for 12-character string IDs."""
    rng = np.random.default_rng(1)
    spec = encode_spec().hash
    ints = pa.array(common.ids_from_ranks(rng.integers(0, 1 << 40, n), 3), pa.int64())
    strs = pa.array([f"{x:012x}" for x in rng.integers(0, 1 << 48, n)])
    out = {}
    for name, arr in (("int64", ints), ("string12", strs)):
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            spec.hash("user", arr)
            times.append(time.perf_counter() - t0)
        out[f"{name}_ids_per_s"] = n / common.median(times)
    return out


# ------------------------------------------------------------------ main


def arms_for(args, files: dict[str, list[str]], columns: list[str], local: dict[str, RayData], s3: RayData | None) -> dict:
    sleep_s = args.sleep_ms / 1e3
    arms = {
        "A": lambda: run_plain(files["zipf"], columns, sleep_s),
        "B-1w": lambda: run_ray("B", 1, local["zipf"], False, sleep_s),
        "C-1w": lambda: run_ray("C", 1, local["zipf"], True, sleep_s),
        "C-1w-noshuf": lambda: run_ray("C", 1, local["zipf"], False, sleep_s),
        "B-2w": lambda: run_ray("B", 2, local["zipf"], False, sleep_s),
        "C-2w": lambda: run_ray("C", 2, local["zipf"], True, sleep_s),
        "C-2w-noshuf": lambda: run_ray("C", 2, local["zipf"], False, sleep_s),
        "A-uniform": lambda: run_plain(files["uniform"], columns, sleep_s),
        "C-2w-uniform": lambda: run_ray("C", 2, local["uniform"], True, sleep_s),
    }
    if s3 is not None:
        arms["C-2w-s3"] = lambda: run_ray("C", 2, s3, True, sleep_s)
    if args.arms:
        unknown = set(args.arms) - set(arms)
        if unknown:
            raise SystemExit(f"--arms: unknown {sorted(unknown)}; arms are {list(arms)} (C-2w-s3 needs --s3)")
        return {k: arms[k] for k in args.arms}
    if args.quick:
        # B's first batch waits for Ray Data's file listing (32 FooterReader actors in
        # Ray 2.60), tens of seconds on 2 cores: smoke-test it with --quick --arms B-1w.
        keep = ["A", "C-1w", "C-2w"] + (["C-2w-s3"] if s3 is not None else [])
        arms = {k: arms[k] for k in keep}
    return arms


def upload_to_s3(endpoint, files: list[str], columns: list[str]) -> RayData:
    import pyarrow.fs as pafs

    from flm_dist.storage import Store

    store = Store.from_config(endpoint.storage_config())
    uri = "s3://flm-bench/ingest"
    store.ensure_bucket(uri)
    fs, base = store.arrow_fs(uri)
    for p in files:
        pafs.copy_files(p, f"{base}/{os.path.basename(p)}", destination_filesystem=fs)
    return RayData(uri=uri, columns=columns, store=store)


def main() -> None:
    args = parse_args()
    common.pin_threads(args.pinned)
    sizes = QUICK if args.quick else FULL
    if args.repeats:
        sizes = replace(sizes, repeats=args.repeats)
    info = common.machine_info()
    common.print_header("ingest (skip mode)" if not args.sleep_ms else f"ingest (sleep-step {args.sleep_ms} ms)", info, args)

    files = {
        dist: common.write_interaction_log(os.path.join(args.data_dir, dist), sizes.rows, sizes.files, sizes.row_group_rows, dist)
        for dist in ("zipf", "uniform")
    }
    warm = sum(common.warm_page_cache(f) for f in files.values())
    columns = encode_spec().read.columns(pq.read_schema(files["zipf"][0]))
    print(f"data: {sizes.rows:,} rows x 2 distributions, {sizes.files} files, {sizes.row_group_rows:,}-row row groups, "
          f"{warm / common.MiB:.0f} MiB read once to warm the page cache; columns {columns}", flush=True)

    hashing = hash_throughput(1 << 20 if not args.quick else 1 << 18, 5 if not args.quick else 2)
    print(f"hashing on one core: {', '.join(f'{k}={v:,.0f}' for k, v in hashing.items())}", flush=True)

    from flm_dist.storage import Store

    common.start_ray()
    local = {d: RayData(uri=os.path.dirname(f[0]), columns=columns, store=Store()) for d, f in files.items()}
    endpoint = s3 = None
    if args.s3:
        from flm_dist.storage import EmbeddedS3

        endpoint = EmbeddedS3().start()
        s3 = upload_to_s3(endpoint, files["zipf"], columns)
    try:
        if sizes.warmup:
            print("warm-up run (untimed): C-2w", flush=True)
            run_ray("C", 2, local["zipf"], True, 0.0)
        runs = common.interleaved(arms_for(args, files, columns, local, s3), sizes.repeats)
    finally:
        if endpoint is not None:
            endpoint.stop()
    with common.captured() as cap:
        report(args, info, sizes, hashing, runs)
    if not args.quick:
        common.update_benchmarks_md('ingest', cap.text(), "python bench/ingest.py" + (" --quick" if args.quick else "") + (" --pinned" if args.pinned else "") + (f" --sleep-ms {args.sleep_ms:g}" if args.sleep_ms else ""), info)


def report(args, info: dict, sizes: Sizes, hashing: dict, runs: dict[str, list[dict]]) -> None:
    med = {arm: common.medians(rs) for arm, rs in runs.items()}

    def r(a: str, b: str, key: str = "rows_per_s") -> float | None:
        return common.ratio(med.get(a, {}).get(key), med.get(b, {}).get(key))

    ratios = {
        "C-1w/A rows/s per core": r("C-1w", "A", "rows_per_s_per_core"),
        "C-2w/A rows/s per core": r("C-2w", "A", "rows_per_s_per_core"),
        "C-1w/A rows/s": r("C-1w", "A"),
        "C-1w/B-1w rows/s": r("C-1w", "B-1w"),
        "C-2w/B-2w rows/s": r("C-2w", "B-2w"),
        # B's read-ahead can buffer most of a small dataset before its first batch: its
        # steady window then times iteration from memory; e2e includes the start.
        "C-1w/B-1w e2e rows/s": r("C-1w", "B-1w", "e2e_rows_per_s"),
        "C-2w/B-2w e2e rows/s": r("C-2w", "B-2w", "e2e_rows_per_s"),
        "C-1w/A e2e rows/s": r("C-1w", "A", "e2e_rows_per_s"),
        "C-1w-noshuf/B-1w rows/s": r("C-1w-noshuf", "B-1w"),
        "C-2w-noshuf/B-2w rows/s": r("C-2w-noshuf", "B-2w"),
        "shuffle on/off C-1w rows/s": r("C-1w", "C-1w-noshuf"),
        "shuffle on/off C-2w rows/s": r("C-2w", "C-2w-noshuf"),
        "C 2w/1w rows/s": r("C-2w", "C-1w"),
        "B 2w/1w rows/s": r("B-2w", "B-1w"),
        "uniform/zipf A rows/s": r("A-uniform", "A"),
        "uniform/zipf C-2w rows/s": r("C-2w-uniform", "C-2w"),
        "s3/local C-2w rows/s": r("C-2w-s3", "C-2w"),
    }
    ratios = {k: v for k, v in ratios.items() if v is not None}
    header = ["arm", "workers", "rows/s", "e2e rows/s", "cores", "rows/s/core", "TTFB s", "startup s",
              "wait p50 ms", "p95 ms", "max ms", "peak PSS MiB", "idle PSS MiB", "obj store MiB"]
    rows = [
        [arm, m["workers"], m["rows_per_s"], m["e2e_rows_per_s"], m["cores_used"], m["rows_per_s_per_core"], m["ttfb_s"],
         m["startup_s"], m["wait_p50_ms"], m["wait_p95_ms"], m["wait_max_ms"], m["peak_pss_mib"], m["idle_pss_mib"],
         m["object_store_peak_mib"]]
        for arm, m in med.items()
    ]
    print()
    print(f"## ingest, {'skip mode' if not args.sleep_ms else f'sleep-step {args.sleep_ms} ms'}: medians of {sizes.repeats} interleaved round(s), "
          f"batch {BATCH_SIZE}, {sizes.rows:,} rows; nproc={info['nproc']}, loadavg at start {info['loadavg_at_start']}")
    print(common.markdown_table(header, rows))
    print()
    print(common.markdown_table(["ratio", "value"], [[k, v] for k, v in ratios.items()]))
    print()
    print(common.markdown_table(["hashing (1 core)", "IDs/s"], [[k, v] for k, v in hashing.items()]))
    print("\nrows/s: steady state (first 10% of each rank's batches excluded); e2e: first request to last batch. "
          "B and C run with launch.resources' CPUs per worker (1 worker: 1.0; 2 workers: 0.5 each). "
          "Peak/idle PSS: the process tree (A: its own process; B, C: every Ray process), before the arm and at its peak.")
    result = {
        "benchmark": "ingest",
        "mode": "skip" if not args.sleep_ms else f"sleep-step {args.sleep_ms} ms",
        "machine": info,
        "args": vars(args),
        "sizes": vars(sizes),
        "batch_size": BATCH_SIZE,
        "hashing_ids_per_s_one_core": hashing,
        "medians": med,
        "ratios": ratios,
        "runs": runs,
    }
    common.write_result(args.out, result)
    stem = os.path.splitext(args.out)[0]
    labels = list(med)
    common.bar_plot(stem + "_rows_per_s.png", f"ingest rows/s (skip mode, batch {BATCH_SIZE}, nproc {info['nproc']})", "rows/s", labels, [med[a]["rows_per_s"] for a in labels])
    common.bar_plot(stem + "_rows_per_core.png", "ingest rows/s per CPU core used", "rows/s/core", labels, [med[a]["rows_per_s_per_core"] for a in labels])


if __name__ == "__main__":
    main()
