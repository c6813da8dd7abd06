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
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from dataclasses import dataclass
from typing import Any

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader, FsspecWriter

from flm_dist.storage import StorageError, Store, join

__all__ = [
    "CheckpointCorruptError",
    "CheckpointRef",
    "commit",
    "find_latest",
    "load_manifest",
    "load_state",
    "prune",
    "resolve",
    "save_state",
]

log = logging.getLogger(__name__)

MARKER = "COMMITTED"
MANIFEST = "manifest.json"
_STEP_RE = re.compile(r"step-(\d{8,})$")


class CheckpointCorruptError(RuntimeError):
    """A committed checkpoint is unreadable or incomplete; the message names it."""


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


def _verify(store: Store, ref: CheckpointRef, marker: dict) -> None:
    fs, path = store.fs(ref.uri)
    try:
        fs.invalidate_cache(path)
        listing = {e["name"].rsplit("/", 1)[-1]: int(e.get("size") or 0) for e in fs.ls(path, detail=True)}
    except FileNotFoundError:
        listing = {}
    for name, size in marker["files"].items():
        if name not in listing:
            raise CheckpointCorruptError(f"corrupt checkpoint {ref.uri}: file {name} listed in {MARKER} is missing")
        if listing[name] != size:
            raise CheckpointCorruptError(
                f"corrupt checkpoint {ref.uri}: {name} has {listing[name]} bytes, {MARKER} says {size} (truncated?)"
            )


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


def load_manifest(store: Store, ref: CheckpointRef) -> dict:
    uri = join(ref.uri, MANIFEST)
    try:
        return store.read_json(uri)
    except FileNotFoundError:
        raise CheckpointCorruptError(f"corrupt checkpoint {ref.uri}: {MANIFEST} is missing") from None
    except StorageError as e:
        raise CheckpointCorruptError(f"corrupt checkpoint {ref.uri}: {e}") from None


# ------------------------------------------------------------------ save / load


def new_attempt_id() -> str:
    """Agreed by all ranks (rank 0 draws it and broadcasts it)."""
    ids = [f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}"]
    if dist.is_initialized():
        dist.broadcast_object_list(ids, src=0)
    return ids[0]


def save_state(store: Store, run_dir: str, step: int, attempt: str, state: dict[str, Any]) -> CheckpointRef:
    """Collective: every rank writes its shards of `state`; DCP's coordinator writes
    `.metadata` after gathering every rank's write results."""
    ref = CheckpointRef(run_dir, step, attempt)
    writer = FsspecWriter(ref.uri, single_file_per_rank=True, sync_files=False, overwrite=False, **store.storage_options(ref.uri))
    dcp.save(state, storage_writer=writer)
    return ref


def commit(store: Store, ref: CheckpointRef, manifest: dict) -> bool:
    """Rank 0 only, after save_state returned everywhere: write the manifest, then the
    marker (create-exclusive). False if another attempt already committed this step."""
    store.write_json(join(ref.uri, MANIFEST), manifest)
    fs, path = store.fs(ref.uri)
    fs.invalidate_cache(path)
    files = {e["name"].rsplit("/", 1)[-1]: int(e.get("size") or 0) for e in fs.ls(path, detail=True)}
    marker = {"attempt": ref.attempt, "step": ref.step, "files": files, "committed_at": time.time()}
    won = store.create_exclusive(join(ref.step_dir, MARKER), json.dumps(marker, indent=2).encode())
    if not won:
        log.warning("step %d was already committed by another attempt; %s is discarded", ref.step, ref.uri)
        store.rm(ref.uri)
    return won


def load_state(store: Store, ref: CheckpointRef, state: dict[str, Any]) -> None:
    """Load in place into `state` (tensors / DTensors pre-allocated with the target
    layout); DCP reshards row blocks to whatever layout `state` has."""
    reader = FsspecReader(ref.uri, **store.storage_options(ref.uri))
    try:
        dcp.load(state, storage_reader=reader, no_dist=not dist.is_initialized())
    except (FileNotFoundError, EOFError, RuntimeError, ValueError) as e:
        if isinstance(e, RuntimeError) and "Missing key" in str(e):
            raise
        raise CheckpointCorruptError(f"corrupt checkpoint {ref.uri}: cannot load: {e}") from e


def prune(store: Store, run_dir: str, keep_last: int, latest: int) -> None:
    """Rank 0, after a commit: delete committed checkpoints beyond `keep_last` and
    uncommitted step folders older than the newest commit (crashed saves). Newer
    uncommitted folders may be a save in flight and are left alone."""
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
        if step < latest:
            store.rm(step_dir(run_dir, step))
