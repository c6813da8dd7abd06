"""The pretraining payoff, reproducibly: two protocols, each pretrained vs scratch at
the same fine-tune budget and seeds, written to docs/RESULTS.md (+ plots).

1. synthetic, label scarcity: a log of all users for pretraining, labels for only a
   share of users (--labeled-users), evaluation on all users (cold users = unlabeled).
2. Amazon Toys_and_Games (../shared/data): leave-one-out by order (the last item of
   each user is the test target), full ranking over all items, the user's earlier
   items excluded; the most-popular baseline beside both arms.

    python bench/payoff.py [--quick] [--out docs/results]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from flm_dist import launch  # noqa: E402
from flm_dist.config import load_job  # noqa: E402
from flm_dist.data.convert import convert  # noqa: E402
from flm_dist.data.synth import synth  # noqa: E402
from flm_dist.payoff import compare, summary_markdown  # noqa: E402
from flm_dist.storage import Store  # noqa: E402

SHARED = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")


def synthetic(root: str, out: str, quick: bool, labeled: float) -> dict:
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
        "scaling.num_workers=2",
        "train.lr=0.002",
    ]
    pre = load_job(None, [*common, "task=pretrain", "run.name=syn-pre", f"data.pretrain={root}/data/pretrain", f"train.epochs={1 if quick else 3}"])
    r_pre = launch.train(pre, store, fresh=True, progress=False)
    ft = load_job(None, [*common, "task=ctr", "run.name=syn-ft", f"init_from={r_pre['checkpoint']}", f"data.train={root}/data/train", f"data.eval={root}/data/eval", "train.epochs=2", "train.recon_weight=0"])
    res = compare(ft, store, out=out)
    res["synth"] = rep
    return res


def leave_one_out(src_dir: str, dst: str) -> None:
    """train/: every interaction but each user's last; test/: the last one."""
    t = pq.read_table(src_dir)
    order = np.lexsort((t.column("ts").to_numpy(), t.column("user_id").to_numpy()))
    t = t.take(pa.array(order))
    u = t.column("user_id").to_numpy()
    last = np.r_[u[1:] != u[:-1], True]
    for name, mask in (("train", ~last), ("test", last)):
        part = t.filter(pa.array(mask))
        os.makedirs(f"{dst}/{name}", exist_ok=True)
        n = 4
        for k, lo in enumerate(np.linspace(0, part.num_rows, n + 1).astype(int)[:-1]):
            hi = np.linspace(0, part.num_rows, n + 1).astype(int)[k + 1]
            pq.write_table(part.slice(lo, hi - lo), f"{dst}/{name}/part-{k}.parquet")


def toys(root: str, out: str, quick: bool) -> dict:
    store = Store()
    src = os.path.join(SHARED, "Toys_and_Games.txt")
    if not os.path.exists(src):
        raise SystemExit(f"{src} not found: the Toys protocol needs ../shared/data")
    convert(store, "sequence", src, f"{root}/seq", files=4)
    leave_one_out(f"{root}/seq", f"{root}/loo")
    common = [
        f"run.storage={root}/runs",
        "model.user_rows=32768",
        "model.item_rows=32768",
        "model.embedding_dim=64",
        "model.hidden=[256]",
        "model.latent_dim=64",
        "data.batch_size=1024",
        "scaling.num_workers=2",
        "train.temperature=0.1",
        "train.lr=0.002",
        "train.sparse_lr=0.05",
    ]
    epochs = 2 if quick else 10
    pre = load_job(None, [*common, "task=pretrain", "run.name=toys-pre", f"data.pretrain={root}/loo/train", f"train.epochs={epochs}"])
    r_pre = launch.train(pre, store, fresh=True, progress=False)
    ft = load_job(None, [*common, "task=retrieval", "run.name=toys-ft", f"init_from={r_pre['checkpoint']}", f"data.train={root}/loo/train", f"data.eval={root}/loo/test", f"train.epochs={epochs}", "train.recon_weight=0"])
    return compare(ft, store, out=out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--work", default="/tmp/flm-payoff")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "docs", "results"))
    ap.add_argument("--labeled-users", type=float, default=0.3)
    ap.add_argument("--only", choices=["synthetic", "toys"])
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    t0 = time.time()
    results = {}
    if args.only in (None, "synthetic"):
        results["synthetic"] = synthetic(f"{args.work}/syn", f"{args.out}/synthetic", args.quick, args.labeled_users)
    if args.only in (None, "toys"):
        results["toys"] = toys(f"{args.work}/toys", f"{args.out}/toys", args.quick)
    with open(os.path.join(args.out, "payoff.json"), "w") as f:
        json.dump(results, f, indent=2, default=str)
    for name, r in results.items():
        print(f"\n## {name}\n")
        print(summary_markdown(r))
    print(f"({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
