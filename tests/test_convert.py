"""Converters on real files: the shared LastFM sequence file and small hand-written
MovieLens, RecBole and CSV samples. Each checks the exact rows, types and values that
land in Parquet, that several parts are written, and that bad input names the file,
line and field."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

import flm_dist.data.convert as cv
from flm_dist.config import FeatureConfig
from flm_dist.data.convert import convert
from flm_dist.data.plan import list_files, plan_read
from flm_dist.data.schema import DataError, ReadSpec
from flm_dist.storage import Store, join

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
LASTFM = SHARED_DATA / "LastFM.txt"


def parts(out) -> list[str]:
    return sorted(str(p) for p in Path(out).glob("part-*.parquet"))


def read(out) -> pa.Table:
    return pa.concat_tables(pq.read_table(p) for p in parts(out))


def types(t: pa.Table) -> dict[str, str]:
    return {f.name: str(f.type) for f in t.schema}


# ------------------------------------------------------------------ sequence


@pytest.mark.skipif(not LASTFM.exists(), reason=f"{LASTFM} is absent (shared research data, not in the repo)")
def test_sequence_lastfm(tmp_path):
    lines = [line.split() for line in LASTFM.read_text().splitlines() if line.strip()]
    n_items = sum(len(w) - 1 for w in lines)
    out = tmp_path / "lastfm"
    rep = convert(Store(), "sequence", str(LASTFM), str(out), files=8)

    t = read(out)
    assert rep["rows"] == t.num_rows == n_items == 52_551
    assert rep["files"] == len(parts(out)) == 8
    assert types(t) == {"user_id": "int64", "item_id": "int64", "ts": "int64"} == rep["schema"]
    assert pc.count_distinct(t["user_id"]).as_py() == 1_090
    # Each user's items, in file order, are ts 0, 1, 2, ...
    for words in (lines[0], lines[1], lines[-1]):
        user = int(words[0])
        mine = t.filter(pc.equal(t["user_id"], user)).sort_by("ts")
        assert mine["item_id"].to_pylist() == [int(w) for w in words[1:]]
        assert mine["ts"].to_pylist() == list(range(len(words) - 1))
    # The output is what training reads.
    assert plan_read(Store(), str(out), ReadSpec.for_task("pretrain", [], [1, 5], need_ts=True)).total_rows == n_items


def test_sequence_is_chunk_invariant_and_counts_skipped_lines(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    text = ""
    expected = []
    for user in range(1, 201):
        items = rng.integers(1, 500, size=rng.integers(1, 30)).tolist()
        text += " ".join(map(str, [user, *items])) + "\n"
        expected += [(user, item, pos) for pos, item in enumerate(items)]
    text += "\n   \n999\n"  # two empty lines and a user with no items
    src = tmp_path / "seq.txt"
    src.write_text(text)

    monkeypatch.setattr(cv, "CHUNK_BYTES", 97)  # many chunks, boundaries mid-line
    rep = convert(Store(), "sequence", str(src), str(tmp_path / "out"), files=4, row_group_rows=100)
    t = read(tmp_path / "out")
    got = sorted(zip(t["user_id"].to_pylist(), t["item_id"].to_pylist(), t["ts"].to_pylist(), strict=True))
    assert got == sorted(expected)
    assert rep["rows"] == len(expected)
    assert rep["skipped"] == {"empty_line": 2, "user_without_items": 1}
    # Every part got rows, and every row group but the last of the stream is full.
    sizes = [pq.ParquetFile(p).metadata.row_group(i).num_rows for p in parts(tmp_path / "out") for i in range(pq.ParquetFile(p).metadata.num_row_groups)]
    assert len(parts(tmp_path / "out")) == 4
    assert sorted(sizes)[1:] == [100] * (len(sizes) - 1)


# ------------------------------------------------------------------ movielens

U_DATA = "196\t242\t3\t881250949\n186\t302\t3\t891717742\n\n22\t377\t1\t878887116\n244\t51\t2\t880606923\n"
RATINGS_DAT = "1::1193::5::978300760\r\n1::661::3::978302109\r\n2::1357::4.5::978298413\r\n"


def test_movielens_u_data_from_file_or_folder(tmp_path):
    folder = tmp_path / "ml-100k"
    folder.mkdir()
    (folder / "u.data").write_text(U_DATA)
    (folder / "u.item").write_text("1|Toy Story (1995)|...\n")  # other dataset files are ignored
    for n, src in enumerate([folder / "u.data", folder]):
        out = tmp_path / f"out{n}"
        rep = convert(Store(), "movielens", str(src), str(out), files=3)
        t = read(out)
        assert rep["layout"] == "u.data"
        assert rep["rows"] == t.num_rows == 4
        assert rep["skipped"] == {"empty_line": 1}
        assert len(parts(out)) == 3
        assert types(t) == {"user_id": "int64", "item_id": "int64", "rating": "float", "ts": "int64"}
        assert t.to_pylist()[0] == {"user_id": 196, "item_id": 242, "rating": 3.0, "ts": 881250949}


def test_movielens_ratings_dat(tmp_path):
    src = tmp_path / "ratings.dat"
    src.write_text(RATINGS_DAT)
    rep = convert(Store(), "movielens", str(src), str(tmp_path / "out"), files=8)
    t = read(tmp_path / "out")
    assert rep["layout"] == "ratings.dat"
    assert rep["rows"] == 3 and rep["files"] == 3  # min(files, rows)
    assert types(t)["rating"] == "float"
    assert t["rating"].to_pylist() == [5.0, 3.0, 4.5]
    assert t["ts"].to_pylist() == [978300760, 978302109, 978298413]


# ------------------------------------------------------------------ recbole

INTER = (
    "user_id:token\titem_id:token\trating:float\ttimestamp:float\tlabel:float\tcontext:token\n"
    "u1\ti1\t4\t100.7\t1\tweb\n"
    "u2\ti2\t3\t200\t0\t\n"
    "\n"
    "u1\ti3\t\t300\t1\tapp\n"
    "u9\ti1\t5\t400\t0\tweb\n"
)
USER = "user_id:token\tage:float\tgender:token\nu1\t23\tM\nu2\t\tF\n"
ITEM = "item_id:token\tgenres:token_seq\tprice:float\temb:float_seq\ni1\tDrama  Comedy\t9.5\t0.1 0.2\ni2\t\t3\t\ni3\tAction\t\t1\n"


def write_recbole(folder: Path) -> Path:
    folder.mkdir()
    (folder / "ds.inter").write_text(INTER)
    (folder / "ds.user").write_text(USER)
    (folder / "ds.item").write_text(ITEM)
    return folder


def test_recbole_joins_user_and_item_features(tmp_path):
    folder = write_recbole(tmp_path / "ds")
    rep = convert(Store(), "recbole", str(folder), str(tmp_path / "out"), files=2)
    t = read(tmp_path / "out")
    assert rep["rows"] == t.num_rows == 4
    assert len(parts(tmp_path / "out")) == 2
    assert rep["skipped"] == {"empty_line": 1}
    assert types(t) == {
        "user_id": "string",  # RecBole tokens stay strings
        "item_id": "string",
        "ts": "int64",
        "label": "float",
        "rating": "float",
        "context": "string",
        "age": "double",
        "gender": "string",
        "genres": "list<element: string>",
        "price": "double",
        "emb": "list<element: double>",
    }
    rows = t.to_pylist()
    assert rows[0] == {
        "user_id": "u1", "item_id": "i1", "ts": 100, "label": 1.0, "rating": 4.0, "context": "web",
        "age": 23.0, "gender": "M", "genres": ["Drama", "Comedy"], "price": 9.5, "emb": [0.1, 0.2],
    }
    assert rows[1]["context"] is None and rows[1]["age"] is None and rows[1]["genres"] is None
    assert rows[2]["rating"] is None and rows[2]["genres"] == ["Action"] and rows[2]["emb"] == [1.0]
    assert rows[3]["age"] is None and rows[3]["gender"] is None  # u9 has no .user row
    assert rep["joined"]["user"]["interactions_without_match"] == 1
    assert rep["joined"]["item"]["interactions_without_match"] == 0
    # Training accepts it, features included.
    feats = [
        FeatureConfig(name="gender", side="user"),
        FeatureConfig(name="genres", side="item", kind="multi"),
        FeatureConfig(name="age", side="user", kind="numeric"),
    ]
    plan = plan_read(Store(), str(tmp_path / "out"), ReadSpec.for_task("ctr", feats, [1, 5]))
    assert plan.total_rows == 4 and plan.id_kinds["user_id"] == "string"


# ------------------------------------------------------------------ csv

CSV = (
    "uid,movie,time,clicked,score,genre,price\n"
    "007,10,2020-01-01T00:00:00,1,4.5,drama,1.5\n"
    "u2,11,2020-01-02T00:00:00,0,3,,2\n"
    "\n"
    "7,12,2020-01-03T00:00:00,1,,comedy,\n"
    "u2,10,2020-01-03T00:00:01,0,2,drama,3.25\n"
)
CSV_MAP = {"user_id": "uid", "item_id": "movie", "ts": "time", "label": "clicked", "rating": "score"}


def test_csv_mapping_keeps_features(tmp_path):
    src = tmp_path / "log.csv"
    src.write_text(CSV)
    rep = convert(Store(), "csv", str(src), str(tmp_path / "out"), mapping=CSV_MAP, files=3)
    t = read(tmp_path / "out")
    assert rep["rows"] == t.num_rows == 4
    assert len(parts(tmp_path / "out")) == 3
    assert types(t) == {
        "user_id": "string",  # "007" is not the integer 7: IDs with leading zeros stay strings
        "item_id": "int64",
        "ts": "int64",
        "label": "float",
        "rating": "float",
        "genre": "string",
        "price": "double",
    }
    assert t["user_id"].to_pylist() == ["007", "u2", "7", "u2"]
    assert t["ts"].to_pylist() == [1577836800, 1577923200, 1578009600, 1578009601]
    assert t["rating"].to_pylist() == [4.5, 3.0, None, 2.0]
    assert t["genre"].to_pylist() == ["drama", None, "comedy", "drama"]


def test_csv_tab_delimited_integer_ids_and_folder_of_files(tmp_path):
    folder = tmp_path / "logs"
    folder.mkdir()
    (folder / "a.tsv").write_text("user_id\titem_id\tts\n1\t5\t10.5\n2\t6\t11\n")
    (folder / "b.tsv").write_text("user_id\titem_id\tts\n3\t7\t12\n")
    (folder / "_SUCCESS").write_text("")
    rep = convert(Store(), "csv", str(folder), str(tmp_path / "out"), delimiter="\t")
    t = read(tmp_path / "out")
    assert len(rep["inputs"]) == 2
    assert types(t) == {"user_id": "int64", "item_id": "int64", "ts": "int64"}
    assert sorted(t["ts"].to_pylist()) == [10, 11, 12]  # seconds are floored


def test_convert_writes_to_s3(s3_store, bucket, tmp_path):
    src = tmp_path / "ratings.dat"
    src.write_text(RATINGS_DAT * 5)
    out = join(bucket, "ml")
    rep = convert(s3_store, "movielens", str(src), out, files=4)
    assert rep["rows"] == 15
    files = list_files(s3_store, out)
    assert len(files) == 4 and all(f.uri.startswith("s3://") for f in files)
    assert s3_store.read_json(join(out, "_convert.json"))["rows"] == 15
    plan = plan_read(s3_store, out, ReadSpec.for_task("rating", [], [0.5, 5]))
    assert plan.total_rows == 15 and plan.id_kinds == {"user_id": "int", "item_id": "int"}


# ------------------------------------------------------------------ bad input


def _fails(tmp_path, fmt: str, name: str, text: str, *, match: list[str], where: str = "", **kw) -> None:
    """Convert `text` written to `name`; the error must name the file at fault (`where`,
    default the input) and every string in `match`."""
    src = tmp_path / name
    src.write_text(text)
    out = tmp_path / "out"
    with pytest.raises(DataError) as e:
        convert(Store(), fmt, str(src), str(out), **kw)
    for part in [str(tmp_path / (where or name)), *match]:
        assert part in str(e.value), f"{part!r} not in: {e.value}"
    assert not parts(out), "a failed conversion must leave no parts behind"


def test_movielens_non_integer_id(tmp_path):
    _fails(tmp_path, "movielens", "u.data", "1\t2\t3\t4\n\n1\t2x\t3\t4\n", match=["line 3", "item_id", "'2x'"])


def test_movielens_wrong_field_count(tmp_path):
    _fails(tmp_path, "movielens", "ratings.dat", "1::2::3::4\n1::2::3\n", match=["line 2", "expected 4 fields"])


def test_movielens_csv_layout_points_to_csv_format(tmp_path):
    _fails(tmp_path, "movielens", "ratings.csv", "userId,movieId,rating,timestamp\n1,2,3,4\n", match=["line 1", "--format csv"])


def test_sequence_non_integer_id(tmp_path):
    _fails(tmp_path, "sequence", "seq.txt", "1 2 3\n2 4 5.5 6\n", match=["line 2", "item 2", "'5.5'"])


def test_sequence_user_on_two_lines(tmp_path):
    _fails(tmp_path, "sequence", "seq.txt", "1 2 3\n2 4\n1 5\n", match=["line 3", "line 1", "user 1"])
    _fails(tmp_path, "sequence", "seq2.txt", "7 1 2\n2 4\n007 3 4\n", match=["line 3", "line 1", "user 007"])  # the same integer


def test_recbole_header_without_user_id(tmp_path):
    _fails(tmp_path, "recbole", "x.inter", "uid:token\titem_id:token\n1\t2\n", match=["line 1", "user_id:token"])


def test_recbole_header_with_unknown_type(tmp_path):
    _fails(tmp_path, "recbole", "x.inter", "user_id:token\titem_id:token\tage:int\n1\t2\t3\n", match=["line 1", "field 3", "age:int"])


def test_recbole_float_field_not_a_number(tmp_path):
    text = "user_id:token\titem_id:token\trating:float\n" + "a\tb\t4\n" * 10 + "a\tb\tfour\n"
    _fails(tmp_path, "recbole", "x.inter", text, match=["line 12", "rating:float", "'four'"])


def test_recbole_side_file_with_duplicate_key(tmp_path):
    (tmp_path / "x.user").write_text("user_id:token\tage:float\na\t1\na\t2\n")
    _fails(tmp_path, "recbole", "x.inter", "user_id:token\titem_id:token\na\tb\n", where="x.user", match=["'a'", "more than one line"])


def test_csv_mapping_names_missing_column(tmp_path):
    _fails(tmp_path, "csv", "log.csv", "uid,iid\n1,2\n", mapping={"user_id": "uid", "item_id": "movie"}, match=["line 1", "item_id=movie", "'movie'"])


def test_csv_bad_value_after_the_first_block(tmp_path, monkeypatch):
    monkeypatch.setattr(cv, "CSV_BLOCK_BYTES", 4096)  # types come from the first block; the bad row is far later
    text = "u,i,clicked\n" + "".join(f"{k},{k % 13},1\n" for k in range(5000)) + "17,x9,0\n"
    _fails(tmp_path, "csv", "log.csv", text, mapping={"user_id": "u", "item_id": "i"}, match=["line 5002", "column 'i' (mapped to item_id)", "'x9'"])


def test_output_must_be_empty(tmp_path):
    src = tmp_path / "u.data"
    src.write_text(U_DATA)
    convert(Store(), "movielens", str(src), str(tmp_path / "out"))
    with pytest.raises(DataError, match="already holds 4 data files"):
        convert(Store(), "movielens", str(src), str(tmp_path / "out"))


def test_mapping_only_for_csv(tmp_path):
    with pytest.raises(DataError, match="csv only"):
        convert(Store(), "sequence", "x", str(tmp_path / "out"), mapping={"user_id": "u"})


def test_recbole_timestamp_must_be_finite(tmp_path):
    text = "user_id:token\titem_id:token\ttimestamp:float\na\tb\t1.5\n\na\tc\tinf\n"
    _fails(tmp_path, "recbole", "x.inter", text, match=["line 4", "timestamp:float", "inf"])


def test_compressed_input_is_read(tmp_path):
    import gzip

    src = tmp_path / "seq.txt.gz"
    src.write_bytes(gzip.compress(b"1 5 6 7\n2 5\n"))
    rep = convert(Store(), "sequence", str(src), str(tmp_path / "out"))
    assert rep["rows"] == 4 and read(tmp_path / "out")["item_id"].to_pylist() == [5, 6, 7, 5]


def test_csv_an_id_with_leading_zeros_after_integer_ids_is_refused_not_merged(tmp_path):
    """The first block makes user_id integers; a later file's "007" was read as 7, the
    ID of another user."""
    folder = tmp_path / "logs"
    folder.mkdir()
    (folder / "a.csv").write_text("user_id,item_id\n7,1\n8,2\n")
    (folder / "b.csv").write_text("user_id,item_id\n9,3\n007,4\n")
    with pytest.raises(DataError, match=r"b\.csv line 3, column 'user_id': '007' is not an integer in canonical form"):
        convert(Store(), "csv", str(folder), str(tmp_path / "out"))
    assert not parts(tmp_path / "out")


def test_csv_with_a_byte_order_mark_locates_its_errors(tmp_path):
    """pyarrow skips the BOM; the error path read a later file's header as '\ufeffuid'
    and failed with a KeyError instead of naming the line."""
    folder = tmp_path / "logs"
    folder.mkdir()
    (folder / "a.csv").write_text("uid,movie,score\n1,10,4\n")
    (folder / "b.csv").write_text("\ufeffuid,movie,score\n1,10,4\n2,11\n")
    with pytest.raises(DataError, match=r"b\.csv line 3: expected 3 fields"):
        convert(Store(), "csv", str(folder), str(tmp_path / "out"), mapping={"user_id": "uid", "item_id": "movie", "rating": "score"})


def test_sub_second_times_are_floored_and_a_nan_time_is_a_null(tmp_path):
    src = tmp_path / "log.csv"
    src.write_text("user_id,item_id,ts\n1,10,2020-01-01T00:00:00.750\n2,11,2020-01-01T00:00:01\n")
    convert(Store(), "csv", str(src), str(tmp_path / "out"))
    assert read(tmp_path / "out")["ts"].to_pylist() == [1577836800, 1577836801]
    inter = tmp_path / "x.inter"
    inter.write_text("user_id:token\titem_id:token\ttimestamp:float\nu1\ti1\t5.5\nu2\ti2\tnan\n")
    convert(Store(), "recbole", str(inter), str(tmp_path / "out2"))
    assert sorted(read(tmp_path / "out2")["ts"].to_pylist(), key=lambda v: -1 if v is None else v) == [None, 5]
