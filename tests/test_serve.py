"""The reference server for real: Ray Serve on the local Ray, HTTP on 127.0.0.1, two
exports (retrieval and ctr) with string user IDs, int item IDs and every feature kind.
Expected values come from the model itself on raw rows encoded as training encodes them."""

from __future__ import annotations

import json
import math
import os
import socket
import threading
import urllib.error
import urllib.request
from dataclasses import replace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from flm_dist import serve as fserve
from flm_dist.config import ConfigError, FeatureConfig, ServeConfig, load_job, to_dict
from flm_dist.data.hashing import HashSpec
from flm_dist.export import write_export
from flm_dist.model import FLM, table_sizes
from flm_dist.storage import Store
from tests.test_export import _expected

pytestmark = pytest.mark.slow

FEATURES = [
    FeatureConfig(name="u_seg", side="user"),
    FeatureConfig(name="i_tags", side="item", kind="multi", max_len=3),
    FeatureConfig(name="i_price", side="item", kind="numeric"),
    FeatureConfig(name="i_cat", side="item"),
]
ID_KINDS = {"user_id": "string", "item_id": "int", "u_seg": "string", "i_cat": "int"}
USERS = [f"u{i}" for i in range(30)]
ITEMS = [1000 + i for i in range(39)] + [2**62 + 7]
MAX_ITEMS = 64
TOL = 1e-5


def _data(rng) -> list[pa.Table]:
    """Two files of interactions; some users change segment between them (last seen wins)."""
    tags = {i: (None if k % 7 == 0 else [f"t{(k * 3 + j) % 11}" for j in range(k % 5)]) for k, i in enumerate(ITEMS)}
    price = {i: (None if k % 9 == 0 else 1.0 + k / 4) for k, i in enumerate(ITEMS)}
    files = []
    for part in range(2):
        users = rng.choice(USERS, 300)
        items = rng.choice(ITEMS, 300)
        files.append(pa.table({
            "user_id": pa.array(users, pa.string()),
            "item_id": pa.array(items, pa.int64()),
            "u_seg": pa.array([f"seg{(int(u[1:]) + part * (int(u[1:]) % 2)) % 6}" for u in users]),
            "i_tags": pa.array([tags[i] for i in items], pa.list_(pa.string())),
            "i_price": pa.array([price[i] for i in items], pa.float64()),
            "i_cat": pa.array([int(i) % 5 for i in items], pa.int64()),
            "label": pa.array(rng.integers(0, 2, 300), pa.int8()),
        }))
    return files


def _model(task: str, seed: int) -> tuple[FLM, dict]:
    job = load_job(None, [
        f"task={task}", "model.user_rows=512", "model.item_rows=256", "model.feature_rows=32", "model.embedding_dim=8",
        "model.hidden=[16]", "model.latent_dim=8", "model.head_hidden=[8]", f"model.hash_seed={seed}",
    ])
    job = replace(job, data=replace(job.data, features=list(FEATURES)))
    torch.manual_seed(seed)
    model = FLM(job.model, FEATURES).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)  # large enough to tell rows apart, small enough not to saturate the ctr sigmoid
    spec = HashSpec.build(table_sizes(job.model, FEATURES), seed)
    return model, {"task": task, "config": to_dict(job), "hash_spec": spec.to_dict(), "data_columns": ID_KINDS, "run": "serve-test"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def world(ray_local, tmp_path_factory):
    """Two exports of random-weight models over the same data, served side by side."""
    tmp = tmp_path_factory.mktemp("serve")
    rng = np.random.default_rng(4)
    files = _data(rng)
    data_files = []
    for k, t in enumerate(files):
        path = tmp / "data" / f"part-{k}.parquet"
        path.parent.mkdir(exist_ok=True)
        pq.write_table(t, path)
        data_files.append({"uri": str(path), "size": path.stat().st_size})
    rows = pa.concat_tables(files)
    last_user = {u: s for u, s in zip(rows.column("user_id").to_pylist(), rows.column("u_seg").to_pylist(), strict=True)}
    item_cols = ["i_tags", "i_price", "i_cat"]
    last_item = {}
    for r in rows.select(["item_id", *item_cols]).to_pylist():
        last_item[r["item_id"]] = {c: r[c] for c in item_cols}
    store = Store()
    out = {"last_user": last_user, "last_item": last_item, "models": {}, "specs": {}}
    for task, seed in (("retrieval", 1), ("ctr", 2)):
        model, source = _model(task, seed)
        uri = str(tmp / f"export-{task}")
        write_export(store, model, {**source, "data_files": data_files}, uri, formats="torchscript")
        out["models"][task], out["specs"][task] = model, HashSpec.from_dict(source["hash_spec"])
        out[task] = uri
    port = _free_port()
    cfg = ServeConfig(max_items=MAX_ITEMS, max_batch_size=16, batch_wait_timeout_s=0.05)
    out["url"] = fserve.start(out["retrieval"], store, cfg, port=port, name="retrieval", route_prefix="/", num_cpus=0.5)
    out["ctr_url"] = fserve.start(out["ctr"], store, cfg, port=port, name="ctr", route_prefix="/ctr", num_cpus=0.5)
    try:
        yield out
    finally:
        fserve.serve.shutdown()  # give the CPUs back to the tests that follow


def _call(url: str, path: str, body=None, raw: bytes | None = None, method: str | None = None) -> tuple[int, dict]:
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(url + path, data=data, method=method or ("POST" if data is not None else "GET"),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _rows(world, user, items, user_feats=None, item_feats=None) -> pa.Table:
    """Raw rows for (user, item) pairs with the features the server should use: the
    request's, else the last seen in the data, else null."""
    n = len(items)
    u_seg = (user_feats or {}).get("u_seg", world["last_user"].get(user))
    cols = {c: [world["last_item"].get(i, {}).get(c) for i in items] for c in ("i_tags", "i_price", "i_cat")}
    for c, v in (item_feats or {}).items():
        cols[c] = v
    return pa.table({
        "user_id": pa.array([user] * n, pa.string()),
        "item_id": pa.array(items, pa.int64()),
        "u_seg": pa.array([u_seg] * n, pa.string()),
        "i_tags": pa.array(cols["i_tags"], pa.list_(pa.string())),
        "i_price": pa.array(cols["i_price"], pa.float64()),
        "i_cat": pa.array(cols["i_cat"], pa.int64()),
        "label": pa.array(np.ones(n, np.int8)),
    })


def _want(world, task, user, items, **feats) -> np.ndarray:
    return _expected(world["models"][task], _rows(world, user, items, **feats), world["specs"][task], FEATURES, task).numpy()


def test_healthz(world):
    status, body = _call(world["url"], "/healthz")
    assert status == 200 and body["status"] == "ok" and body["task"] == "retrieval"
    assert body["items"] == len(world["last_item"]) and body["known_users"] == len(world["last_user"])
    assert body["recommend"] is True and body["serve"]["max_items"] == MAX_ITEMS
    status, body = _call(world["ctr_url"], "/healthz")
    assert status == 200 and body["task"] == "ctr" and body["recommend"] is False


def test_score_known_and_unknown_ids_with_snapshot_features(world):
    items = [1000, 1005, 2**62 + 7, 987654321, 1013]  # 987654321 was never seen: cold start
    for user in ("u3", "u4", "never-seen-user"):
        status, body = _call(world["url"], "/score", {"user_id": user, "item_ids": items})
        assert status == 200, body
        assert body["item_ids"] == items and body["user_id"] == user
        assert np.abs(np.array(body["scores"]) - _want(world, "retrieval", user, items)).max() <= TOL
    # an integer ID column also takes its IDs as decimal strings (64-bit IDs in JSON)
    status, body = _call(world["url"], "/score", {"user_id": "u3", "item_ids": [str(i) for i in items]})
    assert status == 200 and np.abs(np.array(body["scores"]) - _want(world, "retrieval", "u3", items)).max() <= TOL
    # ctr: probabilities from the head
    status, body = _call(world["ctr_url"], "/score", {"user_id": "u7", "item_ids": items})
    assert status == 200 and np.abs(np.array(body["scores"]) - _want(world, "ctr", "u7", items)).max() <= TOL
    assert all(0.0 < s < 1.0 for s in body["scores"])
    status, body = _call(world["url"], "/score", {"user_id": "u3", "item_ids": []})
    assert status == 200 and body["scores"] == []


def test_score_with_features_in_the_request(world):
    items = [1001, 1002, 55]
    user_feats = {"u_seg": "seg5"}
    item_feats = {"i_tags": [["t1", "t2", "t3", "t4"], None, []], "i_price": [2.5, None, 7], "i_cat": [3, None, 1]}
    status, body = _call(world["url"], "/score", {"user_id": 12, "item_ids": items, "user_features": user_feats, "item_features": item_feats})
    assert status == 200, body
    # user_id 12 in a string ID column is the string "12"
    want = _want(world, "retrieval", "12", items, user_feats=user_feats, item_feats=item_feats)
    assert np.abs(np.array(body["scores"]) - want).max() <= TOL
    # a numeric feature may be a boolean column in training (0 / 1): JSON true / false score as 1 / 0
    as_bools = {**item_feats, "i_price": [True, None, False]}
    status, body = _call(world["url"], "/score", {"user_id": 12, "item_ids": items, "user_features": user_feats, "item_features": as_bools})
    assert status == 200, body
    want = _want(world, "retrieval", "12", items, user_feats=user_feats, item_feats={**item_feats, "i_price": [1.0, None, 0.0]})
    assert np.abs(np.array(body["scores"]) - want).max() <= TOL


def test_recommend_ranks_every_item(world):
    for user, exclude in (("u3", []), ("u8", [1000, 1001, 424242]), ("cold-user", [])):
        status, body = _call(world["url"], "/recommend", {"user_id": user, "k": 5, "exclude": exclude})
        assert status == 200, body
        universe = [i for i in sorted(world["last_item"]) if i not in exclude]
        sims = _want(world, "retrieval", user, universe)
        order = np.argsort(-sims, kind="stable")[:5]
        assert [r["item_id"] for r in body["items"]] == [universe[i] for i in order]
        assert np.abs(np.array([r["score"] for r in body["items"]]) - sims[order]).max() <= TOL
    status, body = _call(world["url"], "/recommend", {"user_id": "u3"})
    assert status == 200 and len(body["items"]) == 10  # k defaults to 10


def test_top_k_breaks_ties_in_item_order_whatever_k():
    """A request's top k does not depend on the k of the requests batched with it:
    `torch.topk` alone returns different tied items for k = 3 and k = 50."""
    from flm_dist.serve import top_k

    g = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 4, (300,), generator=g).float()  # few values: ties everywhere
    scores[7] = -math.inf
    want = torch.sort(scores, descending=True, stable=True).indices  # score, then item order
    for k in (1, 3, 50, 300):
        s, i = top_k(scores, k)
        assert i.tolist() == want[:k].tolist() and torch.equal(s, scores[want[:k]])
    # ties inside the top k only (no tie across the cut), and across it
    scores = torch.randn(300, generator=g)
    scores[[40, 9, 5]] = 10.0
    assert top_k(scores, 3)[1].tolist() == [5, 9, 40] and top_k(scores, 2)[1].tolist() == [5, 9]


BAD = [
    ("/score", b"{not json", 400, "body"),
    ("/score", b"[1, 2]", 400, "body"),
    ("/score", {"item_ids": [1]}, 400, "user_id"),
    ("/score", {"user_id": "u1"}, 400, "item_ids"),
    ("/score", {"user_id": 1.5, "item_ids": [1]}, 400, "user_id"),
    ("/score", {"user_id": True, "item_ids": [1]}, 400, "user_id"),
    ("/score", {"user_id": "u1", "item_ids": "1000"}, 400, "item_ids"),
    ("/score", {"user_id": "u1", "item_ids": [1000, {"id": 1}]}, 400, "item_ids[1]"),
    ("/score", {"user_id": "u1", "item_ids": [2**64]}, 400, "item_ids[0]"),
    ("/score", {"user_id": "u1", "item_ids": list(range(MAX_ITEMS + 1))}, 413, "item_ids"),
    ("/score", {"user_id": "u1", "item_ids": [1], "user_features": {"nope": 1}}, 400, "user_features.nope"),
    ("/score", {"user_id": "u1", "item_ids": [1], "user_features": ["seg1"]}, 400, "user_features"),
    ("/score", {"user_id": "u1", "item_ids": [1, 2], "item_features": {"i_cat": [1]}}, 400, "item_features.i_cat"),
    ("/score", {"user_id": "u1", "item_ids": [1], "item_features": {"i_price": ["cheap"]}}, 400, "item_features.i_price[0]"),
    ("/score", {"user_id": "u1", "item_ids": [1], "item_features": {"i_tags": ["t1"]}}, 400, "item_features.i_tags[0]"),
    ("/score", {"user_id": "u1", "item_ids": [1], "extra": 1}, 400, "extra"),
    ("/recommend", {"user_id": "u1", "k": 0}, 400, "k"),
    ("/recommend", {"user_id": "u1", "k": MAX_ITEMS + 1}, 400, "k"),
    ("/recommend", {"user_id": "u1", "k": "5"}, 400, "k"),
    ("/recommend", {"k": 5}, 400, "user_id"),
    ("/recommend", {"user_id": "u1", "exclude": 1000}, 400, "exclude"),
    ("/recommend", {"user_id": "u1", "exclude_history": "yes"}, 400, "exclude_history"),
    ("/nowhere", {"user_id": "u1"}, 404, "path"),
    # what Python's JSON takes but no ID can be: a lone surrogate, a number past the
    # int-string limit, nesting past the recursion limit
    ("/score", {"user_id": "\ud800", "item_ids": [1]}, 400, "user_id"),
    ("/score", {"user_id": "u1", "item_ids": [1000], "item_features": {"i_cat": ["\udfff"]}}, 400, "item_features.i_cat[0]"),
    ("/score", b'{"user_id": 1' + b"1" * 5000 + b', "item_ids": [1]}', 400, "body"),
    ("/score", b"[" * 100_000, 400, "body"),
]


def test_bad_requests_get_4xx_naming_the_field_and_the_server_keeps_serving(world):
    good = {"user_id": "u3", "item_ids": [1000, 1001]}
    want = _want(world, "retrieval", "u3", [1000, 1001])
    for path, body, status, field in BAD:
        raw = body if isinstance(body, bytes) else None
        got_status, got = _call(world["url"], path, None if raw else body, raw=raw)
        assert (got_status, got.get("field")) == (status, field), (path, body, got)
        assert got["error"], got
        s, ok = _call(world["url"], "/score", good)  # still serving, still right
        assert s == 200 and np.abs(np.array(ok["scores"]) - want).max() <= TOL
    status, body = _call(world["url"], "/score", method="GET")
    assert status == 405 and body["field"] == "method"
    status, body = _call(world["ctr_url"], "/recommend", {"user_id": "u1", "k": 3})
    assert status == 400 and body["field"] == "task" and "ctr" in body["error"]


def test_concurrent_requests_are_batched_and_each_gets_its_own_answer(world):
    before = _call(world["url"], "/healthz")[1]["batches"]
    users = [f"u{i}" for i in range(16)]
    results: dict[str, tuple[int, dict]] = {}
    barrier = threading.Barrier(len(users))

    def client(u):
        barrier.wait()
        results[u] = _call(world["url"], "/score", {"user_id": u, "item_ids": [1000 + int(u[1:]), 1020, 1030]})

    threads = [threading.Thread(target=client, args=(u,)) for u in users]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for u in users:
        status, body = results[u]
        assert status == 200 and body["user_id"] == u
        want = _want(world, "retrieval", u, [1000 + int(u[1:]), 1020, 1030])
        assert np.abs(np.array(body["scores"]) - want).max() <= TOL
    after = _call(world["url"], "/healthz")[1]["batches"]
    requests = after["score"]["requests"] - before["score"]["requests"]
    batches = after["score"]["batches"] - before["score"]["batches"]
    assert requests == len(users) and batches < requests  # at least one batch held several requests


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_replica_fetches_only_what_it_serves(world, where, s3_store, bucket, tmp_path):
    """The user vectors are exported for offline use (an ANN index, batch scoring); a
    replica never reads them, and at 10^8 users they are ~25 GB it held in memory."""
    with open(os.path.join(world["retrieval"], "manifest.json")) as f:
        exported = set(json.load(f)["files"])
    store, uri = Store(), world["retrieval"]
    if where == "s3":
        store, uri = s3_store, f"{bucket}/export"
        store.upload_dir(world["retrieval"], uri)
    fserve.fetch_export(store, uri, str(tmp_path))
    fetched = {os.path.relpath(os.path.join(r, n), tmp_path) for r, _, names in os.walk(tmp_path) for n in names}
    assert "user_vectors.parquet" in exported and "user_vectors.parquet" not in fetched
    assert {"manifest.json", "scorer.pt", "item_vectors.parquet"} <= fetched and fetched - {"manifest.json"} <= exported
    assert any(f.startswith("features/") for f in fetched)  # the snapshots /score reads


def test_serve_config_is_checked():
    with pytest.raises(ConfigError, match="serve.max_items"):
        fserve.check_serve_config(ServeConfig(max_items=0))
    with pytest.raises(ConfigError, match="serve.max_batch_size"):
        fserve.check_serve_config(ServeConfig(max_batch_size=0))


def test_case20_load_with_bad_requests_no_5xx(world):
    """RELIABILITY case 20: 2,000 requests from 16 concurrent clients, one in five bad:
    every good one answered correctly, every bad one a 4xx, no 5xx, alive afterwards."""
    from concurrent.futures import ThreadPoolExecutor

    good = [(f"u{i}", [1000 + i, 1000 + (3 * i) % 40, 1039]) for i in range(20)]
    want = {u: _want(world, "retrieval", u, items) for u, items in good}
    bad = [(b"{not json", None), ({"item_ids": [1, 2]}, "user_id"), ({"user_id": "u1", "item_ids": "x"}, "item_ids"), ({"user_id": "u1", "item_ids": list(range(MAX_ITEMS + 1))}, "item_ids")]

    def one(i):
        if i % 5 == 4:
            body, field = bad[i % len(bad)]
            raw = body if isinstance(body, bytes) else None
            status, got = _call(world["url"], "/score", None if raw else body, raw=raw)
            return ("bad", status, got, field)
        u, items = good[i % len(good)]
        status, got = _call(world["url"], "/score", {"user_id": u, "item_ids": items})
        ok = status == 200 and np.abs(np.array(got["scores"]) - want[u]).max() <= TOL
        return ("good", status, ok, None)

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(one, range(2000)))
    statuses = [r[1] for r in results]
    assert not [s for s in statuses if s >= 500], "5xx under load"
    assert all(r[2] for r in results if r[0] == "good"), "a good request got a wrong answer"
    assert all(400 <= r[1] < 500 and (r[3] is None or r[2].get("field") == r[3]) for r in results if r[0] == "bad")
    assert sum(r[0] == "good" for r in results) == 1600
    assert _call(world["url"], "/healthz")[0] == 200
