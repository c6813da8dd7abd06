"""The pretraining payoff on synthetic data: pretrained vs scratch at the same
fine-tune budget and seeds, written to docs/results/ (section 2 of docs/RESULTS.md).

Label scarcity: a log of all users for pretraining, labels for only a share of users
(--labeled-users), evaluation on all users (cold users = unlabeled). The generator
plants the structure FLM learns, so this checks the machinery; real data is
bench/quality.py's.

    python bench/payoff.py [--quick] [--out docs/results]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from flm_dist import launch  # noqa: E402
from flm_dist.config import load_job  # noqa: E402
from flm_dist.data.synth import synth  # noqa: E402
from flm_dist.payoff import compare, summary_markdown  # noqa: E402
from flm_dist.storage import Store  # noqa: E402

JOBS = os.path.join(os.path.dirname(__file__), "..", "jobs")


def synthetic(root: str, out: str, quick: bool, labeled: float) -> dict:
    """The recipe's job files (jobs/pretrain.yaml, then jobs/finetune_ctr.yaml from it and
    from scratch) with only what a user sets per dataset: data paths, features, table
    sizes, batch size and epochs."""
    store = Store()
    rows, users, items = (200_000, 5_000, 2_000) if quick else (1_000_000, 20_000, 5_000)
    rep = synth(store, f"{root}/data", rows, users, items, seed=11, labeled_users=labeled)
    features = "[{name: u_segment, side: user}, {name: u_region, side: user}, {name: i_category, side: item}, {name: i_brand, side: item}]"
    common = [
        f"run.storage={root}/runs",
        f"data.features={features}",
        "model.user_rows=65536",
        "model.item_rows=16384",
        "model.feature_rows=1024",
        "data.batch_size=4096",
    ]
    pre = load_job(os.path.join(JOBS, "pretrain.yaml"), [*common, "run.name=syn-pre", f"data.pretrain={root}/data/pretrain", f"train.epochs={1 if quick else 3}"])
    r_pre = launch.train(pre, store, fresh=True, progress=False)
    ft = load_job(os.path.join(JOBS, "finetune_ctr.yaml"), [*common, "run.name=syn-ft", f"init_from={r_pre['checkpoint']}", f"data.train={root}/data/train",
                                                            f"data.eval={root}/data/eval", f"train.epochs={2 if quick else 10}"])
    res = compare(ft, store, out=out)
    res["synth"] = rep
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--work", default="/tmp/flm-payoff")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "docs", "results"))
    ap.add_argument("--labeled-users", type=float, default=0.3)
    ap.add_argument("--only", choices=["synthetic"], help="the only protocol here (real data: bench/quality.py)")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    t0 = time.time()
    results = {}
    if args.only in (None, "synthetic"):
        results["synthetic"] = synthetic(f"{args.work}/syn", f"{args.out}/synthetic", args.quick, args.labeled_users)
    with open(os.path.join(args.out, "payoff.json"), "w") as f:
        json.dump(results, f, indent=2, default=str)
    for name, r in results.items():
        print(f"\n## {name}\n")
        print(summary_markdown(r))
    print(f"({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
