"""`inspect` on real Parquet: a hand-made log whose bad rows are known row by row, a
synthetic log (exact and sketched distinct counts, the PNG), broken files, S3, and the
`flm-dist data convert / inspect` commands."""

from __future__ import annotations

import json
import math
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from flm_dist.cli import main
from flm_dist.data.hashing import expected_collisions
from flm_dist.data.inspect import _IdCounts, inspect, summary
from flm_dist.data.schema import DataError
from flm_dist.data.synth import synth
from flm_dist.storage import Store, join

NAN = float("nan")


def hand_made(root: Path) -> Path:
    """Ten rows in two files; the comment on each bad row is the reason training drops it
    (the first failing check wins: IDs, then label, then rating)."""
    root.mkdir()
    pq.write_table(
        pa.table(
            {
                "user_id": pa.array([1, 2, None, 4, 5, 6], pa.int64()),  # row 2: null_user_id
                "item_id": pa.array([10, 11, 12, None, 10, 11], pa.int64()),  # row 3: null_item_id (its rating 0.5 is out of range too)
                "label": pa.array([0, 1, 1, 0, 1.5, NAN]),  # row 4: label_out_of_range, row 5: nonfinite_label
                "rating": pa.array([1, 5, 3, 0.5, 3, 4], pa.float32()),
                "ts": pa.array(range(100, 106), pa.int64()),
            }
        ),
        root / "part-0.parquet",
        row_group_size=4,
    )
    pq.write_table(
        pa.table(
            {
                "user_id": pa.array([1, 7, 8, None], pa.int64()),  # row 3: null_user_id (label 2 too)
                "item_id": pa.array([13, 13, 14, 15], pa.int64()),
                "label": pa.array([None, 1, -0.1, 2]),  # row 0: null_label, row 2: label_out_of_range
                "rating": pa.array([6, 2, 3, 4], pa.float32()),  # row 0: rating_out_of_range
                "ts": pa.array(range(200, 204), pa.int64()),
            }
        ),
        root / "part-1.parquet",
    )
    (root / "part-2.parquet").write_bytes(b"")  # empty: counted, not read
    (root / "_SUCCESS").write_bytes(b"")
    (root / ".hidden").mkdir()
    (root / ".hidden" / "x.parquet").write_bytes(b"ignored")
    return root


def test_counts_on_a_hand_made_log(tmp_path):
    root = hand_made(tmp_path / "log")
    rep = inspect(Store(), str(root), table_rows={"user": 8, "item": 1024})

    assert (rep["files"], rep["empty_files"], rep["row_groups"], rep["rows"]) == (3, 1, 3, 10)
    assert rep["unreadable_files"] == [] and rep["problems"] == []
    assert rep["schema"] == {"user_id": "int64", "item_id": "int64", "label": "double", "rating": "float", "ts": "int64"}
    assert rep["null_counts"] == {"user_id": 2, "item_id": 1, "label": 1, "rating": 0, "ts": 0}
    assert rep["ts_range"] == [100, 203]
    assert rep["users"]["distinct"] == 7 and rep["users"]["method"] == "exact"
    assert rep["items"]["distinct"] == 6 and rep["items"]["method"] == "exact"
    assert rep["users"]["rows_per_id"]["max"] == 2  # user 1 has two rows

    def reasons(d):
        return {k: v for k, v in d.items() if k not in ("total", "rows_checked", "fraction")}

    bad = rep["bad_rows"]
    assert reasons(bad["pretrain"]) == {"null_user_id": 2, "null_item_id": 1}
    assert reasons(bad["ctr"]) == {
        "null_user_id": 2,
        "null_item_id": 1,
        "null_label": 1,
        "nonfinite_label": 1,
        "label_out_of_range": 2,
    }
    assert reasons(bad["rating"]) == {"null_user_id": 2, "null_item_id": 1, "rating_out_of_range": 1}
    # retrieval: ctr's bad rows, and the label-0 row it drops outside the budget (row 0;
    # row 3's label 0 comes after its null item)
    assert reasons(bad["retrieval"]) == {**reasons(bad["ctr"]), "not_positive": 1}
    assert [bad[t]["total"] for t in ("pretrain", "ctr", "rating", "retrieval")] == [3, 7, 4, 7]
    assert bad["ctr"]["fraction"] == pytest.approx(0.7)

    assert rep["collisions"]["user"] == {"rows": 8, **expected_collisions(7, 8)}
    assert rep["collisions"]["item"] == {"rows": 1024, **expected_collisions(6, 1024)}
    text = summary(rep)
    assert "7 distinct (exact)" in text and "label_out_of_range 2" in text


def test_rating_range_changes_what_counts_as_bad(tmp_path):
    root = hand_made(tmp_path / "log")
    rep = inspect(Store(), str(root), rating_range=(0.5, 6.0))
    assert "rating_out_of_range" not in rep["bad_rows"]["rating"]


def test_synthetic_log_distincts_and_plot(tmp_path):
    store = Store()
    planted = synth(store, str(tmp_path / "synth"), rows=30_000, users=3_000, items=800, seed=3, row_group_rows=2048)
    data = str(tmp_path / "synth" / "train")
    whole = pq.read_table(data)  # the oracle: small enough to load here
    true_users = pc.count_distinct(whole["user_id"]).as_py()
    true_items = pc.count_distinct(whole["item_id"]).as_py()

    plot = tmp_path / "plots" / "train.png"
    rep = inspect(store, data, plot=str(plot))
    assert rep["files"] == 8 and rep["rows"] == planted["rows_train"]
    assert rep["users"]["distinct"] == true_users and rep["items"]["distinct"] == true_items
    assert rep["bad_rows"]["ctr"]["total"] == 0
    png = plot.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000

    k = 512
    sketched = inspect(store, data, sketch_k=k, plot=str(tmp_path / "sketched.png"))
    assert sketched["users"]["method"] == "kmv" and sketched["users"]["sketch_k"] == k
    se = 1 / math.sqrt(k - 2)
    assert abs(sketched["users"]["distinct"] / true_users - 1) < 4 * se
    assert sketched["items"]["method"] == "kmv"
    assert abs(sketched["items"]["distinct"] / true_items - 1) < 4 * se
    assert sketched["users"]["rows"] == rep["users"]["rows"] == planted["rows_train"]
    assert (tmp_path / "sketched.png").stat().st_size > 10_000


def test_kmv_sample_keeps_exact_counts():
    rng = np.random.default_rng(1)
    ids = rng.integers(0, np.iinfo(np.int64).max, size=5_000)  # hashes are uniform over [0, 2**63)
    rows = ids[rng.zipf(1.3, size=60_000) % len(ids)]
    true_keys, true_counts = np.unique(rows, return_counts=True)

    exact, sketch = _IdCounts(10_000), _IdCounts(300)
    for chunk in np.array_split(rows, 37):
        exact.add(chunk)
        sketch.add(chunk)
    assert exact.distinct() == len(true_keys) and not exact.saturated
    estimate = sketch.distinct()  # merges what is buffered
    np.testing.assert_array_equal(exact.keys, true_keys)
    np.testing.assert_array_equal(exact.counts, true_counts)
    # The sketch keeps the 300 smallest hashes, each with its full row count.
    assert sketch.saturated and len(sketch.keys) == 300
    np.testing.assert_array_equal(sketch.keys, true_keys[:300])
    np.testing.assert_array_equal(sketch.counts, true_counts[:300])
    assert abs(estimate / len(true_keys) - 1) < 4 / math.sqrt(298)


def test_broken_and_inconsistent_files_are_reported(tmp_path):
    root = tmp_path / "log"
    root.mkdir()
    pq.write_table(pa.table({"user_id": pa.array([1, 2], pa.int64()), "item_id": pa.array([3, 4], pa.int64())}), root / "a.parquet")
    pq.write_table(pa.table({"user_id": ["1", None], "item_id": ["3", "5"], "label": ["yes", "no"]}), root / "b.parquet")
    (root / "c.parquet").write_bytes(b"PAR1 this is not parquet")
    rep = inspect(Store(), str(root))
    assert [u for u, _ in rep["unreadable_files"]] == [str(root / "c.parquet")]
    assert rep["rows"] == 4
    assert rep["schema"]["user_id"] == "int64 | string"
    assert rep["users"]["distinct"] == 3  # 1, 2 and "1": integer 1 and string "1" are different IDs
    assert rep["null_counts"]["user_id"] == 1
    problems = "\n".join(rep["problems"])
    assert f"column 'user_id' holds integer in {root / 'a.parquet'}, string in {root / 'b.parquet'}" in problems
    # ctr refuses a.parquet (no label) and b.parquet (text label); pretraining reads no
    # label, so a text one does not matter to it.
    assert f"task ctr would refuse this data: {root / 'a.parquet'}: required column 'label'" in problems
    assert "task pretrain would refuse" not in problems
    assert rep["bad_rows"]["pretrain"]["rows_checked"] == 4 and rep["bad_rows"]["ctr"]["rows_checked"] == 0


def test_missing_prefix_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="no such file or prefix"):
        inspect(Store(), str(tmp_path / "nope"))


def test_inspect_on_s3_writes_the_plot_there(s3_store, bucket):
    afs, path = s3_store.arrow_fs(join(bucket, "log"))
    t = pa.table({"user_id": pa.array(np.arange(500) % 50), "item_id": pa.array(np.arange(500) % 7), "label": pa.array(np.ones(500))})
    for k in range(3):
        pq.write_table(t, f"{path}/part-{k}.parquet", filesystem=afs)
    rep = inspect(s3_store, join(bucket, "log"), plot=join(bucket, "report", "plot.png"))
    assert (rep["files"], rep["rows"], rep["users"]["distinct"], rep["items"]["distinct"]) == (3, 1500, 50, 7)
    assert s3_store.read_bytes(join(bucket, "report", "plot.png"))[:4] == b"\x89PNG"


def test_cli_convert_then_inspect(tmp_path, capsys):
    src = tmp_path / "ratings.dat"
    src.write_text("".join(f"{u}::{i}::{1 + (u * i) % 5}::{978300000 + u * 10 + i}\n" for u in range(1, 21) for i in range(1, 11)))
    out = tmp_path / "ml"
    assert main(["data", "convert", "--format", "movielens", str(src), str(out), "--files", "4"]) == 0
    assert "wrote 200 rows in 4 files" in capsys.readouterr().out
    report = tmp_path / "inspect.json"
    rc = main(["data", "inspect", str(out), "--user-rows", "64", "--json", str(report), "--plot", str(tmp_path / "p.png")])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "200 rows" in printed and "20 distinct (exact)" in printed
    rep = json.loads(report.read_text())
    assert rep["rows"] == 200 and rep["collisions"]["user"]["rows"] == 64
    assert rep["items"]["distinct"] == 10 and (tmp_path / "p.png").stat().st_size > 0

    # Usage and data errors exit with status 2 and say what is wrong.
    assert main(["data", "convert", "--format", "csv", str(src), str(tmp_path / "x"), "--map", "user_id"]) == 2
    assert "expected NAME=COLUMN" in capsys.readouterr().err
    # flags that fell back silently: a misspelled schema name became a feature, the last of
    # two mappings of one name won, an empty delimiter was a comma, 0 rows the job's size
    for flags, says in (
        (["--map", "raiting=stars"], "'raiting' is not a schema column"),
        (["--map", "user_id=a", "--map", "user_id=b"], "--map user_id= is given twice"),
        (["--delimiter", ""], "delimiter '': must be one character"),
    ):
        assert main(["data", "convert", "--format", "csv", str(src), str(tmp_path / "x"), *flags]) == 2
        assert says in capsys.readouterr().err, flags
    with pytest.raises(SystemExit):
        main(["data", "inspect", str(out), "--user-rows", "0"])
    assert "must be >= 1, got 0" in capsys.readouterr().err
    assert main(["data", "convert", "--format", "sequence", str(src), str(tmp_path / "y")]) == 2
    assert f"{src} line 1, field 1 (user_id): '1::1::2::978300011' is not an integer ID" in capsys.readouterr().err


def test_collision_warning_names_the_table_and_the_rows_that_fix_it(tmp_path):
    """20k users in 65,536 rows (the demo's sizing): ~26% of users share a row; the
    run says so and suggests the rows that bring it under 5%. 300 items in 2^20 rows:
    no warning."""
    from flm_dist.data.hashing import expected_collisions
    from flm_dist.data.inspect import collision_warnings, id_counts, rows_for_share
    from flm_dist.data.plan import plan_read
    from flm_dist.data.schema import ReadSpec

    d = tmp_path / "log"
    d.mkdir()
    rng = np.random.default_rng(0)
    users = np.arange(20_000, dtype=np.int64)
    pq.write_table(pa.table({"user_id": users, "item_id": rng.integers(0, 300, len(users))}), d / "a.parquet", row_group_size=3000)
    plan = plan_read(Store(), str(d), ReadSpec.for_task("pretrain", [], [1, 5]))
    tables = {"user": ("user_id", 65_536, "model.user_rows"), "item": ("item_id", 1 << 20, "model.item_rows")}
    (w,) = collision_warnings(id_counts(Store(), plan, ["item_id", "user_id"]), tables)
    assert w.startswith("table 'user': model.user_rows=65,536 rows for 20,000 distinct 'user_id' values: about 26%")
    suggested = rows_for_share(20_000)
    assert f"model.user_rows >= {suggested:,}" in w
    assert expected_collisions(20_000, suggested)["ids_colliding"] <= 0.05 < expected_collisions(20_000, suggested // 2)["ids_colliding"]
    # a sample of the data (max_rows) gives a lower bound, said as such
    (w,) = collision_warnings(id_counts(Store(), plan, ["item_id", "user_id"], max_rows=9000), tables)
    assert "for at least 9,000 distinct" in w


def test_a_run_counts_the_ids_of_its_data_once_and_warns_after_its_first_step(tmp_path, capsys):
    """launch's collision check: the ID counts are cached by the data's fingerprint (a
    second run over the same files reads no rows: a planted count shows in its warning);
    a file added changes the fingerprint and the data is counted again. Run in its
    thread, it waits for the first step, and a check that cannot read the data says so
    and does not raise."""
    from flm_dist import launch
    from flm_dist.config import load_job
    from flm_dist.data.inspect import id_counts
    from flm_dist.data.plan import plan_read
    from flm_dist.data.schema import ReadSpec

    d = tmp_path / "log"
    d.mkdir()
    rng = np.random.default_rng(0)
    pq.write_table(pa.table({"user_id": np.arange(20_000), "item_id": rng.integers(0, 300, 20_000)}), d / "a.parquet")
    job = load_job("jobs/pretrain.yaml", [f"data.pretrain={d}", f"run.storage={tmp_path / 'runs'}", "model.user_rows=65536"])
    spec = ReadSpec.for_task("pretrain", [], [1, 5])
    plan = plan_read(Store(), str(d), spec)
    (w,) = launch._collisions(Store(), plan, job)
    assert "for 20,000 distinct 'user_id' values" in w
    (cache,) = (tmp_path / "runs" / "_cache").iterdir()
    counts = json.loads(cache.read_text())
    assert counts == {"complete": True, "columns": {"item_id": {"distinct": 300, "saturated": False}, "user_id": {"distinct": 20_000, "saturated": False}}}
    counts["columns"]["user_id"]["distinct"] = 30_000
    cache.write_text(json.dumps(counts))
    (w,) = launch._collisions(Store(), plan_read(Store(), str(d), spec), job)
    assert "for 30,000 distinct 'user_id' values" in w
    pq.write_table(pa.table({"user_id": np.arange(20_000, 25_000), "item_id": rng.integers(0, 300, 5000)}), d / "b.parquet")
    (w,) = launch._collisions(Store(), plan_read(Store(), str(d), spec), job)
    assert "for 25,000 distinct 'user_id' values" in w

    capsys.readouterr()
    (d / "a.parquet").unlink()  # read after planning, by a run with no cache
    other = load_job("jobs/pretrain.yaml", [f"data.pretrain={d}", f"run.storage={tmp_path / 'other'}", "model.user_rows=65536"])
    first_step = threading.Event()
    check = launch._Later(lambda stop: launch._warn_collisions(Store(), plan, other, stop), first_step)
    check.start()
    time.sleep(0.5)  # unblocked, the check would have failed and said so by now
    assert capsys.readouterr().out == ""
    first_step.set()
    check.join()
    out = capsys.readouterr().out
    assert out.startswith(f"warning: the hash-collision check of {d} failed (") and "the run goes on" in out

    # a run that fails stops the scan: its queued units are dropped, not read
    stop = threading.Event()
    stop.set()
    with pytest.raises(RuntimeError, match="stopped"):
        id_counts(Store(), plan_read(Store(), str(d), spec), ["user_id"], stop=stop)


def test_per_user_sequences_are_counted_by_event_as_training_reads_them(tmp_path):
    """`data sequences` output (item_id, ts, rating: one list per user): inspect refused
    it for every task, counted users as rows and found no IDs."""
    root = tmp_path / "seq"
    root.mkdir()
    pq.write_table(
        pa.table(
            {
                "user_id": pa.array([1, 2], pa.int64()),
                "item_id": pa.array([[10, 11, None], [11, 12]], pa.list_(pa.int64())),  # user 1's third event: null_item_id
                "rating": pa.array([[4.0, 5.0, 3.0], [9.0, 2.0]], pa.list_(pa.float32())),  # user 2's first: rating_out_of_range
                "ts": pa.array([[100, 101, 102], [50, 300]], pa.list_(pa.int64())),
            }
        ),
        root / "part-0.parquet",
    )
    rep = inspect(Store(), str(root), table_rows={"user": 8, "item": 1024})
    assert not any("would refuse" in p for p in rep["problems"]), rep["problems"]
    assert rep["rows"] == 5 and rep["ts_range"] == [50, 300]
    assert rep["users"]["distinct"] == 2 and rep["items"]["distinct"] == 3
    assert rep["bad_rows"]["pretrain"]["total"] == 1 and rep["bad_rows"]["rating"]["rating_out_of_range"] == 1


def test_sub_second_timestamps_are_read_as_training_reads_them(tmp_path):
    """A `timestamp[ms]` ts with milliseconds: training drops the sub-second part;
    inspect's checked cast raised ArrowInvalid (a traceback)."""
    root = tmp_path / "ms"
    root.mkdir()
    pq.write_table(pa.table({"user_id": [1, 2], "item_id": [3, 4], "ts": pa.array([1500, 2999], pa.timestamp("ms"))}), root / "a.parquet")
    assert inspect(Store(), str(root))["ts_range"] == [1, 2]
