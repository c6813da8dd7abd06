"""Cluster jobs: submit `flm-dist pretrain|finetune` to a running Ray cluster through
the Ray Jobs API, then follow, query and stop it.

The job runs the same command as on a laptop. Its job file travels in the job's
working directory (`_flm_job/`), with `--set` overrides passed through on the command
line; with `--working-dir` the development tree travels too and is imported ahead of
the installed package, on every node. The cluster itself needs only the image (or a
matching install): nothing is read from the submitting machine once the job starts.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import shlex
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import yaml

from flm_dist.config import JobConfig, load_job
from flm_dist.storage import is_remote

__all__ = ["DEFAULT_ADDRESS", "Cluster", "JobState", "Submission", "SubmitError", "resolve_address"]

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
JOB_DIR = "_flm_job"  # inside the job's working directory; holds the job file

# Never uploaded with --working-dir (Ray also honours the tree's .gitignore / .rayignore).
# Top-level names are left out of the staged tree; the patterns apply at any depth.
_SKIP_TOP = frozenset({".venv", "venv", ".git", "runs", "out", "tmp", "build", "dist", "node_modules", JOB_DIR})
_EXCLUDES = [
    "__pycache__/", "*.pyc", "*.egg-info/", ".pytest_cache/", ".ruff_cache/", ".mypy_cache/", ".hypothesis/",
]
_TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
_SECRET_KEY = re.compile(r"secret|password|token", re.IGNORECASE)


class SubmitError(RuntimeError):
    """The cluster cannot be reached, the job does not exist, or the request was refused;
    the message says what to fix."""


def resolve_address(address: str | None) -> str:
    """The Jobs API address: `address`, else RAY_API_SERVER_ADDRESS / RAY_ADDRESS (as Ray's
    own job CLI reads them), else the local dashboard. A `host:port` without a scheme is
    a GCS address, which Ray resolves to its dashboard."""
    env = os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS")
    return address or env or DEFAULT_ADDRESS


def _is_secret(override: str) -> bool:
    return bool(_SECRET_KEY.search(override.split("=", 1)[0]))


# ------------------------------------------------------------------ what is submitted


@dataclass(frozen=True)
class Submission:
    """One `flm-dist submit`: the job file, its overrides and what travels with it."""

    job_file: Path
    overrides: tuple[str, ...] = ()
    working_dir: Path | None = None  # the development tree to ship, or None (code from the image)
    fresh: bool = False

    def load(self) -> JobConfig:
        """Validate here, before anything reaches the cluster (ConfigError names the key)."""
        job = load_job(self.job_file, list(self.overrides), absolute=False)  # its paths resolve on the cluster
        job.check_runnable(str(self.job_file))
        if self.working_dir is not None and not self.working_dir.is_dir():
            raise SubmitError(f"--working-dir {self.working_dir} is not a directory; pass your source tree (e.g. .)")
        if job.storage.endpoint_url == "embedded":
            raise SubmitError(
                f"{self.job_file}: storage.endpoint_url is 'embedded', an S3 endpoint that lives inside one "
                f"command on one machine; a cluster job needs storage every node reaches: set "
                f"storage.endpoint_url to your S3/MinIO endpoint (or null for AWS)"
            )
        return job

    def command(self, job: JobConfig) -> str:
        """The entrypoint: the same CLI command as a local run, with the staged job file.
        Secret overrides (`storage.secret_access_key=...`) go into the staged file instead:
        Ray prints the entrypoint in the job's logs and shows it on the dashboard."""
        verb = "pretrain" if job.task == "pretrain" else "finetune"  # ctr | rating | retrieval
        argv = ["flm-dist", verb, "--config", f"{JOB_DIR}/{self.job_file.name}", "--no-progress", "--log-steps"]
        for item in self.overrides:
            if not _is_secret(item):
                argv += ["--set", item]
        if self.fresh:
            argv.append("--fresh")
        return shlex.join(argv)

    def submission_id(self, job: JobConfig) -> str:
        name = re.sub(r"[^A-Za-z0-9_-]+", "-", job.run.name).strip("-")[:40] or "run"
        return f"flm-{job.task}-{name}-{uuid.uuid4().hex[:6]}"

    @contextlib.contextmanager
    def staged(self) -> Iterator[Path]:
        """A temporary working directory: symlinks to the tree's top-level entries (no
        copy; Ray follows them when it zips) plus `_flm_job/<job file>`."""
        stage = Path(tempfile.mkdtemp(prefix="flm-submit-"))
        try:
            if self.working_dir is not None:
                for entry in sorted(self.working_dir.resolve().iterdir()):
                    if entry.name not in _SKIP_TOP:
                        (stage / entry.name).symlink_to(entry)
            (stage / JOB_DIR).mkdir()
            (stage / JOB_DIR / self.job_file.name).write_text(self._staged_job_text())
            yield stage
        finally:
            shutil.rmtree(stage, ignore_errors=True)  # removes the links, never their targets

    def _staged_job_text(self) -> str:
        """The job file as written, or with the secret overrides folded in."""
        text = self.job_file.read_text()
        secrets = [o for o in self.overrides if _is_secret(o)]
        if not secrets:
            return text
        tree = yaml.safe_load(text) or {}
        for item in secrets:
            key, value = item.split("=", 1)
            node = tree
            *parents, leaf = key.strip().split(".")
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = yaml.safe_load(value) if value else ""  # as load_job parses --set values
        return yaml.safe_dump(tree, sort_keys=False)


def local_paths(job: JobConfig) -> list[str]:
    """Job keys that name a path on the cluster's nodes rather than shared storage."""
    keys = {"run.storage": job.run.storage, "data.pretrain": job.data.pretrain, "data.train": job.data.train,
            "data.eval": job.data.eval, "init_from": job.init_from}
    return [f"{k}={v}" for k, v in keys.items() if v and not is_remote(v)]


# ------------------------------------------------------------------ job state


@dataclass(frozen=True)
class JobState:
    submission_id: str
    status: str  # PENDING | RUNNING | SUCCEEDED | FAILED | STOPPED
    message: str
    entrypoint: str
    ray_job_id: str | None = None  # the Ray job (hex) whose tasks and actors ran it
    driver_exit_code: int | None = None
    start_time: float | None = None  # seconds since the epoch
    end_time: float | None = None

    @property
    def terminal(self) -> bool:
        return self.status in _TERMINAL

    @property
    def ok(self) -> bool:
        """Not failed or stopped (a running job is ok so far)."""
        return self.status not in ("FAILED", "STOPPED")

    @classmethod
    def from_details(cls, d: Any) -> JobState:
        return cls(
            submission_id=d.submission_id or d.job_id or "",
            status=str(d.status.value if hasattr(d.status, "value") else d.status),
            message=d.message or "",
            entrypoint=d.entrypoint or "",
            ray_job_id=d.job_id,
            driver_exit_code=d.driver_exit_code,
            start_time=_seconds(d.start_time),
            end_time=_seconds(d.end_time),
        )

    def describe(self) -> str:
        lines = [f"{self.submission_id}: {self.status}"]
        if self.start_time:
            end = self.end_time or time.time()
            lines.append(f"  elapsed    : {end - self.start_time:.0f} s")
        if self.driver_exit_code is not None:
            lines.append(f"  exit code  : {self.driver_exit_code}")
        lines.append(f"  entrypoint : {redact(self.entrypoint)}")
        if self.message:
            lines.append("  message    : " + self.message.rstrip().replace("\n", "\n               "))
        return "\n".join(lines)


def _seconds(ms: int | None) -> float | None:
    return ms / 1000.0 if ms else None  # Ray reports milliseconds


def redact(entrypoint: str) -> str:
    """Hide secret values (`--set storage.secret_access_key=...`) in what we print."""
    return re.sub(r"((?:secret|password|token)[A-Za-z_]*=)(\S+)", r"\1***", entrypoint)


# ------------------------------------------------------------------ the cluster


class Cluster:
    """A running Ray cluster, reached through its dashboard's Jobs API (http://HOST:8265)."""

    def __init__(self, address: str | None = None):
        self.address = resolve_address(address)

    @cached_property
    def _client(self) -> Any:
        """Connects on first use, so a job file is validated before the cluster is asked."""
        from ray.exceptions import AuthenticationError
        from ray.job_submission import JobSubmissionClient

        _use_token_if_available()
        try:
            return JobSubmissionClient(self.address)
        except AuthenticationError as e:
            raise SubmitError(_auth_fix(self.address, e)) from None
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise SubmitError(
                f"cannot reach the Ray Jobs API at {self.address} ({e}). Pass the head node's dashboard "
                f"address with --address http://HOST:8265 (or set RAY_API_SERVER_ADDRESS); the head must run the "
                f"dashboard (`ray start --head --dashboard-host 0.0.0.0`); on Kubernetes, "
                f"`kubectl port-forward svc/<cluster>-head-svc 8265:8265`"
            ) from None

    def _call(self, what: str, job_id: str, fn: Callable[[], Any]) -> Any:
        from ray.exceptions import AuthenticationError

        try:
            return fn()
        except AuthenticationError as e:
            raise SubmitError(_auth_fix(self.address, e)) from None
        except RuntimeError as e:
            if re.search(r"\b404\b", str(e)) or "does not exist" in str(e):
                raise SubmitError(
                    f"no job '{job_id}' on {self.address}; list the cluster's jobs with "
                    f"`ray job list --address {self.address}`"
                ) from None
            raise SubmitError(f"{what} {job_id} on {self.address} failed: {e}") from None
        except OSError as e:  # the builtin ConnectionError and requests' (an OSError, not that class)
            raise SubmitError(f"lost the Ray Jobs API at {self.address} during {what}: {e}") from None

    def submit(self, sub: Submission) -> tuple[str, str]:
        """Validate the job here, upload its working directory and start it; returns
        (submission id, entrypoint)."""
        job = sub.load()
        for item in local_paths(job):
            print(f"warning: {item} is a path on the cluster's nodes, not on this machine; on a multi-node "
                  f"cluster every node must see it (use s3:// storage); a relative one is taken inside the job's "
                  f"working folder, which Ray deletes with the job", file=sys.stderr)
        entrypoint = sub.command(job)
        sid = sub.submission_id(job)
        metadata = {"flm_task": job.task, "flm_run": job.run.name, "flm_job_file": str(sub.job_file)}
        # Ray's packaging logs one INFO line per .gitignore it honours: warnings only.
        with sub.staged() as stage, _quiet("ray._private.runtime_env.packaging", logging.WARNING):
            runtime_env = {
                "working_dir": str(stage),
                "excludes": list(_EXCLUDES),
                # Job logs are a cluster job's only progress report: line-buffered, with
                # rank 0's step records (loss, rows/s) every train.log_every steps.
                "env_vars": {"PYTHONUNBUFFERED": "1"},
            }
            self._call("submit", sid, lambda: self._client.submit_job(
                entrypoint=entrypoint, submission_id=sid, runtime_env=runtime_env, metadata=metadata,
            ))
        return sid, entrypoint

    def state(self, job_id: str) -> JobState:
        return JobState.from_details(self._call("status of", job_id, lambda: self._client.get_job_info(job_id)))

    def logs(self, job_id: str) -> str:
        return self._call("logs of", job_id, lambda: self._client.get_job_logs(job_id))

    def follow(self, job_id: str, write: Callable[[str], Any]) -> JobState:
        """Stream the job's logs until it ends; returns its final state. A stream that
        drops while the job runs (a `kubectl port-forward` closing) is opened again: Ray
        sends the log from its start, and what was written already is skipped."""
        import aiohttp  # Ray's Jobs client streams logs over it

        self.state(job_id)  # a clear error for an unknown id, before opening the stream
        shown = 0

        async def tail() -> None:
            nonlocal shown
            sent = 0
            async for chunk in self._client.tail_job_logs(job_id):
                new = chunk[max(0, shown - sent) :]
                sent += len(chunk)
                if new:
                    write(new)
                    shown = sent

        while True:
            try:
                asyncio.run(tail())
                st = self.wait(job_id, timeout_s=30.0)  # the stream ends with the job: its state may lag
            except (RuntimeError, OSError, aiohttp.ClientError):  # aiohttp's own: a 502 from an ingress, a dropped socket
                st = self.state(job_id)  # the stream dropped: open it again while the job runs
            if st.terminal:
                return st
            time.sleep(1.0)

    def wait(self, job_id: str, timeout_s: float) -> JobState:
        """Poll until the job is terminal or `timeout_s` passes; returns the last state."""
        deadline = time.monotonic() + timeout_s
        st = self.state(job_id)
        while not st.terminal and time.monotonic() < deadline:
            time.sleep(1.0)
            st = self.state(job_id)
        return st

    def stop(self, job_id: str, timeout_s: float = 60.0) -> JobState:
        """Ask Ray to stop the job (SIGTERM, then SIGKILL) and wait until it has."""
        st = self.state(job_id)
        if st.terminal:
            return st
        self._call("stop", job_id, lambda: self._client.stop_job(job_id))
        return self.wait(job_id, timeout_s)


def _use_token_if_available() -> None:
    """Send the Ray auth token when one is configured (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH
    or ~/.ray/auth_token) and RAY_AUTH_MODE is unset, as `ray.init(address=...)` does:
    Ray 2.60 clusters enable token authentication by default."""
    # Its warning speaks of "this Ray cluster" as if we had started one: not shown.
    with contextlib.suppress(ImportError), _quiet("ray._private.authentication"):
        from ray._private.authentication.authentication_token_setup import (
            maybe_enable_token_auth_if_token_available,
        )

        maybe_enable_token_auth_if_token_available(warn_if_disabled=False)


@contextlib.contextmanager
def _quiet(logger: str, level: int = logging.ERROR) -> Iterator[None]:
    """Raise a Ray logger's level for the duration."""
    log = logging.getLogger(logger)
    old = log.level
    log.setLevel(max(level, old))
    try:
        yield
    finally:
        log.setLevel(old)


def _auth_fix(address: str, e: Exception) -> str:
    first = str(e).strip().splitlines()[0]
    return (
        f"the Ray cluster at {address} refused the request ({first}): it uses token authentication. "
        f"Put the cluster's token in RAY_AUTH_TOKEN or ~/.ray/auth_token (`ray get-auth-token` on the "
        f"head prints it), and leave RAY_AUTH_MODE unset or set it to token"
    )
