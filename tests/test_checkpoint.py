"""Checkpoints: commit markers, corruption, orphans, zombie writers, keep_last, and
resharding a row-wise checkpoint saved by 2 ranks onto 1 and 3."""

from __future__ import annotations

import glob
import json
import os
import re
import threading
from dataclasses import replace

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint._fsspec_filesystem import FsspecWriter

from flm_dist import checkpoint as ckpt
from flm_dist.config import FeatureConfig, ModelConfig
from flm_dist.model import FLM
from flm_dist.storage import Store, join
from tests.dist import run_ranks

CFG = ModelConfig(user_rows=97, item_rows=41, feature_rows=13, embedding_dim=4, hidden=[8], latent_dim=4, head_hidden=[4])
FEATS = [FeatureConfig(name="seg", side="user")]


def _save(store, run_dir, step, seed=0, async_save=False):
    torch.manual_seed(seed)
    m = FLM(CFG, FEATS, init_seed=seed)
    saver = ckpt.Checkpointer(store, run_dir, keep_last=2, async_save=async_save)
    ref = saver.save(step, {"model": m.state_dict()}, {"step": step, "epoch": 0, "epoch_done": False})
    uri = saver.finish()
    saver.close()
    return ref, uri, m


@pytest.mark.parametrize("where", ["local", "s3"])
@pytest.mark.parametrize("async_save", [False, True])
def test_save_commit_load_roundtrip(where, async_save, tmp_path, s3_store, bucket):
    store, run_dir = (Store(), str(tmp_path / "run")) if where == "local" else (s3_store, join(bucket, "run"))
    ref, uri, m = _save(store, run_dir, 10, async_save=async_save)
    assert uri == ref.uri and store.exists(join(ref.step_dir, "COMMITTED"))
    latest = ckpt.find_latest(store, run_dir)
    assert latest == ref and ckpt.load_manifest(store, latest)["checkpoint"] == ref.uri
    fresh = FLM(CFG, FEATS, init_seed=99)
    sd = fresh.state_dict()
    ckpt.load_state(store, latest, {"model": sd})
    assert all(torch.equal(sd[k], v) for k, v in m.state_dict().items())
    assert ckpt.resolve(store, run_dir) == ckpt.resolve(store, ref.step_dir) == ckpt.resolve(store, ref.uri) == ref


@pytest.mark.parametrize("async_save", [False, True])
def test_a_local_checkpoint_is_on_disk_before_its_commit_and_a_remote_one_never_syncs_the_node(async_save, tmp_path, s3_store, bucket, monkeypatch):
    """A commit marker must not outlive a power loss that its state files do not: a local
    save fsyncs every state file before the marker. DCP's fallback for a stream without a
    file descriptor (S3) is os.sync(), every dirty page of the node: never called."""
    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real_fsync(fd)

    def node_sync():
        synced.append("os.sync")

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "sync", node_sync)
    ref, _, _ = _save(s3_store, join(bucket, "run"), 10, async_save=async_save)
    assert "os.sync" not in synced and s3_store.exists(join(ref.step_dir, "COMMITTED"))
    ref, _, _ = _save(Store(), str(tmp_path / "run"), 10, async_save=async_save)
    assert "os.sync" not in synced
    marker = next(i for i, f in enumerate(synced) if os.path.basename(f).startswith("COMMITTED"))
    before = {re.sub(r"\.tmp(-[0-9a-f]+)?$", "", f) for f in synced[:marker]}  # each written as a temp file, then renamed
    state = [os.path.join(ref.uri, f) for f in os.listdir(ref.uri)]  # .metadata too
    assert state and set(state) <= before, (state, synced)
    # and the folders' entries: the renames into the attempt folder before the marker, the marker's link after it
    assert ref.uri in before and ref.step_dir in synced[marker:], synced


def test_uncommitted_step_is_skipped_and_cleaned_later(tmp_path):
    store, run_dir = Store(), str(tmp_path / "run")
    good, _, _ = _save(store, run_dir, 10)
    crashed, _, _ = _save(store, run_dir, 20)
    os.remove(os.path.join(crashed.step_dir, "COMMITTED"))  # a crash after the data files, before the marker
    assert ckpt.find_latest(store, run_dir) == good
    with pytest.raises(ckpt.CheckpointCorruptError, match="no COMMITTED marker"):
        ckpt.resolve(store, crashed.step_dir)
    # a later commit cleans the orphan up (it is older than the new latest)
    newer, _, _ = _save(store, run_dir, 30)
    assert not os.path.exists(crashed.step_dir)
    assert ckpt.find_latest(store, run_dir) == newer


def test_a_checkpoint_pruned_while_a_reader_holds_it_is_gone_not_corrupt(tmp_path, monkeypatch):
    """An `evaluate`/`export` of a run folder, or a fine-tune from a pretraining still
    running, resolves its latest checkpoint; a newer commit may prune it before the read.
    That is not a corrupt checkpoint: the run holds a newer, good one."""
    store, run_dir = Store(), str(tmp_path / "run")
    old, _, _ = _save(store, run_dir, 10)
    for step in (20, 30):  # keep_last=2: step 10 goes
        _save(store, run_dir, step)
    assert not os.path.exists(old.step_dir)
    with pytest.raises(ckpt.CheckpointGoneError, match=r"step-00000010.* was deleted while being read"):
        ckpt.load_state(store, old, {"model": FLM(CFG, FEATS).state_dict()})
    # pruned between the check of the marker and the read of the state: the same answer
    original = ckpt.verify_contents
    newest, _, _ = _save(store, run_dir, 40)
    reader = ckpt.find_latest(store, run_dir)

    def pruned_after_the_check(store_, ref):
        original(store_, ref)
        for step in (50, 60):
            _save(store, run_dir, step)

    monkeypatch.setattr(ckpt, "verify_contents", pruned_after_the_check)
    with pytest.raises(ckpt.CheckpointGoneError):
        ckpt.load_state(store, reader, {"model": FLM(CFG, FEATS).state_dict()})
    assert reader == newest


def test_truncated_or_corrupt_files_are_a_loud_error(tmp_path):
    store, run_dir = Store(), str(tmp_path / "run")
    ref, _, _ = _save(store, run_dir, 10)
    shard = next(f for f in os.listdir(ref.uri) if f.endswith(".distcp"))
    path = os.path.join(ref.uri, shard)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    with pytest.raises(ckpt.CheckpointCorruptError, match=f"corrupt checkpoint .*{shard} has .* bytes.*truncated"):
        ckpt.find_latest(store, run_dir)
    marker = os.path.join(ref.step_dir, "COMMITTED")
    with open(marker, "w") as f:
        f.write('{"attempt": "x", "step"')
    with pytest.raises(ckpt.CheckpointCorruptError, match=f"commit marker {marker} is unreadable"):
        ckpt.find_latest(store, run_dir)


@pytest.mark.parametrize("target", [".metadata", "__0_0.distcp"])
def test_bit_flip_is_caught_before_loading(tmp_path, target):
    store, run_dir = Store(), str(tmp_path / "run")
    ref, _, _ = _save(store, run_dir, 10)
    path = os.path.join(ref.uri, target)
    raw = bytearray(open(path, "rb").read())
    raw[len(raw) // 2] ^= 0x01  # same size: only a content checksum can tell
    open(path, "wb").write(bytes(raw))
    latest = ckpt.find_latest(store, run_dir)  # the listing still looks fine
    with pytest.raises(ckpt.CheckpointCorruptError, match=f"{target} does not match its sha256"):
        ckpt.load_state(store, latest, {"model": FLM(CFG, FEATS).state_dict()})


def _racing_writer(store, run_dir, seed, barrier, out):
    """A writer in its own process whose commit starts when the other's does."""
    original = ckpt.commit

    def synced(*args):
        barrier.wait(timeout=120)
        return original(*args)

    ckpt.commit = synced
    try:
        ref, uri, m = _save(store, run_dir, 10, seed=seed)
    except Exception as e:  # the parent reports it now instead of waiting out its timeout
        out.put((seed, f"{type(e).__name__}: {e}", None, None))
        raise
    # numpy, not tensors: torch would pass tensors through shared memory this process frees on exit
    out.put((seed, ref.attempt, uri, {k: v.numpy().copy() for k, v in m.state_dict().items()}))


@pytest.mark.slow
def test_zombie_writers_exactly_one_commit_wins(tmp_path, s3_store, bucket):
    """Two processes (a worker group and its zombie) save the same step and race their
    commits: exactly one marker wins, both writers learn the winner, the loser's files
    are gone, and the checkpoint loads as the winner's model."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    for store, run_dir in ((Store(), str(tmp_path / "run")), (s3_store, join(bucket, "zrun"))):
        barrier, out = ctx.Barrier(2), ctx.Queue()
        procs = [ctx.Process(target=_racing_writer, args=(store, run_dir, seed, barrier, out)) for seed in (1, 2)]
        for p in procs:
            p.start()
        results = {r[0]: r[1:] for r in (out.get(timeout=180) for _ in procs)}
        assert all(r[2] is not None for r in results.values()), results
        for p in procs:
            p.join(timeout=30)
            assert p.exitcode == 0
        marker = json.loads(store.read_bytes(join(ckpt.step_dir(run_dir, 10), "COMMITTED")))
        winner = next(seed for seed, (attempt, _, _) in results.items() if attempt == marker["attempt"])
        loser = 3 - winner
        win_ref = ckpt.find_latest(store, run_dir)
        assert win_ref.attempt == marker["attempt"]
        assert results[winner][1] == results[loser][1] == win_ref.uri  # the loser learned who won
        lost = ckpt.CheckpointRef(run_dir, 10, results[loser][0])
        assert not store.exists(join(lost.uri, ".metadata"))  # and its files are gone: no mix
        sd = FLM(CFG, FEATS, init_seed=99).state_dict()
        ckpt.load_state(store, win_ref, {"model": sd})
        assert all(torch.equal(sd[k], torch.from_numpy(v)) for k, v in results[winner][2].items())
        assert not all(torch.equal(sd[k], torch.from_numpy(v)) for k, v in results[loser][2].items())


def test_a_loser_whose_folder_the_winner_prunes_mid_commit_learns_it_lost(tmp_path, monkeypatch):
    """The winner's prune deletes the other attempts of its step, one of which may be a
    racing writer between its manifest and its marker: that writer lost, and must say
    so (and learn the winner), not report the step as failed (seen in CI)."""
    store, run_dir = Store(), str(tmp_path / "run")
    sd = {"model": FLM(CFG, FEATS, init_seed=1).state_dict()}
    loser = ckpt.CheckpointRef(run_dir, 10, "loser")
    dcp.save(sd, storage_writer=FsspecWriter(loser.uri, single_file_per_rank=True, sync_files=False))
    original, raced = ckpt._sha256, {}

    def winner_commits_first(store_, uri):
        if not raced:  # the other writer's commit lands between our listing and our checksums
            raced["winner"] = None
            raced["winner"] = _save(store, run_dir, 10, seed=2)[0]
        return original(store_, uri)

    monkeypatch.setattr(ckpt, "_sha256", winner_commits_first)
    assert ckpt.commit(store, loser, {"step": 10}) is False
    assert ckpt.find_latest(store, run_dir) == raced["winner"]
    assert not os.path.exists(loser.uri)


def test_an_async_save_commits_the_manifest_as_it_was_at_the_save(tmp_path, monkeypatch):
    """An async save commits after the write, while training goes on: an epoch record
    appended to the curve after the save of step 10 must not reach step 10's manifest
    (a resume from it would run that epoch again and record it twice)."""
    store, run_dir = Store(), str(tmp_path / "run")
    curve, appended = [{"step": 8, "epoch": 0}], threading.Event()
    original = ckpt.commit

    def commit_once_training_went_on(store_, ref, manifest):
        appended.wait(30)
        return original(store_, ref, manifest)

    monkeypatch.setattr(ckpt, "commit", commit_once_training_went_on)
    saver = ckpt.Checkpointer(store, run_dir, keep_last=2, async_save=True)
    saver.save(10, {"model": FLM(CFG, FEATS, init_seed=1).state_dict()}, {"step": 10, "curve": curve})
    curve.append({"step": 12, "epoch": 1})  # the epoch ends while the save is in flight
    appended.set()
    saver.finish()
    saver.close()
    assert ckpt.load_manifest(store, ckpt.find_latest(store, run_dir))["curve"] == [{"step": 8, "epoch": 0}]


def test_a_commit_refuses_an_attempt_whose_state_files_are_gone(tmp_path):
    """A zombie worker group's prune can delete an attempt's shards after its ranks wrote
    them and before rank 0 commits: the marker would commit a checkpoint with no state."""
    store, run_dir = Store(), str(tmp_path / "run")
    ref = ckpt.CheckpointRef(run_dir, 10, "a")
    dcp.save({"model": FLM(CFG, FEATS, init_seed=1).state_dict()}, storage_writer=FsspecWriter(ref.uri, single_file_per_rank=True, sync_files=False))
    for f in glob.glob(os.path.join(ref.uri, "*.distcp")):
        os.remove(f)
    with pytest.raises(FileNotFoundError, match=r"__0_0\.distcp is missing at the commit"):
        ckpt.commit(store, ref, {"step": 10})
    assert ckpt.find_latest(store, run_dir) is None


def test_keep_last_deletes_only_after_a_newer_commit(tmp_path, s3, bucket):
    store, run_dir = Store(), str(tmp_path / "run")
    refs = [_save(store, run_dir, s)[0] for s in (10, 20, 30)]
    assert sorted(os.listdir(run_dir)) == ["step-00000020", "step-00000030"]  # keep_last=2
    assert ckpt.find_latest(store, run_dir) == refs[-1]
    # a save whose commit fails (the store refuses its marker) deletes nothing: pruning
    # before the commit would have left one checkpoint, keep_last - 1
    from tests.faulty_s3 import FaultyS3

    with FaultyS3(s3.url) as px:
        store = Store.from_config(replace(s3.storage_config(), endpoint_url=px.url, max_attempts=2))
        run_dir = join(bucket, "keep")
        kept = [_save(store, run_dir, s)[0] for s in (10, 20)]
        px.deny = {"step-00000030/COMMITTED"}
        with pytest.raises(ckpt.CheckpointSaveError):
            _save(store, run_dir, 30)
    direct = Store.from_config(s3.storage_config())
    assert ckpt.find_latest(direct, run_dir) == kept[-1]
    assert all(direct.exists(join(r.step_dir, "COMMITTED")) for r in kept)  # step 10 too


# ---------------------------------------------------------------- resharding


def _model_and_state(rank, world, seed):
    from flm_dist.optim import build_optimizers
    from flm_dist.sharding import parallelize, plan_tables, unwrap
    from flm_dist.train_loop import _prime_optimizers, _state

    torch.manual_seed(seed)
    model = FLM(CFG, FEATS, init_seed=seed, table_device="meta")
    for unused in (model.user_decoder, model.item_decoder):  # ctr without reconstruction
        unused.requires_grad_(False)
    plan = plan_tables({n: t.num_embeddings for n, t in model.tables.items()}, CFG.embedding_dim, world, 0)
    pm = parallelize(model, plan, torch.device("cpu"), seed=seed)
    dense, sparse = build_optimizers(unwrap(pm), 1e-2, 0.0, 0.1, "adagrad")
    _prime_optimizers(pm, dense, sparse)
    return pm, plan, dense, sparse, _state(pm, dense, sparse)


def _train_and_save(rank, world, run_dir):
    """2 ranks: a few real steps (so optimiser state is non-trivial), then a save."""
    from flm_dist.batch import Batch

    pm, plan, dense, sparse, _ = _model_and_state(rank, world, seed=5)
    g = torch.Generator().manual_seed(rank)
    for _ in range(3):
        b = Batch(user=torch.randint(0, 97, (16,), generator=g), item=torch.randint(0, 41, (16,), generator=g), features={"seg": torch.randint(0, 13, (16,), generator=g)}, label=torch.rand(16, generator=g).round())
        out = pm(b)
        torch.nn.functional.binary_cross_entropy_with_logits(out.score, b.label).backward()
        dense.step()
        sparse.step()
        dense.zero_grad()
        sparse.zero_grad()
    from flm_dist.train_loop import _state

    saver = ckpt.Checkpointer(Store(), run_dir, keep_last=1, async_save=True)
    saver.save(3, _state(pm, dense, sparse), {"step": 3, "epoch": 0, "epoch_done": False})
    uri = saver.finish()
    saver.close()
    return uri, _local(pm, plan, dense, sparse, rank)


def _local(pm, plan, dense, sparse, rank):
    """This rank's table rows (with their global range), Adagrad state, dense weights and Adam state."""
    from flm_dist.sharding import unwrap

    m = unwrap(pm)
    tables = {n: (plan[n].local_range(rank), t.weight.detach().clone()) for n, t in m.tables.items()}
    accs = {n: sparse.state[t.weight]["sum"].clone() for n, t in m.tables.items()}
    dense_sd = {k: v.clone() for k, v in m.state_dict().items() if not k.startswith("tables.")}
    adam = {(n, k): dense.state[p][k].clone() for n, p in m.named_parameters() if p in dense.state for k in ("exp_avg", "exp_avg_sq", "step")}
    return tables, accs, dense_sd, adam


def _load_world(rank, world, uri):
    """Load the checkpoint into a `world`-rank sharded model; return this rank's local
    tables, Adagrad state and dense weights."""
    pm, plan, dense, sparse, state = _model_and_state(rank, world, seed=123)  # different init
    ckpt.load_state(Store(), ckpt.resolve(Store(), uri), state)
    return _local(pm, plan, dense, sparse, rank)


@pytest.mark.slow
def test_reshard_2_to_1_and_3(tmp_path):
    """What 2 ranks saved (weights and optimiser state) is what 1, 2 and 3 ranks load."""
    saved = run_ranks(_train_and_save, 2, str(tmp_path / "run"))
    uri = saved[0][0]
    # the saved state, whole: each table's row blocks from both ranks, in order
    full_tables = {n: torch.cat([r[1][0][n][1] for r in saved]) for n in saved[0][1][0]}
    full_accs = {n: torch.cat([r[1][1][n] for r in saved]) for n in saved[0][1][1]}
    full_dense, full_adam = saved[0][1][2], saved[0][1][3]
    assert all(torch.equal(v, saved[1][1][2][k]) for k, v in full_dense.items())  # DDP kept replicas equal
    for world in (1, 2, 3):
        loads = [_load_world(0, 1, uri)] if world == 1 else run_ranks(_load_world, world, uri)
        for rank, (tables, accs, dense_sd, adam) in enumerate(loads):
            for name, ((lo, hi), w) in tables.items():
                assert torch.equal(w, full_tables[name][lo:hi]), f"world {world} rank {rank} table {name}"
                assert torch.equal(accs[name], full_accs[name][lo:hi])
            assert all(torch.equal(v, full_dense[k]) for k, v in dense_sd.items())
            assert all(torch.equal(v, full_adam[k]) for k, v in adam.items())
    assert any(float(a.abs().sum()) > 0 for a in full_accs.values())  # the state was really trained


def test_commit_whose_response_was_lost_stands(s3, bucket):
    """The marker PUT succeeds but its response is lost; botocore retries it and gets
    412 (the marker exists). The writer must see that the marker is its own, keep its
    attempt folder and report the commit (before: it deleted the folder the marker
    names, and the next load raised CheckpointCorruptError)."""
    from tests.faulty_s3 import FaultyS3

    with FaultyS3(s3.url) as px:
        store = Store.from_config(replace(s3.storage_config(), endpoint_url=px.url, max_attempts=3))
        px.lose_response[("PUT", "/COMMITTED")] = 1
        run_dir = join(bucket, "lost")
        ref, uri, m = _save(store, run_dir, 10)
        assert px.counts["lost_responses"] == 1
    assert uri == ref.uri
    direct = Store.from_config(s3.storage_config())
    latest = ckpt.find_latest(direct, run_dir)
    assert latest == ref
    sd = FLM(CFG, FEATS, init_seed=99).state_dict()
    ckpt.load_state(direct, latest, {"model": sd})
    assert all(torch.equal(sd[k], v) for k, v in m.state_dict().items())


def test_failed_prune_after_a_commit_is_not_a_failed_save(s3, bucket):
    """Deleting the oldest checkpoint fails (403 on its deletes): the new step is committed
    all the same and the save reports it (before: 'nothing was committed')."""
    from tests.faulty_s3 import FaultyS3

    with FaultyS3(s3.url) as px:
        store = Store.from_config(replace(s3.storage_config(), endpoint_url=px.url, max_attempts=2))
        run_dir = join(bucket, "prune")
        _save(store, run_dir, 10)
        _save(store, run_dir, 20)
        px.deny_deletes = {"step-00000010"}
        ref, uri, _ = _save(store, run_dir, 30)  # keep_last=2: step 10 should go, but cannot
    assert uri == ref.uri
    direct = Store.from_config(s3.storage_config())
    assert ckpt.find_latest(direct, run_dir) == ref
    assert ckpt.committed_steps(direct, run_dir) == [10, 20, 30]  # pruned after a later commit


def test_a_manifest_the_store_will_not_serve_is_a_storage_error_not_a_corrupt_checkpoint(s3, bucket):
    """Read refused by the store (403 on the manifest): the error says storage, so that
    nobody deletes a good checkpoint over it; an unparseable manifest is a corrupt one."""
    from flm_dist.storage import StorageError
    from tests.faulty_s3 import FaultyS3

    run_dir = join(bucket, "denied")
    with FaultyS3(s3.url) as px:
        store = Store.from_config(replace(s3.storage_config(), endpoint_url=px.url, max_attempts=2))
        ref, _, _ = _save(store, run_dir, 10)
        px.deny = {"manifest.json"}
        with pytest.raises(StorageError) as e:
            ckpt.load_manifest(store, ref)
        assert not isinstance(e.value, ckpt.CheckpointCorruptError) and "manifest.json" in str(e.value)
    direct = Store.from_config(s3.storage_config())
    direct.write_bytes(join(ref.uri, "manifest.json"), b'{"step": 1')
    with pytest.raises(ckpt.CheckpointCorruptError, match="manifest.json"):
        ckpt.load_manifest(direct, ref)


@pytest.mark.parametrize("denied", [".metadata", ".distcp"])
def test_state_the_store_will_not_serve_is_a_storage_error_not_a_corrupt_checkpoint(s3, bucket, denied):
    """A 403 (or an outage past the retries) on DCP's metadata or a shard file: the load
    names storage, so that nobody deletes a good checkpoint over it; bytes that do not
    decode are a corrupt checkpoint."""
    from flm_dist.storage import StorageError
    from tests.faulty_s3 import FaultyS3

    run_dir = join(bucket, "denied-state-" + denied.strip("."))
    with FaultyS3(s3.url) as px:
        store = Store.from_config(replace(s3.storage_config(), endpoint_url=px.url, max_attempts=2))
        ref, _, _ = _save(store, run_dir, 10)
        px.deny = {denied}
        loads = {"load_state": lambda: ckpt.load_state(store, ref, {"model": FLM(CFG, FEATS).state_dict()})}
        if denied == ".metadata":  # the keys come from .metadata alone
            loads["saved_keys"] = lambda: ckpt.saved_keys(store, ref)
        for what, load in loads.items():
            with pytest.raises(StorageError) as e:
                load()
            assert not isinstance(e.value, ckpt.CheckpointCorruptError), what
            assert denied in str(e.value) and ref.uri in str(e.value), (what, str(e.value))
    direct = Store.from_config(s3.storage_config())
    direct.write_bytes(join(ref.uri, ".metadata"), b"not a pickle")
    with pytest.raises(ckpt.CheckpointCorruptError, match=re.escape(ref.uri)):
        ckpt.saved_keys(direct, ref)
