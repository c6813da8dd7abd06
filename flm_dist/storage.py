"""URIs, filesystems, atomic writes and the embedded S3 endpoint.

Every place that takes a location takes a URI: `s3://bucket/key`, `file:///abs/path`
or a plain local path. `Store` turns a URI into an fsspec filesystem (for small
objects, markers, listings, DCP) or a pyarrow filesystem (for Parquet and Ray), with
one set of connection settings, so a job runs unchanged against AWS S3, MinIO or the
embedded moto endpoint.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from dataclasses import dataclass, replace
from functools import cached_property
from typing import Any

import fsspec

from flm_dist.config import StorageConfig

__all__ = ["EmbeddedS3", "Store", "StorageError", "is_remote", "join", "split_uri"]

log = logging.getLogger(__name__)


class StorageError(RuntimeError):
    """Object storage is unreachable or an object is missing/corrupt; names the URI."""


def _replace_local(path: str, fill) -> None:
    """Write a local file through a temp file + rename, so a reader never sees it partial."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex}"
    with open(tmp, "wb") as f:
        fill(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(os.path.dirname(path))


def _fsync_dir(path: str) -> None:
    """Make a folder's entries (a rename or link into it) survive a power loss, as a
    file's fsync does its bytes."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def split_uri(uri: str) -> tuple[str, str]:
    """('s3', 'bucket/key') or ('file', '/abs/path')."""
    if uri.startswith("s3://") or uri.startswith("s3a://"):
        return "s3", uri.split("://", 1)[1].rstrip("/")
    if uri.startswith("file://"):
        return "file", os.path.abspath(uri[len("file://") :])
    if "://" in uri:
        raise StorageError(f"unsupported URI scheme in {uri!r}: use s3://, file:// or a local path")
    return "file", os.path.abspath(uri)


def is_remote(uri: str) -> bool:
    return split_uri(uri)[0] == "s3"


def join(uri: str, *parts: str) -> str:
    out = uri.rstrip("/")
    for p in parts:
        out = f"{out}/{p.strip('/')}"
    return out


_REGIONS: dict[str, str] = {}


def _configured_region(store: Store) -> str | None:
    return store.region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")


def _arrow_region(store: Store, bucket: str) -> str:
    """pyarrow's S3 client does not follow S3's redirect to a bucket's region (s3fs's
    botocore does): with no region set (job file, AWS_REGION) and AWS itself as the
    store, ask AWS where the bucket is, once per bucket and process."""
    if _configured_region(store) or store._endpoint:
        return store._region
    if bucket not in _REGIONS:
        import pyarrow.fs as pafs

        try:
            _REGIONS[bucket] = pafs.resolve_s3_region(bucket)
        except OSError as e:  # unreachable or not allowed: the default, and the reads will say
            log.warning("cannot find the region of bucket %s (%s); using us-east-1: set storage.region or AWS_REGION", bucket, e)
            return "us-east-1"
    return _REGIONS[bucket]


def _s3fs_module():
    """s3fs, with botocore's retry as the only retry layer. s3fs wraps every call in
    its own loop of 5 attempts (SlowDown, connection errors), each running botocore's
    `storage.max_attempts`: a store that is down took 5x the attempts and ~25 s to
    report it. Set on the class because DCP builds its own S3FileSystem instances."""
    import s3fs

    s3fs.S3FileSystem.retries = 1
    return s3fs


def _retry_config(max_attempts: int) -> dict[str, Any]:
    """botocore's standard mode: exponential backoff with jitter and bounded attempts,
    the AWS SDKs' standard strategy, which pyarrow's reads use too. Not adaptive:
    AWS recommends it only for a client throttled by one resource; its client-side rate
    limiter also slowed the report of a store that is down (14 s vs 6 s in case 19).
    `total_max_attempts`: botocore's `max_attempts` counts retries after the first
    request, pyarrow's counts every attempt; `storage.max_attempts` means the latter."""
    return {"retries": {"total_max_attempts": max_attempts, "mode": "standard"}}


@dataclass(frozen=True)
class Store:
    """Connection settings for object storage; picklable, so it travels to Ray workers.

    Only values set in the job file are carried; anything unset is resolved from the
    process's own environment (AWS_* variables, instance roles) where it runs."""

    endpoint_url: str | None = None
    region: str | None = None
    access_key_id: str | None = None
    secret_access_key: str | None = None
    max_attempts: int = 8

    @classmethod
    def from_config(cls, cfg: StorageConfig) -> Store:
        if cfg.endpoint_url == "embedded":
            raise StorageError("storage.endpoint_url=embedded must be started first (EmbeddedS3)")
        return cls(
            endpoint_url=cfg.endpoint_url,
            region=cfg.region,
            access_key_id=cfg.access_key_id,
            secret_access_key=cfg.secret_access_key,
            max_attempts=cfg.max_attempts,
        )

    def __getstate__(self) -> dict:
        # Clients are per process: never ship a cached one to a Ray worker.
        return {k: v for k, v in self.__dict__.items() if k != "_s3fs"}

    # -- resolved settings ------------------------------------------------------------

    @property
    def _endpoint(self) -> str | None:
        return self.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")

    @property
    def _region(self) -> str:
        return _configured_region(self) or "us-east-1"

    # -- filesystems ------------------------------------------------------------------

    @cached_property
    def _s3fs(self) -> Any:
        s3fs = _s3fs_module()
        kwargs: dict[str, Any] = {
            "client_kwargs": {"region_name": self._region},
            "config_kwargs": _retry_config(self.max_attempts),
            "skip_instance_cache": True,
        }
        if self._endpoint:
            kwargs["endpoint_url"] = self._endpoint
        if self.access_key_id:
            kwargs["key"] = self.access_key_id
            kwargs["secret"] = self.secret_access_key
        return s3fs.S3FileSystem(**kwargs)

    def fs(self, uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
        scheme, path = split_uri(uri)
        if scheme == "s3":
            return self._s3fs, path
        return fsspec.filesystem("file"), path

    def storage_options(self, uri: str) -> dict[str, Any]:
        """fsspec storage options for libraries that open URIs themselves (DCP)."""
        if not is_remote(uri):
            return {}
        _s3fs_module()  # the filesystem DCP builds from these options retries once, too
        opts: dict[str, Any] = {
            "client_kwargs": {"region_name": self._region},
            "config_kwargs": _retry_config(self.max_attempts),
        }
        if self._endpoint:
            opts["endpoint_url"] = self._endpoint
        if self.access_key_id:
            opts["key"] = self.access_key_id
            opts["secret"] = self.secret_access_key
        return opts

    def arrow_fs(self, uri: str) -> tuple[Any, str]:
        """A pyarrow filesystem + path; pyarrow's C++ S3 client is the fast path for Parquet."""
        import pyarrow.fs as pafs

        scheme, path = split_uri(uri)
        if scheme != "s3":
            return pafs.LocalFileSystem(), path
        kwargs: dict[str, Any] = {
            "region": _arrow_region(self, path.split("/", 1)[0]),
            "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=self.max_attempts),
            "connect_timeout": 10,
            "request_timeout": 60,
        }
        ep = self._endpoint
        if ep:
            scheme_, _, host = ep.partition("://")
            kwargs["endpoint_override"] = host or scheme_
            kwargs["scheme"] = scheme_ if host else "https"
        if self.access_key_id:
            kwargs["access_key"] = self.access_key_id
            kwargs["secret_key"] = self.secret_access_key
        return pafs.S3FileSystem(**kwargs), path

    # -- small-object helpers ---------------------------------------------------------

    def exists(self, uri: str) -> bool:
        fs, path = self.fs(uri)
        try:
            # Never from s3fs's listings cache: other ranks, processes and machines write
            # between two calls of this one (a commit marker), and a listing made before
            # read a committed checkpoint as uncommitted.
            fs.invalidate_cache(path)
            return fs.exists(path)
        except (PermissionError, OSError) as e:
            raise StorageError(f"cannot check {uri}: {e}") from e

    def read_bytes(self, uri: str) -> bytes:
        fs, path = self.fs(uri)
        try:
            return fs.cat_file(path)
        except FileNotFoundError:
            raise
        except Exception as e:
            raise StorageError(f"cannot read {uri}: {e}") from e

    def read_json(self, uri: str) -> Any:
        raw = self.read_bytes(uri)
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise StorageError(f"{uri} is not valid JSON (corrupt or truncated): {e}") from e

    def write_bytes(self, uri: str, data: bytes) -> None:
        """Write an object whole. Local files go through a temp file + rename, so a
        reader never sees a partial file; an S3 PUT is atomic by itself."""
        fs, path = self.fs(uri)
        try:
            if is_remote(uri):
                fs.pipe_file(path, data)
            else:
                _replace_local(path, lambda f: f.write(data))
        except Exception as e:
            raise StorageError(f"cannot write {uri}: {e}") from e

    def put_file(self, local: str, uri: str) -> None:
        """Copy a local file to `uri` without holding it in memory: s3fs streams it (a
        multipart upload past 50 MB, each part retried); a local copy goes through a temp
        file + rename, as `write_bytes`."""
        fs, path = self.fs(uri)
        try:
            if is_remote(uri):
                fs.put_file(local, path)
            else:
                with open(local, "rb") as src:
                    _replace_local(path, lambda f: shutil.copyfileobj(src, f))
        except Exception as e:
            raise StorageError(f"cannot write {uri}: {e}") from e

    def get_file(self, uri: str, local: str) -> None:
        """Copy `uri` to a local file without holding it in memory."""
        fs, path = self.fs(uri)
        try:
            fs.get_file(path, local)
        except FileNotFoundError:
            raise
        except Exception as e:
            raise StorageError(f"cannot read {uri}: {e}") from e

    def write_json(self, uri: str, obj: Any) -> None:
        self.write_bytes(uri, json.dumps(obj, indent=2, sort_keys=True, default=str).encode())

    def create_exclusive(self, uri: str, data: bytes) -> bool:
        """Create `uri` only if it does not exist yet; True if this call created it.

        Local: write a temp file and hard-link it into place (link fails if the name
        exists), atomic and exclusive. S3: a conditional PUT (If-None-Match: *), which
        AWS S3, MinIO and moto honour; the loser gets 412 and we return False."""
        fs, path = self.fs(uri)
        if not is_remote(uri):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = f"{path}.tmp-{uuid.uuid4().hex}"
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(tmp, path)
            except FileExistsError:
                return False
            finally:
                os.unlink(tmp)
            _fsync_dir(os.path.dirname(path))
            return True
        bucket, _, key = path.partition("/")
        try:
            fs.call_s3("put_object", Bucket=bucket, Key=key, Body=data, IfNoneMatch="*")
            return True
        except Exception as e:  # 412 PreconditionFailed, as s3fs translates it
            cause = getattr(e, "__cause__", None)
            code = getattr(cause, "response", {}).get("Error", {}).get("Code", "") if cause else ""
            if not (code in ("PreconditionFailed", "ConditionalRequestConflict") or "pre-conditions you specified" in str(e)):
                raise StorageError(f"cannot create {uri}: {e}") from e
        # The object exists. It may be this very write: botocore retries a PUT whose
        # response was lost, and the retry finds the object the first try created. The
        # caller's bytes are unique (a commit marker names its attempt), so equal bytes
        # mean this call created it.
        try:
            return self.read_bytes(uri) == data
        except FileNotFoundError:
            return False

    def ls(self, uri: str, detail: bool = False) -> list:
        fs, path = self.fs(uri)
        try:
            fs.invalidate_cache(path)  # a fresh listing, as in exists()
            return fs.ls(path, detail=detail)
        except FileNotFoundError:
            return []
        except Exception as e:
            raise StorageError(f"cannot list {uri}: {e}") from e

    def rm(self, uri: str, recursive: bool = True) -> None:
        """Delete `uri` (a folder: everything under it), and check that nothing is left."""
        fs, path = self.fs(uri)
        try:
            fs.rm(path, recursive=recursive)
        except FileNotFoundError:
            pass
        except Exception as e:
            raise StorageError(f"cannot delete {uri}: {e}") from e
        _check_deleted(fs, path, uri, recursive)

    def ensure_bucket(self, uri: str) -> None:
        """Create the bucket of an s3:// URI if the store says it is missing (404: the
        embedded endpoint, a fresh MinIO). Any other answer leaves it be: a role allowed
        objects but not the bucket itself (no s3:ListBucket, so HEAD is 403) still
        runs, and a write to a bucket that is truly not there fails naming it."""
        if is_remote(uri):
            fs, path = self.fs(uri)
            _create_bucket_if_missing(fs, path.split("/", 1)[0], self._region)

    def upload_dir(self, local_dir: str, uri: str) -> None:
        for root, _, files in os.walk(local_dir):
            for name in files:
                src = os.path.join(root, name)
                self.put_file(src, join(uri, os.path.relpath(src, local_dir)))

    def download_dir(self, uri: str, local_dir: str) -> None:
        fs, path = self.fs(uri)
        for entry in fs.find(path):
            dst = os.path.join(local_dir, os.path.relpath(entry, path))
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            fs.get_file(entry, dst)


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ------------------------------------------------------------------ embedded endpoint


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class EmbeddedS3:
    """moto's S3 server on 127.0.0.1 in a child process: the real S3 HTTP API, in memory.

    It lives as long as this object (use it as a context manager); everything stored
    in it is gone when it stops."""

    ACCESS_KEY = "flm-embedded"
    SECRET_KEY = "flm-embedded-secret"

    def __init__(self, port: int | None = None, verbose: bool = False):
        self.port = port or _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._verbose = verbose
        self._proc: subprocess.Popen | None = None

    def start(self) -> EmbeddedS3:
        out = None if self._verbose else subprocess.DEVNULL
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=out,
            stderr=out,
            start_new_session=True,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise StorageError(f"embedded S3 endpoint exited at start (code {self._proc.returncode})")
            try:
                urllib.request.urlopen(f"{self.url}/moto-api/", timeout=1).read()
                return self
            except Exception:
                time.sleep(0.1)
        self.stop()
        raise StorageError(f"embedded S3 endpoint on {self.url} did not start within 30 s")

    def wait(self) -> int | None:
        """Block until the endpoint's process exits (its exit code)."""
        return self._proc.wait() if self._proc else None

    def stop(self) -> None:
        if self._proc and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
        self._proc = None

    def storage_config(self, base: StorageConfig | None = None) -> StorageConfig:
        return replace(
            base or StorageConfig(),
            endpoint_url=self.url,
            access_key_id=self.ACCESS_KEY,
            secret_access_key=self.SECRET_KEY,
            region="us-east-1",
        )

    def __enter__(self) -> EmbeddedS3:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _check_deleted(fs: Any, path: str, uri: str, recursive: bool) -> None:
    """Nothing left under `path`: S3 answers a batch delete 200 with the keys it refused
    listed inside (access, an object lock), which s3fs does not report."""
    try:
        fs.invalidate_cache(path)
        left = fs.find(path) if recursive else ([path] if fs.exists(path) else [])
    except FileNotFoundError:
        left = []
    except Exception as e:
        raise StorageError(f"cannot check the delete of {uri}: {e}") from e
    if left:
        raise StorageError(f"cannot delete {uri}: {len(left)} object(s) remain (first: {left[0]}); the store refused them (access, an object lock?)")


def _create_bucket_if_missing(fs: Any, bucket: str, region: str) -> None:
    try:
        fs.call_s3("head_bucket", Bucket=bucket)
        return
    except FileNotFoundError:
        pass  # s3fs's translation of 404 NoSuchBucket
    except Exception:  # 403 and the like: not ours to judge; the writes will say
        return
    kwargs: dict[str, Any] = {"Bucket": bucket}
    if region != "us-east-1":  # S3 rejects an explicit us-east-1 constraint
        kwargs["CreateBucketConfiguration"] = {"LocationConstraint": region}
    try:
        fs.call_s3("create_bucket", **kwargs)
    except Exception as e:
        if "BucketAlreadyOwnedByYou" not in str(e) and "BucketAlreadyExists" not in str(e):
            raise StorageError(f"cannot create bucket s3://{bucket}: {e}") from e
    fs.invalidate_cache()
