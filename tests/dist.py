"""Run a function on N real processes joined in a gloo process group (no Ray)."""

from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import pickle
import queue as queue_mod
import socket
import time
import traceback


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, world, port, fn, args, queue):
    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    try:
        # A short timeout: a rank that fails must not leave the others hanging in a collective.
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
        # plain pickle bytes: the parent must not depend on this process's shared memory
        queue.put((rank, "ok", pickle.dumps(fn(rank, world, *args))))
    except BaseException:  # noqa: BLE001 - reported to the parent
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _context():
    """Ranks fork from one server process that imported torch and flm_dist once per
    session (it never runs torch ops or joins a group, so each fork starts clean):
    a spawned rank spent 1-2 s importing them again. The ranks see the environment
    the server started with: pass settings as arguments, not environment variables."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "torch.distributed", "flm_dist.sharding", "flm_dist.train_loop", "flm_dist.checkpoint", "flm_dist.metrics"])
    return ctx


def run_ranks(fn, world: int, *args, timeout: float = 240.0) -> list:
    """fn(rank, world, *args) on `world` spawned processes; returns results by rank or
    raises with the failing ranks' tracebacks. `fn` must be importable (module level)."""
    ctx = _context()
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_entry, args=(r, world, port, fn, args, queue)) for r in range(world)]
    for p in procs:
        p.start()
    results, errors = {}, {}
    deadline = time.monotonic() + timeout
    try:
        while len(results) + len(errors) < world:
            try:
                rank, status, value = queue.get(timeout=1.0)
                (results if status == "ok" else errors)[rank] = value
                continue
            except queue_mod.Empty:
                pass
            dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0) and r not in results and r not in errors]
            for r in dead:
                errors[r] = f"process exited with code {procs[r].exitcode} before reporting"
            if time.monotonic() > deadline:
                raise TimeoutError(f"ranks did not finish within {timeout}s")
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    if errors:
        raise AssertionError("\n".join(f"rank {r} failed:\n{tb}" for r, tb in sorted(errors.items())))
    return [pickle.loads(results[r]) for r in range(world)]
