"""Ingest: planning (listing, footers, schema checks, bad files), row validation,
splits, and the Ray Data path across worker counts. Real Parquet files throughout."""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from flm_dist.config import FeatureConfig, SplitConfig
from flm_dist.data.encode import EncodeSpec, encode_table
from flm_dist.data.hashing import HashSpec
from flm_dist.data.plan import plan_read
from flm_dist.data.schema import BAD_REASONS, DataError, ReadSpec
from flm_dist.storage import Store

HASH = HashSpec.build({"user": 1000, "item": 1000, "cat": 64}, 0)
CTR = ReadSpec.for_task("ctr", [], [1, 5])


def write(path, table, row_group_size=None):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pq.write_table(table, path, row_group_size=row_group_size)


def log_table(n, start=0, label=True, **extra):
    cols = {
        "user_id": pa.array(np.arange(start, start + n) % 97, pa.int64()),
        "item_id": pa.array(np.arange(start, start + n) % 31, pa.int64()),
        "ts": pa.array(np.arange(start, start + n), pa.int64()),
    }
    if label:
        cols["label"] = pa.array((np.arange(n) % 2).astype(np.float32))
    cols.update(extra)
    return pa.table(cols)


# ---------------------------------------------------------------- planning


def test_listing_ignores_marker_and_hidden_files_and_accepts_empty(tmp_path):
    d = tmp_path / "log"
    write(str(d / "part-0.parquet"), log_table(100))
    write(str(d / "sub" / "part-1.parquet"), log_table(50, 100))
    write(str(d / "part-empty.parquet"), log_table(0))  # zero rows: fine
    (d / "part-zero-bytes.parquet").write_bytes(b"")  # zero bytes: fine
    (d / "_SUCCESS").write_text("")
    (d / ".part-0.parquet.crc").write_bytes(b"\x00\x01")
    os.makedirs(d / "_temporary")
    (d / "_temporary" / "junk").write_bytes(b"not parquet")
    plan = plan_read(Store(), str(d), CTR)
    assert [os.path.basename(f.uri) for f in plan.files] == ["part-0.parquet", "part-1.parquet"]
    assert plan.total_rows == 150
    assert plan.empty_files == 2


def test_footers_read_from_object_storage_small_and_large(s3_store, bucket):
    # The plan reads each footer with one ranged GET of the file's tail; a footer larger
    # than that first read (thousands of row groups) takes a second one.
    small, large = log_table(100), log_table(3000, start=100)
    s3_store.write_bytes(f"{bucket}/log/a.parquet", _parquet_bytes(small, None))
    s3_store.write_bytes(f"{bucket}/log/b.parquet", _parquet_bytes(large, 1))
    md = pq.ParquetFile(pa.BufferReader(s3_store.read_bytes(f"{bucket}/log/b.parquet"))).metadata
    assert md.serialized_size > 64 * 1024  # the case under test
    plan = plan_read(s3_store, f"{bucket}/log", CTR)
    assert [f.rows for f in plan.files] == [100, 3000]
    assert len(plan.units) == 1 + 3000 and plan.total_rows == 3100


def test_a_plan_reads_the_footers_of_files_planned_before_from_its_cache(s3_store, bucket):
    """The plan cache (`run.storage/_cache`): a second plan of the same files reads no
    footer (a planted row count shows in it) and equals the uncached plan; a file
    rewritten since (another ETag) is read again; a cache that is not JSON is ignored."""
    import json

    s3_store.write_bytes(f"{bucket}/log/a.parquet", _parquet_bytes(log_table(100), 30))
    s3_store.write_bytes(f"{bucket}/log/b.parquet", _parquet_bytes(log_table(50, 100), None))
    cache = f"{bucket}/runs/_cache"
    plain = plan_read(s3_store, f"{bucket}/log", CTR)
    assert plan_read(s3_store, f"{bucket}/log", CTR, cache=cache).to_dict() == plain.to_dict()
    (entry,) = s3_store.ls(cache)
    c = s3_store.read_json(f"s3://{entry}")
    assert [f[4] for f in c["files"].values()] == [[30, 30, 30, 10], [50]]
    c["files"][plain.files[1].uri][4] = [20, 30]  # planted: b's footer as if it had two row groups
    s3_store.write_json(f"s3://{entry}", c)
    cached = plan_read(s3_store, f"{bucket}/log", CTR, cache=cache)
    assert [u.rows for u in cached.units] == [30, 30, 30, 10, 20, 30]

    s3_store.write_bytes(f"{bucket}/log/b.parquet", _parquet_bytes(log_table(60, 100), None))  # rewritten: new ETag
    again = plan_read(s3_store, f"{bucket}/log", CTR, cache=cache)
    assert [u.rows for u in again.units] == [30, 30, 30, 10, 60]
    assert again.to_dict() == plan_read(s3_store, f"{bucket}/log", CTR).to_dict()
    s3_store.write_bytes(f"s3://{entry}", b"not json")
    assert plan_read(s3_store, f"{bucket}/log", CTR, cache=cache).to_dict() == again.to_dict()
    assert json.loads(s3_store.read_bytes(f"s3://{entry}"))["uri"] == f"{bucket}/log"


def test_a_file_without_a_version_is_never_planned_from_the_cache(tmp_path, monkeypatch):
    """A store that reports no version (no ETag, no mtime: not one this project reaches,
    so the listing is patched) cannot tell a same-size rewrite: its footers are read
    every time."""
    from dataclasses import replace as dc_replace

    from flm_dist.data import plan as plan_mod

    d = tmp_path / "log"
    write(str(d / "a.parquet"), log_table(100))
    listed = plan_mod.list_files
    monkeypatch.setattr(plan_mod, "list_files", lambda store, uri: [dc_replace(f, version="") for f in listed(store, uri)])
    cache = str(tmp_path / "cache")
    assert plan_read(Store(), str(d), CTR, cache=cache).total_rows == 100
    (entry,) = os.listdir(cache)
    c = json.loads((tmp_path / "cache" / entry).read_text())
    (f,) = c["files"]
    c["files"][f][2], c["files"][f][4] = 7, [7]  # planted: would show if the cache were used
    (tmp_path / "cache" / entry).write_text(json.dumps(c))
    assert plan_read(Store(), str(d), CTR, cache=cache).total_rows == 100


def _parquet_bytes(table, row_group_size):
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, row_group_size=row_group_size)
    return sink.getvalue().to_pybytes()


@pytest.mark.parametrize("damage", ["bad_magic", "truncated_footer"])
def test_corrupt_file_fails_fast_naming_the_file(tmp_path, damage):
    d = tmp_path / "log"
    write(str(d / "a.parquet"), log_table(100))
    bad = d / "b.parquet"
    write(str(bad), log_table(100))
    raw = bad.read_bytes()
    bad.write_bytes(b"XXXX" + raw[4:-4] + b"XXXX" if damage == "bad_magic" else raw[: len(raw) - 20])
    with pytest.raises(DataError) as e:
        plan_read(Store(), str(d), CTR)
    assert str(bad) in str(e.value) and "on_bad_file: skip" in str(e.value)
    plan = plan_read(Store(), str(d), CTR, on_bad_file="skip", max_bad_files=1)
    assert plan.total_rows == 100 and [u for u, _ in plan.skipped_files] == [str(bad)]
    assert plan.fingerprint()["skipped_files"][0][0] == str(bad)
    with pytest.raises(DataError, match="exceed data.max_bad_files=0"):
        plan_read(Store(), str(d), CTR, on_bad_file="skip", max_bad_files=0)


def test_schema_drift_names_file_and_column(tmp_path):
    d = tmp_path / "log"
    write(str(d / "a.parquet"), log_table(10))
    write(str(d / "b.parquet"), log_table(10).drop_columns(["label"]))
    with pytest.raises(DataError, match=r"b\.parquet: required column 'label'"):
        plan_read(Store(), str(d), CTR)
    # pretraining does not need labels: the same data plans fine
    assert plan_read(Store(), str(d), ReadSpec.for_task("pretrain", [], [1, 5])).total_rows == 20

    d2 = tmp_path / "log2"
    write(str(d2 / "a.parquet"), log_table(10))
    t = log_table(10)
    write(str(d2 / "b.parquet"), t.set_column(0, "user_id", pa.array([str(x) for x in t.column("user_id").to_pylist()])))
    with pytest.raises(DataError) as e:
        plan_read(Store(), str(d2), CTR)
    assert "b.parquet: column 'user_id' holds string IDs" in str(e.value) and "a.parquet" in str(e.value)

    # a column the task reads where present (retrieval's label: 0 is dropped) in some
    # files only: read from those alone, the others' non-clicks would train as clicks
    d4 = tmp_path / "log4"
    write(str(d4 / "a.parquet"), log_table(10, label=False))
    write(str(d4 / "b.parquet"), log_table(10))
    with pytest.raises(DataError, match=r"b\.parquet has column 'label' and .*a\.parquet does not"):
        plan_read(Store(), str(d4), ReadSpec.for_task("retrieval", [], [1, 5]))
    assert plan_read(Store(), str(d4), ReadSpec.for_task("pretrain", [], [1, 5])).total_rows == 20

    d3 = tmp_path / "log3"
    write(str(d3 / "a.parquet"), log_table(10, label=False).append_column("label", pa.array(["yes"] * 10)))
    with pytest.raises(DataError, match=r"a\.parquet: column 'label' has type string"):
        plan_read(Store(), str(d3), CTR)


def test_declared_feature_must_exist_with_a_usable_type(tmp_path):
    d = tmp_path / "log"
    write(str(d / "a.parquet"), log_table(10, cat=pa.array([1.5] * 10)))
    spec = ReadSpec.for_task("pretrain", [FeatureConfig(name="cat", side="item")], [1, 5])
    with pytest.raises(DataError, match=r"a\.parquet: feature column 'cat' has type double"):
        plan_read(Store(), str(d), spec)
    spec = ReadSpec.for_task("pretrain", [FeatureConfig(name="brand", side="item")], [1, 5])
    with pytest.raises(DataError, match="feature column 'brand' declared in data.features is missing"):
        plan_read(Store(), str(d), spec)


def test_missing_prefix_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="no such file or prefix"):
        plan_read(Store(), str(tmp_path / "nope"), CTR)


# ---------------------------------------------------------------- rows


def test_bad_rows_get_one_reason_each():
    t = pa.table(
        {
            "user_id": pa.array([1, None, 3, 4, 5, 6, 7, 8], pa.int64()),
            "item_id": pa.array([1, 2, None, 4, 5, 6, 7, 8], pa.int64()),
            "label": pa.array([1.0, 0.0, 1.0, None, float("nan"), 2.0, -0.5, 0.0]),
            "rating": pa.array([5.0, 1.0, 3.0, 4.0, 4.0, 4.0, 4.0, 9.0]),
        }
    )
    cols = encode_table(t, EncodeSpec(read=CTR, hash=HASH))
    got = [BAD_REASONS[c] for c in cols["_bad"]]
    assert got == ["ok", "null_user_id", "null_item_id", "null_label", "nonfinite_label", "label_out_of_range", "label_out_of_range", "ok"]
    rating = ReadSpec.for_task("rating", [], [1, 5])
    got = [BAD_REASONS[c] for c in encode_table(t, EncodeSpec(read=rating, hash=HASH))["_bad"]]
    assert got[-1] == "rating_out_of_range" and got[0] == "ok"
    # retrieval trains on positives only: label 0 rows are dropped as not_positive
    retrieval = ReadSpec.for_task("retrieval", [], [1, 5])
    got = [BAD_REASONS[c] for c in encode_table(t, EncodeSpec(read=retrieval, hash=HASH))["_bad"]]
    assert got == ["ok", "null_user_id", "null_item_id", "null_label", "nonfinite_label", "label_out_of_range", "label_out_of_range", "not_positive"]
    # a numeric feature's NaN / Inf is a bad row (null is a missing value: 0)
    num = ReadSpec.for_task("pretrain", [FeatureConfig(name="price", side="item", kind="numeric")], [1, 5])
    tn = t.append_column("price", pa.array([1.0, 2.0, 3.0, None, float("nan"), float("inf"), -1e39, 0.5]))  # -1e39: -Inf in float32
    cols = encode_table(tn, EncodeSpec(read=num, hash=HASH))
    got = [BAD_REASONS[c] for c in cols["_bad"]]
    assert got == ["ok", "null_user_id", "null_item_id", "ok", "nonfinite_feature", "nonfinite_feature", "nonfinite_feature", "ok"]
    assert np.isfinite(cols["f_price"]).all()
    assert cols["f_price"][3] == 0.0
    # positions name the unit and row
    cols = encode_table(t, EncodeSpec(read=CTR, hash=HASH), unit=3, row_offset=10)
    assert (cols["_pos"] >> 32).tolist() == [3] * 8 and (cols["_pos"] & 0xFFFFFFFF).tolist() == list(range(10, 18))


def test_string_and_int_ids_and_features_encode():
    t = pa.table(
        {
            "user_id": pa.array(["u1", "u2", "u1"]),
            "item_id": pa.array([10, 20, 10], pa.int32()),
            "cat": pa.array(["a", None, "a"]),
            "tags": pa.array([["x", "y"], [], None]),
            "price": pa.array([1.0, None, 3.0]),
        }
    )
    feats = [
        FeatureConfig(name="cat", side="item"),
        FeatureConfig(name="tags", side="item", kind="multi", max_len=3),
        FeatureConfig(name="price", side="item", kind="numeric"),
    ]
    hs = HashSpec.build({"user": 1000, "item": 1000, "cat": 64, "tags": 64}, 0)
    cols = encode_table(t, EncodeSpec(read=ReadSpec.for_task("pretrain", feats, [1, 5]), hash=hs))
    assert cols["user"][0] == cols["user"][2] != cols["user"][1]
    assert cols["user"][0] == hs.hash("user", pa.array(["u1"]))[0]
    assert cols["f_cat"][1] == hs.hash("cat", pa.array([""]))[0]  # null is a value of its own
    assert cols["f_tags__0"][0] == hs.hash("tags", pa.array(["x"]))[0] and cols["f_tags__2"][0] == -1
    assert cols["f_tags__0"][1] == -1 and cols["f_tags__0"][2] == -1
    assert cols["f_price"].tolist() == [1.0, 0.0, 3.0]
    assert (cols["_bad"] == 0).all()


@pytest.mark.parametrize("by", ["random", "user", "time"])
def test_splits_are_deterministic_disjoint_and_chunking_invariant(by):
    t = log_table(5000)
    split = SplitConfig(by=by, fraction=0.2, time_cutoff=4000 if by == "time" else None)

    def side(table, s):
        return encode_table(table, EncodeSpec(read=CTR, hash=HASH, split=split, side=s, seed=1))["_pos"] & 0xFFFFFFFF

    ev, tr = set(side(t, "eval").tolist()), set(side(t, "train").tolist())
    assert ev.isdisjoint(tr) and len(ev | tr) == 5000
    assert 0.12 < len(ev) / 5000 < 0.28
    # the same rows whatever the chunking (a worker sees any slice of a file)
    ev_chunked = set()
    for lo in range(0, 5000, 700):
        ev_chunked |= set((side(t.slice(lo, 700), "eval") + lo).tolist())
    assert ev_chunked == ev
    if by == "user":
        users = t.column("user_id").to_numpy()
        assert set(users[sorted(ev)]).isdisjoint(set(users[sorted(tr)]))
    if by == "time":
        assert ev == set(range(4000, 5000))


# ---------------------------------------------------------------- Ray Data path


@pytest.mark.slow
def test_ray_data_rows_identical_across_worker_counts(ray_local, tmp_path):
    """The same rows, hashed the same, whether 1 or 2 workers (or the driver) read them."""
    from flm_dist.data.pipeline import build_dataset

    d = tmp_path / "log"
    for i, n in enumerate([0, 3000, 50, 700]):
        t = log_table(n, start=i * 10_000)
        t = t.set_column(0, "user_id", pa.array([f"user-{x}" for x in t.column("user_id").to_pylist()], pa.string()))
        write(str(d / f"part-{i}.parquet"), t, row_group_size=512)
    plan = plan_read(Store(), str(d), CTR)
    enc = EncodeSpec(read=CTR, hash=HASH)
    expected = {}
    for u in plan.units:
        pf = pq.ParquetFile(plan.files[u.file].uri)
        cols = encode_table(pf.read_row_group(u.row_group), enc, u.index)
        expected.update(zip(cols["_pos"].tolist(), zip(cols["user"].tolist(), cols["item"].tolist(), strict=True), strict=True))
    def consume(split) -> list:
        out = []
        for b in split.iter_batches(batch_size=333, batch_format="numpy"):
            out += list(zip(b["_pos"].tolist(), zip(b["user"].tolist(), b["item"].tolist(), strict=True), strict=True))
        return out

    for n in (1, 2):
        ds = build_dataset(plan, enc, Store(), shuffle=True, seed=3, block_rows=1000, on_bad_file="fail")
        # the splits of a streaming split are consumed together, as train workers do
        with ThreadPoolExecutor(n) as pool:
            parts = list(pool.map(consume, ds.streaming_split(n, equal=False)))
        seen = [p for part in parts for p in part]
        assert len(seen) == len(expected) and dict(seen) == expected


def test_read_slots_share_each_nodes_spare_cpus():
    from flm_dist.ingest import read_slots

    # 2 workers of 0.5 CPU on 2 cores: 1 spare CPU, still one read task per rank (never 0)
    assert read_slots(["a", "a"], {"a": 2.0}, 0.5) == [1, 1]
    # 8 GPU workers of 6 CPUs on a 64-CPU node: 16 spare, 2 read tasks each
    assert read_slots(["n"] * 8, {"n": 64.0}, 6.0) == [2] * 8
    # per node: 2 ranks on an 8-CPU node, 1 on a 4-CPU node, 2 CPUs per worker
    assert read_slots(["a", "b", "a"], {"a": 8.0, "b": 4.0}, 2.0) == [2, 2, 2]
    # ranks with no known node share the cluster's total
    assert read_slots([None, None], {None: 12.0}, 1.0) == [5, 5]


@pytest.mark.slow
def test_per_rank_datasets_read_on_their_node_without_cpu_reservations(ray_local, tmp_path):
    """Each rank's dataset (FLMDataConfig) reads its own disjoint share with read tasks
    that reserve no CPU, run on the rank's node, at most `read_slots` at once, one block
    each (no SplitBlocks). This checks how configure builds the reads; the starvation
    they avoid (Ray's coordinator giving each of 2 datasets 0 of 1 spare CPU while
    train workers hold the rest) is measured by bench/run_all.py, C at 2 workers."""
    import ray

    from flm_dist.data.pipeline import InteractionDatasource
    from flm_dist.ingest import FLMDataConfig, read_slots

    d = tmp_path / "log"
    for i, n in enumerate([3000, 700, 1200]):
        write(str(d / f"part-{i}.parquet"), log_table(n, start=i * 10_000), row_group_size=256)
    plan = plan_read(Store(), str(d), CTR)
    src = InteractionDatasource(plan, EncodeSpec(read=CTR, hash=HASH), Store(), True, 3, 1000, "fail")
    node = ray.get_runtime_context().get_node_id()
    cfg = FLMDataConfig({"valid": (src, plan.to_dict())}, Store(), cpus_per_worker=0.5)
    its = [split["valid"] for split in cfg.configure({"valid": None}, 2, worker_node_ids=[node, node])]
    for it in its:
        read_op = it._base_dataset._logical_plan.dag  # the Read operator configure built
        assert read_op.ray_remote_args["num_cpus"] == 0
        assert read_op.ray_remote_args["label_selector"] == {"ray.io/node-id": node}
        assert read_op.compute.size == read_slots([node, node], {node: ray.cluster_resources()["CPU"]}, 0.5)[0]
    with ThreadPoolExecutor(2) as pool:
        parts = list(pool.map(lambda it: [p for b in it.iter_batches(batch_size=500, batch_format="numpy") for p in b["_pos"].tolist()], its))
    assert len(parts[0]) and len(parts[1]) and not set(parts[0]) & set(parts[1])
    assert len(parts[0]) + len(parts[1]) == 4900
    assert all("SplitBlocks" not in it._base_dataset.stats() for it in its)
