"""Helpers shared by the benchmark scripts in bench/: machine facts, synthetic
interaction logs, a sampler of a process tree's CPU and memory, spawned gloo ranks,
statistics, and output (JSON, markdown, PNG).

The rules these serve (the project's benchmark protocol): arms run interleaved
(A B C A B C ...), figures are medians over repeats, and the headline numbers are
RATIOS of arms measured side by side in one run, printed with the machine they ran on.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import multiprocessing as mp
import os
import pickle
import platform
import queue as queue_mod
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

__all__ = [
    "TreeSampler",
    "captured",
    "current_rss",
    "fmt",
    "interleaved",
    "machine_info",
    "markdown_table",
    "median",
    "peak_rss",
    "percentile",
    "pin_threads",
    "print_header",
    "ray_train_data",
    "ratio",
    "reset_peak_rss",
    "run_ranks",
    "warm_page_cache",
    "write_interaction_log",
    "update_benchmarks_md",
    "write_result",
]

MiB = float(1 << 20)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------------ machine and threads


def _version(pkg: str) -> str:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def machine_info() -> dict:
    """What every result is printed with: cores, memory, CPU, GPU, library versions,
    the commit (and whether the tree had local changes), and the load average at the
    start, which says whether the machine was shared while the numbers were taken."""
    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        pass
    gpu = None
    try:
        import torch

        gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except Exception:  # noqa: BLE001 - a missing GPU stack is "no GPU"
        gpu = None
    return {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "nproc": os.cpu_count(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "cpu": cpu,
        "gpu": gpu,
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "versions": {p: _version(p) for p in ("flm_dist", "torch", "ray", "pyarrow", "numpy")},
        "git": {"commit": _git("rev-parse", "--short", "HEAD"), "dirty": bool(_git("status", "--porcelain"))},
        "pinned_threads": os.environ.get("OMP_NUM_THREADS") == "1",
    }


def print_header(name: str, info: dict, args) -> None:
    v = info["versions"]
    print(f"# {name}  ({info['date']})")
    print(
        f"machine: nproc={info['nproc']} memory={info['memory_gib']} GiB cpu='{info['cpu']}' gpu={info['gpu']} "
        f"loadavg={info['loadavg_at_start']}"
    )
    print(
        f"versions: flm_dist={v['flm_dist']} torch={v['torch']} ray={v['ray']} pyarrow={v['pyarrow']} "
        f"numpy={v['numpy']} python={info['python']} commit={info['git']['commit']}{'+dirty' if info['git']['dirty'] else ''}"
    )
    print(f"args: {vars(args)}", flush=True)


def pin_threads(pinned: bool) -> None:
    """The protocol's pinned run: one compute thread per process for OpenMP, torch and
    Arrow. Set in the environment as well, so Ray workers and spawned ranks (which
    inherit it, and whose Arrow reads OMP_NUM_THREADS) are pinned too."""
    if not pinned:
        return
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ["MKL_NUM_THREADS"] = "1"
    import pyarrow as pa
    import torch

    torch.set_num_threads(1)
    pa.set_cpu_count(1)


# ------------------------------------------------------------------ per-process memory


def _status_kib(key: str, pid: int | str = "self") -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def current_rss() -> int:
    return _status_kib("VmRSS") * 1024


def peak_rss() -> int:
    """This process's peak RSS since the last `reset_peak_rss` (VmHWM)."""
    return _status_kib("VmHWM") * 1024


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux: write 5 to clear_refs), so one process
    can measure the peak of several arms in turn. False where the kernel refuses."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


# ------------------------------------------------------------------ process-tree sampler


def _import_psutil():
    """psutil ships inside Ray (ray/thirdparty_files); find it there without importing Ray."""
    try:
        import psutil
    except ImportError:
        import importlib.util

        spec = importlib.util.find_spec("ray")
        for loc in spec.submodule_search_locations if spec else []:
            sys.path.append(os.path.join(loc, "thirdparty_files"))
        import psutil
    return psutil


@dataclass
class _Sample:
    t: float
    cpu_s: float  # CPU seconds used by the tree since the sampler started
    rss: int  # sum of RSS (counts shared pages once per process: an upper bound)
    pss: int | None  # sum of PSS (shared pages split between their users), when sampled
    shm: int  # bytes used in /dev/shm (Ray's object store lives there)
    store: int | None  # `extra()` when given and sampled: e.g. Ray's object store bytes in use


@dataclass
class TreeSampler:
    """Samples, in a background thread, the CPU seconds and memory of a process tree:
    `root_pid` and all its descendants (`include_root=False`: descendants only, e.g.
    the Ray processes a driver started, without the driver's own sampling thread).

    CPU: for each process seen, CPU time beyond what it had when first seen (processes
    born during the run count in full). A process that exits loses its last period.
    Memory: summed RSS (an upper bound: shared libraries and the object store count
    once per process), summed PSS (shared pages divided between the processes that
    map them: the tree's real footprint), and /dev/shm usage."""

    root_pid: int
    include_root: bool = False
    period: float = 0.1
    pss_every: int = 5  # PSS reads smaps_rollup, which walks page tables: sample it less often
    extra: Callable[[], int | None] | None = None  # sampled with PSS
    only_new: bool = False  # count only processes born after the first sample (not an idle Ray runtime)
    samples: list[_Sample] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._psutil = _import_psutil()
        self._first_cpu: dict[int, float] = {}
        self._last_cpu: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="tree-sampler")
        self._n = 0
        self._baseline_seen = False
        self._old: set[int] = set()

    def _procs(self):
        try:
            root = self._psutil.Process(self.root_pid)
            procs = root.children(recursive=True)
        except self._psutil.Error:
            return []
        procs = ([root] if self.include_root else []) + procs
        if self.only_new:
            if not self._baseline_seen:
                self._old = {p.pid for p in procs}
            procs = [p for p in procs if p.pid not in self._old]
        return procs

    def _shm(self) -> int:
        try:
            st = os.statvfs("/dev/shm")
            return (st.f_blocks - st.f_bfree) * st.f_frsize
        except OSError:
            return 0

    def sample(self) -> None:
        psutil = self._psutil
        rss, pss, want_pss = 0, 0, self._n % self.pss_every == 0
        for p in self._procs():
            try:
                with p.oneshot():
                    ct = p.cpu_times()
                    cpu = ct.user + ct.system
                    if want_pss:
                        mi = p.memory_full_info()
                        rss += mi.rss
                        pss += mi.pss
                    else:
                        rss += p.memory_info().rss
            except psutil.Error:
                continue
            if p.pid not in self._first_cpu:
                # Present at the first sample: count from now. Born later: count it all.
                self._first_cpu[p.pid] = cpu if not self._baseline_seen else 0.0
            self._last_cpu[p.pid] = cpu
        self._baseline_seen = True
        used = sum(self._last_cpu[k] - self._first_cpu[k] for k in self._last_cpu)
        store = None
        if want_pss and self.extra is not None:
            try:
                store = self.extra()
            except Exception:  # noqa: BLE001 - an optional figure; the run goes on without it
                store = None
        self.samples.append(_Sample(time.monotonic(), used, rss, pss if want_pss else None, self._shm(), store))
        self._n += 1

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            self.sample()

    def __enter__(self) -> TreeSampler:
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.sample()

    # -- queries (after the run) ----------------------------------------------------

    def cpu_between(self, t0: float, t1: float) -> float:
        """CPU seconds the tree used between monotonic times t0 and t1 (interpolated)."""
        ts = np.array([s.t for s in self.samples])
        cs = np.array([s.cpu_s for s in self.samples])
        return float(np.interp(t1, ts, cs) - np.interp(t0, ts, cs))

    def peak(self, what: str) -> int:
        vals = [getattr(s, what) for s in self.samples if getattr(s, what) is not None]
        return max(vals) if vals else 0

    def first(self, what: str) -> int:
        vals = [getattr(s, what) for s in self.samples if getattr(s, what) is not None]
        return vals[0] if vals else 0


# ------------------------------------------------------------------ synthetic data


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser: a bijection of uint64, so distinct ranks get distinct,
    random-looking 64-bit IDs without a lookup table."""
    x = x.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    x ^= x >> np.uint64(30)
    x *= np.uint64(0xBF58476D1CE4E5B9)
    x ^= x >> np.uint64(27)
    x *= np.uint64(0x94D049BB133111EB)
    x ^= x >> np.uint64(31)
    return x


def draw_ranks(rng: np.random.Generator, n: int, support: int, dist: str, exponent: float = 1.05) -> np.ndarray:
    """n draws of 0-based ranks in [0, support): Zipf-like p(k) ∝ (k+1)^-exponent, or uniform."""
    if dist == "uniform":
        return rng.integers(0, support, size=n)
    if dist != "zipf":
        raise ValueError(f"dist must be zipf or uniform, got {dist!r}")
    cdf = np.cumsum(np.arange(1, support + 1, dtype=np.float64) ** -exponent)
    cdf /= cdf[-1]
    return np.minimum(np.searchsorted(cdf, rng.random(n)), support - 1)


def ids_from_ranks(ranks: np.ndarray, salt: int) -> np.ndarray:
    """Non-negative 64-bit IDs (int64), one per rank, different per `salt`."""
    return (_mix64(ranks.astype(np.uint64) ^ np.uint64(salt)) >> np.uint64(1)).astype(np.int64)


def write_interaction_log(
    out_dir: str,
    rows: int,
    files: int,
    row_group_rows: int,
    dist: str,
    users: int = 4_000_000,
    items: int = 1_000_000,
    seed: int = 0,
) -> list[str]:
    """The interaction-log schema (user_id, item_id int64; ts; label; rating; string and
    int categorical features) as `files` Parquet files with `row_group_rows`-row row
    groups. Written once per parameter set: a matching `_bench.json` means reuse."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    params = {"rows": rows, "files": files, "row_group_rows": row_group_rows, "dist": dist, "users": users, "items": items, "seed": seed, "v": 1}
    stamp = os.path.join(out_dir, "_bench.json")
    names = [os.path.join(out_dir, f"part-{k:05d}.parquet") for k in range(files)]
    try:
        with open(stamp) as f:
            if json.load(f) == params and all(os.path.exists(n) for n in names):
                return names
    except (OSError, ValueError):
        pass
    os.makedirs(out_dir, exist_ok=True)
    rng = np.random.default_rng(seed)
    segments = pa.array([f"seg{x}" for x in range(24)])
    categories = pa.array([f"cat{x}" for x in range(32)])
    bounds = np.linspace(0, rows, files + 1).astype(np.int64)
    for k in range(files):
        n = int(bounds[k + 1] - bounds[k])
        u = draw_ranks(rng, n, users, dist)
        i = draw_ranks(rng, n, items, dist)
        t = pa.table(
            {
                "user_id": pa.array(ids_from_ranks(u, 1), pa.int64()),
                "item_id": pa.array(ids_from_ranks(i, 2), pa.int64()),
                "ts": pa.array(1_700_000_000 + rng.integers(0, 30 * 86400, n), pa.int64()),
                "label": pa.array((rng.random(n) < 0.2).astype(np.int8)),
                "rating": pa.array(rng.integers(1, 6, n).astype(np.float32)),
                "u_segment": segments.take(pa.array(u % 24)),
                "i_category": categories.take(pa.array(i % 32)),
                "i_brand": pa.array(i % 160, pa.int64()),
            }
        )
        pq.write_table(t, names[k], row_group_size=row_group_rows)
    with open(stamp, "w") as f:
        json.dump(params, f)
    return names


def warm_page_cache(paths: list[str]) -> int:
    """Read every file once so the page cache is equally warm for every arm."""
    total = 0
    for p in paths:
        with open(p, "rb") as f:
            while chunk := f.read(8 << 20):
                total += len(chunk)
    return total


# ------------------------------------------------------------------ gloo ranks (no Ray)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_entry(rank, world, port, fn, args, queue):
    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)  # one core per rank: the ranks share this machine's cores
    try:
        # Generous timeout: a replicated step all-reduces whole tables.
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=600))
        queue.put((rank, "ok", pickle.dumps(fn(rank, world, *args))))
    except BaseException:  # noqa: BLE001 - reported to the parent
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(fn, world: int, *args, timeout: float = 900.0) -> list:
    """fn(rank, world, *args) on `world` spawned processes in one gloo group; returns
    the results by rank or raises with the failing ranks' tracebacks. `fn` must be
    importable by the children (module level). Copied from tests/dist.py so the
    benchmarks do not import the test suite."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_rank_entry, args=(r, world, port, fn, args, queue)) for r in range(world)]
    for p in procs:
        p.start()
    results, errors = {}, {}
    deadline = time.monotonic() + timeout
    first_error = float("inf")
    # A `kill` of this process must not leave the ranks running: exit through `finally`.
    old_handler = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        while len(results) + len(errors) < world:
            try:
                rank, status, value = queue.get(timeout=1.0)
                (results if status == "ok" else errors)[rank] = value
                continue
            except queue_mod.Empty:
                pass
            for r, p in enumerate(procs):
                if p.exitcode not in (None, 0) and r not in results and r not in errors:
                    errors[r] = f"process exited with code {p.exitcode} before reporting"
            if errors and time.monotonic() > first_error + 10:
                break  # the other ranks are likely stuck in a collective with the failed one
            if errors and first_error == float("inf"):
                first_error = time.monotonic()
            if time.monotonic() > deadline:
                raise TimeoutError(f"ranks did not finish within {timeout}s")
    finally:
        signal.signal(signal.SIGTERM, old_handler)
        for p in procs:
            p.join(timeout=10 if not errors and len(results) == world else 0.1)
            if p.is_alive():
                p.kill()
                p.join()
    if errors:
        raise RuntimeError("\n".join(f"rank {r} failed:\n{tb}" for r, tb in sorted(errors.items())))
    return [pickle.loads(results[r]) for r in range(world)]


# ------------------------------------------------------------------ Ray Train arms B and C


def start_ray() -> None:
    """A local Ray as `launch.ensure_ray` starts it (all CPUs, dashboard on, its node
    settings `launch.RAY_NODE_ENV`, Ray Data progress bars off), except that worker logs
    stay in Ray's log files: forwarded, they would bury the results (and cost the driver
    CPU)."""
    import ray
    from ray.data import DataContext

    from flm_dist.launch import RAY_NODE_ENV

    # Ray workers import the shared helpers by name: put bench/ on their path.
    os.environ["PYTHONPATH"] = os.pathsep.join([os.path.dirname(os.path.abspath(__file__)), REPO, os.environ.get("PYTHONPATH", "")])
    for k, v in RAY_NODE_ENV.items():
        os.environ.setdefault(k, v)
    ray.init(num_cpus=os.cpu_count(), include_dashboard=True, log_to_driver=False, configure_logging=False)
    DataContext.get_current().enable_progress_bars = False


def ray_train_data(arm: str, store, uri: str, columns: list[str], spec, shuffle: bool, seed: int, block_rows: int, cpus_per_worker: float = 1.0) -> dict:
    """TorchTrainer's data arguments for arm B (the Ray recipe: read_parquet +
    map_batches(encode_table), Ray's own split) or C (flm_dist as launch.train builds
    it: plan_read -> InteractionDatasource -> per-rank shares through FLMDataConfig)."""
    import functools

    from flm_dist.data.encode import encode_table

    if arm == "B":
        import ray.data

        fs, path = store.arrow_fs(uri)
        ds = ray.data.read_parquet(path, filesystem=fs, columns=columns)
        ds = ds.map_batches(functools.partial(encode_table, spec=spec), batch_format="pyarrow")
        return {"datasets": {"train": ds}}
    from flm_dist.data.pipeline import InteractionDatasource, read
    from flm_dist.data.plan import plan_read
    from flm_dist.ingest import FLMDataConfig

    plan = plan_read(store, uri, spec.read)
    src = InteractionDatasource(plan, spec, store, shuffle, seed, block_rows, "fail")
    return {"datasets": {"train": read(src)}, "dataset_config": FLMDataConfig({"train": (src, plan.to_dict())}, store, None, cpus_per_worker=cpus_per_worker)}


# ------------------------------------------------------------------ runs and statistics


def interleaved(arms: dict[str, Callable[[], dict]], repeats: int) -> dict[str, list[dict]]:
    """Run the arms in turn, A B C A B C ..., `repeats` rounds; each call returns a
    dict of figures. Interleaving spreads a shared machine's noise over all arms."""
    runs: dict[str, list[dict]] = {name: [] for name in arms}
    for r in range(repeats):
        for name, fn in arms.items():
            t0 = time.monotonic()
            res = fn()
            runs[name].append(res)
            print(f"  round {r + 1}/{repeats} {name:<14} {time.monotonic() - t0:6.1f}s  {_brief(res)}", flush=True)
    return runs


def _brief(res: dict) -> str:
    keys = [k for k in res if _numeric(res[k])][:4]
    return " ".join(f"{k}={fmt(res[k])}" for k in keys)


def median(xs) -> float | None:
    xs = [x for x in xs if x is not None]
    return float(np.median(xs)) if xs else None


def percentile(xs, q: float) -> float | None:
    xs = [x for x in xs if x is not None]
    return float(np.percentile(xs, q)) if xs else None


def _numeric(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def medians(runs: list[dict]) -> dict:
    """Per key, the median over repeats of the numeric figures (None where a figure
    was not available in any repeat)."""
    keys = list(dict.fromkeys(k for r in runs for k, v in r.items() if _numeric(v) or v is None))
    return {k: median([r.get(k) for r in runs]) for k in keys}


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def fmt(x, digits: int = 3) -> str:
    if x is None:
        return "—"
    if isinstance(x, str):
        return x
    if isinstance(x, int) or (isinstance(x, float) and x.is_integer() and abs(x) >= 1000):
        return f"{int(x):,}"
    if abs(x) >= 100:
        return f"{x:,.0f}"
    return f"{x:.{digits}g}"


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(fmt(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write_result(path: str, result: dict) -> None:
    """Write JSON atomically (a .tmp file renamed), so a killed run leaves no half file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=2, default=str)
    os.replace(tmp, path)
    print(f"wrote {path}")


class captured:
    """Tee stdout into a buffer: a script's printed report becomes its BENCHMARKS.md section."""

    def __enter__(self):
        import io

        self.buf, self._old = io.StringIO(), sys.stdout
        outer = self

        class _Tee:
            def write(self, s):
                outer._old.write(s)
                outer.buf.write(s)
                return len(s)

            def flush(self):
                outer._old.flush()

        sys.stdout = _Tee()
        return self

    def __exit__(self, *exc) -> None:
        sys.stdout = self._old

    def text(self) -> str:
        return "\n".join(line for line in self.buf.getvalue().splitlines() if not line.startswith("wrote ")).strip()


def update_benchmarks_md(section: str, body: str, command: str, info: dict, path: str | None = None) -> None:
    """Replace (or append) the section `<!-- bench:NAME -->...<!-- /bench:NAME -->` of
    BENCHMARKS.md with `body`, headed by the command, date, machine and versions that
    produced it. Text outside the markers (analysis written by people) is kept."""
    import re

    path = path or os.path.join(REPO, "BENCHMARKS.md")
    v = info["versions"]
    head = (
        f"`{command}` — {info['date']}, commit {info['git']['commit']}{'+dirty' if info['git']['dirty'] else ''}; "
        f"machine: {info['nproc']} cores ({info['cpu']}), {info['memory_gib']} GiB, GPU: {info['gpu'] or 'none'}, "
        f"load average at start {info['loadavg_at_start']}; torch {v['torch']}, ray {v['ray']}, pyarrow {v['pyarrow']}, "
        f"python {info['python']}{', pinned threads' if info.get('pinned_threads') else ''}."
    )
    block = f"<!-- bench:{section} -->\n{head}\n\n{body.strip()}\n<!-- /bench:{section} -->"
    try:
        with open(path) as f:
            text = f.read()
    except FileNotFoundError:
        text = "# Benchmarks\n"
    pattern = re.compile(rf"<!-- bench:{re.escape(section)} -->.*?<!-- /bench:{re.escape(section)} -->", re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + f"\n\n## {section}\n\n{block}\n"
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)
    print(f"wrote {path} (section {section})")


def bar_plot(path: str, title: str, ylabel: str, labels: list[str], values: list[float | None], ref: float | None = None) -> None:
    """A bar chart of one figure per arm (skipped quietly without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(max(4, 0.9 * len(labels) + 2), 3.2))
    ax.bar(labels, [v or 0 for v in values], color="#4C72B0")
    if ref is not None:
        ax.axhline(ref, color="#C44E52", linestyle="--", linewidth=1)
    ax.set_title(title, fontsize=10)
    ax.set_ylabel(ylabel)
    ax.tick_params(axis="x", labelrotation=30, labelsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"wrote {path}")
