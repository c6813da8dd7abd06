"""What a run's start costs: tiny 2-worker runs on a local Ray runtime, side by side
with Ray Train's own floor.

Every run of flm_dist starts Ray Train (a controller process, a worker group, Ray
Data's coordinators and read tasks); on small jobs and in the test suite (~45 runs)
that start is most of the wall time. Arms, interleaved, on one local Ray runtime:

  B-floor      a plain TorchTrainer: 2 workers x 0.5 CPU, default DataConfig, a
               4,000-row Ray dataset read once by each worker, nothing else. What any
               Ray Train job pays on this machine.
  C-pretrain   `launch.train`, pretrain, 4,000 synthetic rows, 1 epoch, 2 workers
  C-finetune   `launch.train`, ctr, 1 epoch, with a validation carve and an eval set
  C-evaluate   `launch.evaluate` of C-finetune's checkpoint on the eval set

Figures: seconds from the call to its result, median over the rounds, and each C arm
over B-floor. Ray's defaults throughout (the test suite polls faster:
RAY_TRAIN_HEALTH_CHECK_INTERVAL_S=0.2).

    python bench/startup.py [--repeats N] [--out bench/results/startup.json] [--no-md]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

ROWS = 4000


def floor_run(rows: int) -> float:
    import ray.data
    import ray.train
    from ray.train import ScalingConfig
    from ray.train.torch import TorchTrainer

    def loop(_cfg):
        for _ in ray.train.get_dataset_shard("train").iter_batches(batch_size=256):
            pass

    t0 = time.perf_counter()
    TorchTrainer(
        loop,
        scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.5}),
        datasets={"train": ray.data.range(rows)},
    ).fit()
    return time.perf_counter() - t0


def tiny_job(root: str, name: str, task: str, **sets):
    from flm_dist.config import FeatureConfig, load_job

    overrides = [f"task={task}", f"run.name={name}", f"run.storage={root}/runs", "model.user_rows=4096", "model.item_rows=1024",
                 "model.feature_rows=64", "model.embedding_dim=8", "model.hidden=[16]", "model.latent_dim=8", "model.head_hidden=[8]",
                 "data.batch_size=256", "train.epochs=1", "scaling.num_workers=2"]
    job = load_job(None, overrides + [f"{k}={v}" for k, v in sets.items()])
    job.data.features = [FeatureConfig(name="u_segment", side="user"), FeatureConfig(name="i_category", side="item")]
    return job


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default="bench/results/startup.json")
    p.add_argument("--no-md", action="store_true", help="do not rewrite BENCHMARKS.md")
    args = p.parse_args()
    info = common.machine_info()
    common.print_header("startup", info, args)

    from flm_dist import launch
    from flm_dist.data.synth import synth
    from flm_dist.storage import Store

    t0 = time.perf_counter()
    launch.ensure_ray(num_cpus=2)
    ray_init_s = time.perf_counter() - t0
    root = tempfile.mkdtemp(prefix="flm-bench-startup-")
    store = Store()
    synth(store, f"{root}/data", rows=ROWS, users=200, items=100, seed=1, files=2, row_group_rows=1000)
    state: dict = {}

    def c_pretrain() -> dict:
        t = time.perf_counter()
        launch.train(tiny_job(root, "pre", "pretrain", **{"data.pretrain": f"{root}/data/pretrain"}), store, fresh=True, progress=False)
        return {"s": time.perf_counter() - t}

    def c_finetune() -> dict:
        t = time.perf_counter()
        job = tiny_job(root, "ft", "ctr", **{"data.train": f"{root}/data/train", "data.eval": f"{root}/data/eval"})
        state["ckpt"] = launch.train(job, store, fresh=True, progress=False)["checkpoint"]
        return {"s": time.perf_counter() - t}

    def c_evaluate() -> dict:
        t = time.perf_counter()
        launch.evaluate(state["ckpt"], store, f"{root}/data/eval")
        return {"s": time.perf_counter() - t}

    arms = {"B-floor": lambda: {"s": floor_run(ROWS)}, "C-pretrain": c_pretrain, "C-finetune": c_finetune, "C-evaluate": c_evaluate}
    runs = common.interleaved(arms, args.repeats)
    med = {a: common.median([r["s"] for r in rs]) for a, rs in runs.items()}
    result = {"benchmark": "startup", "machine": info, "rows": ROWS, "ray_init_s": ray_init_s, "runs": runs, "median_s": med,
              "over_floor": {a: med[a] / med["B-floor"] for a in med if a != "B-floor"}}
    common.write_result(args.out, result)
    body = common.markdown_table(
        ["arm", "seconds (median)", "runs", "x B-floor"],
        [[a, med[a], ", ".join(f"{r['s']:.1f}" for r in runs[a]), "—" if a == "B-floor" else med[a] / med["B-floor"]] for a in arms],
    )
    body += f"\n\nLocal Ray runtime start (`ensure_ray`, once): {ray_init_s:.1f} s. {ROWS:,} rows per run; seconds from the call to its result."
    print(body)
    if not args.no_md:
        common.update_benchmarks_md("startup", body, "python bench/startup.py", info)


if __name__ == "__main__":
    main()
