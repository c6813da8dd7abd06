"""Cluster jobs on a real two-node Ray cluster on this machine.

`ray start --head` and a second `ray start --address` run as separate process groups,
each with its own temp dir and ports; jobs go through `flm-dist submit|status|logs|stop`
and the Ray Jobs API, data and checkpoints through the embedded S3 endpoint. The nodes
carry custom resources (`flm_head`, `flm_second`) so the test can tell them apart.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from flm_dist import checkpoint as ckpt_lib
from flm_dist.data.synth import synth
from flm_dist.storage import join
from flm_dist.submit import Submission, SubmitError, redact
from tests.conftest import pretraining_positions

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the venv's bin: `ray` and `flm-dist`

# A job small enough for 2 cores: tiny tables, small batches.
TINY = {
    "task": "pretrain",
    "run": {"name": "clu", "storage": "s3://clu/runs"},
    "data": {
        "pretrain": "s3://clu/data/pretrain",
        "batch_size": 256,
        "shuffle_window": 2,
        "features": [{"name": "u_segment", "side": "user"}, {"name": "i_category", "side": "item"}],
    },
    "model": {"user_rows": 4096, "item_rows": 1024, "feature_rows": 64, "embedding_dim": 8, "hidden": [16], "latent_dim": 8, "head_hidden": [8]},
    "train": {"epochs": 1, "log_every": 5},
    # One CPU per worker: each 2-CPU node keeps one for Ray Data's reads (cluster/README.md).
    "scaling": {"num_workers": 2, "placement_strategy": "SPREAD", "cpus_per_worker": 1},
}


_GIVEN: set[int] = set()


def _free_port() -> int:
    """A free port no earlier call returned: the OS may hand a just-released port out
    again, and two components of one node given the same port fail its start (seen:
    the dashboard and the runtime-env agent both on 44369)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _GIVEN:
            _GIVEN.add(port)
            return port


# Ray 2.60 clusters use token authentication by default; this cluster's token is its own,
# so the test never depends on a ~/.ray/auth_token left on the machine.
TOKEN = uuid.uuid4().hex


def _env(dashboard: str | None = None, token: str = TOKEN) -> dict[str, str]:
    """Environment of the CLI, or with `dashboard`, of the cluster's nodes."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH"))}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"  # the job's `flm-dist` is this venv's
    env["RAY_AUTH_TOKEN"] = token
    if dashboard:
        env["RAY_AUTH_MODE"] = "token"  # the CLI picks the mode up from the token alone
        # Ray's own State API lookups inside the cluster (Train's placement-group cleaner)
        # would otherwise auto-detect among every Ray instance on this machine.
        env["RAY_API_SERVER_ADDRESS"] = dashboard
    return env


def flm(*args: str, timeout: float = 60, token: str = TOKEN) -> subprocess.CompletedProcess:
    """Run the `flm-dist` CLI as a user would (a separate process, bounded in time)."""
    try:
        return subprocess.run([str(BIN / "flm-dist"), *args], capture_output=True, text=True, timeout=timeout,
                              env=_env(token=token), cwd=ROOT)
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode(errors="replace")[-6000:] + (e.stderr or b"").decode(errors="replace")[-3000:]
        raise AssertionError(f"flm-dist {args[0]} did not finish within {timeout:.0f} s:\n{out}") from None


def _state(dashboard: str, resource: str, **filters: str) -> list[dict]:
    """The dashboard's State API over HTTP (nodes, actors), with this cluster's token."""
    query = [("detail", "true"), ("limit", "1000")]
    for k, v in filters.items():
        query += [("filter_keys", k), ("filter_predicates", "="), ("filter_values", v)]
    req = urllib.request.Request(f"{dashboard}/api/v0/{resource}?{urllib.parse.urlencode(query)}",
                                 headers={"Authorization": f"Bearer {TOKEN}"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.load(r)["data"]["result"]["result"]


def _job(dashboard: str, sid: str) -> dict:
    """A submission's state from the Jobs REST API (polled: a CLI process per probe costs
    seconds of imports; the CLI's own `status` is asserted where its output matters)."""
    req = urllib.request.Request(f"{dashboard}/api/jobs/{sid}", headers={"Authorization": f"Bearer {TOKEN}"})
    with urllib.request.urlopen(req, timeout=10) as r:
        info = json.load(r)
    return {"status": info["status"], "ray_job_id": info.get("job_id")}


# ------------------------------------------------------------------ the cluster


@dataclass
class RayNode:
    """One `ray start --block` process group: killing the group stops every process of
    the node (GCS, raylet, dashboard, workers), and nothing else on the machine."""

    proc: subprocess.Popen
    temp_dir: str
    log_path: Path

    @classmethod
    def start(cls, name: str, args: list[str], log_dir: Path, dashboard: str) -> RayNode:
        # Short temp dirs: Ray's Unix socket paths live under them (limit ~107 chars).
        temp_dir = tempfile.mkdtemp(prefix=f"flm-{name}-", dir="/tmp")
        log_path = log_dir / f"ray-{name}.log"
        cmd = [
            str(BIN / "ray"), "start", "--block", "--disable-usage-stats",
            "--num-cpus", "2", "--object-store-memory", str(256 << 20),
            "--node-ip-address", "127.0.0.1", "--temp-dir", temp_dir,
            # Every port this node listens on is its own, so two nodes (and any other Ray on
            # this machine) never collide; worker ports 0 = chosen by the OS.
            "--min-worker-port", "0", "--max-worker-port", "0",
            "--dashboard-agent-listen-port", str(_free_port()),
            "--dashboard-agent-grpc-port", str(_free_port()),
            "--runtime-env-agent-port", str(_free_port()),
            "--metrics-export-port", str(_free_port()),
            "--node-manager-port", str(_free_port()),
            "--object-manager-port", str(_free_port()),
            *args,
        ]
        with open(log_path, "w") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=_env(dashboard), start_new_session=True)
        return cls(proc, temp_dir, log_path)

    @staticmethod
    def stop(nodes: list[RayNode]) -> None:
        """SIGTERM every node's group at once (Ray's graceful path), SIGKILL whatever is
        left after a second, and wait until the groups are empty. (The raylet, GCS and
        runtime-env agent of `ray start --block` outlived SIGTERM by more than 5 s here:
        a longer grace only delayed the teardown.)"""
        for sig, grace_s in ((signal.SIGTERM, 1.0), (signal.SIGKILL, 10.0)):
            for n in nodes:
                try:
                    os.killpg(n.proc.pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + grace_s
            while time.monotonic() < deadline and any(n._group_alive() for n in nodes):
                time.sleep(0.2)
        for n in nodes:
            shutil.rmtree(n.temp_dir, ignore_errors=True)

    def _group_alive(self) -> bool:
        self.proc.poll()  # reap the leader, or it stays a zombie member of the group
        try:
            os.killpg(self.proc.pid, 0)
            return True
        except ProcessLookupError:
            return False


@dataclass
class TwoNodes:
    head: RayNode
    second: RayNode
    dashboard: str  # the Jobs API address, http://127.0.0.1:PORT
    node_ids: dict[str, str]  # "head" / "second" -> Ray node id

    def log_tail(self) -> str:
        return "\n".join(f"--- {n.log_path.name}\n{n.log_path.read_text()[-3000:]}" for n in (self.head, self.second))


def _alive_nodes(dashboard: str) -> dict[str, str]:
    """{"head" | "second": node id} of the alive nodes, told apart by their resources."""
    out = {}
    for n in _state(dashboard, "nodes", state="ALIVE"):
        for label in ("flm_head", "flm_second"):
            if label in (n.get("resources_total") or {}):
                out[label.removeprefix("flm_")] = n["node_id"]
    return out


def _both_nodes(dashboard: str) -> dict[str, str] | None:
    ids = _alive_nodes(dashboard)
    return ids if len(ids) == 2 else None


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    logs = tmp_path_factory.mktemp("ray-logs")
    gcs_port, dash_port = _free_port(), _free_port()
    dashboard = f"http://127.0.0.1:{dash_port}"
    head = RayNode.start("head", [
        "--head", "--port", str(gcs_port), "--include-dashboard", "true",
        "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash_port),
        "--ray-client-server-port", str(_free_port()), "--resources", json.dumps({"flm_head": 1}),
    ], logs, dashboard)
    nodes: list[RayNode] = [head]
    try:
        _wait(lambda: _alive_nodes(dashboard).get("head"), 90, "the head node to start", head.log_path)
        second = RayNode.start("second", ["--address", f"127.0.0.1:{gcs_port}", "--resources", json.dumps({"flm_second": 1})], logs, dashboard)
        nodes.append(second)
        ids = _wait(lambda: _both_nodes(dashboard), 90, "the second node to join", second.log_path)
        yield TwoNodes(head, second, dashboard, ids)
    finally:
        RayNode.stop(nodes)


def _wait(probe, timeout_s: float, what: str, log: Path | None = None):
    deadline = time.monotonic() + timeout_s
    last_err = None
    while time.monotonic() < deadline:
        try:
            got = probe()
            if got:
                return got
        except Exception as e:  # the endpoint is not up yet
            last_err = e
        time.sleep(0.2)
    tail = log.read_text()[-3000:] if log and log.exists() else ""
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what} (last error: {last_err})\n{tail}")


@pytest.fixture(scope="module")
def cluster_data(s3_store):
    s3_store.ensure_bucket("s3://clu")
    return synth(s3_store, "s3://clu/data", rows=4000, users=300, items=120, seed=5, files=4, row_group_rows=500)


def _job_file(tmp_path: Path, **changes) -> Path:
    doc = json.loads(json.dumps(TINY))
    for dotted, value in changes.items():
        node = doc
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    path = tmp_path / f"{doc['run']['name']}.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def _s3_sets(s3) -> list[str]:
    cfg = s3.storage_config()
    return ["--set", f"storage.endpoint_url={cfg.endpoint_url}", "--set", f"storage.access_key_id={cfg.access_key_id}",
            "--set", f"storage.secret_access_key={cfg.secret_access_key}"]


def _submission_id(out: str) -> str:
    line = next(ln for ln in out.splitlines() if ln.startswith("submitted "))
    return line.split()[1]


def _train_workers(dashboard: str, ray_job_id: str) -> list[dict]:
    return [a for a in _state(dashboard, "actors", job_id=ray_job_id) if a["class_name"] == "RayTrainWorker"]


# ------------------------------------------------------------------ tests


@pytest.mark.slow
@pytest.mark.timeout(480)
def test_submit_status_logs_stop_on_two_nodes(cluster, cluster_data, s3, s3_store, tmp_path):
    d = cluster.dashboard
    sets = _s3_sets(s3)

    # The job of part 2 fails in planning and needs no train worker: submitted first, it
    # runs its course while part 1 runs.
    bad = _job_file(tmp_path, **{"run.name": "clu-bad", "data.pretrain": "s3://clu/no-such-prefix"})
    r = flm("submit", str(bad), "--address", d, "--no-wait", *sets)
    assert r.returncode == 0, r.stderr
    sid_bad = _submission_id(r.stdout)

    # 1. a 2-worker pretraining job, one worker per node, following its logs to the end
    job = _job_file(tmp_path)
    r = flm("submit", str(job), "--address", d, "--working-dir", str(ROOT), *sets, timeout=240)
    assert r.returncode == 0, f"{r.stdout[-4000:]}\n{r.stderr[-4000:]}\n{cluster.log_tail()}"
    sid = _submission_id(r.stdout)
    assert "flm-dist pretrain --config _flm_job/clu.yaml" in r.stdout
    assert s3.SECRET_KEY not in r.stdout + r.stderr  # travels in the staged job file, not the command line

    st = flm("status", sid, "--address", d, "--json")
    assert st.returncode == 0, st.stderr
    info = json.loads(st.stdout)
    assert info["status"] == "SUCCEEDED" and info["driver_exit_code"] == 0

    logs = flm("logs", sid, "--address", d).stdout
    assert s3.SECRET_KEY not in logs + st.stdout
    assert "'step': 5" in logs  # rank 0's step records reach the job's logs
    result, _ = json.JSONDecoder().raw_decode(logs, logs.rindex('{\n  "checkpoint"'))  # the command's result
    ref = ckpt_lib.resolve(s3_store, result["checkpoint"])
    assert ref.step_dir.startswith("s3://clu/runs/clu/step-"), ref
    assert s3_store.exists(join(ref.step_dir, "COMMITTED"))
    # Ray Data's equal split drops the remainder row of an odd total (one per epoch at most);
    # pretraining holds out the fine-tunes' validation carve.
    rows = len(pretraining_positions("s3://clu/data/pretrain", s3_store))
    assert rows - 1 <= result["metrics"]["rows"] <= rows

    workers = _train_workers(d, info["ray_job_id"])
    assert len(workers) == 2, workers
    assert {w["node_id"] for w in workers} == set(cluster.node_ids.values()), (workers, cluster.node_ids)
    # each rank's split coordinator (its dataset's executor loop) runs on the rank's node,
    # not on the one Ray Train's controller picked for all of them
    coords = [a for a in _state(d, "actors", job_id=info["ray_job_id"]) if a["class_name"] == "SplitCoordinator"]
    assert sorted(a["node_id"] for a in coords) == sorted(w["node_id"] for w in workers), (coords, workers)

    # 2. a job that fails: its error reaches `status` (FAILED + message) and `logs`
    _wait(lambda: _job(d, sid_bad)["status"] in ("FAILED", "SUCCEEDED", "STOPPED"), 120, "the bad job to end")
    st = flm("status", sid_bad, "--address", d)
    assert st.returncode == 1, st.stdout + st.stderr
    assert f"{sid_bad}: FAILED" in st.stdout
    assert "s3://clu/no-such-prefix: no such file or prefix" in st.stdout
    assert "s3://clu/no-such-prefix: no such file or prefix" in flm("logs", sid_bad, "--address", d).stdout

    # 3. a long job, stopped once it trains: STOPPED, and its workers are gone
    long = _job_file(tmp_path, **{"run.name": "clu-long", "train.epochs": 1000})
    r = flm("submit", str(long), "--address", d, "--no-wait", *sets)
    assert r.returncode == 0, r.stderr
    sid_long = _submission_id(r.stdout)

    def training_or_ended() -> bool:
        info = _job(d, sid_long)
        if info["status"] not in ("PENDING", "RUNNING"):
            return True
        return bool(info["ray_job_id"]) and sum(w["state"] == "ALIVE" for w in _train_workers(d, info["ray_job_id"])) == 2

    _wait(training_or_ended, 180, "the long job's two train workers")
    assert _job(d, sid_long)["status"] == "RUNNING", flm("logs", sid_long, "--address", d).stdout[-3000:]
    r = flm("stop", sid_long, "--address", d, "--timeout", "60")
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"{sid_long}: STOPPED" in r.stdout
    st = flm("status", sid_long, "--address", d)
    assert st.returncode == 1 and f"{sid_long}: STOPPED" in st.stdout
    ray_job = _job(d, sid_long)["ray_job_id"]
    _wait(lambda: not [w for w in _train_workers(d, ray_job) if w["state"] == "ALIVE"], 60, "the stopped job's workers to exit")


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_unknown_job_unreachable_cluster_and_bad_token_name_the_fix(cluster):
    r = flm("status", "flm-no-such-job", "--address", cluster.dashboard)
    assert r.returncode == 2 and "no job 'flm-no-such-job'" in r.stderr
    r = flm("status", "x", "--address", f"http://127.0.0.1:{_free_port()}")
    assert r.returncode == 2 and "cannot reach the Ray Jobs API" in r.stderr and "--address" in r.stderr
    r = flm("status", "x", "--address", cluster.dashboard, token="not-the-token")
    assert r.returncode == 2 and "token authentication" in r.stderr and "RAY_AUTH_TOKEN" in r.stderr, r.stderr


# ------------------------------------------------------------------ no cluster needed


def test_submission_stages_job_file_and_tree(tmp_path):
    job = _job_file(tmp_path)
    sub = Submission(job, ("train.epochs=2", "storage.secret_access_key=s3cr3t"), working_dir=ROOT, fresh=True)
    cfg = sub.load()
    assert cfg.storage.secret_access_key == "s3cr3t"
    cmd = sub.command(cfg)
    assert cmd == "flm-dist pretrain --config _flm_job/clu.yaml --no-progress --log-steps --set train.epochs=2 --fresh"
    assert redact("x --set storage.secret_access_key=s3cr3t") == "x --set storage.secret_access_key=***"
    with sub.staged() as stage:
        staged = yaml.safe_load((stage / "_flm_job" / "clu.yaml").read_text())
        assert staged["storage"]["secret_access_key"] == "s3cr3t"  # the secret travels in the file
        assert staged["model"] == TINY["model"]
        assert (stage / "flm_dist").is_symlink() and (stage / "flm_dist" / "submit.py").is_file()
        assert not (stage / ".venv").exists() and not (stage / ".git").exists()
    assert not stage.exists() and (ROOT / "flm_dist" / "submit.py").is_file()  # links removed, targets kept


def test_submission_refuses_embedded_storage_and_bad_keys(tmp_path):
    from flm_dist.config import ConfigError

    job = _job_file(tmp_path, **{"storage.endpoint_url": "embedded"})
    with pytest.raises(SubmitError, match="storage.endpoint_url"):
        Submission(job).load()
    with pytest.raises(ConfigError, match="train.epocs"):
        Submission(_job_file(tmp_path), ("train.epocs=2",)).load()
    ctr = Submission(_job_file(tmp_path, task="ctr", **{"run.name": "ft", "data.train": "s3://x/y"}))
    assert ctr.command(ctr.load()).startswith("flm-dist finetune --config _flm_job/ft.yaml")


def test_a_log_stream_that_drops_while_the_job_runs_is_opened_again():
    """`submit`/`logs --follow` on a stream that drops (a `kubectl port-forward` closing)
    while the job runs: it exited 1 (FAILED, to a scheduler) after 30 s. Ray's client is
    stubbed here: the fault is the stream's drop, which Ray sends the log from its start
    after, so the text already written must not come twice."""
    from types import SimpleNamespace

    from flm_dist.submit import Cluster

    class DroppingJobsApi:
        def __init__(self):
            self.tails = 0

        def get_job_info(self, job_id):
            status = "SUCCEEDED" if self.tails >= 2 else "RUNNING"
            return SimpleNamespace(submission_id=job_id, job_id="02000000", status=status, message="", entrypoint="flm-dist pretrain",
                                   driver_exit_code=None, start_time=None, end_time=None)

        async def tail_job_logs(self, job_id):
            self.tails += 1
            yield "epoch 0\n"
            if self.tails == 1:
                raise RuntimeError("websocket closed")
            yield "epoch 1\n"

    cluster = Cluster("http://127.0.0.1:1")
    cluster.__dict__["_client"] = DroppingJobsApi()
    written = []
    st = cluster.follow("job-1", written.append)
    assert st.status == "SUCCEEDED" and "".join(written) == "epoch 0\nepoch 1\n"


def test_a_jobs_api_lost_after_connecting_is_a_clear_error():
    """The dashboard answers, then goes away (a dropped `kubectl port-forward`): the
    next call says so and names the address, not a traceback."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from flm_dist.submit import Cluster, SubmitError

    class Version(BaseHTTPRequestHandler):
        def do_GET(self):
            body = json.dumps({"version": "4", "ray_version": "2.60.0", "ray_commit": "x"}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Version)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    cluster = Cluster(f"http://127.0.0.1:{server.server_address[1]}")
    assert cluster._client is not None  # connected
    server.shutdown()
    server.server_close()
    with pytest.raises(SubmitError, match=rf"lost the Ray Jobs API at {cluster.address}"):
        cluster.state("some-job")
