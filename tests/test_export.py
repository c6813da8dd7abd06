"""Export: the scoring graphs against the model, the ID universe, and a real 2-worker
row-wise sharded checkpoint exported and loaded in processes that import only torch,
or only onnxruntime + numpy."""

from __future__ import annotations

import glob
import hashlib
import json
import os
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch

from flm_dist import checkpoint as ckpt
from flm_dist import launch
from flm_dist.batch import Batch
from flm_dist.cli import main as cli_main
from flm_dist.config import FeatureConfig, ModelConfig, ServeConfig
from flm_dist.data.encode import EncodeSpec, encode_table
from flm_dist.data.hashing import HashSpec, prehash_ids, prehash_str
from flm_dist.data.plan import list_files
from flm_dist.data.schema import ReadSpec
from flm_dist.data.synth import synth
from flm_dist.export import (
    Scorer,
    _export_onnx,
    _feature_meta,
    _LastSeen,
    export,
    feature_inputs,
    load_model,
    write_export,
)
from flm_dist.model import FLM, table_sizes
from flm_dist.storage import Store
from tests.conftest import FEATURES, tiny_job

FP32_TOL = 1e-5
# fp16 tables: each row rounds to 11 significant bits (relative error <= 2^-11 ~ 4.9e-4);
# through the towers and a cosine that stays well inside 5e-3 on [-1, 1] scores.
FP16_TOL = 5e-3


# ---------------------------------------------------------------- helpers


def _expected(model: FLM, table: pa.Table, spec: HashSpec, features, task: str) -> torch.Tensor:
    """The model's scores on raw rows, encoded exactly as training encodes them."""
    read = ReadSpec.for_task("ctr" if task != "retrieval" else "retrieval", features, [1, 5])
    cols = encode_table(table, EncodeSpec(read=read, hash=spec))
    feats = {}
    for f in features:
        if f.kind == "multi":
            feats[f.name] = torch.from_numpy(np.stack([cols[f"f_{f.name}__{j}"] for j in range(f.max_len)], 1))
        else:
            feats[f.name] = torch.from_numpy(cols[f"f_{f.name}"])
    batch = Batch(user=torch.from_numpy(cols["user"]), item=torch.from_numpy(cols["item"]), features=feats)
    with torch.no_grad():
        out = model(batch)
        if task == "ctr":
            return torch.sigmoid(out.score)
        if task == "rating":
            return out.score
        return model.similarity(out.z_user, out.z_item)


# ---------------------------------------------------------------- graphs vs model (no Ray)

ALL_KINDS = [
    FeatureConfig(name="u_seg", side="user"),  # string categorical
    FeatureConfig(name="i_tags", side="item", kind="multi", max_len=3),  # list<string>
    FeatureConfig(name="i_price", side="item", kind="numeric"),
    FeatureConfig(name="i_brand", side="item"),  # int categorical
]


def _raw_rows(n: int = 257) -> pa.Table:
    rng = np.random.default_rng(1)
    users = rng.integers(-(2**63), 2**63 - 1, n, dtype=np.int64)
    users[:4] = [-(2**63), 2**63 - 1, 0, -1]  # the ends of int64: the in-graph hash must wrap like the spec
    return pa.table({
        "user_id": pa.array(users),
        "item_id": pa.array([f"item-{i}" for i in rng.integers(0, 60, n)]),  # string IDs
        "u_seg": pa.array([None if i % 7 == 0 else f"s{i % 5}" for i in range(n)]),
        "i_tags": pa.array([None if i % 11 == 0 else [f"t{(i + j) % 9}" for j in range(i % 6)] for i in range(n)]),
        "i_price": pa.array([None if i % 13 == 0 else (float("nan") if i % 17 == 0 else i / 10) for i in range(n)]),
        "i_brand": pa.array([None if i % 19 == 0 else int(i % 9) for i in range(n)], pa.int64()),
        "label": pa.array(np.ones(n, np.int8)),
    })


def _random_model(task: str) -> tuple[FLM, HashSpec]:
    cfg = ModelConfig(user_rows=4096, item_rows=1024, feature_rows=64, embedding_dim=8, hidden=[16], latent_dim=8, head_hidden=[8])
    torch.manual_seed(0)
    model = FLM(cfg, ALL_KINDS, rating_center=3.0 if task == "rating" else 0.0).eval()
    with torch.no_grad():  # weights of a trained model's scale, so a wrong row or mask shows in the scores
        for p in model.parameters():
            p.normal_(0.0, 0.5)
    return model, HashSpec.build(table_sizes(cfg, ALL_KINDS), 5)


ID_KINDS = {"user_id": "int", "item_id": "string", "u_seg": "string", "i_brand": "int"}


@pytest.mark.parametrize("task", ["ctr", "rating", "retrieval"])
def test_torchscript_scorer_matches_the_model_for_every_feature_kind(task):
    model, spec = _random_model(task)
    table = _raw_rows()
    feats = feature_inputs(table, _feature_meta(ALL_KINDS, ID_KINDS, table.schema))
    user = torch.from_numpy(prehash_ids(table.column("user_id")).copy())
    item = torch.from_numpy(prehash_ids(table.column("item_id")).copy())
    expected = _expected(model, table, spec, ALL_KINDS, task)
    with torch.no_grad():
        got = torch.jit.script(Scorer(model, spec, task, ID_KINDS))(user, item, feats)
        assert got.dtype == torch.float32
        assert float((got - expected).abs().max()) <= FP32_TOL
        # a feature left out scores as a null value scores in training
        nulls = table.set_column(table.schema.get_field_index("u_seg"), "u_seg", pa.nulls(table.num_rows, pa.string()))
        no_useg = {k: v for k, v in feats.items() if k != "u_seg"}
        got = torch.jit.script(Scorer(model, spec, task, ID_KINDS))(user, item, no_useg)
        assert float((got - _expected(model, nulls, spec, ALL_KINDS, task)).abs().max()) <= FP32_TOL
        # the graph scores NaN / inf numeric inputs as 0 (training drops such rows as bad; the server refuses them)
        price = feats["i_price"].clone()
        price[::5] = float("nan")
        price[1::5] = float("inf")
        zeroed = feats["i_price"].clone()
        zeroed[::5] = 0.0
        zeroed[1::5] = 0.0
        scorer = torch.jit.script(Scorer(model, spec, task, ID_KINDS))
        assert torch.equal(scorer(user, item, {**feats, "i_price": price}), scorer(user, item, {**feats, "i_price": zeroed}))
        half = torch.jit.script(Scorer(model, spec, task, ID_KINDS, torch.float16))(user, item, feats)
        scale = float(expected.abs().max()) if task == "rating" else 1.0  # ratings are not in [-1, 1]
        assert half.dtype == torch.float32 and float((half - expected).abs().max()) <= FP16_TOL * scale


def test_onnx_scorer_matches_the_model_for_every_feature_kind(tmp_path):
    import onnxruntime as ort

    model, spec = _random_model("ctr")
    table = _raw_rows()
    meta = _feature_meta(ALL_KINDS, ID_KINDS, table.schema)
    _export_onnx(Scorer(model, spec, "ctr", ID_KINDS), meta, str(tmp_path / "scorer.onnx"))
    sess = ort.InferenceSession(str(tmp_path / "scorer.onnx"), providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    assert names == ["user_id", "item_id", "u_seg", "i_tags", "i_tags__len", "i_price", "i_brand"]
    feed = {"user_id": prehash_ids(table.column("user_id")), "item_id": prehash_ids(table.column("item_id"))}
    feed.update({k: v.numpy() for k, v in feature_inputs(table, meta).items()})
    (got,) = sess.run(None, feed)
    assert float(np.abs(got - _expected(model, table, spec, ALL_KINDS, "ctr").numpy()).max()) <= FP32_TOL
    one = {k: v[:1] for k, v in feed.items()}  # the batch dimension is dynamic, down to one row
    assert sess.run(None, one)[0].shape == (1,)


def test_last_seen_keeps_the_last_row_per_id_across_merges():
    rng = np.random.default_rng(0)
    seen = _LastSeen("user_id")
    expected: dict = {}
    for block in range(12):
        n = int(rng.integers(0, 9))
        ids = [None if rng.random() < 0.1 else f"u{rng.integers(0, 15)}" for _ in range(n)]
        vals = [f"v{block}-{i}" for i in range(n)]
        for u, v in zip(ids, vals, strict=True):
            if u is not None:  # null IDs are dropped, as training drops them
                expected[u] = v
        seen.add(pa.table({"user_id": pa.array(ids, pa.string()), "seg": pa.array(vals)}))
        seen.merge_rows = 3  # merge often: the reduced blocks and the merged table interleave
    got = seen.table()
    assert got.column("user_id").to_pylist() == sorted(expected)
    assert dict(zip(got.column("user_id").to_pylist(), got.column("seg").to_pylist(), strict=True)) == expected


def test_prehash_ids_are_prehashed_strings_and_raw_ints():
    strings = ["", "a", "ünïcode", None]
    want = [prehash_str(s or "") for s in strings]
    assert prehash_ids(pa.array(strings)).tolist() == want
    assert prehash_ids(pa.array(strings).dictionary_encode()).tolist() == want
    assert prehash_ids(pa.array(strings, pa.large_string())).tolist() == want
    assert prehash_ids(pa.array([5, None, -(2**63)], pa.int64())).tolist() == [5, 0, -(2**63)]
    assert prehash_ids(pa.array([7], pa.int8())).tolist() == [7]


def test_bad_format_or_dtype_is_refused_before_any_work():
    with pytest.raises(ValueError, match="torchscript,onnx"):
        write_export(None, None, {}, "/nowhere", formats="pdf")
    with pytest.raises(ValueError, match="fp32 or fp16"):
        write_export(None, None, {}, "/nowhere", dtype="bf16")


# ---------------------------------------------------------------- a real sharded checkpoint

TORCH_ONLY = r"""
import json, re, sys, torch
export_dir, rows_path, out_path = sys.argv[1:4]
m = json.load(open(export_dir + "/manifest.json"))
spec = m["hash_spec"]
# The hash, reimplemented from the manifest's definition text alone: its hex constants
# are, in order, the two fmix64 multipliers, the FNV offset and prime, the string domain.
C1, C2, FNV_OFFSET, FNV_PRIME, DOMAIN = (int(c, 16) for c in re.findall(r"0x[0-9a-f]+", spec["definition"]))
M = (1 << 64) - 1
def fmix64(k):
    k ^= k >> 33; k = (k * C1) & M; k ^= k >> 33; k = (k * C2) & M; return k ^ (k >> 33)
def fnv1a64(b):
    h = FNV_OFFSET
    for x in b: h = ((h ^ x) * FNV_PRIME) & M
    return h
def signed(u): return u - (1 << 64) if u >= 1 << 63 else u
def prehash(s): return signed(fnv1a64(s.encode()) ^ DOMAIN)
def row_of_string(table, s):
    t = spec["tables"][table]
    return (fmix64(fnv1a64(s.encode()) ^ t["seed"] ^ DOMAIN) >> 1) % t["rows"]

rows = json.load(open(rows_path))
def col(name, kind):
    return torch.tensor([prehash(v) if kind == "string" else v for v in rows[name]], dtype=torch.int64)
feats = {f["name"]: col(f["name"], f["id_kind"]) for f in m["features"]}
scorer = torch.jit.load(export_dir + "/scorer.pt")
with torch.no_grad():
    user, item = col("user_id", m["id_kinds"]["user_id"]), col("item_id", m["id_kinds"]["item_id"])
    out = {
        "scores": scorer(user, item, feats),
        "user_vectors": scorer.user_vectors(user, feats),
        "item_vectors": scorer.item_vectors(item, feats),
        "string_rows": {t: [row_of_string(t, s) for s in rows["strings"]] for t in ("user", "item")},
        # string IDs through the int64 graph: prehash(s) must land on the string's row
        "string_scores": scorer(col("strings", "string"), col("strings", "string"), None),
    }
assert not [k for k in sys.modules if k.startswith("flm_dist")], "the export must load without flm_dist"
torch.save(out, out_path)
"""

ONNX_ONLY = r"""
import json, sys
import numpy as np
import onnxruntime as ort
export_dir, rows_path, out_path = sys.argv[1:4]
m = json.load(open(export_dir + "/manifest.json"))
scope = {}
exec(m["hash_spec"]["prehash"]["numpy"], scope)  # the documented pre-processing for strings
prehash = scope["prehash"]
rows = json.load(open(rows_path))
def col(name, kind):
    return prehash(rows[name]) if kind == "string" else np.asarray(rows[name], dtype=np.int64)
kinds = {**m["id_kinds"], **{f["name"]: f["id_kind"] for f in m["features"]}}
sess = ort.InferenceSession(export_dir + "/" + m["onnx"]["file"], providers=["CPUExecutionProvider"])
names = [i.name for i in sess.get_inputs()]
assert names == m["onnx"]["inputs"], (names, m["onnx"]["inputs"])
(scores,) = sess.run(["score"], {n: col(n, kinds[n]) for n in names})
assert "torch" not in sys.modules and not [k for k in sys.modules if k.startswith("flm_dist")]
np.save(out_path, scores)
"""


def _run(script: str, *args, cwd) -> None:
    subprocess.run([sys.executable, "-c", script, *map(str, args)], check=True, cwd=cwd, env={**os.environ, "PYTHONPATH": ""}, timeout=120)


@pytest.fixture(scope="module")
def trained(ray_local, s3, s3_store, tmp_path_factory):
    """One retrieval checkpoint trained by 2 workers with every table row-wise sharded,
    exported in fp32 (TorchScript + ONNX) and fp16 (TorchScript), both downloaded."""
    s3_store.ensure_bucket("s3://export-test")
    synth(s3_store, "s3://export-test/data", rows=6000, users=300, items=200, seed=3, files=4, row_group_rows=500)
    job = tiny_job("s3://export-test/runs", "ret", "retrieval", **{
        "scaling.shard_threshold_bytes": 0, "data.train": "s3://export-test/data/train", "train.epochs": 1,
        "data.valid_fraction": 0,  # no validation: no export test reads it
    })
    job = replace(job, storage=s3.storage_config())
    res = launch.train(job, s3_store, fresh=True, progress=False)
    tmp = tmp_path_factory.mktemp("export")
    out = {"checkpoint": res["checkpoint"], "tmp": tmp}
    for name, dtype, formats in (("fp32", "fp32", "torchscript,onnx"), ("fp16", "fp16", "torchscript,onnx")):
        uri = f"s3://export-test/{name}"
        export(s3_store, res["checkpoint"], uri, dtype=dtype, formats=formats)
        s3_store.download_dir(uri, str(tmp / name))
        out[name] = tmp / name
    # 300 rows of one training file, raw, and what the trained model scores on them
    fs, path = s3_store.arrow_fs("s3://export-test/data/train/part-00000.parquet")
    table = pq.read_table(path, filesystem=fs).slice(0, 300)
    model, manifest, _ = load_model(s3_store, res["checkpoint"])
    out["model"], out["ckpt_manifest"], out["table"] = model, manifest, table
    out["expected"] = _expected(model, table, HashSpec.from_dict(manifest["hash_spec"]), FEATURES, "retrieval")
    return out


def _rows_json(trained, strings: list[str]) -> str:
    t = trained["table"]
    rows = {c: t.column(c).to_pylist() for c in ["user_id", "item_id"] + [f.name for f in FEATURES]}
    rows["strings"] = strings
    path = trained["tmp"] / "rows.json"
    path.write_text(json.dumps(rows))
    return str(path)


@pytest.mark.slow
def test_sharded_checkpoint_exports_and_loads_with_torch_only(trained):
    m_ckpt = trained["ckpt_manifest"]
    assert m_ckpt["world_size"] == 2 and {p["kind"] for p in m_ckpt["sharding_plan"].values()} == {"row_wise"}
    strings = ["", "user-42", "ünïcode-ID", "123"]
    out_path = trained["tmp"] / "torch_out.pt"
    _run(TORCH_ONLY, trained["fp32"], _rows_json(trained, strings), out_path, cwd=trained["tmp"])
    got = torch.load(out_path)
    assert float((got["scores"] - trained["expected"]).abs().max()) <= FP32_TOL
    # plain-Python rows from the manifest's definition == HashSpec.hash
    spec = HashSpec.from_dict(m_ckpt["hash_spec"])
    for table in ("user", "item"):
        assert got["string_rows"][table] == spec.hash(table, pa.array(strings)).tolist()
    # ... and prehash(s) through the int64 graph lands on the string's rows
    model = trained["model"]
    with torch.no_grad():
        rows_u = torch.from_numpy(spec.hash("user", pa.array(strings)))
        rows_i = torch.from_numpy(spec.hash("item", pa.array(strings)))
        xu = torch.cat([model.tables["user"](rows_u), model.tables["u_segment"](torch.full_like(rows_u, int(spec.hash("u_segment", pa.array([""]))[0])))], 1)
        xi = torch.cat([model.tables["item"](rows_i), model.tables["i_category"](torch.full_like(rows_i, int(spec.hash("i_category", pa.array([""]))[0])))], 1)
        want = model.similarity(model.user_encoder(xu), model.item_encoder(xi))
    assert float((got["string_scores"] - want).abs().max()) <= FP32_TOL
    # the vectors' inner products are the scores
    assert float(((got["user_vectors"] * got["item_vectors"]).sum(-1) - got["scores"]).abs().max()) <= FP32_TOL


@pytest.mark.slow
def test_onnx_export_reproduces_the_trained_model_with_onnxruntime_only(trained):
    out_path = trained["tmp"] / "onnx_out.npy"
    _run(ONNX_ONLY, trained["fp32"], _rows_json(trained, []), out_path, cwd=trained["tmp"])
    got = np.load(out_path)
    assert float(np.abs(got - trained["expected"].numpy()).max()) <= FP32_TOL


@pytest.mark.slow
def test_fp16_export_is_close_and_half_the_table_bytes(trained):
    m16 = json.loads((trained["fp16"] / "manifest.json").read_text())
    m32 = json.loads((trained["fp32"] / "manifest.json").read_text())
    assert m16["dtype"] == "fp16"
    size = {rel: (m16["files"][rel]["bytes"], m32["files"][rel]["bytes"]) for rel in ("tables/user.safetensors", "scorer.pt", "scorer.onnx")}
    assert size["tables/user.safetensors"][0] < 0.51 * size["tables/user.safetensors"][1]
    assert all(b16 < b32 for b16, b32 in size.values()), size  # graphs have fixed overheads besides the tables
    rows = _rows_json(trained, ["x"])
    _run(TORCH_ONLY, trained["fp16"], rows, trained["tmp"] / "fp16.pt", cwd=trained["tmp"])
    _run(ONNX_ONLY, trained["fp16"], rows, trained["tmp"] / "fp16.npy", cwd=trained["tmp"])
    ts = torch.load(trained["tmp"] / "fp16.pt")["scores"]
    ort_scores = np.load(trained["tmp"] / "fp16.npy")
    diff = float((ts - trained["expected"]).abs().max())
    assert ts.dtype == torch.float32 and diff <= FP16_TOL, diff
    # both runtimes compute the same fp32 arithmetic on the same fp16 rows
    assert float(np.abs(ort_scores - ts.numpy()).max()) <= FP32_TOL


def _all_rows(s3_store, manifest) -> pa.Table:
    parts = []
    for f in manifest["data_files"]:
        fs, path = s3_store.arrow_fs(f["uri"])
        parts.append(pq.read_table(path, filesystem=fs, columns=["user_id", "item_id", "label", "u_segment", "i_category"]))
    return pa.concat_tables(parts)


@pytest.mark.slow
def test_vectors_and_feature_snapshot_cover_the_training_data(trained, s3_store):
    d = trained["fp32"]
    m = json.loads((d / "manifest.json").read_text())
    rows = _all_rows(s3_store, trained["ckpt_manifest"])
    rows = rows.filter(pc.greater(rows.column("label"), 0))  # what a retrieval run trains on: its clicks
    for side, feat in (("user", "u_segment"), ("item", "i_category")):
        last = dict(zip(rows.column(f"{side}_id").to_pylist(), rows.column(feat).to_pylist(), strict=True))
        snap = pq.read_table(d / m["feature_snapshot"][f"{side}s"]["file"])
        assert snap.column(f"{side}_id").to_pylist() == sorted(last)  # every distinct ID, once, sorted
        assert dict(zip(snap.column(0).to_pylist(), snap.column(1).to_pylist(), strict=True)) == last
        vec = pq.read_table(d / f"{side}_vectors.parquet")
        assert vec.column(f"{side}_id").to_pylist() == sorted(last)
        assert m["vectors"][f"{side}s"]["rows"] == len(last)
    # user . item from the parquet files == the scorer's similarity on the sample rows (its clicks)
    click = np.asarray(trained["table"].column("label").to_numpy(zero_copy_only=False)) > 0

    def lookup(side):
        vec = pq.read_table(d / f"{side}_vectors.parquet")
        index = {k: i for i, k in enumerate(vec.column(f"{side}_id").to_pylist())}
        mat = np.stack(vec.column("vector").to_pylist()).astype(np.float32)
        ids = np.asarray(trained["table"].column(f"{side}_id").to_pylist())[click]
        return mat[[index[k] for k in ids.tolist()]]
    dots = (lookup("user") * lookup("item")).sum(1)
    assert click.sum() > 100 and float(np.abs(dots - trained["expected"].numpy()[click]).max()) <= FP32_TOL
    assert np.allclose(np.linalg.norm(lookup("item"), axis=1), 1.0, atol=1e-5)


@pytest.mark.slow
def test_manifest_lists_every_file_with_its_sha256_and_lineage(trained, s3_store):
    d = trained["fp32"]
    m = json.loads((d / "manifest.json").read_text())
    on_disk = {os.path.relpath(p, d) for p in glob.glob(str(d / "**" / "*"), recursive=True) if os.path.isfile(p)}
    assert on_disk - {"manifest.json"} == set(m["files"])
    for rel, info in m["files"].items():
        data = (d / rel).read_bytes()
        assert len(data) == info["bytes"] and hashlib.sha256(data).hexdigest() == info["sha256"], rel
    assert m["formats"] == ["torchscript", "onnx"] and m["task"] == "retrieval"
    assert m["onnx"]["inputs"] == ["user_id", "item_id", "u_segment", "i_category"]
    assert [i["name"] for i in m["inputs"]] == m["onnx"]["inputs"]
    assert m["lineage"]["checkpoint"] == trained["checkpoint"]
    chain = ckpt.lineage(s3_store, "s3://export-test/fp32")
    assert chain[0]["export"] == "s3://export-test/fp32" and chain[1]["checkpoint"] == trained["checkpoint"]
    assert m["hash_spec"]["version"] == "flm-hash-v1" and "definition" in m["hash_spec"]
    assert {f["name"]: f["id_kind"] for f in m["features"]} == {"u_segment": "string", "i_category": "string"}


@pytest.mark.slow
def test_cli_export_writes_only_the_formats_asked_for(trained, s3, tmp_path):
    storage = s3.storage_config()
    sets = [f"storage.endpoint_url={storage.endpoint_url}", f"storage.access_key_id={storage.access_key_id}",
            f"storage.secret_access_key={storage.secret_access_key}", "storage.region=us-east-1"]
    argv = ["export", "--checkpoint", trained["checkpoint"], "--out", str(tmp_path / "ts"), "--format", "torchscript"]
    for s in sets:
        argv += ["--set", s]
    assert cli_main(argv) == 0
    m = json.loads((tmp_path / "ts" / "manifest.json").read_text())
    assert m["formats"] == ["torchscript"] and m["onnx"] is None
    assert (tmp_path / "ts" / "scorer.pt").exists() and not (tmp_path / "ts" / "scorer.onnx").exists()


@pytest.mark.parametrize(
    "task,features",
    [("ctr", []), ("rating", []), ("retrieval", []), ("pretrain", []), ("ctr", ALL_KINDS[:1]), ("retrieval", ALL_KINDS)],
    ids=["ctr-ids-only", "rating-ids-only", "retrieval-ids-only", "pretrain-ids-only", "ctr-1-feature", "retrieval-4-features"],
)
def test_default_export_of_every_task_with_0_1_and_several_features(tmp_path, task, features):
    """`flm-dist export`'s default (TorchScript and ONNX) for IDs-only models (the most
    common kind; the ONNX step failed on them) and with features, every task."""
    import onnxruntime as ort

    from flm_dist.config import JobConfig, to_dict

    cfg = ModelConfig(user_rows=4096, item_rows=1024, feature_rows=64, embedding_dim=8, hidden=[16], latent_dim=8, head_hidden=[8])
    torch.manual_seed(0)
    model = FLM(cfg, features, rating_center=3.0 if task == "rating" else 0.0).eval()
    spec = HashSpec.build(table_sizes(cfg, features), 5)
    table = _raw_rows(64)
    pq.write_table(table, tmp_path / "train.parquet")
    job = JobConfig(task=task, model=cfg)
    job.data.features = list(features)
    source = {"task": task, "config": to_dict(job), "hash_spec": spec.to_dict(), "data_columns": ID_KINDS,
              "data_files": [{"uri": str(tmp_path / "train.parquet"), "size": (tmp_path / "train.parquet").stat().st_size}]}
    manifest = write_export(Store(), model, source, str(tmp_path / "out"))
    assert manifest["formats"] == ["torchscript", "onnx"]
    meta = manifest["features"]
    feed = {"user_id": prehash_ids(table.column("user_id")), "item_id": prehash_ids(table.column("item_id"))}
    feed.update({k: v.numpy() for k, v in feature_inputs(table, meta).items()})
    want = _expected(model, table, spec, features, "retrieval" if task == "pretrain" else task).numpy()
    (got,) = ort.InferenceSession(str(tmp_path / "out" / "scorer.onnx"), providers=["CPUExecutionProvider"]).run(None, feed)
    assert float(np.abs(got - want).max()) <= FP32_TOL
    ts = torch.jit.load(str(tmp_path / "out" / "scorer.pt"))
    with torch.no_grad():
        got = ts(torch.from_numpy(feed["user_id"]), torch.from_numpy(feed["item_id"]), {k: torch.from_numpy(v) for k, v in feed.items() if k not in ("user_id", "item_id")})
    assert float(np.abs(got.numpy() - want).max()) <= FP32_TOL


def test_a_re_export_into_the_same_folder_leaves_no_old_file_and_never_a_mix(tmp_path, monkeypatch):
    """Exported again into its folder, an export holds only its own files (an ONNX graph
    of the first one was left behind, and read by whoever loads scorer.onnx); one that
    fails midway leaves no manifest, so no replica serves old and new files together."""
    from flm_dist.config import JobConfig, to_dict
    from flm_dist.serve import fetch_export
    from flm_dist.storage import StorageError

    cfg = ModelConfig(user_rows=4096, item_rows=1024, feature_rows=64, embedding_dim=8, hidden=[16], latent_dim=8)
    pq.write_table(_raw_rows(64), tmp_path / "train.parquet")
    source = {"task": "retrieval", "config": to_dict(JobConfig(task="retrieval", model=cfg)), "hash_spec": HashSpec.build(table_sizes(cfg, []), 5).to_dict(),
              "data_columns": ID_KINDS, "data_files": [{"uri": str(tmp_path / "train.parquet"), "size": (tmp_path / "train.parquet").stat().st_size}]}
    out = tmp_path / "out"

    def on_disk():
        return {os.path.relpath(p, out) for p in glob.glob(f"{out}/**", recursive=True) if os.path.isfile(p)}

    write_export(Store(), FLM(cfg, []).eval(), source, str(out))
    assert (out / "scorer.onnx").exists()
    m = write_export(Store(), FLM(cfg, []).eval(), source, str(out), formats="torchscript")
    assert on_disk() == {*m["files"], "manifest.json"}
    write_export(Store(), FLM(cfg, []).eval(), source, str(out))  # both again
    put, done = Store.put_file, []

    def store_fails_after_one_file(self, local, uri):
        if done:
            raise StorageError(f"cannot write {uri}: the store went away")
        done.append(uri)
        put(self, local, uri)

    monkeypatch.setattr(Store, "put_file", store_fails_after_one_file)
    with pytest.raises(StorageError, match="went away"):
        write_export(Store(), FLM(cfg, []).eval(), source, str(out), formats="torchscript")
    with pytest.raises(FileNotFoundError, match="no manifest.json: not an export, or one still being written"):
        fetch_export(Store(), str(out), str(tmp_path))
    monkeypatch.setattr(Store, "put_file", put)
    # the next export finds no manifest listing the old files: it knows an export's own names
    m = write_export(Store(), FLM(cfg, []).eval(), source, str(out), formats="torchscript")
    assert on_disk() == {*m["files"], "manifest.json"} and "scorer.onnx" not in m["files"]
    write_export(Store(), FLM(cfg, []).eval(), source, str(out), formats="onnx")
    with pytest.raises(ValueError, match=r"has no scorer.pt \(exported with --format onnx only\)"):  # what a replica says of it
        fetch_export(Store(), str(out), str(tmp_path))


def test_uint64_ids_past_2_63_are_exported_and_served_as_training_hashes_them(tmp_path):
    """Training hashes an integer ID's 64 bits, so a uint64 column's IDs at and above
    2^63 (64-bit fingerprints) train. The export cast them to int64 and failed; the
    server refused them as out of the int64 range, or hashed their decimal strings as
    strings: unseen IDs."""
    from flm_dist.config import JobConfig, to_dict
    from flm_dist.serve import LoadedExport

    big = 2**63 + 5
    pq.write_table(pa.table({"user_id": pa.array([big, big], pa.uint64()), "item_id": pa.array([big + 1, 4], pa.uint64()), "label": pa.array([1.0, 1.0])}), tmp_path / "a.parquet")
    # another file of the log gives the IDs as int64: training reads both as the same kind
    pq.write_table(pa.table({"user_id": pa.array([7], pa.int64()), "item_id": pa.array([3], pa.int64()), "label": pa.array([1.0])}), tmp_path / "b.parquet")
    cfg = ModelConfig(user_rows=4096, item_rows=1024, feature_rows=64, embedding_dim=8, hidden=[16], latent_dim=8)
    job = JobConfig(task="retrieval", model=cfg)
    job.data.valid_fraction = 0.0
    source = {"task": "retrieval", "config": to_dict(job), "hash_spec": HashSpec.build(table_sizes(cfg, []), 5).to_dict(), "data_columns": {"user_id": "int", "item_id": "int"},
              "data_files": [{"uri": str(tmp_path / f), "size": (tmp_path / f).stat().st_size} for f in ("a.parquet", "b.parquet")]}
    torch.manual_seed(0)
    write_export(Store(), FLM(cfg, []).eval(), source, str(tmp_path / "out"), formats="torchscript")
    assert sorted(pq.read_table(tmp_path / "out" / "item_vectors.parquet").column("item_id").to_pylist()) == [3, 4, big + 1]
    server = LoadedExport(str(tmp_path / "out"), ServeConfig(max_items=10))
    assert {r["item_id"] for r in server.recommend_batch([server.parse_recommend({"user_id": big, "k": 3})])[0]["items"]} == {3, 4, big + 1}
    scorer = torch.jit.load(str(tmp_path / "out" / "scorer.pt"))
    with torch.no_grad():  # the graph takes the int64 of the same bits
        want = scorer(torch.tensor([big - 2**64]), torch.tensor([big + 1 - 2**64]), {}).tolist()
    for user, item in ((big, big + 1), (str(big), str(big + 1))):
        got = server.score_batch([server.parse_score({"user_id": user, "item_ids": [item]})])[0]["scores"]
        assert got == pytest.approx(want, abs=1e-6)


def test_vectors_and_the_snapshot_take_the_rows_training_takes(tmp_path):
    """The export's universe and last-seen features come from the rows training trained
    on: not a row it dropped (a NaN feature, a retrieval non-click), nor an eval row of
    its split. User 7's last row has a NaN age: training saw 30, so the server must."""
    from flm_dist.config import DataConfig, JobConfig, SplitConfig, to_dict

    t = pa.table({
        "user_id": pa.array([7, 7, 8, 8, 9], pa.int64()),
        "item_id": pa.array([1, 2, 1, 99, 50], pa.int64()),  # 2: in the NaN row only; 99: a non-click only; 50: eval only
        "ts": pa.array([1, 2, 3, 4, 100], pa.int64()),
        "label": pa.array([1.0, 1.0, 1.0, 0.0, 1.0]),
        "age": pa.array([30.0, float("nan"), 40.0, 41.0, 50.0]),
    })
    pq.write_table(t, tmp_path / "log.parquet")
    files = [{"uri": f.uri, "size": f.size, "version": f.version} for f in list_files(Store(), str(tmp_path / "log.parquet"))]
    feats = [FeatureConfig(name="age", side="user", kind="numeric")]
    cfg = ModelConfig(user_rows=97, item_rows=89, feature_rows=64, embedding_dim=8, hidden=[], latent_dim=8)
    job = JobConfig(task="retrieval", model=cfg, data=DataConfig(features=feats, split=SplitConfig(by="time", time_cutoff=100), valid_fraction=0.0))
    source = {"task": "retrieval", "config": to_dict(job), "hash_spec": HashSpec.build(table_sizes(cfg, feats), 0).to_dict(), "data_files": files,
              "data_columns": {"user_id": "int", "item_id": "int"}}
    manifest = write_export(Store(), FLM(cfg, feats).eval(), source, str(tmp_path / "out"), formats="torchscript")
    items = pq.read_table(tmp_path / "out" / "item_vectors.parquet").column("item_id").to_pylist()
    users = pq.read_table(tmp_path / "out" / "features" / "users.parquet").to_pydict()
    assert items == [1]
    assert dict(zip(users["user_id"], users["age"], strict=True)) == {7: 30.0, 8: 40.0}
    assert manifest["universe"]["changed_since_training"] == []
    # rewritten in place at the same size (one value edited): the export says so
    pq.write_table(t.set_column(4, "age", pa.array([31.0, float("nan"), 40.0, 41.0, 50.0])), tmp_path / "log.parquet")
    os.utime(tmp_path / "log.parquet", (1e9, 1e9))
    assert (tmp_path / "log.parquet").stat().st_size == files[0]["size"]
    manifest = write_export(Store(), FLM(cfg, feats).eval(), source, str(tmp_path / "out2"), formats="torchscript")
    assert manifest["universe"]["changed_since_training"] == [files[0]["uri"]]
