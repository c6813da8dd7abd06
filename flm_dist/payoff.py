"""The pretraining payoff: fine-tune from scratch and from the pretrained backbone on
the same data, budget and seeds, evaluate both the same way (overall and per slice),
and write a table, plots and a markdown summary (`flm-dist compare`)."""

from __future__ import annotations

import io
import json
import math
from dataclasses import replace

import numpy as np

from flm_dist import launch
from flm_dist.config import FINETUNE_TASKS, ConfigError, JobConfig
from flm_dist.data.encode import encode_table
from flm_dist.data.hashing import HashSpec
from flm_dist.data.plan import read_unit
from flm_dist.metrics import SLICES, ranking_report
from flm_dist.model import table_sizes
from flm_dist.storage import Store, join

__all__ = ["compare", "most_popular"]

HEADLINE = {"ctr": "auc", "rating": "rmse", "retrieval": "recall@10"}


def most_popular(store: Store, job: JobConfig, ks=(10, 20)) -> dict:
    """The most-popular baseline for retrieval: every user gets the items ranked by
    training popularity (their own training items excluded), scored like the models.
    Training and eval rows are read exactly as the fine-tune reads them."""
    hs = HashSpec.build(table_sizes(job.model, job.data.features), job.model.hash_seed)
    _, plans, specs = launch.plan_datasets(job, store, hs, job.data.train, job.data.eval or None, "retrieval")
    ref = launch.training_reference(store, plans["train"], specs["known"], "retrieval")
    plan, spec = plans["eval"], specs["eval"]
    users, items = [], []
    for u in plan.units:
        cols = encode_table(read_unit(store, plan, u), spec, u.index)
        good = cols["_bad"] == 0
        users.append(cols["user_key"][good])
        items.append(cols["item_key"][good])
    users, items = np.concatenate(users), np.concatenate(items)
    catalog = ref.catalog["item_key"]
    pop = np.log1p(ref.item_counts[np.searchsorted(ref.items, catalog)]).astype(np.float32)
    return ranking_report(lambda lo, hi: np.broadcast_to(pop, (hi - lo, len(pop))).copy(), len(users), users, items, catalog, ref, ks=ks)


def compare(job: JobConfig, store: Store, *, out: str | None = None, progress: bool = False, address: str | None = None, baseline: bool = True) -> dict:
    if job.task not in FINETUNE_TASKS:
        raise ConfigError(f"compare fine-tunes: task must be one of {FINETUNE_TASKS}, got {job.task!r}")
    if not job.init_from:
        raise ConfigError("compare needs init_from: the pretrained checkpoint (or run folder) to compare against scratch")
    if not job.data.eval and job.data.split.by == "none":
        raise ConfigError("compare needs data.eval (or a data.split): both arms are evaluated on it")
    out = out or join(job.run.storage, f"{job.run.name}-compare")
    arms = {
        "scratch": replace(job, init_from="", run=replace(job.run, name=f"{job.run.name}-scratch")),
        "pretrained": replace(job, run=replace(job.run, name=f"{job.run.name}-pretrained")),
    }
    results: dict = {"task": job.task, "init_from": job.init_from, "data": {"train": job.data.train, "eval": job.data.eval or f"the split ({job.data.split.by})"}, "budget": {"epochs": job.train.epochs, "batch_size": job.data.batch_size, "workers": job.scaling.max_workers, "seed": job.run.seed}, "arms": {}}
    for name, arm in arms.items():
        print(f"compare: fine-tuning {name}", flush=True)
        res = launch.train(arm, store, fresh=True, progress=progress, address=address)
        m = res["metrics"]
        results["arms"][name] = {
            "checkpoint": res["checkpoint"],
            "eval": m["eval"],
            "curve": m.get("curve", []),
            "epochs_curve": m.get("epochs_curve", []),
            "best": m.get("best"),
            "rows_per_s": m["rows_per_s"],
            "steps": m["steps"],
        }
    if baseline and job.task == "retrieval":
        results["arms"]["most_popular"] = {"eval": most_popular(store, job)}
    store.ensure_bucket(out)
    store.write_json(join(out, "results.json"), results)
    store.write_bytes(join(out, "learning_curves.png"), _curves_png(results))
    store.write_bytes(join(out, "slices.png"), _slices_png(results))
    md = summary_markdown(results)
    store.write_bytes(join(out, "summary.md"), md.encode())
    results["out"] = out
    return results


def _fmt(v) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4f}" if isinstance(v, float) else str(v)


def summary_markdown(results: dict) -> str:
    task = results["task"]
    head = HEADLINE[task]
    metrics = [k for k in results["arms"]["scratch"]["eval"]["overall"] if k not in ("rows", "users", "catalog_items")]
    lines = [f"# Pretraining payoff: {task}", "", f"Fine-tune data `{results['data']['train']}`, evaluated on `{results['data']['eval']}`; "
             f"pretrained backbone `{results['init_from']}`. Same budget for both arms: {json.dumps(results['budget'])}.", ""]
    lines += ["| arm | slice | rows | " + " | ".join(metrics) + " |", "|---|---|---|" + "---|" * len(metrics)]
    for arm, r in results["arms"].items():
        ev = r["eval"]
        for sl in ("overall", *SLICES):
            m = ev["overall"] if sl == "overall" else ev.get("slices", {}).get(sl)
            if m:
                lines.append(f"| {arm} | {sl} | {m.get('rows')} | " + " | ".join(_fmt(m.get(k)) for k in metrics) + " |")
    p, s = results["arms"]["pretrained"]["eval"], results["arms"]["scratch"]["eval"]
    lines += ["", f"Headline ({head}; pretrained minus scratch):", ""]
    for sl in ("overall", *SLICES):
        a = p["overall"] if sl == "overall" else p.get("slices", {}).get(sl, {})
        b = s["overall"] if sl == "overall" else s.get("slices", {}).get(sl, {})
        if head in a and head in b:
            lines.append(f"- {sl}: {_fmt(a[head])} vs {_fmt(b[head])} ({a[head] - b[head]:+.4f})")
    lines += ["", "![learning curves](learning_curves.png) ![slices](slices.png)", ""]
    return "\n".join(lines)


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return buf.getvalue()


def _curves_png(results: dict) -> bytes:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 3.5))
    ax = fig.add_subplot()
    for k, arm in enumerate(("scratch", "pretrained")):
        color = f"C{k}"
        c = [r for r in results["arms"][arm]["curve"] if r["loss"] == r["loss"]]
        ax.plot([r["step"] for r in c], [r["loss"] for r in c], color=color, alpha=0.6, label=f"{arm}: training loss")
        v = [r for r in results["arms"][arm].get("epochs_curve", []) if "valid_loss" in r]
        if v:
            ax.plot([r["step"] for r in v], [r["valid_loss"] for r in v], "o--", color=color, label=f"{arm}: validation criterion (retrieval: 1 - NDCG@10)")
            best = results["arms"][arm].get("best")
            if best:
                ax.plot([best["step"]], [best["valid_loss"]], "*", color=color, markersize=14)
    ax.set_xlabel("step")
    ax.set_ylabel("loss per row")
    ax.set_title(f"fine-tuning ({results['task']}); star: the kept epoch")
    ax.legend(fontsize=7)
    return _png(fig)


def _slices_png(results: dict) -> bytes:
    from matplotlib.figure import Figure

    head = HEADLINE[results["task"]]
    names = ["overall", *SLICES]
    arms = list(results["arms"])
    fig = Figure(figsize=(7, 3.5))
    ax = fig.add_subplot()
    width = 0.8 / len(arms)
    for i, arm in enumerate(arms):
        ev = results["arms"][arm]["eval"]
        vals = [(ev["overall"] if n == "overall" else ev.get("slices", {}).get(n, {})).get(head, float("nan")) for n in names]
        ax.bar(np.arange(len(names)) + i * width, vals, width, label=arm)
    ax.set_xticks(np.arange(len(names)) + width * (len(arms) - 1) / 2, names)
    ax.set_ylabel(head)
    ax.legend()
    return _png(fig)
