"""The prepared GPU check (run it whenever a GPU is lent; `--dry` runs it on CPU).

1. oracle: FLM train steps on the device (fp32, TF32 off) equal the same steps of an
   independent float64 copy on CPU, to float32 rounding. Not covered: a 2-rank NCCL
   run with row-wise sharded tables (one GPU per rank; the lent machines have one);
   tests/test_sharding.py checks 2 ranks against the single process on CPU (gloo).
2. throughput: the bare PyTorch loop over batches already in device memory (the
   limit, L) vs flm_dist end to end from Parquet on local disk with 1 worker (C),
   same model and batch size: samples/s and C/L.
3. memory: peak device memory of the L arm.
4. the sequence model (model.history_len; causal Transformer over the history through
   scaled_dot_product_attention): the same float64 oracle for retrieval steps with
   uniform negatives, bf16 throughput of the bare loop, and which attention kernels
   (flash, memory-efficient, math) run its masked attention on the device.

    bash bench/gpu_check.sh [--dry] [--out bench/results/gpu_check.json]

Each part is written to the output as it ends, and a part that fails is recorded with
its error while the others still run (the script then exits 1): a lent GPU's time is
short, and one error must not lose the rest. The system arm needs Ray (flm_dist's own
environment); where the Python that runs the script has none (a lent machine's image),
it is recorded as skipped, saying so.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
import traceback
from dataclasses import replace

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from flm_dist.batch import Batch  # noqa: E402
from flm_dist.config import FeatureConfig, ModelConfig  # noqa: E402
from flm_dist.model import FLM  # noqa: E402
from flm_dist.objectives import compute_loss, forward_flags  # noqa: E402
from flm_dist.optim import build_optimizers  # noqa: E402

FEATURES = [FeatureConfig(name="u_segment", side="user"), FeatureConfig(name="i_category", side="item")]


def make_batches(cfg: ModelConfig, n: int, bs: int, device, seed: int = 0) -> list[Batch]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        b = Batch(
            user=torch.randint(0, cfg.user_rows, (bs,), generator=g),
            item=torch.randint(0, cfg.item_rows, (bs,), generator=g),
            features={f.name: torch.randint(0, cfg.feature_rows, (bs,), generator=g) for f in FEATURES},
            label=torch.randint(0, 2, (bs,), generator=g).float(),
        )
        out.append(b.to(device))
    return out


def _train(model, batches, loss_of, frozen=("user_decoder", "item_decoder")) -> list[float]:
    """Optimiser steps over `batches`; `loss_of(batch)` is the batch's loss sum."""
    dense, sparse = build_optimizers(model, 1e-3, 0.0, 0.05, "adagrad")
    for name in frozen:
        getattr(model, name).requires_grad_(False)
    losses = []
    for b in batches:
        loss = loss_of(b) / len(b)
        for o in (dense, sparse):
            o.zero_grad(set_to_none=True)
        loss.backward()
        dense.step()
        sparse.step()
        losses.append(float(loss.detach()))
    return losses


def steps(model, batches, amp: bool, device) -> list[float]:
    def loss_of(b):
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp):
            return compute_loss("ctr", model(b, **forward_flags("ctr", 0.0)), b, 0.0, 1.0, 0.1, None).total

    return _train(model, batches, loss_of)


ORACLE_TOL = 1e-4  # float32 rounding over 4 steps stays far below; a wrong kernel or update does not


def oracle(device, cfg: ModelConfig, bs: int, device_steps=steps) -> dict:
    """`device_steps` on the device in fp32 against `steps` on a float64 copy on CPU:
    an oracle that shares no arithmetic with the path under test, so the CPU dry run
    fails too when that path is wrong."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(0)
    ref = FLM(cfg, FEATURES, init_seed=0).double()
    torch.manual_seed(0)
    dev = FLM(cfg, FEATURES, init_seed=0).to(device)
    ref_batches = [replace(b, label=b.label.double()) for b in make_batches(cfg, 4, bs, "cpu")]
    la = steps(ref, ref_batches, False, torch.device("cpu"))
    lb = device_steps(dev, make_batches(cfg, 4, bs, device), False, device)
    diff = max(float((a - b.detach().cpu().double()).abs().max()) for a, b in zip(ref.state_dict().values(), dev.state_dict().values(), strict=True))
    res = {"world1_max_abs_diff": diff, "world1_losses_close": all(abs(a - b) < ORACLE_TOL for a, b in zip(la, lb, strict=True))}
    res["world1_ok"] = res["world1_losses_close"] and diff < ORACLE_TOL
    n_gpu = torch.cuda.device_count() if device.type == "cuda" else 0
    res["world2"] = f"not covered ({n_gpu} GPUs here): a 2-rank NCCL oracle is not part of this script; tests/test_sharding.py checks 2 ranks on CPU (gloo)"
    return res


def limit_arm(device, cfg: ModelConfig, bs: int, n: int) -> dict:
    torch.manual_seed(0)
    model = FLM(cfg, FEATURES, init_seed=0).to(device)
    batches = make_batches(cfg, min(n, 64), bs, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    steps(model, batches[:4], device.type == "cuda", device)  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    done = 0
    while done < n:
        chunk = batches[: min(len(batches), n - done)]
        steps(model, chunk, device.type == "cuda", device)
        done += len(chunk)
    if device.type == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    mem = torch.cuda.max_memory_allocated() if device.type == "cuda" else None
    return {"samples_per_s": n * bs / dt, "steps": n, "peak_device_bytes": mem}


def seq_batches(cfg: ModelConfig, n: int, bs: int, device, seed: int = 0) -> list[Batch]:
    """Histories of every length, left-padded (-1), as the read tasks build them."""
    g = torch.Generator().manual_seed(seed)
    length = cfg.history_len
    out = []
    for _ in range(n):
        hist = torch.randint(0, cfg.item_rows, (bs, length), generator=g)
        lengths = torch.randint(0, length + 1, (bs,), generator=g)
        hist[torch.arange(length).unsqueeze(0) < (length - lengths).unsqueeze(1)] = -1
        b = Batch(user=torch.randint(0, cfg.user_rows, (bs,), generator=g), item=torch.randint(0, cfg.item_rows, (bs,), generator=g), features={}, history=hist)
        b.negatives = torch.randint(0, cfg.item_rows, (bs // 2,), generator=g)
        out.append(b.to(device))
    return out


def seq_steps(model, batches, amp: bool, device) -> list[float]:
    """Retrieval steps of the sequence model: sampled softmax over in-batch and uniform
    negatives (the loss in fp32, as the train loop computes it)."""

    def loss_of(b):
        b.negatives = b.negatives.to(b.item.device)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp):
            out = model(b, **forward_flags("retrieval", 0.0))
        # the device path computes the loss in fp32 as the train loop does; the float64 reference in float64
        out = out if model.history.pos.dtype == torch.float64 else out.float()
        return compute_loss("retrieval", out, b, 0.0, 1.0, 0.05, None, len(b), len(b.negatives) / model.cfg.item_rows).total

    return _train(model, batches, loss_of, ("user_decoder", "item_decoder", "head"))


# Row-wise Adagrad normalises each row's gradient: a float32 rounding in a tiny gradient
# moves a row by up to ~lr, so 3 steps of the sequence model reach ~1e-4 on CPU; a
# wrong kernel, mask or update is off by far more (a dropout mask alone: 0.29).
SEQ_ORACLE_TOL = 1e-3


def seq_check(device, cfg: ModelConfig, bs: int, n: int) -> dict:
    """Oracle, bf16 throughput and attention kernels of the sequence model."""
    torch.manual_seed(0)
    ref = FLM(cfg, [], init_seed=0).double()
    torch.manual_seed(0)
    dev = FLM(cfg, [], init_seed=0).to(device)
    la = seq_steps(ref, seq_batches(cfg, 3, bs, "cpu"), False, torch.device("cpu"))
    lb = seq_steps(dev, seq_batches(cfg, 3, bs, device), False, device)
    diff = max(float((a - b.detach().cpu().double()).abs().max()) for a, b in zip(ref.state_dict().values(), dev.state_dict().values(), strict=True))
    res = {"oracle_max_abs_diff": diff, "oracle_ok": diff < SEQ_ORACLE_TOL and all(abs(a - b) < SEQ_ORACLE_TOL for a, b in zip(la, lb, strict=True))}
    amp = device.type == "cuda"
    torch.manual_seed(0)
    model = FLM(cfg, [], init_seed=0).to(device)
    batches = seq_batches(cfg, min(n, 32), bs, device)
    seq_steps(model, batches[:2], amp, device)  # warm-up
    if amp:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    seq_steps(model, batches, amp, device)
    if amp:
        torch.cuda.synchronize()
    res["bf16" if amp else "fp32"] = {"samples_per_s": len(batches) * bs / (time.perf_counter() - t0), "steps": len(batches), "peak_device_bytes": torch.cuda.max_memory_allocated() if amp else None}
    # which kernels take the encoder's masked attention (causal & valid slots)
    import warnings

    from torch.nn.attention import SDPBackend, sdpa_kernel

    b = batches[0]
    kernels = {}
    for name, backend in (("flash", SDPBackend.FLASH_ATTENTION), ("efficient", SDPBackend.EFFICIENT_ATTENTION), ("math", SDPBackend.MATH)):
        with warnings.catch_warnings(record=True) as caught:  # why a kernel cannot run comes as warnings
            warnings.simplefilter("always")
            try:
                with sdpa_kernel(backend), torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp):
                    model(b, **forward_flags("retrieval", 0.0)).z_user.float().sum().backward()  # forward and backward kernels
                kernels[name] = "ok"
            except RuntimeError as e:
                reasons = "; ".join(str(w.message).splitlines()[0][:200] for w in caught)
                kernels[name] = f"unavailable: {str(e).splitlines()[0][:120]}" + (f" ({reasons})" if reasons else "")
    res["attention_kernels"] = kernels
    # an empty batch (a rank whose data ran out) still runs the encoder on the device
    empty = seq_batches(model.cfg, 1, 0, device)[0]
    with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp):
        z = model(empty, **forward_flags("retrieval", 0.0)).z_user
    res["empty_batch_ok"] = tuple(z.shape) == (0, model.cfg.latent_dim)
    return res


def system_arm(use_gpu: bool, cfg: ModelConfig, bs: int, rows: int) -> dict:
    from flm_dist import launch
    from flm_dist.config import load_job
    from flm_dist.data.synth import synth
    from flm_dist.storage import Store

    work = tempfile.mkdtemp(prefix="flm-gpu-check-")
    synth(Store(), f"{work}/data", rows, max(1000, rows // 50), max(500, rows // 200), seed=1)
    job = load_job(
        None,
        [
            "task=ctr",
            "run.name=gpu-check",
            f"run.storage={work}/runs",
            f"data.train={work}/data/train",
            "data.features=[{name: u_segment, side: user}, {name: i_category, side: item}]",
            f"data.batch_size={bs}",
            f"model.user_rows={cfg.user_rows}",
            f"model.item_rows={cfg.item_rows}",
            f"model.feature_rows={cfg.feature_rows}",
            f"model.embedding_dim={cfg.embedding_dim}",
            f"model.hidden={cfg.hidden}",
            f"model.latent_dim={cfg.latent_dim}",
            "scaling.num_workers=1",
            f"scaling.use_gpu={str(use_gpu).lower()}",
            "train.recon_weight=0",
        ],
    )
    res = launch.train(job, Store(), fresh=True, progress=False)
    return {"samples_per_s": res["metrics"]["rows_per_s"], "rows": res["metrics"]["rows"]}


def _part(result: dict, name: str, fn, out: str) -> None:
    """result[name] = fn(), or the error it raised; the output rewritten either way."""
    try:
        result[name] = fn()
    except Exception as e:  # noqa: BLE001 - recorded, and the script fails at its end
        result[name] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-4000:]}
        print(f"gpu_check: {name} FAILED: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=2)


def _system_or_why_not(gpu: bool, cfg: ModelConfig, bs: int, rows: int) -> dict:
    try:
        import ray  # noqa: F401
    except ImportError as e:
        return {"skipped": f"Ray is not installed in this Python ({sys.executable}: {e}); the system arm runs flm_dist end to end, which needs it"}
    return system_arm(gpu, cfg, bs, rows)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dry", action="store_true", help="CPU, tiny sizes: checks the script itself")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "gpu_check.json"))
    ap.add_argument("--skip-system", action="store_true")
    args = ap.parse_args()
    gpu = torch.cuda.is_available() and not args.dry
    if not gpu and not args.dry:
        raise SystemExit("no CUDA device: run with --dry for the CPU check of this script")
    device = torch.device("cuda" if gpu else "cpu")
    if args.dry:
        cfg = ModelConfig(user_rows=4096, item_rows=1024, feature_rows=64, embedding_dim=16, hidden=[32], latent_dim=16, head_hidden=[16])
        bs, n, rows = 256, 8, 5_000
    else:
        cfg = ModelConfig(user_rows=1 << 20, item_rows=1 << 18, feature_rows=1 << 12, embedding_dim=64, hidden=[512, 256], latent_dim=128, head_hidden=[128])
        bs, n, rows = 8192, 200, 2_000_000
    result = {
        "device": torch.cuda.get_device_name(0) if gpu else f"cpu ({os.cpu_count()} cores)",
        "dry": args.dry,
        "versions": {"torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version()},
        "batch_size": bs,
    }
    out = args.out
    _part(result, "oracle", lambda: oracle(device, cfg, min(bs, 512)), out)
    _part(result, "limit", lambda: limit_arm(device, cfg, bs, n), out)
    seq_cfg = replace(cfg, history_len=8 if args.dry else 50, history_layers=1, history_heads=2, history_dropout=0.0, user_id=False)  # no dropout: the oracle needs the same function
    _part(result, "sequence", lambda: seq_check(device, seq_cfg, 64 if args.dry else 2048, 2 if args.dry else 50), out)
    if not args.skip_system:
        _part(result, "system", lambda: _system_or_why_not(gpu, cfg, bs, rows), out)
        if "samples_per_s" in result["system"] and "samples_per_s" in result["limit"]:
            _part(result, "C_over_L", lambda: result["system"]["samples_per_s"] / result["limit"]["samples_per_s"], out)
    print(json.dumps(result, indent=2))
    failed = [k for k, v in result.items() if isinstance(v, dict) and "error" in v]
    if failed:
        raise SystemExit(f"gpu_check: {', '.join(failed)} FAILED (errors in {out})")
    if not result["oracle"]["world1_ok"]:
        raise SystemExit("oracle check FAILED: device steps differ from the CPU reference")
    if not result["sequence"]["oracle_ok"]:
        raise SystemExit("oracle check FAILED: the sequence model's device steps differ from the CPU reference")


if __name__ == "__main__":
    main()
