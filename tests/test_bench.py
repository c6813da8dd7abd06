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
