"""Checkpoints: commit markers, corruption, orphans, zombie writers, keep_last, and
resharding a row-wise checkpoint saved by 2 ranks onto 1 and 3."""

from __future__ import annotations

import json
import os

import pytest
import torch

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


def test_zombie_writers_exactly_one_commit_wins(tmp_path, s3_store, bucket):
    for store, run_dir in ((Store(), str(tmp_path / "run")), (s3_store, join(bucket, "zrun"))):
        a, uri_a, _ = _save(store, run_dir, 10, seed=1)
        b, uri_b, _ = _save(store, run_dir, 10, seed=2)  # a second attempt at the same step
        assert uri_a == uri_b == a.uri  # the second learned that the first won
        assert not store.exists(join(b.uri, ".metadata"))  # and its files are gone: no mix
        marker = json.loads(store.read_bytes(join(a.step_dir, "COMMITTED")))
        assert marker["attempt"] == a.attempt
        assert ckpt.find_latest(store, run_dir) == a


def test_keep_last_deletes_only_after_a_newer_commit(tmp_path):
    store, run_dir = Store(), str(tmp_path / "run")
    refs = [_save(store, run_dir, s)[0] for s in (10, 20, 30)]
    assert sorted(os.listdir(run_dir)) == ["step-00000020", "step-00000030"]  # keep_last=2
    assert ckpt.find_latest(store, run_dir) == refs[-1]


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
    return uri


def _load_world(rank, world, uri):
    """Load the checkpoint into a `world`-rank sharded model; return this rank's local
    tables, Adagrad state and dense weights."""
    pm, plan, dense, sparse, state = _model_and_state(rank, world, seed=123)  # different init
    ckpt.load_state(Store(), ckpt.resolve(Store(), uri), state)
    from flm_dist.sharding import unwrap

    m = unwrap(pm)
    tables = {n: (plan[n].local_range(rank), t.weight.detach().clone()) for n, t in m.tables.items()}
    accs = {n: sparse.state[t.weight]["sum"].clone() for n, t in m.tables.items()}
    dense_sd = {k: v.clone() for k, v in m.state_dict().items() if not k.startswith("tables.")}
    adam = {n: dense.state[p]["exp_avg_sq"].clone() for n, p in m.named_parameters() if p in dense.state}
    return tables, accs, dense_sd, adam


@pytest.mark.slow
def test_reshard_2_to_1_and_3(tmp_path):
    uri = run_ranks(_train_and_save, 2, str(tmp_path / "run"))[0]
    # world 1, no process group: the whole tables
    (full_tables, full_accs, full_dense, full_adam) = _load_world_single(uri)
    for world in (2, 3):
        for rank, (tables, accs, dense_sd, adam) in enumerate(run_ranks(_load_world, world, uri)):
            for name, ((lo, hi), w) in tables.items():
                assert torch.equal(w, full_tables[name][lo:hi]), f"world {world} rank {rank} table {name}"
                assert torch.equal(accs[name], full_accs[name][lo:hi])
            assert all(torch.equal(v, full_dense[k]) for k, v in dense_sd.items())
            assert all(torch.equal(v, full_adam[k]) for k, v in adam.items())
    assert any(float(a.abs().sum()) > 0 for a in full_accs.values())  # the state was really trained


def _load_world_single(uri):
    tables, accs, dense_sd, adam = _load_world(0, 1, uri)
    return {n: w for n, (_, w) in tables.items()}, accs, dense_sd, adam
