"""bench/gpu_check.sh in its CPU dry mode: the prepared GPU script cannot rot."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.join(os.path.dirname(__file__), "..")


@pytest.mark.slow
def test_gpu_check_dry_run(ray_local, tmp_path):
    out = tmp_path / "gpu_check.json"
    # the script's system arm joins the session's Ray runtime instead of starting its own
    env = {**os.environ, "PYTHON": sys.executable, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address}
    proc = subprocess.run(["bash", os.path.join(ROOT, "bench", "gpu_check.sh"), "--dry", "--out", str(out)], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["dry"] and res["device"].startswith("cpu")
    assert res["oracle"]["world1_ok"] and res["oracle"]["world1_max_abs_diff"] < 1e-4
    assert res["limit"]["samples_per_s"] > 0 and res["system"]["rows"] > 0
    assert 0 < res["C_over_L"] < 10


def test_without_ray_the_script_still_reports_every_device_part(tmp_path):
    """A lent GPU machine's Python has torch but no Ray: the system arm is recorded as
    skipped, saying why, and the device parts (the point of the check) come back in
    $OUT, where the device tool looks; before, the import failed after every device part
    had run, and nothing was written."""
    fake = tmp_path / "no_ray" / "ray"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError(\"No module named 'ray'\")\n")
    out = tmp_path / "out"
    out.mkdir()
    env = {**os.environ, "PYTHON": sys.executable, "PYTHONPATH": str(tmp_path / "no_ray"), "OUT": str(out)}
    proc = subprocess.run(["bash", os.path.join(ROOT, "bench", "gpu_check.sh"), "--dry"], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((out / "gpu_check.json").read_text())
    assert res["oracle"]["world1_ok"] and res["sequence"]["oracle_ok"] and res["limit"]["samples_per_s"] > 0
    assert "Ray is not installed" in res["system"]["skipped"] and "C_over_L" not in res


def test_oracle_fails_when_the_device_path_is_wrong():
    """The dry run's oracle is not the path under test: a device path that drops the
    embedding update (or does anything else wrong) fails it."""
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    import gpu_check
    import torch

    from flm_dist.config import ModelConfig

    cfg = ModelConfig(user_rows=512, item_rows=256, feature_rows=32, embedding_dim=8, hidden=[16], latent_dim=8, head_hidden=[8])
    ok = gpu_check.oracle(torch.device("cpu"), cfg, 64)
    assert ok["world1_ok"] and 0 < ok["world1_max_abs_diff"] < 1e-5  # float32 vs float64: close, not equal

    def no_sparse_update(model, batches, amp, device):
        before = {n: t.weight.detach().clone() for n, t in model.tables.items()}
        losses = gpu_check.steps(model, batches, amp, device)
        with torch.no_grad():
            for n, t in model.tables.items():
                t.weight.copy_(before[n])
        return losses

    bad = gpu_check.oracle(torch.device("cpu"), cfg, 64, device_steps=no_sparse_update)
    assert not bad["world1_ok"] and bad["world1_max_abs_diff"] > 1e-3
