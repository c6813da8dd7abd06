"""The run's side processes: what the Ray Train controller, Ray Data's coordinators
and the run channel actor import. Kept free of torch (`tests/test_launch.py` checks):
each of them is a fresh process on every run's start, where importing torch costs
~2 s of the time to first batch.
"""

from __future__ import annotations

import threading
import time
from collections import Counter

import ray
from ray.train import DataConfig
from ray.train.v2._internal.execution.callback import ControllerCallback
from ray.train.v2._internal.execution.failure_handling import FailureDecision

from flm_dist import checkpoint as ckpt
from flm_dist.data.pipeline import InteractionDatasource, read
from flm_dist.data.plan import DataPlan
from flm_dist.data.position import ConsumedRows
from flm_dist.data.schema import DataError
from flm_dist.storage import Store

__all__ = ["FLMDataConfig", "NoRetryOnInputErrors", "RunChannel", "resume_point", "wait_for_catalog"]


@ray.remote(num_cpus=0)
class RunChannel:
    """Rank 0 pushes its latest step record (for the driver's progress bar) and the
    final result here; the driver publishes a ranking run's item catalog here once it
    has read it (`wait_for_catalog`); a worker that stops on its input posts the error
    here, so that the run is not restarted (`NoRetryOnInputErrors`)."""

    def __init__(self):
        self.latest: dict | None = None
        self.final: dict | None = None
        self.resume_from: tuple[str | None] | None = None  # set by rank 0 at each worker-group start
        self.catalog: tuple[dict | None, str] | None = None  # (catalog, error) once the driver's scan ended
        self.catalog_wanted = False
        self.starts = 0  # worker-group starts: rank 0 decides a resume point at each
        self.input_error: Exception | None = None  # a worker's DataError / ConfigError

    def update(self, rec: dict) -> None:
        self.latest = rec

    def poll(self) -> tuple[dict | None, bool]:
        """(the latest step record, whether a worker is waiting for the catalog)."""
        return self.latest, self.catalog_wanted

    def set_result(self, res: dict) -> None:
        self.final = res

    def result(self) -> dict | None:
        return self.final

    def set_resume(self, uri: str | None) -> None:
        self.resume_from = (uri,)
        self.starts += 1

    def resume(self) -> tuple[str | None] | None:
        """(checkpoint URI or None,) once rank 0 has decided; None before."""
        return self.resume_from

    def set_catalog(self, catalog: dict | None, error: str = "") -> None:
        self.catalog = (catalog, error)

    def want_catalog(self) -> tuple[dict | None, str] | None:
        """(catalog, error) once published, else None; tells the driver a worker waits."""
        self.catalog_wanted = True
        return self.catalog

    def fail_on_input(self, error: Exception) -> None:
        """A worker stopped on its input (`NoRetryOnInputErrors`); the first one is kept."""
        if self.input_error is None:
            self.input_error = error

    def input_failure(self) -> tuple[Exception | None, int]:
        """(the input error a worker stopped on or None, worker-group starts so far)."""
        return self.input_error, self.starts


def wait_for_catalog(channel, poll_s: float = 0.2, say_after_s: float = 60.0) -> dict:
    """The item catalog the driver publishes on the run channel, once it has read it."""
    t0 = time.monotonic()
    while (got := ray.get(channel.want_catalog.remote())) is None:
        if say_after_s and time.monotonic() - t0 > say_after_s:
            print(f"waiting {say_after_s:.0f} s so far for the item catalog, which the driver reads from the training data", flush=True)
            say_after_s = 0.0
        time.sleep(poll_s)
    catalog, error = got
    if error:
        raise DataError(f"the training data's item catalog (what validation and evaluation rank) could not be read: {error}")
    return None if catalog is None else ray.get(catalog[0])  # [object ref]: `launch._publish_reference`


class NoRetryOnInputErrors(ControllerCallback):
    """Ends the run instead of restarting its worker group when a worker stopped on its
    input (a DataError or ConfigError posted on the run channel): bad rows past the
    budget, a file that breaks the schema, an unreadable catalog. `scaling.max_failures`
    is for lost workers and transient faults; the same input would fail every restart
    the same way, each after re-reading from the last checkpoint.

    Ray Train 2.60 has no public way to mark an error not retryable. Its controller
    runs RunConfig callbacks of this internal kind before it acts on a failure, and an
    error raised there ends the run (a ControllerError, which `launch._fit` replaces
    by the worker's own error)."""

    def __init__(self, channel):
        self.channel = channel

    def before_controller_execute_failure_decision(self, failure_decision) -> None:
        if failure_decision != FailureDecision.RETRY:
            return
        error, _ = ray.get(self.channel.input_failure.remote())
        if error is not None:
            raise RuntimeError(f"not restarted: a worker stopped on its input ({type(error).__name__}, above), which every restart would meet again")


class FLMDataConfig(DataConfig):
    """Gives each train worker its own deterministic share of the data
    (`pipeline.assign_units`) instead of Ray's dynamic `streaming_split`, whose
    `equal=True` mode drops up to world-1 rows per epoch and whose assignment depends
    on worker speed. Per-rank shares make an epoch's remaining work after a restart a
    function of the data alone; rows of a resumed epoch that the latest checkpoint
    already consumed are skipped at the read.

    `configure` runs whenever a worker group starts (first start, Ray Train restart,
    rerun of the command), when a worker first asks for its shard; it skips the rows
    consumed by exactly the checkpoint the workers restored, which rank 0 decided once
    and published on the run channel."""

    def __init__(self, sources: dict[str, tuple[InteractionDatasource, dict]], store: Store, channel=None, deterministic: bool = False,
                 cpus_per_worker: float = 1.0):
        super().__init__(datasets_to_split="all")
        self._sources = sources
        self._store = store
        self._channel = channel  # a RunChannel: the resume point rank 0 decided for "train"; None: never resume
        self._deterministic = deterministic
        self._cpus_per_worker = cpus_per_worker

    def configure(self, datasets, world_size, worker_handles=None, worker_node_ids=None, **kwargs):
        out: list[dict] = [{} for _ in range(world_size)]
        nodes = worker_node_ids or [None] * world_size
        slots = read_slots(nodes, _node_cpus(), self._cpus_per_worker)
        for name in datasets:
            source, plan = self._sources[name]
            first_epoch, skip = self.resume(DataPlan.from_dict(plan)) if name == "train" else (0, {})
            for rank in range(world_size):
                ds = read(source.for_rank(rank, world_size, first_epoch, skip), node_id=nodes[rank], slots=slots[rank])
                ds.context.execution_options = self._resolve_execution_options(name)
                if self._deterministic:
                    ds.context.execution_options.preserve_order = True
                if name != "train":
                    # Validation and evaluation run between steps: the worker executes
                    # them itself, without a coordinator process per rank and dataset
                    # (tiny 2-worker ctr runs: fine-tune 18.7 -> 15.2 s, evaluate
                    # 12.6 -> 10.2 s on 2 cores).
                    out[rank][name] = ds.iterator()
                    continue
                out[rank][name] = SplitOnWorker(ds)
        return out


    def resume(self, plan: DataPlan) -> tuple[int, dict]:
        """(epoch to read first, rows of it already consumed) of the checkpoint rank 0
        decided. Called when a worker first asks for its shard, which the workers do
        only after that decision."""
        if self._channel is None:
            return 0, {}
        decided = ray.get(self._channel.resume.remote())
        if decided is None:
            raise RuntimeError("the training data was requested before rank 0 decided the resume point")
        return resume_point(self._store, decided[0], plan)


class SplitOnWorker:
    """A rank's training dataset, executed by a coordinator actor on the rank's node.

    A split of one: the rank's own dataset, run by a coordinator (its read tasks run on
    the rank's node: `read_slots`) instead of inside the train worker, where the
    executor's threads would take the GIL and CPU from the step (measured:
    bench/run_all.py, C at 2 workers). `streaming_split` places the coordinator on the
    node of the process that calls it, so the train worker calls it, on its first read:
    called in `configure` (Ray Train's dataset manager, beside the controller), every
    rank's executor loop ran on that one node, a KubeRay head's few CPUs at scale. The
    worker owns the coordinator, which thus ends with it."""

    def __init__(self, ds):
        self._ds = ds
        self._it = None
        self._lock = threading.Lock()

    def _split(self):
        with self._lock:  # one coordinator, whichever thread reads first
            if self._it is None:
                here = ray.get_runtime_context().get_node_id()
                self._it = self._ds.streaming_split(1, equal=False, locality_hints=[here])[0]
            return self._it

    def iter_batches(self, **kwargs):
        return self._split().iter_batches(**kwargs)

    def __getattr__(self, name):  # the rest of Ray's DataIterator (stats, iter_torch_batches, ...)
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self._split(), name)

    def __getstate__(self):
        return {"_ds": self._ds}  # a worker gets the dataset, never another process's coordinator

    def __setstate__(self, state):
        self.__init__(state["_ds"])


def read_slots(worker_nodes: list[str | None], node_cpus: dict[str | None, float], cpus_per_worker: float) -> list[int]:
    """Read tasks each rank's dataset may run at once: an even share of the CPUs its
    node has left after the train workers there, at least one.

    Each rank's read tasks take no CPU reservation and run on the rank's node
    (`pipeline.read`), so this cap is what keeps them from oversubscribing it. Ray's
    own accounting cannot: its autoscaling coordinator (Ray 2.60) splits a node's
    spare CPUs between concurrent datasets by integer division, so with fewer spare
    CPUs than ranks on a node (2 workers on 2 cores) every rank's dataset got 0 CPUs,
    launched a read task only when its worker had run dry, and its executor loop spun
    meanwhile (0.46-0.69 of a core per coordinator; `bench/run_all.py`, C at 2 workers).
    Slots count per dataset: while a validation pass reads, a rank's train prefetch
    may still hold its own slots, briefly up to twice the share."""
    per_node = Counter(worker_nodes)
    return [max(1, int((node_cpus.get(n, 1.0) - cpus_per_worker * per_node[n]) / per_node[n])) for n in worker_nodes]


def _node_cpus() -> dict[str | None, float]:
    """CPUs per alive node id; under None, the cluster's total (ranks with no known node)."""
    nodes = {nd["NodeID"]: float(nd["Resources"].get("CPU", 0.0)) for nd in ray.nodes() if nd.get("Alive")}
    return {**nodes, None: sum(nodes.values())}


def resume_point(store: Store, checkpoint: str | None, plan: DataPlan) -> tuple[int, dict]:
    """(epoch to read first, rows of it already consumed) of the checkpoint the workers
    resumed from (None: a fresh start)."""
    if checkpoint is None:
        return 0, {}
    m = ckpt.load_manifest(store, ckpt.resolve(store, checkpoint))
    if m.get("epoch_done"):
        return int(m["epoch"]) + 1, {}
    return int(m["epoch"]), ConsumedRows(plan).merge_state(m.get("data_state")).skip_map()
