"""The walking skeleton end to end: real Ray workers, real S3 HTTP (moto), real Parquet."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401 - pa.compute
import pyarrow.parquet as pq
import pytest
import torch

from flm_dist import checkpoint as ckpt
from flm_dist import launch
from flm_dist.batch import Batch
from flm_dist.data.encode import EncodeSpec, encode_table
from flm_dist.data.hashing import HashSpec, prehash_str
from flm_dist.data.schema import ReadSpec
from flm_dist.data.synth import synth
from flm_dist.export import export, load_model
from flm_dist.storage import join
from tests.conftest import FEATURES, pretraining_positions, tiny_job

pytestmark = pytest.mark.slow

SCORE_IN_SUBPROCESS = r"""
import sys, torch
inputs = torch.load(sys.argv[2])
scorer = torch.jit.load(sys.argv[1])
with torch.no_grad():
    out = scorer(inputs["user_id"], inputs["item_id"], inputs["features"])
assert not [m for m in sys.modules if m.startswith("flm_dist")], "the export must load without flm_dist"
torch.save(out, sys.argv[3])
"""


@pytest.fixture(scope="module")
def data(s3_store):
    s3_store.ensure_bucket("s3://e2e")
    rep = synth(s3_store, "s3://e2e/data", rows=24_000, users=800, items=300, seed=3, files=8, row_group_rows=2000)
    return rep


def _job(s3, name, task, **sets):
    # every table sharded row-wise across the 2 workers (the threshold is 0 bytes)
    job = tiny_job("s3://e2e/runs", name, task, **{"scaling.shard_threshold_bytes": 0, **sets})
    return replace(job, storage=s3.storage_config())


@pytest.fixture(scope="module")
def trained(ray_local, s3, s3_store, data):
    """Pretraining with 2 workers streaming Parquet from the S3 endpoint, then a ctr
    fine-tune from it (evaluated at the end)."""
    pre = _job(s3, "pre", "pretrain", **{"data.pretrain": "s3://e2e/data/pretrain", "train.epochs": 1})
    r_pre = launch.train(pre, s3_store, fresh=True, progress=False)
    ft = _job(
        s3,
        "ft",
        "ctr",
        init_from="s3://e2e/runs/pre",  # a run folder, as the job files give it
        **{"data.train": "s3://e2e/data/train", "data.eval": "s3://e2e/data/eval", "train.epochs": 3, "train.lr": 0.01},
    )
    return r_pre, launch.train(ft, s3_store, fresh=True, progress=False), ft


def test_pretrain_finetune_evaluate_export(trained, s3_store, data, tmp_path):
    # 1. pretraining
    r_pre, r_ft, ft = trained
    ref = ckpt.resolve(s3_store, r_pre["checkpoint"])
    assert r_pre["checkpoint"].startswith("s3://e2e/runs/pre/step-")
    assert s3_store.exists(join(ref.step_dir, "COMMITTED"))
    m_pre = ckpt.load_manifest(s3_store, ref)
    assert m_pre["world_size"] == 2 and m_pre["task"] == "pretrain"
    assert {p["kind"] for p in m_pre["sharding_plan"].values()} == {"row_wise"}
    # every row trained on exactly once, less the fine-tunes' validation carve
    assert r_pre["metrics"]["rows"] == len(pretraining_positions("s3://e2e/data/pretrain", s3_store))
    # validated on that carve by full ranking at the end of its epoch; its result is its last state
    curve = r_pre["metrics"]["epochs_curve"]
    assert [c["epoch"] for c in curve] == [0] and curve[0]["valid_recall@10"] > 0
    assert m_pre["best"]["step"] == curve[0]["step"] == ref.step

    # 2. the ctr fine-tune from it, evaluated at the end
    ev_train = r_ft["metrics"]["eval"]["overall"]
    assert ev_train["rows"] == data["rows_eval"]
    assert ev_train["auc"] > 0.6, ev_train  # it learned the planted signal
    m_ft = ckpt.load_manifest(s3_store, ckpt.resolve(s3_store, r_ft["checkpoint"]))
    # the run folder was resolved once, on the driver, and every rank loaded what it names:
    # ranks resolving it apart could load two checkpoints of a pretraining still committing
    assert m_ft["parent"]["checkpoint"] == m_ft["init_from"] == ref.uri
    assert m_ft["data"]["files"] == 8 and m_ft["data"]["sha256"]

    # 3. evaluate the same checkpoint on 1 worker: same predictions, same AUC
    ev = launch.evaluate(r_ft["checkpoint"], s3_store, "s3://e2e/data/eval", workers=1)
    assert ev["checkpoint"] == r_ft["checkpoint"]
    assert ev["overall"]["rows"] == data["rows_eval"]
    assert ev["overall"]["auc"] == pytest.approx(ev_train["auc"], abs=1e-6)
    assert set(ev["slices"]) == {"cold_user", "cold_item", "long_tail", "warm"}
    assert ev["reference"] == "s3://e2e/data/train"
    # every row is warm (user and item seen), a cold user's or a cold item's
    assert ev["slices"]["warm"]["rows"] > 0
    assert sum(ev["slices"][k]["rows"] for k in ("warm", "cold_user", "cold_item")) >= ev["overall"]["rows"]

    # the pretrained backbone, evaluated by full ranking against its training items, on
    # an eval file of one row group: one of the 2 workers gets no rows at all
    fs, path = s3_store.arrow_fs("s3://e2e/data/eval/part-00000.parquet")
    one = pq.ParquetFile(path, filesystem=fs).read_row_group(0)
    pq.write_table(one, "e2e/eval-one/part-0.parquet", filesystem=fs)
    ev_pre = launch.evaluate(r_pre["checkpoint"], s3_store, "s3://e2e/eval-one", workers=2)
    # retrieval ranks positives only, each user's distinct targets once
    positives = {(u, i) for u, i, label in zip(*(one.column(c).to_pylist() for c in ("user_id", "item_id", "label")), strict=True) if label > 0}
    assert ev_pre["task"] == "retrieval" and ev_pre["overall"]["rows"] == len(positives)
    assert ev_pre["overall"]["recall@10"] > 10 / ev_pre["overall"]["catalog_items"]  # better than chance
    assert ev_pre["overall"]["recall@10"] == pytest.approx(_recall_from_export(s3_store, r_pre["checkpoint"], one, tmp_path), abs=1.0 / ev_pre["overall"]["users"])

    # 4. export, then score in a process that has only torch
    export(s3_store, r_ft["checkpoint"], "s3://e2e/export", formats=("torchscript",))  # ONNX: tests/test_export.py
    local = tmp_path / "export"
    s3_store.download_dir("s3://e2e/export", str(local))
    manifest = json.loads((local / "manifest.json").read_text())
    # lineage: export -> fine-tuned checkpoint -> pretraining checkpoint and its data
    chain = ckpt.lineage(s3_store, "s3://e2e/export")
    assert [n.get("task") for n in chain] == ["ctr", "ctr", "pretrain"]
    assert chain[1]["checkpoint"] == r_ft["checkpoint"] and chain[2]["checkpoint"] == ref.uri
    assert chain[2]["data"]["uri"] == "s3://e2e/data/pretrain" and chain[2]["data"]["rows"] == data["rows_pretrain"]
    assert manifest["task"] == "ctr" and manifest["lineage"]["checkpoint"] == r_ft["checkpoint"]
    assert set(manifest["files"]) >= {"scorer.pt", "tables/user.safetensors", "tables/item.safetensors"}

    fs, path = s3_store.arrow_fs("s3://e2e/data/eval/part-00000.parquet")
    table = pq.read_table(path, filesystem=fs).slice(0, 500)
    model, cm, _ = load_model(s3_store, r_ft["checkpoint"])
    spec = EncodeSpec(read=ReadSpec.for_task("ctr", FEATURES, [1, 5]), hash=HashSpec.from_dict(cm["hash_spec"]))
    cols = encode_table(table, spec)
    batch = Batch(
        user=torch.from_numpy(cols["user"]),
        item=torch.from_numpy(cols["item"]),
        features={f.name: torch.from_numpy(cols[f"f_{f.name}"]) for f in FEATURES},
    )
    with torch.no_grad():
        expected = torch.sigmoid(model(batch).score)
    inputs = {
        "user_id": torch.from_numpy(table.column("user_id").to_numpy()),
        "item_id": torch.from_numpy(table.column("item_id").to_numpy()),
        "features": {
            f.name: torch.tensor([prehash_str(v) for v in table.column(f.name).to_pylist()], dtype=torch.int64) for f in FEATURES
        },
    }
    torch.save(inputs, tmp_path / "in.pt")
    subprocess.run(
        [sys.executable, "-c", SCORE_IN_SUBPROCESS, str(local / "scorer.pt"), str(tmp_path / "in.pt"), str(tmp_path / "out.pt")],
        check=True,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": ""},
    )
    got = torch.load(tmp_path / "out.pt")
    assert got.shape == expected.shape
    assert float((got - expected).abs().max()) <= 1e-5


def _recall_from_export(store, checkpoint, eval_rows, tmp_path, k=10) -> float:
    """Recall@k computed independently of the evaluation path: the export's item
    vectors and TorchScript user tower, each user's training items (read back from the
    training files) excluded except the target, a target below the items tied with it,
    over each user's distinct targets, averaged over users."""
    export(store, checkpoint, "s3://e2e/export-pre", formats=("torchscript",))
    local = tmp_path / "export-pre"
    store.download_dir("s3://e2e/export-pre", str(local))
    scorer = torch.jit.load(str(local / "scorer.pt"))
    items = pq.read_table(local / "item_vectors.parquet")
    item_ids = items.column("item_id").to_numpy()
    item_mat = np.stack(items.column("vector").to_pylist()).astype(np.float32)
    manifest = ckpt.load_manifest(store, ckpt.resolve(store, checkpoint))
    seen: dict[int, set] = {}
    for f in manifest["data_files"]:
        fs, path = store.arrow_fs(f["uri"])
        t = pq.read_table(path, filesystem=fs, columns=["user_id", "item_id"])
        for u, i in zip(t.column("user_id").to_pylist(), t.column("item_id").to_pylist(), strict=True):
            seen.setdefault(u, set()).add(i)
    pos = eval_rows.filter(pa.compute.greater(eval_rows.column("label"), 0))
    users = pos.column("user_id").to_pylist()
    with torch.no_grad():
        uvec = scorer.user_vectors(
            torch.tensor(users, dtype=torch.int64),
            {"u_segment": torch.tensor([prehash_str(v) for v in pos.column("u_segment").to_pylist()], dtype=torch.int64)},
        ).numpy()
    index = {int(i): j for j, i in enumerate(item_ids)}
    hits: dict[int, dict[int, float]] = {}
    for r, (u, target) in enumerate(zip(users, pos.column("item_id").to_pylist(), strict=True)):
        scores = item_mat @ uvec[r]
        drop = [index[i] for i in seen.get(u, ()) if i != target and i in index]
        scores[drop] = -np.inf
        hit = 0.0
        if target in index:
            t = scores[index[target]]
            above, tied = int((scores > t).sum()), int((scores == t).sum()) - 1
            hit = float(above + tied < k)  # below every item tied with it
        hits.setdefault(u, {})[target] = hit  # each distinct target once
    return float(np.mean([np.mean(list(h.values())) for h in hits.values()]))


def test_case18_never_seen_ids_at_evaluation_are_hashed(trained, s3_store, tmp_path):
    """RELIABILITY case 18: users (and a feature value) never seen in training, scored
    by the distributed evaluation through their hashed rows."""
    _, r_ft, ft = trained
    n = 300
    cold = pa.table({
        "user_id": pa.array(np.arange(10**12, 10**12 + n), pa.int64()),  # never seen
        "item_id": pa.array(np.arange(n) % 150 + 1, pa.int64()),
        "label": pa.array((np.arange(n) % 2).astype(np.float32)),
        "u_segment": pa.array(["never-seen-segment"] * n),
        "i_category": pa.array([f"c{x % 7}" for x in range(n)]),
    })
    fs, path = s3_store.arrow_fs("s3://e2e/cold/part-0.parquet")
    pq.write_table(cold, path, filesystem=fs)
    ev = launch.evaluate(r_ft["checkpoint"], s3_store, "s3://e2e/cold")
    assert ev["overall"]["rows"] == n and ev["slices"]["cold_user"]["rows"] == n
    # the distributed evaluation equals this process's model on the same rows, hashed here
    from flm_dist.metrics import auc

    model, manifest, _ = load_model(s3_store, r_ft["checkpoint"])
    spec = EncodeSpec(read=ReadSpec.for_task("ctr", ft.data.features, [1, 5]), hash=HashSpec.from_dict(manifest["hash_spec"]))
    cols = encode_table(cold, spec)
    feats = {f.name: torch.from_numpy(cols[f"f_{f.name}"]) for f in ft.data.features}
    with torch.no_grad():
        scores = model(Batch(user=torch.from_numpy(cols["user"]), item=torch.from_numpy(cols["item"]), features=feats)).score.numpy()
    assert ev["overall"]["auc"] == pytest.approx(auc(scores, cols["label"]), abs=1e-6)


def test_config_error_names_key_and_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("task: pretrain\ntrain:\n  epocs: 3\n")
    out = subprocess.run([sys.executable, "-m", "flm_dist.cli", "pretrain", "--config", str(bad)], capture_output=True, text=True)
    assert out.returncode == 2
    assert str(bad) in out.stderr and "train.epocs" in out.stderr and "train.epochs" in out.stderr
