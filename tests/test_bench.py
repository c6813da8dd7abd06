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
    # an untrained model (all scores equal): ties count against it, NDCG@10 = 10 positions' mean gain over 20 - 1 candidates
    flat = sasrec.SASRec(20, cfg).eval()
    torch.nn.init.zeros_(flat.item.weight)
    ndcg = sasrec._validation_ndcg(flat, [np.array([1])], np.array([2]))
    assert abs(ndcg - sum(1 / np.log2(r + 2) for r in range(10)) / 19) < 1e-6

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

    for name in ("SOURCES", "SIZES", "BATCH", "EPOCHS", "SEQ_SIZES", "SEQ_EPOCHS"):
        monkeypatch.setattr(quality, name, dict(getattr(quality, name)))
    path = tmp_path / "Beauty.txt"
    path.write_text("".join(f"{u} " + " ".join(str(100 + (u * 7 + k) % 300) for k in range(5)) + "\n" for u in range(1, 2001)))
    protocols = quality.protocols_for(argparse.Namespace(data=[f"beauty={path}"], work=str(tmp_path), quick=True, sasrec=False))
    assert list(protocols) == ["ml", "lastfm", "toys", "beauty", "lastfm-seq", "toys-seq", "beauty-seq"]
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
