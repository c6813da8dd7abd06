"""The train loop itself, run without Ray: the Worker on 1 process or on 2 gloo ranks,
fed by a local stand-in for its Ray Data shard (the same read tasks, in-process).
Faults are injected from the test (a gradient hook), never by product code."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from flm_dist import checkpoint as ckpt
from flm_dist import ingest, launch
from flm_dist.config import ConfigError, FeatureConfig, to_dict
from flm_dist.data.batches import BatchStream
from flm_dist.data.budget import BadRows
from flm_dist.data.encode import EncodeSpec, empty_columns, encode_table, read_units
from flm_dist.data.hashing import HashSpec
from flm_dist.data.pipeline import assign_units
from flm_dist.data.plan import plan_read
from flm_dist.data.schema import ReadSpec
from flm_dist.export import load_model
from flm_dist.model import table_sizes
from flm_dist.storage import Store
from flm_dist.train_loop import NonFiniteLossError, ValidationBatches, Worker, first_epoch, train
from tests.conftest import tiny_job
from tests.dist import run_ranks


class LocalShard:
    """What `ray.train.get_dataset_shard` gives a rank, read in this process: the
    rank's units (`assign_units`), read and encoded by the read-task body."""

    def __init__(self, plan, spec: EncodeSpec, rank: int, world: int, seed: int = 0, skip: dict | None = None):
        self.plan, self.spec, self.rank, self.world, self.seed = plan, spec, rank, world, seed
        self.epoch = 0
        self.skip = skip or {}  # a resumed epoch's consumed rows (`ingest.resume_point`), first pass only

    def iter_batches(self, batch_size, batch_format="numpy", prefetch_batches=0):
        units = assign_units(self.plan.units, self.world, self.seed, self.epoch)[self.rank]
        skip, self.skip = self.skip, {}
        units = [u for u in units if not (u.index in skip and skip[u.index] is None)]
        self.epoch += 1
        files = [f.uri for f in self.plan.files]
        partial = {i: m for i, m in skip.items() if m is not None}
        for t in read_units(units, files, self.spec, Store(), self.plan.columns, None, "fail", empty_columns(self.spec), partial):
            yield {c: t.column(c).to_numpy() for c in t.column_names}


def _data(path, n=3000, seed=0, positives=1.0):
    rng = np.random.default_rng(seed)
    path.mkdir(parents=True, exist_ok=True)
    for i in range(2):
        pq.write_table(pa.table({
            "user_id": pa.array(rng.integers(0, 300, n), pa.int64()),
            "item_id": pa.array(rng.integers(0, 100, n), pa.int64()),
            "label": pa.array((rng.random(n) < positives).astype(np.float32)),
            "u_segment": pa.array([f"s{x}" for x in rng.integers(0, 5, n)]),
            "i_category": pa.array([f"c{x}" for x in rng.integers(0, 7, n)]),
        }), path / f"part-{i}.parquet", row_group_size=500)
    return str(path)


def _worker(job, rank=0, world=1):
    store = Store()
    hs = HashSpec.build(table_sizes(job.model, job.data.features), job.model.hash_seed)
    rs = ReadSpec.for_task(job.task, job.data.features, job.data.rating_range)
    plan = plan_read(store, job.train_data, rs)
    manifest = {"task": job.task, "config": to_dict(job)}
    spec = launch._worker_spec(job, store, "train", hs, 1, train_plan=plan.to_dict(), manifest=manifest)
    w = Worker(spec)
    w.build()
    progress, start = w.resume_point()
    w.restore(start)
    return w, progress, LocalShard(plan, EncodeSpec(read=rs, hash=hs), rank, world, job.run.seed)


def _train_with_inf_gradient(rank, world, runs, data, at_step):
    """Every rank trains; on rank 0 one step's gradient of a dense weight turns Inf
    while the loss stays finite."""
    job = tiny_job(runs, "guard", "ctr", **{"data.train": data, "data.batch_size": 128, "checkpoint.every_steps": 2, "train.epochs": 2})
    w, progress, shard = _worker(job, rank, world)
    calls = {"n": 0}

    def poison(grad):
        calls["n"] += 1
        return grad * float("inf") if calls["n"] == at_step and rank == 0 else grad

    from flm_dist.sharding import unwrap

    unwrap(w.model).item_encoder[0].weight.register_hook(poison)
    try:
        train(w, progress, first_epoch(w, progress, shard))
    except NonFiniteLossError as e:
        return str(e)
    return None


@pytest.mark.slow
def test_inf_gradient_with_a_finite_loss_stops_before_a_checkpoint(tmp_path):
    """Before: the guard looked at the loss only, one step late, so the save after the
    poisoned step committed NaN weights."""
    data = _data(tmp_path / "log")
    runs = str(tmp_path / "runs")
    errors = run_ranks(_train_with_inf_gradient, 2, runs, data, 5)
    assert all(e is not None and "NaN/Inf at step 5" in e for e in errors), errors
    latest = ckpt.find_latest(Store(), os.path.join(runs, "guard"))
    assert latest is not None and latest.step == 4  # the checkpoint before the poisoned step stands
    model, _, _ = load_model(Store(), latest.uri)
    assert all(torch.isfinite(t).all() for t in model.state_dict().values())


def test_retrieval_drops_non_clicks_without_failing_the_bad_row_budget(tmp_path):
    """A retrieval job on a click log: the 60% non-clicks are filtered (counted as
    not_positive), not bad rows that blow data.max_bad_fraction."""
    data = _data(tmp_path / "log", positives=0.4)
    job = tiny_job(str(tmp_path / "runs"), "clicks", "retrieval", **{"data.train": data, "data.batch_size": 256})
    w, progress, shard = _worker(job)
    res = train(w, progress, first_epoch(w, progress, shard))
    labels = np.concatenate([pq.read_table(f).column("label").to_numpy() for f in sorted((tmp_path / "log").glob("*.parquet"))])
    assert res["rows"] == int((labels > 0).sum())
    assert res["bad_rows"] == {"not_positive": int((labels <= 0).sum())}


def test_the_first_epoch_is_read_by_the_fetcher_started_before_the_model(tmp_path):
    """worker_main starts reading the first epoch before the model is built (time to
    first batch); the train loop must train on that reader, not open the epoch again,
    and a resumed run with no epoch left closes it unread."""
    data = _data(tmp_path / "log")
    job = tiny_job(str(tmp_path / "runs"), "early", "ctr", **{"data.train": data, "data.batch_size": 256, "train.epochs": 2})
    w, progress, shard = _worker(job)
    first = first_epoch(w, progress, shard)
    res = train(w, progress, first)
    assert shard.epoch == 2  # two epochs trained, each opened once
    assert res["rows"] == 2 * 6000
    w, progress, shard = _worker(job)  # resumes the finished run
    first = first_epoch(w, progress, shard)
    assert first.epoch == 2
    train(w, progress, first)
    assert first.done and shard.epoch <= 1


def test_data_resumes_from_the_checkpoint_the_workers_restored(ray_local, tmp_path):
    """The rows skipped on resume are those of the checkpoint rank 0 decided and every
    rank restored, even when a newer one is committed in between (a zombie's, say);
    before, the data side read "the latest" again on its own."""
    import ray

    from flm_dist.data.position import ConsumedRows
    from flm_dist.model import FLM

    data = _data(tmp_path / "log", n=1000)
    plan = plan_read(Store(), data, ReadSpec.for_task("pretrain", [], [1, 5]))
    run_dir = str(tmp_path / "runs" / "r")
    refs = {}
    for step, rows in ((3, 200), (6, 400)):
        consumed = ConsumedRows(plan)
        consumed.add((np.int64(plan.units[0].index) << 32) | np.arange(rows, dtype=np.int64))
        saver = ckpt.Checkpointer(Store(), run_dir, keep_last=3, async_save=False)
        job = tiny_job(str(tmp_path / "runs"), "r")
        refs[step] = saver.save(step, {"model": FLM(job.model, job.data.features).state_dict()}, {"step": step, "epoch": 0, "epoch_done": False, "data_state": consumed.state()})
        saver.close()
    assert ckpt.find_latest(Store(), run_dir) == refs[6]
    channel = ingest.RunChannel.remote()
    cfg = ingest.FLMDataConfig({}, Store(), channel)
    with pytest.raises(RuntimeError, match="before rank 0 decided"):
        cfg.resume(plan)
    ray.get(channel.set_resume.remote(refs[3].uri))
    epoch, skip = cfg.resume(plan)
    first = plan.units[0].index
    assert epoch == 0 and int(skip[first].sum()) == 200  # checkpoint 3's rows, not checkpoint 6's


def _popularity(rank, world):
    from flm_dist.objectives import PopularityEstimator

    est = PopularityEstimator(buckets=8)
    est.update(torch.tensor([rank, rank, 5]))  # rank 0: {0: 2, 5: 1}; rank 1: {1: 2, 5: 1}
    first = est.sync()
    est.update(torch.tensor([7]))
    second = est.sync()  # only what was counted since the first sync is added
    resumed = PopularityEstimator(buckets=8)
    resumed.load(second)  # a resumed run starts from the saved global estimate
    resumed.update(torch.tensor([rank]))
    third = resumed.sync()
    return first, second, third, float(resumed.log_q(torch.tensor([5]))[0]), _negatives(rank)


def _negatives(rank):
    """The uniform negatives' catalog: rank 0 sees items 1, 2 (categories 10, 20), rank 1
    items 2, 3 (21, 31): the saved state is every row seen, each with one rank's values,
    and a resumed sampler draws from all of it."""
    from flm_dist.batch import Batch
    from flm_dist.objectives import NegativeSampler

    cat = FeatureConfig(name="cat", side="item")
    neg = NegativeSampler(8, [cat], 64, "cpu", seed=rank)
    items = torch.tensor([1, 2]) + rank
    neg.observe(Batch(user=torch.zeros(2, dtype=torch.long), item=items, features={"cat": torch.tensor([10, 20]) + rank * 11}))
    live = neg.seen.clone()
    state = neg.state()
    assert torch.equal(neg.seen, live)  # a save leaves the live sampler as it was
    resumed = NegativeSampler(8, [cat], 64, "cpu", seed=rank)
    resumed.load(state)
    rows, feats, share = resumed.sample()
    return state["seen"].tolist(), state["features"]["cat"].tolist(), sorted(set(rows.tolist())), sorted(set(zip(rows.tolist(), feats["cat"].tolist(), strict=True))), share


@pytest.mark.slow
def test_popularity_estimate_and_negatives_catalog_are_global_and_survive_a_resume():
    res = run_ranks(_popularity, 2)
    for seen, cats, drawn, pairs, share in (r[4] for r in res):
        assert seen == [0, 1, 1, 1, 0, 0, 0, 0] and cats == [0, 10, 21, 31, 0, 0, 0, 0]  # item 2: rank 1's value
        assert drawn == [1, 2, 3] and pairs == [(1, 10), (2, 21), (3, 31)] and share == 64 / 3
    for first, second, third, *_ in res:
        assert first["counts"].tolist() == [2, 2, 0, 0, 0, 2, 0, 0] and float(first["total"]) == 6
        assert second["counts"].tolist() == [2, 2, 0, 0, 0, 2, 0, 2] and float(second["total"]) == 8
        assert third["counts"].tolist() == [3, 3, 0, 0, 0, 2, 0, 2] and float(third["total"]) == 10
    # add-one smoothing over the 4 buckets counted, not all 8
    assert res[0][3] == res[1][3] == pytest.approx(float(np.log(3 / 14)))


def test_a_resumed_run_draws_its_negatives_from_every_item_seen_before_it(tmp_path):
    """The uniform negatives' catalog is in the checkpoint. Resumed without it, a run
    drew them from its first batch's items again (a softmax over a tiny catalog, which
    undoes a pretrained ranking), and the item features of a history's items were zeros
    until those items came again."""
    data = _data(tmp_path / "log")
    job = tiny_job(str(tmp_path / "runs"), "neg", "retrieval", **{"data.train": data, "data.batch_size": 64, "train.uniform_negatives": 16,
                                                                 "checkpoint.every_steps": 3, "train.max_steps": 3, "checkpoint.async_save": False})
    w, progress, shard = _worker(job)
    train(w, progress, first_epoch(w, progress, shard))
    seen, cats = w.negatives.seen.clone(), w.negatives.cache["i_category"].clone()
    resumed, progress, _ = _worker(job)
    assert progress.step == 3 and int(seen.sum()) == resumed.negatives._n > 50
    assert torch.equal(resumed.negatives.seen, seen) and torch.equal(resumed.negatives.cache["i_category"][seen], cats[seen])
    assert set(resumed.negatives.sample()[0].tolist()) <= set(torch.nonzero(seen).flatten().tolist())


def test_the_popularity_estimate_is_the_share_of_counted_items_in_a_large_table():
    """q(item) is about its share of the counted items, however many buckets the table
    has: with 2^20 buckets and 2,000 items counted, (c + 1) / (total + buckets) made it
    500 times too small."""
    from flm_dist.objectives import PopularityEstimator

    est = PopularityEstimator(buckets=1 << 20)
    est.update(torch.tensor([3] * 1500 + [9] * 400 + [11] * 100))
    q = est.log_q(torch.tensor([3, 9, 11])).exp()
    assert torch.allclose(q, torch.tensor([1501 / 2003, 401 / 2003, 101 / 2003]))
    resumed = PopularityEstimator(buckets=1 << 20)
    resumed.load(est.sync())  # the seen buckets come back with the counts
    assert torch.allclose(resumed.log_q(torch.tensor([3])), est.log_q(torch.tensor([3])))


def test_validation_carve_partitions_the_training_rows(tmp_path):
    """train + valid = known (the training data), disjoint, about valid_fraction held
    out, by (user, item) pair; eval rows of a split are in none of them."""
    from dataclasses import replace as dc_replace

    from flm_dist.config import SplitConfig

    t = pq.read_table(_data(tmp_path / "log"))
    rs = ReadSpec.for_task("ctr", [], [1, 5])
    hs = HashSpec.build({"user": 4096, "item": 1024}, 0)
    base = EncodeSpec(read=rs, hash=hs, split=SplitConfig(by="user", fraction=0.2), valid_fraction=0.25)
    pos = {side: set(encode_table(t, dc_replace(base, side=side))["_pos"].tolist()) for side in ("train", "valid", "known", "eval")}
    assert pos["train"] | pos["valid"] == pos["known"] and not pos["train"] & pos["valid"]
    assert not pos["known"] & pos["eval"] and len(pos["known"]) + len(pos["eval"]) == t.num_rows
    assert 0.2 < len(pos["valid"]) / len(pos["known"]) < 0.3


def test_pretraining_never_reads_the_fine_tunes_validation_rows(tmp_path):
    """A fine-tune validates on its carve of the training rows; a backbone pretrained on
    the same log must not have trained on them, or the pretrained arm's validation
    score is inflated and early stopping picks its epochs on memorised pairs."""
    data = _data(tmp_path / "log")
    t = pq.read_table(data)
    store = Store()
    read = {}
    for task, validate in (("pretrain", False), ("ctr", True)):
        job = tiny_job(str(tmp_path / "runs"), task, task, **{"data.train": data, "data.pretrain": data})
        hs = HashSpec.build(table_sizes(job.model, job.data.features), job.model.hash_seed)
        _, _, specs = launch.plan_datasets(job, store, hs, data, None, task, validate=validate)
        read[task] = {side: set(encode_table(t, specs[side])["_pos"].tolist()) for side in specs}
    valid = read["ctr"]["valid"]
    assert valid and not valid & read["pretrain"]["train"]
    assert read["pretrain"]["train"] == read["ctr"]["train"]  # the rest: every other row
    # the reference data (what counts as seen in training) still holds every row
    assert read["pretrain"]["known"] == read["ctr"]["known"] == set(encode_table(t, EncodeSpec(read=specs["train"].read, hash=specs["train"].hash))["_pos"].tolist())


def _finetune(tmp_path, name, task="ctr", **sets):
    """An in-process fine-tune with a validation carve, on labels the model cannot
    learn (random): it overfits, and early stopping has to pick the best epoch.
    Retrieval validates by full ranking over the training data's catalog."""
    data = _data(tmp_path / "log", positives=0.5)
    job = tiny_job(str(tmp_path / "runs"), name, task, **{"data.train": data, "data.batch_size": 128, "train.lr": 0.02, "train.sparse_lr": 0.2, **sets})
    store = Store()
    hs = HashSpec.build(table_sizes(job.model, job.data.features), job.model.hash_seed)
    datasets, plans, specs = launch.plan_datasets(job, store, hs, data, None, task, validate=True)
    manifest = {"task": task, "config": to_dict(job)}
    catalog = launch.training_reference(store, plans["train"], specs["known"], task).catalog if task in ("retrieval", "pretrain") else None
    spec = launch._worker_spec(job, store, "train", hs, 1, train_plan=plans["train"].to_dict(), valid_rows=300, manifest=manifest, init_from=job.init_from,
                               catalog=catalog)
    w = Worker(spec)
    w.build()
    progress, start = w.resume_point()
    w.restore(start)
    shard = LocalShard(plans["train"], specs["train"], 0, 1)
    valid = LocalShard(plans["valid"], specs["valid"], 0, 1)
    return w, train(w, progress, first_epoch(w, progress, shard), valid)


def test_validation_rows_are_read_once_then_replayed_when_they_fit(tmp_path):
    """Every epoch validates on the same rows: with room, later validations replay the
    first pass's batches (the same rows, no read, bad and good rows counted once);
    without room, each validation reads its rows again."""
    data = _data(tmp_path / "log")
    job = tiny_job(str(tmp_path / "runs"), "vc", "ctr", **{"data.train": data, "data.batch_size": 128})
    hs = HashSpec.build(table_sizes(job.model, job.data.features), job.model.hash_seed)
    _, plans, specs = launch.plan_datasets(job, Store(), hs, data, None, "ctr", validate=True)
    for limit, reads_expected in ((64 << 20, 1), (1024, 3)):
        shard, reads = LocalShard(plans["valid"], specs["valid"], 0, 1), []

        class Counting:
            def iter_batches(self, _shard=shard, _reads=reads, **kw):
                _reads.append(1)
                return _shard.iter_batches(**kw)

        valid = ValidationBatches(BatchStream(Counting(), 128, tuple(job.data.features)), None, torch.device("cpu"), limit)
        budget = BadRows(Store(), None, 1.0)
        passes = [[pair for b in valid(budget) for pair in zip(b.user.tolist(), b.item.tolist(), strict=True)] for _ in range(3)]
        assert len(reads) == reads_expected
        assert sorted(passes[0]) == sorted(passes[1]) == sorted(passes[2]) and len(passes[0]) > 200
        if reads_expected == 1:  # a replay: the very batches, in order
            assert passes[0] == passes[1] == passes[2]
        assert budget.other_rows == reads_expected * len(passes[0])


def test_early_stopping_keeps_and_returns_the_best_epoch(tmp_path):
    w, res = _finetune(tmp_path, "es", **{"train.epochs": 8, "train.patience": 2, "checkpoint.keep_last": 1})
    curve = res["epochs_curve"]
    losses = [c["valid_loss"] for c in curve]
    best = res["best"]
    assert best["valid_loss"] == min(losses) and curve[best["epoch"]]["step"] == best["step"]
    if len(curve) < 8:  # stopped early: the last `patience` epochs did not improve
        assert all(v > best["valid_loss"] for v in losses[-2:]) and len(curve) - 1 - best["epoch"] == 2
    # the best checkpoint survives keep_last=1, is the result, and is what the model holds now
    ref = ckpt.resolve(Store(), res["checkpoint"])
    assert ref.step == best["step"] and ckpt.find_latest(Store(), w.spec.run.dir).step == curve[-1]["step"]
    from flm_dist.sharding import unwrap

    saved, _, _ = load_model(Store(), res["checkpoint"])
    now = unwrap(w.model).state_dict()
    assert all(torch.equal(v, now[k]) for k, v in saved.state_dict().items())
    assert ckpt.load_manifest(Store(), ref)["best"]["step"] == best["step"]
    # the run folder stands for the run's result, as its export and evaluation take it
    assert ckpt.resolve_result(Store(), w.spec.run.dir).step == best["step"]
    assert load_model(Store(), w.spec.run.dir)[2].step == best["step"]
    last = ckpt.find_latest(Store(), w.spec.run.dir)
    assert ckpt.resolve_result(Store(), last.step_dir).step == last.step  # a step folder is itself


def test_a_run_stopped_by_max_steps_at_an_epochs_end_still_validates_that_epoch(tmp_path):
    """max_steps reached on an epoch's last batch: that epoch ended, so it is validated,
    a candidate for the best, and saved as done (a rerun with more steps starts the next)."""
    _, whole = _finetune(tmp_path / "a", "one", **{"train.epochs": 1})
    steps = whole["epochs_curve"][-1]["step"]
    _, res = _finetune(tmp_path / "b", "capped", **{"train.epochs": 2, "train.max_steps": steps})
    assert [c["epoch"] for c in res["epochs_curve"]] == [0] and res["best"]["step"] == steps
    manifest = ckpt.load_manifest(Store(), ckpt.resolve(Store(), res["checkpoint"]))
    assert manifest["step"] == steps and manifest["epoch_done"]


def _bad_data(path, every: int = 97) -> tuple[str, int]:
    """`_data`'s log with a null user_id on every `every`-th row: (URI, bad rows)."""
    path.mkdir(parents=True)
    bad = 0
    for f in sorted(Path(_data(path.parent / (path.name + "-clean"))).glob("*.parquet")):
        t = pq.read_table(f)
        users = t.column("user_id").to_pylist()
        users = [None if i % every == 0 else u for i, u in enumerate(users)]
        bad += users.count(None)
        pq.write_table(t.set_column(0, "user_id", pa.array(users, pa.int64())), path / f.name, row_group_size=500)
    return str(path), bad


def _run(tmp_path, name, data, **sets):
    """One rank, in this process, reading its training side as launch does (the split,
    the validation carve) and resuming from the run folder's latest checkpoint."""
    from flm_dist.data.encode import training_read

    job = tiny_job(str(tmp_path / "runs"), name, "ctr", **{"data.train": data, "data.batch_size": 128, "data.valid_fraction": 0.0, **sets})
    store = Store()
    hs = HashSpec.build(table_sizes(job.model, job.data.features), job.model.hash_seed)
    enc = training_read(job.data, job.task, 0, hs, job.run.seed, eval_given=False)
    plan = plan_read(store, data, enc.read)
    spec = launch._worker_spec(job, store, "train", hs, 1, train_plan=plan.to_dict(), manifest={"task": "ctr", "config": to_dict(job)})
    w = Worker(spec)
    w.build()
    progress, start = w.resume_point()
    w.restore(start)
    _, skip = ingest.resume_point(store, start.uri if start else None, plan)
    return w, train(w, progress, first_epoch(w, progress, LocalShard(plan, enc, 0, 1, job.run.seed, skip=skip)))


def test_the_bad_row_budget_is_an_epochs_share(tmp_path):
    """1% bad rows under a 1.5% budget: within it every epoch, so a 3-epoch run ends
    (the counts of earlier epochs do not fill a later epoch's budget)."""
    data, bad = _bad_data(tmp_path / "log")
    _, res = _run(tmp_path, "epochs", data, **{"train.epochs": 3, "data.max_bad_fraction": 0.015})
    assert res["bad_rows"] == {"null_user_id": 3 * bad} and res["epochs"] == 3


def test_a_resumed_epoch_counts_each_bad_row_once(tmp_path):
    """Stopped mid-epoch, resumed: the epoch's bad rows are counted once over both
    attempts (the ones dropped before the checkpoint are neither read nor counted
    again), and every good row is trained once."""
    data, bad = _bad_data(tmp_path / "log")
    sets = {"train.epochs": 1, "data.max_bad_fraction": 0.015, "checkpoint.every_steps": 4}
    _, first = _run(tmp_path, "resume", data, **sets, **{"train.max_steps": 25})
    _, second = _run(tmp_path, "resume", data, **sets)
    assert first["steps"] == 25 and sum(second["bad_rows"].values()) == bad
    assert first["rows"] + second["rows"] == 6000 - bad


def test_a_mid_epoch_checkpoint_counts_units_done_with_a_validation_carve(tmp_path):
    """With rows held out (the validation carve), a read unit is done once every row
    of its training side is consumed, so a checkpoint lists it as done instead of
    carrying a bitmap of it until the epoch ends."""
    data, _ = _bad_data(tmp_path / "log")
    sets = {"train.epochs": 1, "data.valid_fraction": 0.1, "data.max_bad_fraction": 0.015, "checkpoint.every_steps": 4, "train.max_steps": 40}
    w, _ = _run(tmp_path, "carve", data, **sets)
    state = ckpt.load_manifest(Store(), ckpt.find_latest(Store(), w.spec.run.dir))["data_state"]
    assert len(state["done"]) >= 8 and len(state["done"]) + len(state["partial"]) <= 12


def _stops(task: str, criteria: list[float], start: float | None = None) -> tuple[list[bool], dict]:
    """`_end_of_epoch`'s early-stopping decisions over a scripted validation curve
    (`start`: a fine-tune from a backbone validates that backbone first, epoch -1)."""
    from types import SimpleNamespace

    from flm_dist.train_loop import Progress, _end_of_epoch

    values = iter(([] if start is None else [start]) + criteria)
    w = SimpleNamespace(rank=1, spec=SimpleNamespace(task=task, train=SimpleNamespace(patience=2)), validate=lambda _: {"valid_loss": next(values)})
    p, stops = Progress(), []
    if start is not None:
        _end_of_epoch(w, p, lambda budget: None, None, 0.0, epoch=-1)
    for epoch in range(len(criteria)):
        p.epoch = epoch
        stops.append(_end_of_epoch(w, p, lambda budget: None, None, 0.0))
    return stops, p.best


def test_a_fine_tune_from_a_backbone_does_not_count_its_first_epoch_against_patience():
    """The first epoch after the switch from pretraining's objective often falls below
    the backbone it starts from (docs/RESULTS.md: Toys' pretrained arm stopped on its
    start in run R; in two of three runs after, its second epoch passed the start). It
    is not counted against `train.patience`; the backbone stays the result if no epoch
    beats it, and every other epoch counts as before."""
    # the first epoch below the start, the second too, the third above it: trains on
    stops, best = _stops("retrieval", [0.985, 0.984, 0.975, 0.976, 0.977], start=0.980)
    assert stops == [False, False, False, False, True] and best["epoch"] == 2
    # never better than the start: stops after patience epochs past the first, keeps it
    stops, best = _stops("retrieval", [0.985, 0.984, 0.983], start=0.980)
    assert stops == [False, False, True] and best["epoch"] == -1
    # from scratch the first epoch is the first candidate: nothing to spare
    stops, best = _stops("retrieval", [0.980, 0.985, 0.984])
    assert stops == [False, False, True] and best["epoch"] == 0
    # a later epoch of a fine-tune from a backbone counts as ever
    stops, best = _stops("retrieval", [0.975, 0.985, 0.984], start=0.980)
    assert stops == [False, False, True] and best["epoch"] == 0
    # pretraining never stops early (`_patience`)
    assert _stops("pretrain", [0.980, 0.985, 0.984, 0.983])[0] == [False] * 4


def test_pretraining_validates_every_epoch_ends_on_its_last_and_hands_retrieval_its_best(tmp_path):
    """Pretraining validates by full ranking but never stops early: its result is its
    last state (what fine-tunes start from), its best epoch a kept checkpoint that a
    retrieval fine-tune which continues the pretraining starts from."""
    w, res = _finetune(tmp_path, "pre-v", task="pretrain", **{"train.epochs": 5, "train.patience": 1, "checkpoint.keep_last": 1})
    curve = res["epochs_curve"]
    assert [c["epoch"] for c in curve] == [0, 1, 2, 3, 4] and all("valid_ndcg@10" in c for c in curve)
    best = res["best"]
    assert best["valid_loss"] == min(c["valid_loss"] for c in curve) and best["step"] < curve[-1]["step"]  # it overfits: patience 1 would have stopped it
    last = ckpt.resolve(Store(), res["checkpoint"])
    assert last.step == curve[-1]["step"] and ckpt.load_manifest(Store(), last)["best"] == best
    kept = ckpt.resolve(Store(), ckpt.step_dir(w.spec.run.dir, best["step"])).uri

    def start(init_from, task="retrieval", go_on=True):
        return launch.start_checkpoint(Store(), tiny_job(str(tmp_path / "runs"), "ft", task, init_from=init_from, **{"train.continue_pretraining": go_on}))

    assert start(res["checkpoint"]) == kept
    assert start(w.spec.run.dir) == kept  # a run folder: its latest, then its best
    assert start(kept) == kept
    assert start(res["checkpoint"], go_on=False) == res["checkpoint"]
    assert start(w.spec.run.dir, go_on=False) == last.uri  # resolved here, once: not by each rank
    assert start(res["checkpoint"], task="ctr", go_on=False) == res["checkpoint"]
    with pytest.raises(ConfigError, match="train.continue_pretraining is for task=retrieval"):
        tiny_job(str(tmp_path / "runs"), "ft", "ctr", init_from=kept, **{"data.train": res["checkpoint"], "train.continue_pretraining": True}).check_runnable()


def _pretrained(tmp_path):
    """A committed pretraining checkpoint of a randomly initialised FLM."""
    from flm_dist.model import FLM

    job = tiny_job(str(tmp_path / "runs"), "pre")
    pre = FLM(job.model, job.data.features, init_seed=3)
    saver = ckpt.Checkpointer(Store(), str(tmp_path / "runs" / "pre"), keep_last=1, async_save=False)
    ref = saver.save(1, {"model": pre.state_dict()}, {"step": 1, "epoch": 0, "epoch_done": True})
    saver.close()
    return pre, ref


@pytest.mark.parametrize("lr", [0.0, 0.02])
def test_a_retrieval_fine_tune_counts_the_model_it_starts_from(tmp_path, lr):
    """A retrieval fine-tune adds no parameters to its pretrained backbone: the backbone
    is validated and saved before the first step (epoch -1) and is the result when no
    epoch beats it (lr 0: every epoch ties, and a tie does not replace the best)."""
    from flm_dist.sharding import unwrap

    pre, pre_ref = _pretrained(tmp_path)
    sets = {"train.epochs": 2, "train.patience": 0, "train.lr": lr, "train.sparse_lr": 10 * lr, "checkpoint.keep_last": 1}
    w, res = _finetune(tmp_path, f"ret-{lr}", task="retrieval", init_from=pre_ref.uri, **sets)
    curve = res["epochs_curve"]
    assert [(c["epoch"], c["step"] > 0) for c in curve] == [(-1, False), (0, True), (1, True)]
    assert res["best"]["valid_loss"] == min(c["valid_loss"] for c in curve) and "valid_ndcg@10" in curve[0]
    start = ckpt.resolve(Store(), ckpt.step_dir(w.spec.run.dir, 0))
    kept, _, _ = load_model(Store(), start.uri)
    backbone = {k: v for k, v in pre.state_dict().items() if k in unwrap(w.model).backbone_keys()}
    assert all(torch.equal(kept.state_dict()[k], v) for k, v in backbone.items())
    if lr == 0.0:  # the start is the result, and what the model holds now
        assert res["best"]["step"] == 0 and res["checkpoint"] == start.uri
        assert all(torch.equal(unwrap(w.model).state_dict()[k], v) for k, v in backbone.items())
    w, res = _finetune(tmp_path, f"ctr-{lr}", init_from=pre_ref.uri, **sets)
    assert [c["epoch"] for c in res["epochs_curve"]] == [0, 1]  # a new head: its start is no candidate


def test_a_retrieval_fine_tune_continues_the_pretrained_optimiser_state_and_item_counts(tmp_path):
    """Retrieval goes on with pretraining's contrastive objective, so it goes on with
    the item counts behind the logQ correction, and with `train.continue_pretraining`
    with its backbone's optimiser state too (row-wise Adagrad's accumulators, AdamW's
    moments): a parameter's first steps are then as small as pretraining left them.
    Without it, and for a new task head (ctr), the state starts afresh."""
    from flm_dist.model import FLM
    from flm_dist.objectives import PopularityEstimator
    from flm_dist.optim import RowWiseAdagrad, optimizer_state
    from flm_dist.sharding import unwrap

    job = tiny_job(str(tmp_path / "runs"), "pre")
    pre = FLM(job.model, job.data.features, init_seed=3)
    tables = {n: p for n, p in pre.named_parameters() if n.startswith("tables.")}
    dense = {n: p for n, p in pre.named_parameters() if n.startswith("user_encoder.")}
    sparse_opt, dense_opt = RowWiseAdagrad(list(tables.values())), torch.optim.AdamW(list(dense.values()))
    for p in tables.values():
        sparse_opt.state[p]["sum"] = torch.rand(p.shape[0]) + 1.0
    for p in dense.values():
        dense_opt.state[p].update(step=torch.tensor(50.0), exp_avg=torch.rand_like(p), exp_avg_sq=torch.rand_like(p))
    pop = PopularityEstimator(job.model.item_rows)
    pop.update(torch.arange(100_000) % 7)
    state = {"model": pre.state_dict(), "sparse_optim": optimizer_state(pre, sparse_opt), "dense_optim": optimizer_state(pre, dense_opt), "popularity": pop.sync()}
    saver = ckpt.Checkpointer(Store(), str(tmp_path / "runs" / "pre"), keep_last=1, async_save=False)
    ref = saver.save(1, state, {"step": 1, "epoch": 0, "epoch_done": True})
    saver.close()
    one_step = {"train.epochs": 1, "train.max_steps": 1}
    w, _ = _finetune(tmp_path, "ft-ret", task="retrieval", init_from=ref.uri, **one_step, **{"train.continue_pretraining": True})
    params = dict(unwrap(w.model).named_parameters())
    # one step's squared gradients add to what pretraining left (a fresh state: one step's only)
    assert all((w.sparse_opt.state[params[n]]["sum"] >= sparse_opt.state[p]["sum"]).all() for n, p in tables.items())
    assert all(float(w.dense_opt.state[params[n]]["step"]) == 51.0 for n in dense)
    assert w.popularity.total == 100_000 + 128 and w.popularity.counts[3] >= 100_000 // 7
    # restarted: the item counts go on, the optimiser state is the one step's alone
    w, _ = _finetune(tmp_path, "ft-ret-fresh", task="retrieval", init_from=ref.uri, **one_step)
    params = dict(unwrap(w.model).named_parameters())
    assert not all((w.sparse_opt.state[params[n]]["sum"] >= sparse_opt.state[p]["sum"]).all() for n, p in tables.items())
    assert all(float(w.dense_opt.state[params[n]]["step"]) == 1.0 for n in dense)
    assert w.popularity.total == 100_000 + 128
    # ctr: one step in which only the new head trains leaves the backbone's fresh state as it was
    w, _ = _finetune(tmp_path, "ft-ctr", init_from=ref.uri, **one_step, **{"train.head_warmup_steps": 1})
    params = dict(unwrap(w.model).named_parameters())
    assert not any(w.sparse_opt.state[params[n]]["sum"].any() for n in tables)


def test_freeze_pretrained_keeps_those_parts_of_a_backbone_and_not_of_a_scratch_model(tmp_path):
    """train.freeze_pretrained: [encoder] keeps a pretrained encoder as it was while the
    embeddings and the head train; from scratch there is nothing to keep and it trains."""
    from flm_dist.sharding import unwrap

    pre, pre_ref = _pretrained(tmp_path)
    sets = {"train.epochs": 1, "train.max_steps": 4, "train.head_warmup_steps": 0, "train.freeze_pretrained": "[encoder]"}
    w, _ = _finetune(tmp_path, "keep", init_from=pre_ref.uri, **sets)
    m = unwrap(w.model).state_dict()
    encoder = [k for k in m if k.startswith(("user_encoder.", "item_encoder."))]
    assert encoder and all(torch.equal(m[k], pre.state_dict()[k]) for k in encoder)
    assert any(not torch.equal(m[k], pre.state_dict()[k]) for k in m if k.startswith("tables."))
    assert not any(p.requires_grad for n, p in unwrap(w.model).named_parameters() if n in encoder)
    w, _ = _finetune(tmp_path, "scratch", **sets)
    assert all(p.requires_grad for n, p in unwrap(w.model).named_parameters() if n in encoder)


def test_a_head_warmup_of_about_one_epoch_counts_the_rows_trained_on(tmp_path):
    """head_warmup_steps: -1 is an epoch's steps: the training rows less the validation
    carve, or all of them when the validation data is a set of its own (data.valid)."""
    data = _data(tmp_path / "log")
    hs = HashSpec.build({"user": 1024, "item": 1024}, 0)
    plan = plan_read(Store(), data, ReadSpec.for_task("ctr", [], [1, 5]))
    for sets, valid_rows, rows in (({}, 600, plan.total_rows - 600), ({"data.valid": data}, 6000, plan.total_rows)):
        job = tiny_job(str(tmp_path / "runs"), "w", "ctr", **{"data.train": data, "data.batch_size": 128, **sets})
        spec = launch._worker_spec(job, Store(), "train", hs, 1, train_plan=plan.to_dict(), valid_rows=valid_rows, init_from="x")
        assert Worker(spec).head_warmup_steps() == -(-rows // 128)


def test_head_warmup_trains_only_the_head_then_everything(tmp_path):
    """A fine-tune from a pretrained checkpoint: for head_warmup_steps steps only the
    new head changes; after them the backbone trains too."""
    from flm_dist.sharding import unwrap

    pre, pre_ref = _pretrained(tmp_path)
    backbone = {k: v.clone() for k, v in pre.state_dict().items() if not k.startswith("head.")}
    w, res = _finetune(tmp_path, "warm", init_from=pre_ref.uri, **{"train.epochs": 1, "train.max_steps": 4, "train.head_warmup_steps": 4, "data.valid_fraction": 0.1})
    m = unwrap(w.model)
    assert all(torch.equal(m.state_dict()[k], v) for k, v in backbone.items())  # 4 head-only steps
    w, res = _finetune(tmp_path, "warm2", init_from=pre_ref.uri, **{"train.epochs": 1, "train.max_steps": 6, "train.head_warmup_steps": 4})
    m = unwrap(w.model)
    changed = [k for k, v in backbone.items() if not torch.equal(m.state_dict()[k], v)]
    assert any(k.startswith("tables.") for k in changed) and any(k.startswith("user_encoder") for k in changed)
