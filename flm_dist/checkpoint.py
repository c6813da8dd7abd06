"""Sharded, atomic checkpoints on any URI with torch.distributed.checkpoint (DCP).

Layout of a run folder:

    RUN/step-00000120/COMMITTED        commit marker, written last (create-exclusive)
    RUN/step-00000120/<attempt>/       DCP files (.metadata, __<rank>_0.distcp) + manifest.json

A checkpoint counts only once COMMITTED exists; it names the attempt folder that won
and the size of every file in it. Each save writes a fresh attempt folder, so keys
are never overwritten in place, and a second (zombie) writer of the same step loses
the create-exclusive race instead of mixing its files in. A step folder without a
marker is never loaded and is deleted once a newer checkpoint is committed. A marker
that is unreadable, or files that do not match it, raise `CheckpointCorruptError`:
a broken checkpoint is never silently replaced by a fresh start.

Sharded tables are saved as DTensor row blocks, so DCP can load them onto any number
of workers (or one process without a process group, for export and evaluation).

torch is imported only by the functions that move tensors: the commit protocol
(markers, manifests, resolve, prune) is also read by the Ray Train controller and the
driver, fresh processes that would otherwise pay torch's ~2 s import on every run's
start (`tests/test_launch.py` keeps them torch-free).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
import uuid
from dataclasses import dataclass
from typing import Any

from flm_dist.storage import StorageError, Store, is_remote, join

__all__ = [
    "CheckpointCorruptError",
    "CheckpointGoneError",
    "CheckpointRef",
    "CheckpointSaveError",
    "Checkpointer",
    "commit",
    "find_latest",
    "lineage",
    "load_manifest",
    "load_state",
    "prune",
    "resolve",
    "resolve_result",
    "saved_keys",
]

log = logging.getLogger(__name__)

MARKER = "COMMITTED"
MANIFEST = "manifest.json"
_STEP_RE = re.compile(r"step-(\d{8,})$")


class CheckpointCorruptError(RuntimeError):
    """A committed checkpoint is unreadable or incomplete; the message names it."""


class CheckpointGoneError(FileNotFoundError):
    """A checkpoint resolved earlier was deleted since (its run pruned it after a newer
    commit, keep_last): not corrupt; resolving the run again finds the newer one."""


def _gone(store: Store, ref: CheckpointRef) -> CheckpointGoneError | None:
    """The error for a checkpoint no longer committed as `ref` (its marker deleted, or
    naming another attempt), else None."""
    marker = _read_marker(store, ref.step_dir)
    if marker is not None and marker["attempt"] == ref.attempt:
        return None
    return CheckpointGoneError(f"checkpoint {ref.uri} was deleted while being read (its run's keep_last pruned it after a newer commit?); "
                               f"resolve the run folder again for its latest checkpoint")


@dataclass(frozen=True)
class CheckpointRef:
    run_dir: str
    step: int
    attempt: str

    @property
    def step_dir(self) -> str:
        return join(self.run_dir, f"step-{self.step:08d}")

    @property
    def uri(self) -> str:
        """The checkpoint's data folder (what users pass to init_from/evaluate/export)."""
        return join(self.step_dir, self.attempt)


def step_dir(run_dir: str, step: int) -> str:
    return join(run_dir, f"step-{step:08d}")


def _read_marker(store: Store, step_uri: str) -> dict | None:
    uri = join(step_uri, MARKER)
    try:
        raw = store.read_bytes(uri)
    except FileNotFoundError:
        return None
    try:
        marker = json.loads(raw)
        if not isinstance(marker, dict) or not {"attempt", "step", "files"} <= set(marker):
            raise ValueError("missing fields")
        return marker
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointCorruptError(
            f"corrupt checkpoint: commit marker {uri} is unreadable ({e}); "
            f"delete {step_uri} to fall back to the previous checkpoint"
        ) from None


def _listing(store: Store, uri: str) -> dict[str, dict]:
    """name -> {"size", "etag"} of the files in a checkpoint folder (one LIST request)."""
    fs, path = store.fs(uri)
    try:
        fs.invalidate_cache(path)
        entries = fs.ls(path, detail=True)
    except FileNotFoundError:
        return {}
    out = {}
    for e in entries:
        if e.get("type", "file") != "file":
            continue
        info = {"size": int(e.get("size") or 0)}
        etag = e.get("ETag") or e.get("etag")
        if etag:
            info["etag"] = str(etag).strip('"')
        out[e["name"].rsplit("/", 1)[-1]] = info
    return out


def _sha256(store: Store, uri: str) -> str:
    h = hashlib.sha256()
    fs, path = store.fs(uri)
    with fs.open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _verify(store: Store, ref: CheckpointRef, marker: dict) -> None:
    """Cheap checks from one listing: every file present, with its committed size (and
    ETag on object stores, which the store itself checksums)."""
    listing = _listing(store, ref.uri)
    for name, want in marker["files"].items():
        want = want if isinstance(want, dict) else {"size": want}
        got = listing.get(name)
        if got is None:
            raise _gone(store, ref) or CheckpointCorruptError(f"corrupt checkpoint {ref.uri}: file {name} listed in {MARKER} is missing")
        if got["size"] != want["size"]:
            raise CheckpointCorruptError(
                f"corrupt checkpoint {ref.uri}: {name} has {got['size']} bytes, {MARKER} says {want['size']} (truncated?)"
            )
        if "etag" in want and got.get("etag") and got["etag"] != want["etag"]:
            raise CheckpointCorruptError(f"corrupt checkpoint {ref.uri}: {name} was replaced after the commit (ETag changed)")


def verify_contents(store: Store, ref: CheckpointRef) -> None:
    """The full check before loading: sha256 of every local file against the marker
    (object stores verify their own content checksums; their ETags were checked)."""
    marker = _read_marker(store, ref.step_dir)
    if marker is None or marker["attempt"] != ref.attempt:
        raise _gone(store, ref)
    _verify(store, ref, marker)
    for name, want in marker["files"].items():
        if isinstance(want, dict) and "sha256" in want and _sha256(store, join(ref.uri, name)) != want["sha256"]:
            raise CheckpointCorruptError(f"corrupt checkpoint {ref.uri}: {name} does not match its sha256 in {MARKER} (bit rot or tampering)")


def committed_steps(store: Store, run_dir: str) -> list[int]:
    steps = []
    for entry in store.ls(run_dir):
        m = _STEP_RE.search(entry.rstrip("/"))
        if m:
            steps.append(int(m.group(1)))
    return sorted(steps)


def find_latest(store: Store, run_dir: str) -> CheckpointRef | None:
    """The newest committed, verified checkpoint of a run, or None if there is none."""
    for step in reversed(committed_steps(store, run_dir)):
        sd = step_dir(run_dir, step)
        marker = _read_marker(store, sd)
        if marker is None:
            continue  # uncommitted: a crash mid-save or a save in progress
        ref = CheckpointRef(run_dir, step, marker["attempt"])
        _verify(store, ref, marker)
        return ref
    return None


def resolve(store: Store, uri: str) -> CheckpointRef:
    """Accept a run folder (latest checkpoint), a step folder, or an attempt folder."""
    uri = uri.rstrip("/")
    tail = uri.rsplit("/", 1)[-1]
    if _STEP_RE.search(tail):
        marker = _read_marker(store, uri)
        if marker is None:
            raise CheckpointCorruptError(f"{uri} has no {MARKER} marker: it is not a committed checkpoint")
        ref = CheckpointRef(uri.rsplit("/", 1)[0], int(_STEP_RE.search(tail).group(1)), marker["attempt"])
        _verify(store, ref, marker)
        return ref
    parent = uri.rsplit("/", 1)[0]
    ptail = parent.rsplit("/", 1)[-1]
    if _STEP_RE.search(ptail):
        ref = resolve(store, parent)
        if ref.attempt != tail:
            raise CheckpointCorruptError(f"{uri} is an attempt that did not commit; the committed one is {ref.uri}")
        return ref
    ref = find_latest(store, uri)
    if ref is None:
        raise FileNotFoundError(f"no committed checkpoint under {uri}")
    return ref


def resolve_result(store: Store, uri: str) -> CheckpointRef:
    """What a run produced, for exporting and evaluating it: a step or attempt folder is
    itself; a run folder is its latest checkpoint, or for a fine-tune that validated,
    the best epoch it kept there (the checkpoint the run returned, `train_loop._finish`),
    not the up to `train.patience` worse epochs after it. A pretraining's result is its
    last state."""
    ref = resolve(store, uri)
    if ref.run_dir.rstrip("/") != uri.rstrip("/"):  # a step or attempt folder
        return ref
    m = load_manifest(store, ref)
    best = m.get("best")
    if best and m.get("task") != "pretrain" and best["step"] != ref.step:
        return resolve(store, step_dir(ref.run_dir, best["step"]))
    return ref


def load_manifest(store: Store, ref: CheckpointRef) -> dict:
    uri = join(ref.uri, MANIFEST)
    try:
        raw = store.read_bytes(uri)  # a store that will not serve it raises StorageError: not a corrupt checkpoint
    except FileNotFoundError:
        raise CheckpointCorruptError(f"corrupt checkpoint {ref.uri}: {MANIFEST} is missing") from None
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointCorruptError(f"corrupt checkpoint {ref.uri}: {MANIFEST} is not valid JSON: {e}") from None


# ------------------------------------------------------------------ save / load


def new_attempt_id(group=None) -> str:
    """Agreed by all ranks (rank 0 draws it and broadcasts it)."""
    import torch.distributed as dist

    ids = [f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}"]
    if dist.is_initialized():
        dist.broadcast_object_list(ids, src=0, group=group)
    return ids[0]


def commit(store: Store, ref: CheckpointRef, manifest: dict) -> bool:
    """Rank 0 only, after save_state returned everywhere: write the manifest, then the
    marker (create-exclusive). False if another attempt already committed this step."""
    try:
        store.write_json(join(ref.uri, MANIFEST), manifest)
        files = _listing(store, ref.uri)
        if unsaved := _unsaved(store, ref, files):
            # deleted since the ranks wrote them (another worker group's prune): the marker
            # would commit a checkpoint that cannot load
            raise FileNotFoundError(f"{ref.uri}: {unsaved[0]} is missing at the commit ({len(unsaved)} state file(s)); not committed")
        if not is_remote(ref.uri):
            # Local disks have no content checksums of their own: record sha256 per file.
            for name in files:
                files[name]["sha256"] = _sha256(store, join(ref.uri, name))
    except (FileNotFoundError, StorageError):
        # A racing attempt that committed first prunes the other attempts of its step,
        # ours included, possibly under our feet: then we lost, we did not fail.
        winner = _read_marker(store, ref.step_dir)
        if winner is None or winner["attempt"] == ref.attempt:
            raise
        log.warning("step %d was committed by attempt %s while %s was committing; ours is discarded", ref.step, winner["attempt"], ref.uri)
        return False
    marker = {"attempt": ref.attempt, "step": ref.step, "files": files, "committed_at": time.time()}
    won = store.create_exclusive(join(ref.step_dir, MARKER), json.dumps(marker, indent=2).encode())
    if not won:
        log.warning("step %d was already committed by another attempt; %s is discarded", ref.step, ref.uri)
        try:
            store.rm(ref.uri)
        except StorageError as e:  # the winner stands either way; prune deletes orphans later
            log.warning("could not delete the discarded attempt %s: %s", ref.uri, e)
    return won


def _unsaved(store: Store, ref: CheckpointRef, files: dict) -> list[str]:
    """The state files DCP's metadata names (and the metadata itself) not in `files`."""
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader

    if ".metadata" not in files:
        return [".metadata"]
    md = FsspecReader(ref.uri, **store.storage_options(ref.uri)).read_metadata()
    return sorted({info.relative_path for info in md.storage_data.values()} - set(files))


def load_state(store: Store, ref: CheckpointRef, state: dict[str, Any]) -> None:
    """Load in place into `state` (tensors / DTensors pre-allocated with the target
    layout); DCP reshards row blocks to whatever layout `state` has."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader

    verify_contents(store, ref)
    reader = FsspecReader(ref.uri, **store.storage_options(ref.uri))
    try:
        dcp.load(state, storage_reader=reader, no_dist=not dist.is_initialized())
    except (Exception, dcp.CheckpointException) as e:  # DCP's own is a BaseException
        if "Missing key" in str(e) or "Size mismatch" in str(e):
            raise ValueError(f"checkpoint {ref.uri} does not fit this model: {e}") from e
        raise _read_failure(store, ref, e, "cannot load") from e


def _read_failure(store: Store, ref: CheckpointRef, e: BaseException, what: str) -> Exception:
    """What a failed DCP read means. A store that refuses or fails a read (403, an outage
    past the retries) is a StorageError, which a restart may outlast and which never tells
    anyone to delete a good checkpoint; only bytes that do not decode are corrupt. DCP keeps
    a shard read's own exception but reports a failed metadata read as a string, so each
    file of the checkpoint is probed with a one-byte read to name the one the store refuses."""
    causes = [failure[0] for failure in getattr(e, "failures", {}).values()] or [e]
    refused = next((c for c in causes if isinstance(c, OSError) and not isinstance(c, FileNotFoundError)), None)
    fs, path = store.fs(ref.uri)
    try:
        names = list(_listing(store, ref.uri))
    except Exception as listing:  # the store went down since the load's own listing
        return StorageError(f"cannot read checkpoint {ref.uri}: {refused or listing}")
    for name in names:
        try:
            fs.cat_file(f"{path}/{name}", start=0, end=1)
        except FileNotFoundError:
            continue
        except Exception as probe:
            return StorageError(f"cannot read checkpoint {ref.uri}: {name}: {probe}")
    if refused is not None:
        return StorageError(f"cannot read checkpoint {ref.uri} ({what}): {refused}")
    return _gone(store, ref) or CheckpointCorruptError(f"corrupt checkpoint {ref.uri}: {what}: {e}")


def saved_keys(store: Store, ref: CheckpointRef) -> set[str]:
    """The flattened keys ("model.head.0.weight", ...) a checkpoint holds, from DCP's metadata."""
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader

    reader = FsspecReader(ref.uri, **store.storage_options(ref.uri))
    try:
        return set(reader.read_metadata().state_dict_metadata)
    except Exception as e:
        raise _read_failure(store, ref, e, "cannot read its metadata") from e


def prune(store: Store, run_dir: str, keep_last: int, latest: int, keep: set[int] | frozenset[int] = frozenset()) -> None:
    """Rank 0, after a commit: delete committed checkpoints beyond `keep_last` (except
    the steps in `keep`: the best epoch's) and uncommitted step folders older than the
    newest commit (crashed saves). Newer uncommitted folders may be a save in flight
    and are left alone."""
    committed = []
    for step in committed_steps(store, run_dir):
        sd = step_dir(run_dir, step)
        try:
            marker = _read_marker(store, sd)
        except CheckpointCorruptError:
            marker = {"corrupt": True}
        if marker is None:
            if step < latest:
                store.rm(sd)
            continue
        committed.append(step)
        # attempts in a committed step that lost (or crashed) are orphans too
        if "attempt" in marker:
            for entry in store.ls(sd):
                name = entry.rstrip("/").rsplit("/", 1)[-1]
                if name not in (marker["attempt"], MARKER) and not name.startswith(MARKER):
                    store.rm(join(sd, name))
    for step in committed[:-keep_last] if keep_last > 0 else []:
        if step < latest and step not in keep:
            store.rm(step_dir(run_dir, step))


class CheckpointSaveError(RuntimeError):
    """A save failed on some rank (e.g. the object store stayed down); nothing was committed."""


class Checkpointer:
    """Saves a run's checkpoints, in the background when `async_save`.

    The training thread blocks only while DCP stages the state into host memory; a
    background thread writes the shards and, on rank 0, commits (manifest, then the
    marker) once DCP's coordinator has every rank's write results. DCP's own
    collectives in that thread run on a dedicated gloo group, never on the groups the
    train loop uses. A save's outcome is agreed by all ranks at the next save (or at
    `finish`): if any rank failed, every rank raises `CheckpointSaveError`, and the
    failed attempt was never committed."""

    def __init__(self, store: Store, run_dir: str, keep_last: int, async_save: bool, ctrl_group=None):
        import torch.distributed as dist

        self.store, self.run_dir, self.keep_last, self.async_save = store, run_dir, keep_last, async_save
        self.ctrl = ctrl_group
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.group = dist.new_group(backend="gloo") if dist.is_initialized() else None
        self._pending = None  # Future of the save in flight
        self._pending_step: int | None = None
        self.last_committed: str | None = None
        self._pool = None

    def save(self, step: int, state: dict, manifest: dict, keep: set[int] | frozenset[int] = frozenset()) -> CheckpointRef:
        """Collective. Returns the attempt's ref; it counts only once committed. Steps
        in `keep` survive the pruning of checkpoints beyond keep_last."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint._fsspec_filesystem import FsspecWriter

        self.finish()
        # The manifest as it is now: an async commit writes it later, while training
        # goes on appending to the lists it holds (the epochs' curve).
        manifest = json.loads(json.dumps(manifest, default=str))
        ref = CheckpointRef(self.run_dir, step, new_attempt_id(self.ctrl))
        # Local state is fsynced before the commit marker (which is), or a power loss could
        # leave a committed checkpoint without its state. Not for object stores: their PUT
        # is durable once answered, and DCP's fallback for a stream without a file
        # descriptor is os.sync(), every dirty page of the node.
        writer = FsspecWriter(ref.uri, single_file_per_rank=True, sync_files=not is_remote(ref.uri), overwrite=False, **self.store.storage_options(ref.uri))

        def commit_after(fut=None):
            if fut is not None:
                fut.result()  # raises if any rank's write failed
            if self.rank == 0:
                if commit(self.store, ref, dict(manifest, checkpoint=ref.uri)):
                    try:
                        prune(self.store, self.run_dir, self.keep_last, step, keep)
                    except Exception as e:  # noqa: BLE001 - the step is committed whatever happens here
                        # Committed is committed: old folders are pruned after the next commit.
                        log.warning("checkpoint %s committed; deleting older ones failed (retried after the next commit): %s", ref.uri, e)
                else:
                    # Another attempt (a zombie of a restarted worker group) won this
                    # step; its checkpoint stands and ours was discarded. Training goes on.
                    return resolve(self.store, ref.step_dir).uri
            return ref.uri

        if not self.async_save:
            try:
                dcp.save(state, storage_writer=writer, process_group=self.group)
                self._pending = _Resolved(commit_after())
            except Exception as e:  # noqa: BLE001 - agreed on in finish()
                self._pending = _Resolved(error=e)
            self._pending_step = step
            self.finish()
            return ref
        else:
            from concurrent.futures import ThreadPoolExecutor

            fut = dcp.async_save(state, storage_writer=writer, process_group=self.group)
            if self._pool is None:
                self._pool = ThreadPoolExecutor(1, thread_name_prefix="flm-commit")
            self._pending = self._pool.submit(commit_after, fut)
        self._pending_step = step
        return ref

    def finish(self) -> str | None:
        """Collective: wait for the save in flight; all ranks raise if any rank failed."""
        import torch
        import torch.distributed as dist

        if self._pending is None:
            return self.last_committed
        err = ""
        try:
            uri = self._pending.result()
        except Exception as e:  # noqa: BLE001 - agreed on below, then raised everywhere
            uri, err = None, f"{type(e).__name__}: {e}"
        failed = torch.tensor([1.0 if err else 0.0])
        if dist.is_initialized():
            dist.all_reduce(failed, group=self.ctrl)
        step, self._pending, self._pending_step = self._pending_step, None, None
        if failed.item() > 0:
            raise CheckpointSaveError(
                f"saving the checkpoint of step {step} to {self.run_dir} failed ({err or 'on another rank'}); "
                f"nothing was committed; the last committed checkpoint is {self.last_committed}"
            )
        if uri:
            self.last_committed = uri
        # every rank learns the committed URI (rank 0 wrote it)
        out = [self.last_committed]
        if dist.is_initialized():
            dist.broadcast_object_list(out, src=0, group=self.ctrl)
        self.last_committed = out[0]
        return self.last_committed

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)


class _Resolved:
    """The outcome of a synchronous save, shaped like a Future."""

    def __init__(self, value=None, error: Exception | None = None):
        self._value, self._error = value, error

    def result(self):
        if self._error is not None:
            raise self._error
        return self._value


def lineage(store: Store, uri: str) -> list[dict]:
    """The chain from an export or checkpoint back to the pretraining data: one entry
    per checkpoint (task, run, step, data fingerprint), child first."""
    chain: list[dict] = []
    export_manifest = join(uri, "manifest.json")
    if store.exists(export_manifest):
        m = store.read_json(export_manifest)
        if m.get("format", "").startswith("flm-export"):
            chain.append({"export": uri, "task": m.get("task"), "exported_at": m.get("exported_at")})
            uri = m["lineage"]["checkpoint"]
    seen = set()
    while uri and uri not in seen:
        seen.add(uri)
        ref = resolve(store, uri)
        m = load_manifest(store, ref)
        data = m.get("data") or {}
        chain.append(
            {
                "checkpoint": ref.uri,
                "task": m.get("task"),
                "run": m.get("run"),
                "step": m.get("step"),
                "epoch": m.get("epoch"),
                "world_size": m.get("world_size"),
                "data": {k: data.get(k) for k in ("uri", "files", "rows", "sha256")},
                "init_from": m.get("init_from") or None,
            }
        )
        parent = m.get("parent") or {}
        uri = parent.get("checkpoint")
    return chain
