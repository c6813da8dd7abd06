"""The benchmark scripts' report plumbing: BENCHMARKS.md sections are rewritten in
place, and what people wrote around them survives."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
import common  # noqa: E402

INFO = {
    "date": "2026-01-01T00:00:00",
    "nproc": 2,
    "memory_gib": 24.0,
    "cpu": "x",
    "gpu": None,
    "loadavg_at_start": [0.1, 0.1, 0.1],
    "python": "3.11",
    "versions": {"torch": "t", "ray": "r", "pyarrow": "p"},
    "git": {"commit": "abc", "dirty": False},
}


def test_sections_are_replaced_in_place_and_prose_is_kept(tmp_path):
    path = str(tmp_path / "BENCHMARKS.md")
    with open(path, "w") as f:
        f.write("# Benchmarks\n\nanalysis kept\n\n<!-- bench:a -->\nold a\n<!-- /bench:a -->\n\nbetween\n\n<!-- bench:b -->\nold b\n<!-- /bench:b -->\ntail\n")
    common.update_benchmarks_md("a", "| new | a |", "python bench/a.py", INFO, path=path)
    common.update_benchmarks_md("c", "new c", "python bench/c.py", INFO, path=path)
    text = open(path).read()
    assert "old a" not in text and "| new | a |" in text and "`python bench/a.py`" in text
    assert "old b" in text and "analysis kept" in text and "between" in text and "tail" in text
    assert text.index("| new | a |") < text.index("between") < text.index("old b")  # same place
    assert text.rstrip().endswith("<!-- /bench:c -->") and "## c" in text  # a new section is appended
    common.update_benchmarks_md("a", "newer a", "python bench/a.py", INFO, path=path)
    text = open(path).read()
    assert text.count("<!-- bench:a -->") == 1 and "newer a" in text and "| new | a |" not in text


def test_captured_text_drops_file_notices(capsys):
    with common.captured() as cap:
        print("| table |")
        print("wrote bench/results/x.json")
    assert cap.text() == "| table |"
    assert "wrote bench/results/x.json" in capsys.readouterr().out  # still printed


def test_the_cooccurrence_baseline_counts_neighbours_in_the_window_and_weighs_recent_items_more():
    import numpy as np
    import quality

    seqs = [np.array([0, 1, 2, 3, 4, 5, 6, 7]), np.array([0, 1]), np.array([2, 6, -1])]  # -1: outside the catalog
    pop = np.log1p(np.array([2, 2, 2, 1, 1, 1, 2, 1, 0, 5], dtype=np.float64))
    scores = quality.cooccurrence(seqs, [np.array([0]), np.array([2, 0]), np.array([])], 10, pop, window=5, recent=50)(0, 3)
    # item 0 is next to 1 twice; 1..5 lie within 5 positions of it, 6 and 7 do not
    assert scores[0, 1] > scores[0, 2] > 0 and abs(scores[0, 1] - 2) < 0.01
    assert scores[0, 5] > 0.99 and all(scores[0, j] < 0.01 for j in (6, 7, 8, 9))
    # history [2, 0]: 0 (most recent) weighs 1, 2 weighs 1/2: item 1 gets 2 + 1/2; item 6 gets 2 (it co-occurs twice with 2) x 1/2
    assert abs(scores[1, 1] - 2.5) < 0.01 and abs(scores[1, 6] - 1.0) < 0.01
    # no history: popularity alone orders the items, below any co-occurrence
    assert np.argmax(scores[2]) == 9 and scores[2].max() < 1 / 50
    assert np.isfinite(scores).all() and scores.shape == (3, 10)
    # next items only: after 2 come 3..6 (and 6 again in the third sequence), never 0 or 1
    ahead = quality.cooccurrence(seqs, [np.array([2])], 10, pop, window=5, recent=50, forward=True)(0, 1)[0]
    assert ahead[0] < 0.01 and ahead[1] < 0.01 and abs(ahead[6] - 2) < 0.01 and abs(ahead[3] - 1) < 0.01


def test_the_sasrec_baseline_is_causal_and_learns_a_planted_order():
    import numpy as np
    import sasrec
    import torch

    cfg = sasrec.SASRecConfig(max_len=10, dropout=0.1, batch=32, epochs=15, patience=15)
    model = sasrec.SASRec(20, cfg).eval()
    x = torch.tensor([[0, 0, 3, 5, 7, 9, 11, 13, 15, 17]])
    later = x.clone()
    later[0, 6:] = torch.tensor([2, 4, 6, 8])
    with torch.no_grad():
        assert torch.allclose(model(x)[0, :6], model(later)[0, :6]) and not torch.allclose(model(x)[0, 6:], model(later)[0, 6:])
    # an untrained model (all scores equal): ties count against it, NDCG@10 = 0
    flat = sasrec.SASRec(20, cfg).eval()
    torch.nn.init.zeros_(flat.item.weight)
    assert sasrec._validation_ndcg(flat, [np.array([1])], np.array([2])) == 0.0

    # every sequence walks the items in a cycle: the next item is the current one + 1
    rng = np.random.default_rng(0)
    seqs = [(rng.integers(0, 20) + np.arange(12)) % 20 + 1 for _ in range(120)]
    model, info = sasrec.fit(seqs, 20, cfg, log=lambda *_: None)
    assert info["valid_ndcg@10"] > 0.9, info["valid_ndcg@10"]
    histories = [s[:-1] for s in seqs[:5]]
    scores = sasrec.scores_for(model, histories)(0, 5)  # over catalog positions: item index - 1
    for r, h in enumerate(histories):
        scores[r, h - 1] = -np.inf  # the user's earlier items are not recommended, as in the evaluation
    assert [int(t) + 1 for t in scores.argmax(1)] == [int(s[-1]) for s in seqs[:5]]


def test_the_quality_harness_runs_another_ranking_file_with_settings_from_the_file(tmp_path, monkeypatch):
    import argparse

    import pytest
    import quality

    for name in ("SOURCES", "RATINGS", "SIZES", "BATCH", "EPOCHS", "SEQ_SIZES", "SEQ_EPOCHS"):
        monkeypatch.setattr(quality, name, dict(getattr(quality, name)))
    path = tmp_path / "Beauty.txt"
    path.write_text("".join(f"{u} " + " ".join(str(100 + (u * 7 + k) % 300) for k in range(5)) + "\n" for u in range(1, 2001)))
    protocols = quality.protocols_for(argparse.Namespace(data=[f"beauty={path}"], work=str(tmp_path), quick=True, sasrec=False))
    assert list(protocols) == ["ml", "lastfm", "toys", "beauty", "lastfm-seq", "toys-seq", "beauty-seq", "ml-seq"]
    # 20 rows per distinct ID, rounded up to a power of two: 2,000 users -> 65,536; 300 items -> 8,192
    assert quality.SIZES["beauty"] == {"model.user_rows": 65536, "model.item_rows": 8192}
    assert quality.SEQ_SIZES["beauty"] == {"model.user_rows": 1024, "model.item_rows": 8192, "data.batch_size": 256}
    assert quality.EPOCHS["beauty"] == quality.EPOCHS["toys"] and quality.SOURCES["beauty"] == str(path)
    # a malformed line is refused with its file and line; a name may not shadow a protocol
    # a blank line and a user without items are skipped, as `flm-dist data convert` skips them
    gaps = tmp_path / "gaps.txt"
    gaps.write_text("1 5 6\n\n2 7\n3\n")
    assert quality.settings_for("gaps", str(gaps))["users"] == 2
    bad = tmp_path / "bad.txt"
    bad.write_text("1 2 3\n2 x 4\n")
    with pytest.raises(SystemExit, match=r"bad.txt, line 2: expected `user_id item_id"):
        quality.settings_for("bad", str(bad))
    with pytest.raises(SystemExit, match="NAME must be a new word"):
        quality.settings_for("toys", str(path))
    # a protocol name that does not exist is an error, not a run of nothing
    monkeypatch.setattr(sys, "argv", ["quality.py", "--only", "toy,lastfm"])
    with pytest.raises(SystemExit, match="no protocol toy; the protocols are ml, lastfm, toys"):
        quality.main()


def test_the_quality_harness_runs_another_movielens_folder_in_either_format(tmp_path, monkeypatch):
    import argparse

    import numpy as np
    import pyarrow.parquet as pq
    import pytest
    import quality

    for name in ("SOURCES", "RATINGS", "SIZES", "BATCH", "EPOCHS", "SEQ_SIZES", "SEQ_EPOCHS"):
        monkeypatch.setattr(quality, name, dict(getattr(quality, name)))
    rng = np.random.default_rng(0)
    events = []  # 50 users x 10 ratings of 60 movies, integer stars (ml-1m's), one tie in time per user
    for u in range(1, 51):
        for k, m in enumerate(rng.choice(60, 10, replace=False) + 1):
            events.append((u, int(m), int(rng.integers(1, 6)), 1000 + min(k, 8)))
    genres = {m: "|".join(["Drama", "Comedy", "Horror"][: 1 + m % 3]) if m % 7 else "(no genres listed)" for m in range(1, 61)}
    dat, csv = tmp_path / "ml-1m", tmp_path / "ml-csv"
    dat.mkdir(), csv.mkdir()
    (dat / "ratings.dat").write_text("".join(f"{u}::{m}::{r}::{t}\n" for u, m, r, t in events))
    (dat / "movies.dat").write_bytes("".join(f"{m}::Am\xe9lie, Part {m} (2001)::{g}\n" for m, g in genres.items()).encode("latin-1"))
    (csv / "ratings.csv").write_text("userId,movieId,rating,timestamp\n" + "".join(f"{u},{m},{r}.0,{t}\n" for u, m, r, t in events))
    (csv / "movies.csv").write_text("movieId,title,genres\n" + "".join(f'{m},"Amelie, Part {m} (2001)",{g}\n' for m, g in genres.items()))

    a, b = quality.read_movielens(str(dat)), quality.read_movielens(str(csv))
    for x, y in zip(a[:4], b[:4], strict=True):
        assert np.array_equal(x, y)
    assert a[4] == b[4] and a[4][7] == [] and a[4][2] == ["Drama", "Comedy", "Horror"]

    protocols = quality.protocols_for(argparse.Namespace(data=[f"ml1m={dat}"], work=str(tmp_path), quick=True, sasrec=False))
    assert list(protocols) == ["ml", "ml1m", "lastfm", "toys", "lastfm-seq", "toys-seq", "ml-seq", "ml1m-seq"]
    # 20 rows per distinct ID, rounded up to a power of two: 50 users -> 1,024; 60 movies -> 2,048; ml's batches and epochs
    assert quality.SIZES["ml1m"] == {"model.user_rows": 1024, "model.item_rows": 2048} and quality.EPOCHS["ml1m"] == quality.EPOCHS["ml"]
    assert quality.SEQ_SIZES["ml1m"]["data.batch_size"] == 256 and quality.RATINGS["ml1m"] == str(dat)

    info = quality.prepare_ml(str(tmp_path / "work"), "ml1m")
    assert info["rating_range"] == [1.0, 5.0] and info["users"] == 50 and info["labeled_users"] == 15
    test, pre = pq.read_table(f"{info['dir']}/test"), pq.read_table(f"{info['dir']}/pretrain")
    assert test.num_rows == 50 * 2 and pre.num_rows == 50 * 8 and "rating" not in pre.column_names  # each user's last 20% by time
    for u in (1, 50):  # the held-out ratings are the user's latest (ties in time by movie ID)
        mine = sorted((t, m) for uu, m, _, t in events if uu == u)
        held = test.filter(np.asarray(test.column("user_id")) == u)
        assert sorted(held.column("item_id").to_pylist()) == sorted(m for _, m in mine[-2:])
    # the sequence protocol's file: each user's movies in time order, ties by movie ID
    txt = quality.ratings_as_sequences(str(dat), str(tmp_path / "ml1m.txt"))
    first = open(txt).readline().split()
    assert first == ["1"] + [str(m) for _, m in sorted((t, m) for u, m, _, t in events if u == 1)]

    # bad folders are refused with the file and what is wrong
    (csv / "ratings.csv").write_text("userId,movieId,rating\n1,2,3.0\n")
    with pytest.raises(SystemExit, match=r"ratings.csv: no column timestamp"):
        quality.read_movielens(str(csv))
    (csv / "ratings.csv").write_text("userId,movieId,rating,timestamp\n1,2,3.0,5\n1,3,good,6\n")
    with pytest.raises(SystemExit, match=r"ratings.csv: column rating holds string values, not numbers"):
        quality.read_movielens(str(csv))
    (dat / "ratings.dat").write_text("1::2::3::4\n\n1::5::4\n")
    with pytest.raises(SystemExit, match=r"ratings.dat, line 3: expected 4 `::`-separated fields, got 3"):
        quality.read_movielens(str(dat))
    (dat / "ratings.dat").write_text("1::2::three::4\n")
    with pytest.raises(SystemExit, match=r"ratings.dat: expected UserID::MovieID::Rating::Timestamp numbers"):
        quality.read_movielens(str(dat))
    with pytest.raises(SystemExit, match=r"expected a MovieLens folder with ratings.csv \+ movies.csv"):
        quality.read_movielens(str(tmp_path / "work"))


def test_the_bootstrap_resamples_whole_users_as_often_as_drawn():
    import numpy as np
    import quality

    users = np.array([5, 5, 5, 9, 2, 2, 7])
    seen = []

    def rows(w):
        seen.append(w.copy())
        return float(w.sum())

    value, lo, hi = quality.bootstrap(users, rows, n=300)
    assert value == 7 and len(seen) == 301
    sizes = set()
    for c in seen[:-1]:
        assert c[0] == c[1] == c[2] and c[4] == c[5]  # a user comes with all of its rows
        assert c[0] + c[3] + c[4] + c[6] == 4  # four users drawn, with replacement
        sizes.add(int(c.sum()))
    assert lo < hi and min(sizes) < 7 < max(sizes)  # 4 to 12 rows: users, not rows, are drawn


def test_weighted_metrics_equal_the_metrics_of_the_rows_repeated():
    """A resample's metrics from row weights are those of its rows gathered: the exact
    AUC (ties 1/2) included, with tied scores across both labels."""
    import numpy as np
    import pytest
    import quality

    from flm_dist.metrics import auc

    rng = np.random.default_rng(0)
    p = rng.integers(0, 12, 400) / 12.0  # few distinct scores: many ties
    y = (rng.random(400) < 0.3 + 0.4 * p).astype(np.float64)
    ctr, rating = quality.weighted_metrics("ctr", p, y), quality.weighted_metrics("rating", p, y)
    for _ in range(5):
        w = rng.integers(0, 4, 400).astype(np.float64)
        r = np.repeat(np.arange(400), w.astype(np.int64))
        assert ctr["auc"](w) == pytest.approx(auc(p[r], y[r]), abs=1e-12)
        pc = np.clip(p[r], 1e-7, 1 - 1e-7)
        assert ctr["logloss"](w) == pytest.approx(float(-np.mean(y[r] * np.log(pc) + (1 - y[r]) * np.log(1 - pc))), rel=1e-12)
        assert ctr["calibration"](w) == pytest.approx(p[r].mean() / y[r].mean(), rel=1e-12)
        assert rating["rmse"](w) == pytest.approx(float(np.sqrt(np.mean((p[r] - y[r]) ** 2))), rel=1e-12)
