"""Transition counts beside a sequence model's export: counted from the run's training
events only, the most frequent kept, a blend weight fitted on the validation events,
and the server's /recommend and /score answering the same blended scores."""

from __future__ import annotations

import json
import re
from dataclasses import replace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from flm_dist.config import (
    ConfigError,
    DataConfig,
    JobConfig,
    ModelConfig,
    ServeConfig,
    SplitConfig,
    TransitionsConfig,
    to_dict,
)
from flm_dist.data.encode import EncodeSpec
from flm_dist.data.hashing import HashSpec
from flm_dist.data.schema import ReadSpec
from flm_dist.model import FLM, table_sizes
from flm_dist.storage import Store
from flm_dist.transitions import count

ITEMS = 40


def _cycles(users: int = 30, seed: int = 0) -> list[list[int]]:
    """Each user walks the items in a cycle (i is always followed by i + 1) from a random start."""
    rng = np.random.default_rng(seed)
    return [[(int(s) + k) % ITEMS for k in range(int(n))] for s, n in zip(rng.integers(0, ITEMS, users), rng.integers(6, 12, users), strict=True)]


def _write(tmp_path, seqs: list[list[int]]) -> list[dict]:
    t = pa.table({"user_id": pa.array(range(100, 100 + len(seqs)), pa.int64()), "item_id": pa.array(seqs, pa.list_(pa.int64())), "ts": pa.array([list(range(len(s))) for s in seqs], pa.list_(pa.int64()))})
    files = []
    for k, part in enumerate((t.slice(0, len(seqs) // 2), t.slice(len(seqs) // 2))):  # two files: the counts span files
        path = tmp_path / f"seq-{k}.parquet"
        pq.write_table(part, path)
        files.append({"uri": str(path), "size": path.stat().st_size})
    return files


def _retrieval_read(history_len: int) -> EncodeSpec:
    """A leave-one-out retrieval run's training read of these files."""
    read = ReadSpec.for_task("retrieval", [], (1, 5), history_len=history_len)
    return EncodeSpec(read=read, hash=HashSpec.build({"user": 97, "item": 89}, 0), split=SplitConfig(by="last"), valid_fraction=0.1)


@pytest.mark.parametrize("backward", [0.0, 0.25])
def test_counts_leave_out_validation_and_eval_events_and_keep_the_most_frequent(tmp_path, backward):
    rng = np.random.default_rng(3)
    seqs = [[int(x) for x in rng.integers(0, 12, n)] for n in rng.integers(1, 9, 25)]
    files = _write(tmp_path, seqs)
    got = count(Store(), files, _retrieval_read(4), window=2, keep=3, history_len=4, fit_users=100, backward=backward)
    # oracle: pairs among each user's events but the last two (eval, validation); j
    # after i counts 1 for i's row and `backward` for j's
    pairs: dict[int, dict[int, float]] = {}
    for s in seqs:
        train = s[:-2]
        for t, a in enumerate(train):
            for b in train[t + 1 : t + 3]:
                pairs.setdefault(a, {}).setdefault(b, 0.0)
                pairs[a][b] += 1
                if backward:
                    pairs.setdefault(b, {}).setdefault(a, 0.0)
                    pairs[b][a] += backward
    want = {a: sorted(f.items(), key=lambda x: (-x[1], x[0]))[:3] for a, f in pairs.items()}
    table = {a: list(zip(f, c, strict=True)) for a, f, c in zip(*(got.table.column(k).to_pylist() for k in ("item_key", "follower_keys", "counts")), strict=True)}
    assert table == {a: [(b, pytest.approx(c)) for b, c in f] for a, f in want.items()}
    assert got.pairs == sum(len(f) for f in pairs.values())
    # validation events: each user's second-to-last, with the training events before it
    long = [s for s in seqs if len(s) >= 2]
    assert got.valid_target.tolist() == [s[-2] for s in long]
    assert [h.tolist() for h in got.valid_history] == [s[:-2][-4:] for s in long]
    assert [v.tolist() for v in got.valid_seen] == [sorted(set(s[:-2])) for s in long]


def _export(tmp_path, window: int, task: str = "retrieval", eval_uri: str = "", files: list[dict] | None = None):
    from flm_dist.export import write_export

    files = files or _write(tmp_path, _cycles())
    cfg = ModelConfig(user_rows=97, item_rows=89, embedding_dim=8, hidden=[], latent_dim=8, history_len=5, history_layers=1, history_heads=2, user_id=False)
    torch.manual_seed(0)
    model = FLM(cfg, []).eval()  # untrained: its vectors know nothing of the cycles, the counts know them all
    job = JobConfig(task=task, model=cfg, data=DataConfig(split=SplitConfig(by="last"), valid_fraction=0.1, eval=eval_uri), transitions=TransitionsConfig(window=window, keep=5))
    source = {"task": task, "config": to_dict(job), "hash_spec": HashSpec.build(table_sizes(cfg, []), 0).to_dict(), "data_files": files, "data_columns": {"user_id": "int", "item_id": "int"}}
    out = tmp_path / f"export-{task}-{window}-{bool(eval_uri)}"
    return write_export(Store(), model, source, str(out), formats="torchscript"), out


def test_the_counts_follow_the_split_training_read(tmp_path):
    """A fine-tune with data.eval trained on every event but the validation carve; a
    pretraining never reads data.eval, so its split still held the last event out."""
    pairs = {(task, e): _export(tmp_path, 3, task, e)[0]["transitions"]["pairs"] for task, e in (("retrieval", ""), ("retrieval", "s3://b/eval"), ("pretrain", "s3://b/eval"))}
    assert pairs[("pretrain", "s3://b/eval")] == pairs[("retrieval", "")]
    assert pairs[("retrieval", "s3://b/eval")] > pairs[("retrieval", "")]


@pytest.mark.parametrize("task", ["retrieval", "pretrain"])
def test_the_counts_the_fit_and_the_served_history_take_the_events_training_does(tmp_path, task):
    """A retrieval run trains on label-1 events only and its histories skip the rest
    (a pretraining reads every event): the counts pair, the weight's fit reads and the
    export's snapshot of each user's last items hold exactly those events."""
    items, labels = [1, 2, 3, 4, 5, 6, 7], [1, 1, 0, 1, 1, 1, 1]  # item 3 rejected; 6 validates, 7 tests
    t = pa.table({"user_id": pa.array([100], pa.int64()), "item_id": pa.array([items], pa.list_(pa.int64())),
                  "ts": pa.array([list(range(7))], pa.list_(pa.int64())), "label": pa.array([labels], pa.list_(pa.float64()))})
    pq.write_table(t, tmp_path / "labels.parquet")
    files = [{"uri": str(tmp_path / "labels.parquet"), "size": (tmp_path / "labels.parquet").stat().st_size}]
    read = _retrieval_read(5)
    if task == "pretrain":
        read = replace(read, read=ReadSpec.for_task("pretrain", [], (1, 5), history_len=5))
    got = count(Store(), files, read, window=1, keep=5, history_len=5, fit_users=10)
    trained = [1, 2, 4, 5] if task == "retrieval" else [1, 2, 3, 4, 5]
    pairs = {a: f for a, f in zip(got.table.column("item_key").to_pylist(), got.table.column("follower_keys").to_pylist(), strict=True)}
    assert pairs == {a: [b] for a, b in zip(trained, trained[1:], strict=False)}
    assert [h.tolist() for h in got.valid_history] == [trained] and got.valid_target.tolist() == [6]
    assert [v.tolist() for v in got.valid_seen] == [trained]
    # the snapshot a request without "history" is served with: the last 5 of those events, every side
    _, out = _export(tmp_path, 1, task, files=files)
    snap = pq.read_table(out / "features" / "users.parquet")
    assert snap.column("history").to_pylist() == [(trained + [6, 7])[-5:]]


@pytest.mark.parametrize("backward", [0.0, 0.3])
def test_events_at_one_time_count_for_each_other_either_way(tmp_path, backward):
    """Items 2 and 3 share a time: training puts neither in the other's history, and the
    file's order between them (item order) is no evidence of which came first."""
    t = pa.table({"user_id": pa.array([1], pa.int64()), "item_id": pa.array([[1, 2, 3, 4, 5, 6]], pa.list_(pa.int64())),
                  "ts": pa.array([[0, 1, 1, 2, 3, 4]], pa.list_(pa.int64()))})
    pq.write_table(t, tmp_path / "ties.parquet")
    got = count(Store(), [{"uri": str(tmp_path / "ties.parquet")}], _retrieval_read(5), window=1, keep=5, history_len=5, fit_users=10, backward=backward)
    table = {a: dict(zip(f, c, strict=True)) for a, f, c in zip(*(got.table.column(k).to_pylist() for k in ("item_key", "follower_keys", "counts")), strict=True)}
    tied = (1 + backward) / 2
    want = {1: {2: 1.0}, 2: {3: tied}, 3: {2: tied, 4: 1.0}}
    if backward:
        want[2][1] = backward
        want[4] = {3: backward}
    assert table == {a: {b: pytest.approx(c) for b, c in f.items()} for a, f in want.items()}


def test_validation_histories_hold_strictly_earlier_events_at_the_times_resolution(tmp_path):
    """Millisecond times: events 500 ms apart are not a tie (training's histories keep
    them), events at the same instant are, and an event without a time is left out."""
    ts = pa.array([[0, 1000, 2000, 2500, 2500, 3000], [0, None, 1000, 2000, 3000]], pa.list_(pa.timestamp("ms")))
    t = pa.table({"user_id": pa.array([1, 2], pa.int64()), "item_id": pa.array([[10, 11, 12, 13, 14, 15], [20, 21, 22, 23, 24]], pa.list_(pa.int64())), "ts": ts})
    pq.write_table(t, tmp_path / "ms.parquet")
    got = count(Store(), [{"uri": str(tmp_path / "ms.parquet")}], _retrieval_read(10), window=1, keep=5, history_len=10, fit_users=10)
    assert got.valid_target.tolist() == [14, 23]
    assert [h.tolist() for h in got.valid_history] == [[10, 11, 12], [20, 22]]


def test_the_export_fits_a_blend_weight_and_the_server_ranks_by_it(tmp_path):
    from flm_dist.serve import LoadedExport

    manifest, out = _export(tmp_path, window=3)
    tr = manifest["transitions"]
    by_weight = tr["fit"]["ndcg@10_by_weight"]
    assert tr["fit"]["validation_events"] == 30
    assert tr["weight"] > 0 and by_weight[str(tr["weight"])] > by_weight["0.0"] + 0.3, by_weight
    assert by_weight[str(tr["weight"])] == max(by_weight.values())
    assert json.loads((out / "manifest.json").read_text())["files"]["transitions.parquet"]["bytes"] > 0

    server = LoadedExport(str(out), ServeConfig(max_items=ITEMS))
    scorer = torch.jit.load(str(out / "scorer.pt"))

    def model_alone(history: list[int]) -> torch.Tensor:
        with torch.no_grad():
            return scorer(torch.full((ITEMS,), 1), torch.arange(ITEMS), {"history": torch.tensor([history] * ITEMS), "history__len": torch.full((ITEMS,), len(history))})

    # a history whose next item the untrained model alone does not rank first
    history = next(h for h in ([(s + k) % ITEMS for k in range(4)] for s in range(ITEMS)) if int(model_alone(h).argmax()) != (h[-1] + 1) % ITEMS)
    alone = model_alone(history)
    rec = server.recommend_batch([server.parse_recommend({"user_id": 1, "k": ITEMS, "history": history})])[0]["items"]
    assert rec[0]["item_id"] == (history[-1] + 1) % ITEMS  # what follows the last item, as every user's walk does
    # the items the user just had are left out unless asked for (the counts boost them: they follow each other)
    assert {r["item_id"] for r in rec} == set(range(ITEMS)) - set(history)
    kept = server.recommend_batch([server.parse_recommend({"user_id": 1, "k": ITEMS, "history": history, "exclude_history": False})])[0]["items"]
    assert {r["item_id"] for r in kept} == set(range(ITEMS))
    # /score answers the same blended score for the same items
    items = [r["item_id"] for r in rec]
    scored = server.score_batch([server.parse_score({"user_id": 1, "item_ids": items, "history": history})])[0]["scores"]
    np.testing.assert_allclose(scored, [r["score"] for r in rec], rtol=1e-5, atol=1e-6)
    assert scored[0] > float(alone[rec[0]['item_id']]) + 0.1


def test_recommend_leaves_out_the_whole_history_it_is_given_and_refuses_what_is_no_item(tmp_path):
    from flm_dist.serve import LoadedExport, RequestError

    _, out = _export(tmp_path, window=3)
    server = LoadedExport(str(out), ServeConfig(max_items=ITEMS))
    history = list(range(7))  # longer than the model's history_len (5): it reads the last 5
    for body in ({"history": history}, {"user_features": {"history": history}}):
        rec = server.recommend_batch([server.parse_recommend({"user_id": 1, "k": ITEMS, **body})])[0]["items"]
        assert {r["item_id"] for r in rec} == set(range(ITEMS)) - set(history)
    for body, field in (({"history": [3, None]}, "history[1]"),  # a null is no item: it scored as item 0
                        ({"history": [{"x": 1}, 5, 6, 7, 8, 9]}, "history[0]"),  # before the 5 read, still checked
                        ({"history": [1], "user_features": {"history": [2]}}, "history")):
        for parse in (server.parse_recommend, lambda b: server.parse_score({"item_ids": [1], **b})):
            with pytest.raises(RequestError, match=re.escape(field)) as e:
                parse({"user_id": 1, **body})
            assert e.value.field == field and e.value.status == 400
    # a history is capped like exclude: each of its entries is hashed and left out of the ranking
    for body, field in (({"history": list(range(ITEMS + 1))}, "history"), ({"user_features": {"history": list(range(ITEMS + 1))}}, "user_features.history")):
        for parse in (server.parse_recommend, lambda b: server.parse_score({"item_ids": [1], **b})):
            with pytest.raises(RequestError, match=rf"{field} has {ITEMS + 1} items; at most serve.max_items = {ITEMS}") as e:
                parse({"user_id": 1, **body})
            assert e.value.field == field and e.value.status == 413


def test_recommend_and_the_weight_fit_score_a_large_catalog_a_few_users_at_a_time(tmp_path, monkeypatch):
    """Scores over the whole catalog are [users, items]: /recommend's batch and the export's
    weight fit (512 users) held 10 GB an array at 5M items. Split to SCORE_BLOCK scores,
    they answer and fit as before."""
    from flm_dist import transitions
    from flm_dist.serve import LoadedExport

    manifest, out = _export(tmp_path, window=3)
    server = LoadedExport(str(out), ServeConfig(max_items=ITEMS))
    reqs = [server.parse_recommend({"user_id": u, "k": 10, "history": [(u + k) % ITEMS for k in range(4)]}) for u in range(7)]
    whole = server.recommend_batch(reqs)
    monkeypatch.setattr(transitions, "SCORE_BLOCK", 2 * ITEMS)  # two users' scores at a time
    calls = []
    scorer = server.scorer

    class Spy:
        def user_vectors(self, users, features):
            calls.append(len(users))
            return scorer.user_vectors(users, features)

    server.scorer = Spy()
    split = server.recommend_batch(reqs)
    assert calls == [2, 2, 2, 1] and [r["user_id"] for r in split] == [r["user_id"] for r in whole]
    for a, b in zip(split, whole, strict=True):  # the same items, up to the last float bit of a smaller product
        assert {i["item_id"] for i in a["items"]} == {i["item_id"] for i in b["items"]}
        assert [i["score"] for i in a["items"]] == pytest.approx([i["score"] for i in b["items"]], abs=1e-6)
    split = _export(tmp_path, window=3, files=_write(tmp_path, _cycles()))[0]["transitions"]
    assert split["fit"] == manifest["transitions"]["fit"] and split["weight"] == manifest["transitions"]["weight"] > 0


def test_window_zero_exports_no_counts_and_bad_keys_are_refused(tmp_path):
    from flm_dist.serve import LoadedExport

    manifest, out = _export(tmp_path, window=0)
    assert manifest["transitions"] is None and not (out / "transitions.parquet").exists()
    server = LoadedExport(str(out), ServeConfig(max_items=ITEMS))
    assert server.health()["transitions_weight"] is None
    with pytest.raises(ConfigError, match="transitions.keep"):
        TransitionsConfig(keep=0)
    with pytest.raises(ConfigError, match="transitions.window"):
        TransitionsConfig(window=-1)
    with pytest.raises(ConfigError, match="transitions.backward"):
        TransitionsConfig(backward=-0.1)


def test_score_runs_the_user_tower_once_per_request_and_answers_as_the_graph(tmp_path):
    """/score computes each request's user latent once and scores its items against it:
    the same scores as the graph's forward on one row per item, also in a batch whose
    requests have different histories and item counts (one none)."""
    from flm_dist.serve import LoadedExport

    _, out = _export(tmp_path, window=0)  # no counts: the scores are the model's
    server = LoadedExport(str(out), ServeConfig(max_items=ITEMS))
    scorer = torch.jit.load(str(out / "scorer.pt"))
    bodies = [{"user_id": 1, "item_ids": list(range(ITEMS)), "history": [3, 4, 5, 6]},
              {"user_id": 2, "item_ids": [], "history": [9]},
              {"user_id": 3, "item_ids": [5, 7, 11], "history": [20, 21]}]
    want = []
    for b in bodies:
        n, h = len(b["item_ids"]), b["history"]
        with torch.no_grad():
            s = scorer(torch.full((n,), b["user_id"]), torch.tensor(b["item_ids"], dtype=torch.int64), {"history": torch.tensor([h] * n, dtype=torch.int64).view(n, len(h)), "history__len": torch.full((n,), len(h))})
        want.append(s.tolist())
    assert server.split_towers
    for split in (True, False):  # False: an export made before the towers were exported apart
        server.split_towers = split
        got = [r["scores"] for r in server.score_batch([server.parse_score(b) for b in bodies])]
        assert [len(g) for g in got] == [ITEMS, 0, 3]
        for g, w in zip(got, want, strict=True):
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)


def test_transition_scores_sum_each_recent_items_followers_by_recency():
    """m_j = sum over the `recent` most recent history items h_r of counts[h_r -> j] / (1 + r),
    against a loop over a random table: short and empty histories, histories longer than
    `recent`, repeated items, and items (in the history and among the followers) outside
    the ranking."""
    from flm_dist.transitions import Transitions

    rng = np.random.default_rng(0)
    ranked = rng.choice(np.arange(1000, 1100), 30, replace=False)  # the ranking's items, in its row order
    universe = np.arange(1000, 1100)  # and 70 more it does not rank
    counts: dict[int, dict[int, float]] = {}
    for a in rng.choice(universe, 60, replace=False):
        followers = rng.choice(universe, int(rng.integers(1, 9)), replace=False)
        counts[int(a)] = {int(b): float(rng.integers(1, 20)) for b in followers}
    table = pa.table({"item_key": pa.array(list(counts), pa.int64()),
                      "follower_keys": pa.array([list(f) for f in counts.values()], pa.list_(pa.int64())),
                      "counts": pa.array([list(f.values()) for f in counts.values()], pa.list_(pa.float32()))})
    recent, width = 4, 7
    trans = Transitions(table, ranked, recent, 1.0)
    lengths = np.array([0, 1, 3, 4, 5, 7, 7, 2])
    history = rng.choice(universe, (len(lengths), width))
    history[6, :] = history[6, 0]  # one item, seven times
    got = trans.scores(torch.from_numpy(history), torch.from_numpy(lengths)).numpy()
    row = {int(k): i for i, k in enumerate(ranked)}
    want = np.zeros((len(lengths), len(ranked)))
    for u, n in enumerate(lengths):
        for r in range(min(n, recent)):
            h = int(history[u, n - 1 - r])
            if h not in row:  # an item the ranking does not hold adds nothing, even where it was counted
                continue
            for j, c in counts.get(h, {}).items():
                if j in row:
                    want[u, row[j]] += c / (1 + r)
    assert want[0].sum() == 0 and want.sum() > 0
    np.testing.assert_allclose(got, want, rtol=1e-6)
    blended = trans.blend(torch.zeros(len(lengths), len(ranked)), torch.from_numpy(history), torch.from_numpy(lengths))
    np.testing.assert_allclose(blended.numpy(), np.log1p(want), rtol=1e-6)


def test_recommend_without_k_takes_at_most_what_there_is(tmp_path):
    """k defaults to 10, or to every item the server may return when that is fewer."""
    from flm_dist.serve import LoadedExport

    _, out = _export(tmp_path, window=0)
    assert LoadedExport(str(out), ServeConfig(max_items=ITEMS)).parse_recommend({"user_id": 1}).k == 10
    server = LoadedExport(str(out), ServeConfig(max_items=5))
    assert len(server.recommend_batch([server.parse_recommend({"user_id": 1})])[0]["items"]) == 5


def test_the_counts_sort_each_pair_a_few_times_not_once_per_batch(tmp_path, monkeypatch):
    """The accumulator is summed again only once the new pairs outnumber it: with a fixed
    threshold every batch re-sorted all the distinct pairs so far, quadratic in the log
    (here 40 batches of distinct pairs sorted 21x as many pairs as were emitted)."""
    import flm_dist.transitions as tr

    rng = np.random.default_rng(0)
    seqs = [[int(x) for x in rng.integers(0, 10**9, 8)] for _ in range(4000)]  # pairs all distinct
    files = _write(tmp_path, seqs)
    sorted_sizes = []
    real = tr._sum_pairs
    monkeypatch.setattr(tr, "_sum_pairs", lambda a, b, c: (sorted_sizes.append(len(a)), real(a, b, c))[1])
    monkeypatch.setattr(tr, "_REDUCE", 100)
    monkeypatch.setattr(tr, "_BATCH_USERS", 100)
    got = count(Store(), files, _retrieval_read(4), window=1, keep=5, history_len=4, fit_users=1)
    emitted = sum(len(s) - 3 for s in seqs)  # pairs among each user's training events (all but the last two)
    assert got.pairs == emitted
    assert sum(sorted_sizes) <= 3 * emitted, (sum(sorted_sizes), emitted, len(sorted_sizes))
