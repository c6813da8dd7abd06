"""bench/gpu_check.sh in its CPU dry mode: the prepared GPU script cannot rot."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.join(os.path.dirname(__file__), "..")


@pytest.mark.slow
def test_gpu_check_dry_run(tmp_path):
    out = tmp_path / "gpu_check.json"
    env = {**os.environ, "PYTHON": sys.executable}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run(["bash", os.path.join(ROOT, "bench", "gpu_check.sh"), "--dry", "--out", str(out)], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["dry"] and res["device"].startswith("cpu")
    assert res["oracle"]["world1_ok"] and res["oracle"]["world1_max_abs_diff"] < 1e-4
    assert res["limit"]["samples_per_s"] > 0 and res["system"]["rows"] > 0
    assert 0 < res["C_over_L"] < 10
