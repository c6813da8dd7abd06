"""The real-data quality harness: does pretraining make the fine-tuned model better,
above all for users without labels, against classical baselines run side by side on
the same split? Every arm runs the project's own job files (jobs/*.yaml) with only
data paths, table sizes, batch size and epochs set per dataset, as a user would.

Protocols (data in ../shared/data):

- `ml`: MovieLens ml-latest-small, genres as an item feature. The last 20% of each
  user's ratings by time are the test set; pretraining sees every user's other
  interactions without ratings; fine-tuning sees the ratings of 30% of the users
  (label scarcity). `ctr` (label = rating >= 4) and `rating`, scratch vs pretrained,
  overall and for the users without labels; `rating` again with every user's labels.
  Baselines (scikit-surprise, the same training labels): global mean, user + item
  biases (BaselineOnly), SVD.
- `lastfm`, `toys`: LastFM.txt and Toys_and_Games.txt, leave-one-out (each user's last
  item is the test target), full ranking over every item, the user's earlier items
  excluded; `retrieval` scratch vs pretrained, beside most-popular and item
  co-occurrence, within a window and of the next items only (`cooccurrence`: classical
  sequence-aware baselines, fitted on the same training events).
- `lastfm-seq`, `toys-seq` (issue 17): the same files as per-user sequences (the
  `flm-dist data sequences` stage) for the sequence model (`jobs/pretrain_sequence.yaml`,
  `jobs/finetune_retrieval_sequence.yaml`: a causal Transformer over each user's
  history, no user ID). 10% of the users are held out of all training (cold start);
  for the others the last item is the test target and the one before it validation.
  Full ranking, earlier items excluded; warm users and cold users (scored from the
  export with their history only), beside most-popular and the two co-occurrences;
  with `--sasrec`, beside a plain SASRec too (bench/sasrec.py), trained on the same
  events (off by default: it takes longer than the protocol's own arms).

Scores come from each arm's exported TorchScript scorer (ctr, rating) or its exported
user and item vectors (retrieval), computed here independently of the training
system's own evaluation (both are printed). Confidence intervals: 95% percentile
bootstrap over users (the same resamples for both sides of a difference).

    python bench/quality.py [--only ml,lastfm,toys,lastfm-seq,toys-seq [--merge]] [--sasrec] [--quick] [--work /tmp/flm-quality]

Writes docs/results/quality.json and its section of docs/RESULTS.md.

Other data, with settings derived from it (`settings_for`): a file in the format of
LastFM.txt (one user per line, `user item item ...`, items oldest first; e.g. another
Amazon 5-core file of the S3-Rec repository) runs through the two ranking protocols; a
MovieLens folder (ml-1m's ratings.dat + movies.dat, or ml-latest's / ml-25m's
ratings.csv + movies.csv) through the label-scarcity protocol of `ml` and, as NAME-seq,
the sequence protocol over its ratings read as per-user sequences (`ml-seq` does that
for ml-latest-small; not in the default run):

    python bench/quality.py --data beauty=/data/Beauty.txt [--only beauty,beauty-seq]
    python bench/quality.py --data ml1m=/data/ml-1m [--only ml1m]

Such a run writes WORK/quality.json (or --out) and leaves docs/RESULTS.md alone.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
import warnings

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402 - the benchmarks' shared helpers live next to this file
import sasrec  # noqa: E402 - the sequence protocols' SASRec baseline, also here

from flm_dist import launch  # noqa: E402
from flm_dist.config import load_job  # noqa: E402
from flm_dist.data.convert import convert  # noqa: E402
from flm_dist.data.hashing import (  # noqa: E402
    HashSpec,  # noqa: E402
    identity_keys,
    prehash_ids,
)
from flm_dist.export import export, feature_inputs  # noqa: E402
from flm_dist.metrics import ranking_rows  # noqa: E402
from flm_dist.model import table_sizes  # noqa: E402
from flm_dist.payoff import compare  # noqa: E402
from flm_dist.storage import Store  # noqa: E402

SHARED = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")
JOBS = os.path.join(os.path.dirname(__file__), "..", "jobs")
OUT = os.path.join(os.path.dirname(__file__), "..", "docs", "results")
BOOT = 500  # bootstrap resamples
# the co-occurrence baselines' sparse products (torch's CSR matmul works; it warns it is beta)
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")

# Per dataset, only what a user sets: table sizes (<= 5% of IDs sharing a row), batch
# sizes and epochs (pretraining, fine-tuning at most); paths are added below.
SIZES = {
    "ml": {"model.user_rows": 16384, "model.item_rows": 200_000},
    "lastfm": {"model.user_rows": 32768, "model.item_rows": 100_000},
    "toys": {"model.user_rows": 400_000, "model.item_rows": 250_000},
}
BATCH = {"ml": (1024, 1024), "lastfm": (1024, 1024), "toys": (2048, 1024)}
EPOCHS = {"ml": (20, 10), "lastfm": (20, 10), "toys": (10, 10)}
GENRES = "[{name: genres, side: item, kind: multi, max_len: 8}]"
RATINGS = {"ml": os.path.join(SHARED, "ml-latest-small")}  # the label-scarcity protocols: name -> MovieLens folder
KNN_USERS = 20_000  # the implicit user kNN baseline runs up to this many users


SOURCES = {"lastfm": "LastFM.txt", "toys": "Toys_and_Games.txt"}  # relative to ../shared/data


def settings_for(name: str, path: str) -> dict:
    """Register a file the harness has no settings for (`--data NAME=PATH`), as a user
    would set it up: tables of 20 rows per distinct ID, rounded up to a power of two
    (about 5% of IDs sharing a row, what the sizes above give).
    - A ranking file in LastFM.txt's format: Toys' batch sizes and epochs, as such a file
      is most likely another Amazon 5-core log.
    - A MovieLens folder (`read_movielens`): ml-latest-small's batch sizes and epochs.
    Either way the sequence protocol's fine-tune takes batches of 256 under 5,000 users,
    LastFM's reason (enough steps an epoch)."""
    if name in SIZES or name.endswith("-seq") or not name.replace("_", "").isalnum():
        raise SystemExit(f"--data {name}={path}: NAME must be a new word of letters, digits and _ (not {sorted(SIZES)}, not ending in -seq)")
    if os.path.isdir(path):
        u, i, *_ = read_movielens(path)
        users, items = set(np.unique(u).tolist()), set(np.unique(i).tolist())
        RATINGS[name] = path
        BATCH[name], EPOCHS[name] = BATCH["ml"], EPOCHS["ml"]
    else:
        users, items = set(), set()
        with open(path) as f:
            for n, line in enumerate(f, 1):
                ids = line.split()
                if len(ids) < 2:  # skipped by `flm-dist data convert` too: a blank line, a user without items
                    continue
                if not all(t.isdigit() for t in ids):
                    raise SystemExit(f"{path}, line {n}: expected `user_id item_id item_id ...` (positive integers), got {line.strip()[:80]!r}")
                users.add(ids[0])
                items.update(ids[1:])
        SOURCES[name] = path
        BATCH[name], EPOCHS[name] = BATCH["toys"], EPOCHS["toys"]

    def rows(n: int) -> int:
        return max(1024, 1 << (20 * n - 1).bit_length())

    SIZES[name] = {"model.user_rows": rows(len(users)), "model.item_rows": rows(len(items))}
    SEQ_SIZES[name] = {"model.user_rows": 1024, "model.item_rows": rows(len(items)), **({"data.batch_size": 256} if len(users) < 5000 else {})}
    SEQ_EPOCHS[name] = SEQ_EPOCHS["toys"]
    return {"users": len(users), "items": len(items), "sizes": SIZES[name], "sequence_sizes": SEQ_SIZES[name]}


def _source(file: str) -> str:
    src = os.path.join(SHARED, file)  # an absolute path (--data) stays as it is
    if not os.path.exists(src):
        raise SystemExit(f"{src} not found: the ranking protocols read it (../shared/data, or --data NAME=PATH)")
    return src


def _job(file: str, dataset: str, work: str, name: str, epochs: int, **paths) -> object:
    batch = BATCH[dataset][0 if file == "pretrain.yaml" else 1]
    sets = {**SIZES[dataset], "data.batch_size": batch, "train.epochs": epochs, "run.storage": f"{work}/runs", "run.name": name, **paths}
    return load_job(os.path.join(JOBS, file), [f"{k}={v}" for k, v in sets.items()])


def _write(table: pa.Table, folder: str, files: int = 4) -> None:
    os.makedirs(folder, exist_ok=True)
    bounds = np.linspace(0, table.num_rows, files + 1).astype(int)
    for k in range(files):
        pq.write_table(table.slice(bounds[k], bounds[k + 1] - bounds[k]), f"{folder}/part-{k}.parquet", row_group_size=16384)


# ------------------------------------------------------------------ statistics


def bootstrap(users: np.ndarray, stat, seed: int = 0, n: int = BOOT) -> tuple[float, float, float]:
    """(value, 2.5%, 97.5%) of `stat(w)` over resamples of users: `w` [rows] is how often
    each row is drawn (all of a drawn user's rows, as often as the user is drawn), and
    `stat` weights each row by it: the statistic of the drawn rows, without gathering
    them (an AUC sorts its scores once, not once per resample)."""
    _, inv, counts = np.unique(users, return_inverse=True, return_counts=True)
    rng = np.random.default_rng(seed)
    vals = [stat(np.bincount(rng.integers(0, len(counts), len(counts)), minlength=len(counts))[inv].astype(np.float64)) for _ in range(n)]
    lo, hi = np.percentile(vals, [2.5, 97.5])
    return float(stat(np.ones(len(users)))), float(lo), float(hi)


def weighted_auc(p: np.ndarray, y: np.ndarray):
    """The exact ROC AUC (ties 1/2) of the rows taken w times each, as a function of w:
    for each group of tied scores, its positives' weight times the negatives' weight
    below it plus half the tied negatives'."""
    order = np.argsort(p, kind="mergesort")
    s, pos = p[order], y[order] > 0.5
    group = np.r_[0, np.cumsum(s[1:] != s[:-1])] if len(s) else np.zeros(0, np.int64)
    groups = int(group[-1]) + 1 if len(s) else 0

    def f(w: np.ndarray) -> float:
        ww = w[order]
        wp, wn = np.bincount(group, ww * pos, groups), np.bincount(group, ww * ~pos, groups)
        den = wp.sum() * wn.sum()
        return float((wp * (np.cumsum(wn) - wn + 0.5 * wn)).sum() / den) if den else float("nan")

    return f


def weighted_metrics(task: str, p: np.ndarray, y: np.ndarray) -> dict:
    """The task's metrics of predictions `p` against `y` as functions of row weights."""
    if task == "ctr":
        pc = np.clip(p, 1e-7, 1 - 1e-7)
        loss = -(y * np.log(pc) + (1 - y) * np.log(1 - pc))
        return {"auc": weighted_auc(p, y), "logloss": lambda w: float(w @ loss / w.sum()), "calibration": lambda w: float((w @ p) / (w @ y))}
    err = (p - y) ** 2
    return {"rmse": lambda w: float(np.sqrt(w @ err / w.sum()))}


def pointwise_table(task: str, users: np.ndarray, y: np.ndarray, preds: dict[str, np.ndarray], masks: dict[str, np.ndarray], pairs: list[tuple[str, str]]) -> dict:
    """Per arm and slice: the metrics with bootstrap CIs; per pair (a, b) and slice:
    a - b in the first metric with its CI (paired resamples)."""
    out: dict = {"arms": {}, "differences": {}}
    stats = {(arm, sl): weighted_metrics(task, p[m], y[m]) for arm, p in preds.items() for sl, m in masks.items()}
    for arm in preds:
        out["arms"][arm] = {}
        for sl, m in masks.items():
            out["arms"][arm][sl] = {name: bootstrap(users[m], f) for name, f in stats[(arm, sl)].items()}
            out["arms"][arm][sl]["rows"] = int(m.sum())
    for a, b in pairs:
        key = f"{a} - {b}"
        out["differences"][key] = {}
        for sl, m in masks.items():
            name = next(iter(stats[(a, sl)]))
            fa, fb = stats[(a, sl)][name], stats[(b, sl)][name]
            out["differences"][key][sl] = {name: bootstrap(users[m], lambda w, fa=fa, fb=fb: fa(w) - fb(w))}
    return out


def ranking_table(users: np.ndarray, rows: dict[str, tuple[dict, dict]], pairs: list[tuple[str, str]], k: int = 10) -> dict:
    """Recall@k and NDCG@k per arm (one target per user: per-user means = per-row means)."""
    out: dict = {"arms": {}, "differences": {}}
    for arm, (hit, dcg) in rows.items():
        out["arms"][arm] = {
            "all": {f"recall@{k}": bootstrap(users, lambda w, h=hit[k]: float(w @ h / w.sum())), f"ndcg@{k}": bootstrap(users, lambda w, d=dcg[k]: float(w @ d / w.sum())), "rows": int(len(users))}
        }
    for a, b in pairs:
        dh, dd = rows[a][0][k] - rows[b][0][k], rows[a][1][k] - rows[b][1][k]
        out["differences"][f"{a} - {b}"] = {"all": {
            f"recall@{k}": bootstrap(users, lambda w, dh=dh: float(w @ dh / w.sum())),
            f"ndcg@{k}": bootstrap(users, lambda w, dd=dd: float(w @ dd / w.sum())),
        }}
    return out


# ------------------------------------------------------------------ MovieLens


def read_movielens(src: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict]:
    """A MovieLens folder -> (user, item, ts, rating arrays, {item: genres}). Either
    ratings.csv + movies.csv with headers (ml-latest, ml-latest-small, ml-20m, ml-25m:
    userId,movieId,rating,timestamp and movieId,title,genres) or ratings.dat + movies.dat
    (ml-1m, ml-10m: `::`-separated UserID::MovieID::Rating::Timestamp, MovieID::Title::Genres)."""
    if os.path.isfile(f"{src}/ratings.csv"):
        r = _csv(f"{src}/ratings.csv", ("userId", "movieId", "rating", "timestamp"))
        m = _csv(f"{src}/movies.csv", ("movieId", "genres"))
        u, i, ts = (r.column(c).to_numpy().astype(np.int64) for c in ("userId", "movieId", "timestamp"))
        rating = r.column("rating").to_numpy().astype(np.float64)
        ids, names = m.column("movieId").to_numpy().astype(np.int64), m.column("genres").to_pylist()
    elif os.path.isfile(f"{src}/ratings.dat"):
        rows = _dat(f"{src}/ratings.dat", 4)
        try:
            u, i, ts = (np.array([int(x[k]) for x in rows], np.int64) for k in (0, 1, 3))
            rating = np.array([float(x[2]) for x in rows], np.float64)
        except ValueError as e:
            raise SystemExit(f"{src}/ratings.dat: expected UserID::MovieID::Rating::Timestamp numbers: {e}") from None
        movies = _dat(f"{src}/movies.dat", 3)
        ids, names = np.array([int(x[0]) for x in movies], np.int64), [x[2] for x in movies]
    else:
        raise SystemExit(f"{src}: expected a MovieLens folder with ratings.csv + movies.csv (ml-latest, ml-25m) or ratings.dat + movies.dat (ml-1m, ml-10m)")
    genres = {int(k): ([] if g in ("(no genres listed)", "") else g.split("|")) for k, g in zip(ids, names, strict=True)}
    return u, i, ts, rating, genres


def _csv(path: str, columns: tuple[str, ...]) -> pa.Table:
    if not os.path.isfile(path):
        raise SystemExit(f"{path} not found: a MovieLens folder has ratings.csv and movies.csv side by side")
    t = pacsv.read_csv(path)
    missing = [c for c in columns if c not in t.column_names]
    if missing:
        raise SystemExit(f"{path}: no column {', '.join(missing)} (it has {', '.join(t.column_names)})")
    empty = [c for c in columns if t.column(c).null_count]
    if empty:
        raise SystemExit(f"{path}: column {empty[0]} has {t.column(empty[0]).null_count} empty values")
    text = [c for c in columns if c != "genres" and not (pa.types.is_integer(t.schema.field(c).type) or pa.types.is_floating(t.schema.field(c).type))]
    if text:
        raise SystemExit(f"{path}: column {text[0]} holds {t.schema.field(text[0]).type} values, not numbers")
    return t.select(list(columns))


def _dat(path: str, fields: int) -> list[list[str]]:
    """A `::`-separated MovieLens file (latin-1, as GroupLens ships ml-1m)."""
    if not os.path.isfile(path):
        raise SystemExit(f"{path} not found: a MovieLens folder has ratings.dat and movies.dat side by side")
    rows = []
    with open(path, encoding="latin-1") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            x = line.rstrip("\r\n").split("::")
            if len(x) != fields:
                raise SystemExit(f"{path}, line {n}: expected {fields} `::`-separated fields, got {len(x)}: {line.strip()[:80]!r}")
            rows.append(x)
    return rows


def prepare_ml(work: str, name: str = "ml", labeled_share: float = 0.3, seed: int = 0) -> dict:
    src = RATINGS[name]
    if not os.path.exists(src):
        raise SystemExit(f"{src} not found: the {name} protocol needs it (../shared/data, or --data NAME=FOLDER)")
    u, i, ts, rating, genres = read_movielens(src)
    order = np.lexsort((i, ts, u))  # by user, then time; ties by item id (deterministic)
    u, i, ts, rating = u[order], i[order], ts[order], rating[order]
    starts = np.r_[0, np.flatnonzero(np.diff(u)) + 1]
    n = np.diff(np.r_[starts, len(u)])
    pos = np.arange(len(u)) - np.repeat(starts, n)
    test = pos >= np.ceil(np.repeat(n, n) * 0.8)
    users = np.unique(u)
    labeled = np.isin(u, np.random.default_rng(seed).choice(users, int(round(labeled_share * len(users))), replace=False))
    table = pa.table({
        "user_id": pa.array(u, pa.int64()),
        "item_id": pa.array(i, pa.int64()),
        "ts": pa.array(ts, pa.int64()),
        "rating": pa.array(rating, pa.float32()),
        "label": pa.array((rating >= 4).astype(np.float32)),
        "genres": pa.array([genres.get(int(x), []) for x in i], pa.list_(pa.string())),
    })
    d = f"{work}/{name}"
    _write(table.filter(pa.array(~test)).drop_columns(["rating", "label"]), f"{d}/pretrain")
    _write(table.filter(pa.array(~test & labeled)), f"{d}/labeled")
    _write(table.filter(pa.array(~test)), f"{d}/all_labels")
    _write(table.filter(pa.array(test)), f"{d}/test")
    return {"dir": d, "users": int(len(users)), "items": int(len(np.unique(i))), "rows": int(len(u)), "test_rows": int(test.sum()), "rating_range": [float(rating.min()), float(rating.max())],
            "labeled_users": int(len(np.unique(u[labeled]))), "labeled_train_rows": int((~test & labeled).sum()), "pretrain_rows": int((~test).sum())}


def _surprise(train: pa.Table, test: pa.Table, target: str, scale: tuple[float, float], implicit: pa.Table | None = None) -> dict[str, np.ndarray]:
    """The classical arms on `test`: global mean, BaselineOnly, SVD and, given the
    unlabeled log (`implicit`) of at most KNN_USERS users, a user kNN over
    BaselineOnly's residuals (its dense user-user similarity is users^2 floats)."""
    import pandas as pd
    from surprise import SVD, BaselineOnly, Dataset, Reader

    df = pd.DataFrame({"u": train.column("user_id").to_numpy(), "i": train.column("item_id").to_numpy(), "y": train.column(target).to_numpy()})
    ds = Dataset.load_from_df(df, Reader(rating_scale=(0.0, 1.0) if target == "label" else scale)).build_full_trainset()
    tu, ti = test.column("user_id").to_pylist(), test.column("item_id").to_pylist()
    out = {"global mean": np.full(test.num_rows, float(df["y"].mean()))}
    for name, algo in (("biases (BaselineOnly)", BaselineOnly(verbose=False)), ("SVD", SVD(random_state=0))):
        algo.fit(ds)
        out[name] = np.array([algo.predict(a, b, clip=False).est for a, b in zip(tu, ti, strict=True)], np.float64)
        if name.startswith("biases") and implicit is not None and len(np.unique(implicit.column("user_id").to_numpy())) <= KNN_USERS:
            fitted = np.array([algo.predict(a, b, clip=False).est for a, b in zip(df["u"], df["i"], strict=True)], np.float64)
            out["user kNN (implicit)"] = out[name] + _implicit_knn(implicit, train, df["y"].to_numpy() - fitted, test)
    if target == "label":
        out = {k: np.clip(v, 1e-4, 1 - 1e-4) for k, v in out.items()}  # probabilities, for log loss and calibration
    return out


def _implicit_knn(implicit: pa.Table, train: pa.Table, residual: np.ndarray, test: pa.Table, k: int = 100, shrink: float = 1.0) -> np.ndarray:
    """A test row's correction to a biases model: the similarity-weighted mean residual
    of the user's k nearest labeled users on the same item, shrunk towards 0 (`shrink`
    in units of summed similarity), with users compared by the cosine of their item
    sets in the unlabeled log. Neighbourhood CF with the similarity taken from the
    implicit log: the classical way to carry labels to users who have none, and a
    yardstick for what the log says about a user's ratings."""
    from scipy import sparse

    def index(col: pa.ChunkedArray, keys: np.ndarray) -> np.ndarray:
        return np.searchsorted(keys, col.to_numpy())

    users = np.unique(np.concatenate([implicit.column("user_id").to_numpy(), train.column("user_id").to_numpy(), test.column("user_id").to_numpy()]))
    items = np.unique(np.concatenate([implicit.column("item_id").to_numpy(), train.column("item_id").to_numpy(), test.column("item_id").to_numpy()]))
    shape = (len(users), len(items))
    x = sparse.csr_matrix((np.ones(implicit.num_rows), (index(implicit.column("user_id"), users), index(implicit.column("item_id"), items))), shape=shape)
    x.data[:] = 1.0  # an item set: repeats count once
    x = sparse.csr_matrix(x.multiply(1.0 / np.sqrt(np.maximum(x.sum(1), 1))))
    sim = (x @ x.T).toarray()
    tu, tri = index(train.column("user_id"), users), index(train.column("item_id"), items)
    sim[:, ~np.isin(np.arange(len(users)), tu)] = 0.0  # neighbours: users with labels
    np.fill_diagonal(sim, 0.0)
    top = np.argsort(-sim, axis=1)[:, :k]
    near = np.zeros_like(sim)
    np.put_along_axis(near, top, np.take_along_axis(sim, top, 1), 1)
    near = sparse.csr_matrix(near)
    res = sparse.csr_matrix((residual, (tu, tri)), shape=shape)
    seen = sparse.csr_matrix((np.ones(len(tu)), (tu, tri)), shape=shape)
    eu, ei = index(test.column("user_id"), users), index(test.column("item_id"), items)
    num, den = np.asarray((near @ res)[eu, ei]).ravel(), np.asarray((near @ seen)[eu, ei]).ravel()
    return num / (den + shrink)


def _score_export(store: Store, checkpoint: str, test: pa.Table, out: str) -> np.ndarray:
    """The exported TorchScript scorer on the test rows (IDs and features as a server gets them)."""
    import torch

    manifest = export(store, checkpoint, out, formats="torchscript")
    scorer = torch.jit.load(f"{out}/scorer.pt")
    feats = feature_inputs(test, manifest["features"])
    with torch.no_grad():
        s = scorer(torch.from_numpy(prehash_ids(test.column("user_id")).copy()), torch.from_numpy(prehash_ids(test.column("item_id")).copy()), feats)
    return s.numpy().astype(np.float64)


def run_ml(work: str, quick: bool, dataset: str = "ml") -> dict:
    store = Store()
    info = prepare_ml(work, dataset)
    d = info["dir"]
    pre_epochs, ft_epochs = (3, 3) if quick else EPOCHS[dataset]
    feats = {"data.features": GENRES}
    scale = tuple(info["rating_range"])
    t0 = time.time()
    pre = _job("pretrain.yaml", dataset, work, f"{dataset}-pre", pre_epochs, **feats, **{"data.pretrain": f"{d}/pretrain"})
    r_pre = launch.train(pre, store, fresh=True, progress=False)
    result = {"data": info, "pretrain": _pretrain_report(r_pre, time.time() - t0), "protocols": {}}
    test = pq.read_table(f"{d}/test")
    labeled_users = np.unique(pq.read_table(f"{d}/labeled", columns=["user_id"]).column("user_id").to_numpy())
    users = test.column("user_id").to_numpy()
    masks = {"all": np.ones(len(users), bool), "users without labels": ~np.isin(users, labeled_users)}
    for proto, file, train_dir, target in (("ctr", "finetune_ctr.yaml", "labeled", "label"), ("rating", "finetune_rating.yaml", "labeled", "rating"), ("rating, all labels", "finetune_rating.yaml", "all_labels", "rating")):
        t0 = time.time()
        name = f"{dataset}-" + proto.replace(", ", "-").replace(" ", "-")
        ft = _job(file, dataset, work, name, ft_epochs, **feats, **{"data.train": f"{d}/{train_dir}", "data.eval": f"{d}/test", "init_from": r_pre["checkpoint"], "data.rating_range": f"[{scale[0]}, {scale[1]}]"})
        res = compare(ft, store, out=f"{work}/compare/{name}", progress=False)
        train_table = pq.read_table(f"{d}/{train_dir}")
        preds = {arm: _score_export(store, res["arms"][arm]["checkpoint"], test, f"{work}/export/{name}-{arm}") for arm in ("scratch", "pretrained")}
        preds.update(_surprise(train_table, test, target, scale, implicit=pq.read_table(f"{d}/pretrain")))
        y = test.column(target).to_numpy().astype(np.float64)
        sl = masks if train_dir == "labeled" else {"all": masks["all"]}
        pairs = [("pretrained", b) for b in ("scratch", "biases (BaselineOnly)", "SVD", "user kNN (implicit)") if b in preds]
        table = pointwise_table("ctr" if target == "label" else "rating", users, y, preds, sl, pairs)
        system = {arm: res["arms"][arm]["eval"]["overall"] for arm in ("scratch", "pretrained")}
        table.update({"seconds": round(time.time() - t0, 1), "system_eval_overall": system,
                      "epochs": {arm: {"best": res["arms"][arm]["best"], "curve": res["arms"][arm]["epochs_curve"]} for arm in ("scratch", "pretrained")}})
        result["protocols"][proto] = table
        print(f"{dataset} {proto}: {json.dumps(_brief(table))}", flush=True)
    result["rating_signal"] = rating_signal(store, r_pre["checkpoint"], pq.read_table(f"{d}/all_labels"), f"{work}/export/{dataset}-pre")
    print(f"{dataset} rating signal in the pretrained user vectors: {result['rating_signal']}", flush=True)
    return result


def rating_signal(store: Store, checkpoint: str, labeled: pa.Table, out: str, folds: int = 5) -> dict:
    """How much of a user's rating level the pretrained user vector predicts: the
    cross-validated R^2 of a ridge regression from the vector to the user's mean offset
    from the item means of what they rated (what RMSE needs for a user without labels)."""
    export(store, checkpoint, out, formats="torchscript")
    ukeys, uvec = _vectors(f"{out}/user_vectors.parquet", "user_id")
    u, i, r = (labeled.column(c).to_numpy() for c in ("user_id", "item_id", "rating"))
    items, inv = np.unique(i, return_inverse=True)
    item_mean = np.bincount(inv, r) / np.bincount(inv)
    users, uinv = np.unique(u, return_inverse=True)
    offset = np.bincount(uinv, r - item_mean[inv]) / np.bincount(uinv)
    keys = identity_keys(pa.array(users))
    order = np.argsort(ukeys)
    at = order[np.clip(np.searchsorted(ukeys[order], keys), 0, len(order) - 1)]
    found = ukeys[at] == keys
    x, y = uvec[at[found]].astype(np.float64), offset[found]
    fold = np.random.default_rng(0).integers(0, folds, len(y))
    best = None
    for alpha in (0.1, 1.0, 10.0, 100.0):
        pred = np.zeros_like(y)
        for k in range(folds):
            tr, te = fold != k, fold == k
            xm, ym = x[tr].mean(0), y[tr].mean()
            w = np.linalg.solve((x[tr] - xm).T @ (x[tr] - xm) + alpha * np.eye(x.shape[1]), (x[tr] - xm).T @ (y[tr] - ym))
            pred[te] = (x[te] - xm) @ w + ym
        r2 = 1.0 - float(np.mean((pred - y) ** 2) / np.var(y))
        best = max(best or (r2, alpha), (r2, alpha))
    return {"users": int(found.sum()), "offset_std": round(float(np.std(y)), 4), "cv_r2": round(best[0], 4), "ridge_alpha": best[1], "folds": folds}


# ------------------------------------------------------------------ leave-one-out ranking


def prepare_loo(work: str, name: str, file: str) -> dict:
    store = Store()
    src = _source(file)
    d = f"{work}/{name}"
    shutil.rmtree(d, ignore_errors=True)  # the harness's own work folder: a rerun starts clean
    convert(store, "sequence", src, f"{d}/seq", files=4)
    t = pq.read_table(f"{d}/seq")
    order = np.lexsort((t.column("ts").to_numpy(), t.column("user_id").to_numpy()))
    t = t.take(pa.array(order))
    u = t.column("user_id").to_numpy()
    last = np.r_[u[1:] != u[:-1], True]
    _write(t.filter(pa.array(~last)), f"{d}/train")
    _write(t.filter(pa.array(last)), f"{d}/test")
    return {"dir": d, "users": int(last.sum()), "items": int(len(np.unique(t.column("item_id").to_numpy()))), "train_rows": int((~last).sum()), "test_rows": int(last.sum())}


def _vectors(path: str, column: str) -> tuple[np.ndarray, np.ndarray]:
    t = pq.read_table(path)
    flat = t.column("vector").combine_chunks().flatten().to_numpy(zero_copy_only=False)
    return identity_keys(t.column(column)), np.asarray(flat, np.float32).reshape(t.num_rows, -1)


def _ranking_rows_from_export(store: Store, checkpoint: str, out: str, test: pa.Table, ref, catalog: np.ndarray, ks=(10,)) -> tuple[dict, dict]:
    export(store, checkpoint, out, formats="torchscript")
    ukeys, uvec = _vectors(f"{out}/user_vectors.parquet", "user_id")
    ikeys, ivec = _vectors(f"{out}/item_vectors.parquet", "item_id")
    order = np.argsort(ikeys)
    pos = np.minimum(np.searchsorted(ikeys[order], catalog), len(order) - 1)
    missing = int((ikeys[order][pos] != catalog).sum())
    if missing:  # an item the model never trained on: ranking it with a neighbour's vector would be silently wrong
        raise SystemExit(f"{out}/item_vectors.parquet has no vector for {missing} of the {len(catalog)} catalog items")
    cat = ivec[order][pos]
    users = identity_keys(test.column("user_id"))
    order = np.argsort(ukeys)
    rows = order[np.minimum(np.searchsorted(ukeys[order], users), len(order) - 1)]
    assert np.array_equal(ukeys[rows], users), "every test user of a leave-one-out split has training items"
    targets = identity_keys(test.column("item_id"))
    return ranking_rows(lambda lo, hi: uvec[rows[lo:hi]] @ cat.T, len(users), users, targets, catalog, ref, ks)


def cooccurrence(train: list[np.ndarray], histories: list[np.ndarray], n_items: int, pop: np.ndarray, window: int = 5, recent: int = 50, forward: bool = False):
    """Classical sequence-aware baselines, as item kNN, session kNN and sequential rules
    score: C[i, j] counts how often item j occurs within `window` positions of item i in
    a training sequence (with `forward`, only after it: the next items); a user's score
    for j is the sum, over their last `recent` items i (r = 0 the most recent), of
    C[i, j] / (1 + r), plus a popularity prior (`pop`, per catalog item) of at most
    0.1 / `recent`: it breaks ties, and may reorder two scores closer than that (1/49
    against 1/50). Items are catalog positions; -1 (an item outside the catalog) is
    dropped. The window and weights were fixed before any figure was seen, not tuned.
    Returns scores_for(lo, hi) for `ranking_rows`."""
    import torch

    train = [s[s >= 0] for s in (np.asarray(s, np.int64) for s in train)]
    seq = np.concatenate(train + [np.zeros(0, np.int64)])
    who = np.repeat(np.arange(len(train)), [len(s) for s in train])
    earlier = np.concatenate([seq[:-d][who[d:] == who[:-d]] for d in range(1, window + 1)])
    later = np.concatenate([seq[d:][who[d:] == who[:-d]] for d in range(1, window + 1)])
    if not forward:
        earlier, later = np.r_[earlier, later], np.r_[later, earlier]
    # C as CSR, and each chunk's weights as a sparse [users, items] matrix (at most
    # `recent` items a row): the chunk's scores are weights @ C, a sparse product.
    # Duplicates add up when coalesced; float64 keeps the counts exact.
    c = torch.sparse_coo_tensor(torch.from_numpy(np.stack([earlier, later])), torch.ones(len(later), dtype=torch.float64), (n_items, n_items), check_invariants=True).coalesce().to_sparse_csr()
    recent_items = [h[h >= 0][-recent:] for h in (np.asarray(h, np.int64) for h in histories)]
    # at most a tenth of the smallest non-zero score, 1 / recent
    tie = 0.1 / recent * pop.astype(np.float64) / max(float(pop.max()), 1e-9)

    def scores_for(lo: int, hi: int) -> np.ndarray:
        chunk = recent_items[lo:hi]
        rows = np.repeat(np.arange(len(chunk)), [len(h) for h in chunk])
        weights = np.concatenate([1.0 / np.arange(len(h), 0, -1) for h in chunk] + [np.zeros(0)])
        w = torch.sparse_coo_tensor(torch.from_numpy(np.stack([rows, np.concatenate(chunk + [np.zeros(0, np.int64)])])), torch.from_numpy(weights), (len(chunk), n_items), check_invariants=True)
        return (w.coalesce().to_sparse_csr() @ c).to_dense().numpy() + tie

    return scores_for


def _catalog_positions(raw_items: np.ndarray, catalog: np.ndarray) -> np.ndarray:
    """Raw item IDs -> positions in the sorted catalog of identity keys (-1: not in it)."""
    keys = identity_keys(pa.array(raw_items))
    pos = np.minimum(np.searchsorted(catalog, keys), max(len(catalog) - 1, 0))
    return np.where(catalog[pos] == keys, pos, -1) if len(catalog) else np.full(len(keys), -1)


def run_loo(work: str, name: str, file: str, quick: bool) -> dict:
    store = Store()
    info = prepare_loo(work, name, file)
    d = info["dir"]
    pre_epochs, ft_epochs = (2, 2) if quick else EPOCHS[name]
    t0 = time.time()
    pre = _job("pretrain.yaml", name, work, f"{name}-pre", pre_epochs, **{"data.pretrain": f"{d}/train"})
    r_pre = launch.train(pre, store, fresh=True, progress=False)
    result = {"data": info, "pretrain": _pretrain_report(r_pre, time.time() - t0)}
    t0 = time.time()
    ft = _job("finetune_retrieval.yaml", name, work, f"{name}-ft", ft_epochs, **{"data.train": f"{d}/train", "data.eval": f"{d}/test", "init_from": r_pre["checkpoint"]})
    res = compare(ft, store, out=f"{work}/compare/{name}", progress=False)
    hs = HashSpec.build(table_sizes(ft.model, ft.data.features), ft.model.hash_seed)
    _, plans, specs = launch.plan_datasets(ft, store, hs, ft.data.train, ft.data.eval, "retrieval", validate=True)
    ref = launch.training_reference(store, plans["train"], specs["known"], "retrieval")
    catalog = ref.catalog["item_key"]
    test = pq.read_table(f"{d}/test")
    rows = {arm: _ranking_rows_from_export(store, res["arms"][arm]["checkpoint"], f"{work}/export/{name}-{arm}", test, ref, catalog) for arm in ("scratch", "pretrained")}
    pop = np.log1p(ref.item_counts[np.searchsorted(ref.items, catalog)]).astype(np.float32)
    users = identity_keys(test.column("user_id"))
    rows["most popular"] = ranking_rows(lambda lo, hi: np.broadcast_to(pop, (hi - lo, len(pop))).copy(), len(users), users, identity_keys(test.column("item_id")), catalog, ref, (10,))
    # co-occurrence fitted on the same training file, each user's training items in time order
    train = pq.read_table(f"{d}/train")
    order = np.lexsort((train.column("ts").to_numpy(), train.column("user_id").to_numpy()))
    tu = train.column("user_id").to_numpy()[order]
    ti = _catalog_positions(train.column("item_id").to_numpy()[order], catalog)
    starts = np.flatnonzero(np.r_[True, tu[1:] != tu[:-1]])
    seqs = dict(zip(tu[starts].tolist(), np.split(ti, starts[1:]), strict=True))
    histories = [seqs[u] for u in test.column("user_id").to_pylist()]
    for arm, forward in (("co-occurrence", False), ("co-occurrence, next items", True)):
        rows[arm] = ranking_rows(cooccurrence(list(seqs.values()), histories, len(catalog), pop, forward=forward), len(users), users, identity_keys(test.column("item_id")), catalog, ref, (10,))
    table = ranking_table(users, rows, [("pretrained", "scratch"), ("scratch", "most popular"), ("pretrained", "most popular"), ("pretrained", "co-occurrence"), ("pretrained", "co-occurrence, next items")])
    table.update({"seconds": round(time.time() - t0, 1), "system_eval_overall": {arm: res["arms"][arm]["eval"]["overall"] for arm in ("scratch", "pretrained", "most_popular")},
                  "epochs": {arm: {"best": res["arms"][arm]["best"], "curve": res["arms"][arm]["epochs_curve"]} for arm in ("scratch", "pretrained")}})
    result["protocols"] = {"retrieval": table}
    print(f"{name} retrieval: {json.dumps(_brief(table))}", flush=True)
    return result


# ------------------------------------------------------------------ sequences (issue 17)

# LastFM has 1,090 users: batches of 256 give it ~90 steps an epoch (1,024: 23)
SEQ_SIZES = {"lastfm": {"model.user_rows": 1024, "model.item_rows": 100_000, "data.batch_size": 256}, "toys": {"model.user_rows": 1024, "model.item_rows": 250_000}}
SEQ_EPOCHS = {"lastfm": (4, 20), "toys": (3, 20)}
# ml-seq: ml-latest-small's 671 users and 9,066 items, sized as settings_for sizes a new file
SEQ_SIZES["ml"], SEQ_EPOCHS["ml"] = {"model.user_rows": 1024, "model.item_rows": 262_144, "data.batch_size": 256}, SEQ_EPOCHS["toys"]


def prepare_sequences(work: str, name: str, file: str, cold_share: float = 0.1, seed: int = 0) -> dict:
    """The file as per-user sequences (the `flm-dist data sequences` stage), split by
    user: `cold_share` of the users are held out of all training (cold start)."""
    from flm_dist.data.sequences import build_sequences

    store = Store()
    d = f"{work}/{name}-seq"
    shutil.rmtree(d, ignore_errors=True)  # the harness's own work folder: a rerun starts clean
    convert(store, "sequence", _source(file), f"{d}/flat", files=4)
    launch.ensure_ray()
    rep = build_sequences(store, f"{d}/flat", f"{d}/all", files=4)
    t = pq.read_table(f"{d}/all")
    users = t.column("user_id").to_numpy()
    cold = np.random.default_rng(seed).random(len(users)) < cold_share
    _write(t.filter(pa.array(~cold)), f"{d}/warm")
    _write(t.filter(pa.array(cold)), f"{d}/cold")
    return {"dir": d, "users": int(len(users)), "cold_users": int(cold.sum()), "events": rep["events"], "sequences_stage_s": rep["seconds"]}


def _seq_job(file: str, name: str, work: str, run: str, epochs: int, **paths):
    sets = {**SEQ_SIZES[name], "train.epochs": epochs, "run.storage": f"{work}/runs", "run.name": run, **paths}
    return load_job(os.path.join(JOBS, file), [f"{k}={v}" for k, v in sets.items()])


def _seq_examples(table: pa.Table) -> tuple[np.ndarray, list[list[int]], np.ndarray]:
    """Leave-one-out examples of sequence rows: (user IDs, each user's earlier items, the last item)."""
    users = table.column("user_id").to_numpy()
    items = table.column("item_id").to_pylist()
    return users, [s[:-1] for s in items], np.array([s[-1] for s in items], np.int64)


def _seq_rows(out: str, users: np.ndarray, histories: list[list[int]], targets: np.ndarray, catalog: np.ndarray, ref, ks=(10,)) -> dict[str, tuple[dict, dict]]:
    """Per-row expected hits from an export, ranked over `catalog`: "served", what the
    server's /recommend ranks (user vectors from the scorer with each user's history,
    item vectors from item_vectors.parquet, plus the export's transition counts), and
    "model", the vectors alone."""
    import torch

    from flm_dist.transitions import Transitions

    scorer = torch.jit.load(f"{out}/scorer.pt")
    ikeys, ivec = _vectors(f"{out}/item_vectors.parquet", "item_id")
    order = np.argsort(ikeys)
    at = order[np.minimum(np.searchsorted(ikeys[order], catalog), len(order) - 1)]
    if (missing := int((ikeys[at] != catalog).sum())):  # ranking it with a neighbour's vector would be silently wrong
        raise SystemExit(f"{out}/item_vectors.parquet has no vector for {missing} of the {len(catalog)} catalog items")
    cat = torch.from_numpy(ivec[at])
    # the catalog's items as the export's inputs take them (prehash), for the transition counts
    inputs = prehash_ids(pq.read_table(f"{out}/item_vectors.parquet", columns=["item_id"]).column("item_id"))[at]
    width = max(1, max(len(h) for h in histories))
    hist = np.zeros((len(users), width), np.int64)
    for i, h in enumerate(histories):
        hist[i, : len(h)] = h
    hist, lens = torch.from_numpy(hist), torch.tensor([len(h) for h in histories], dtype=torch.int64)
    with torch.no_grad():
        uvec = torch.cat([
            scorer.user_vectors(torch.from_numpy(users[i : i + 2048].copy()), {"history": hist[i : i + 2048], "history__len": lens[i : i + 2048]})
            for i in range(0, len(users), 2048)
        ])
    with open(f"{out}/manifest.json") as f:
        tr = json.load(f).get("transitions")
    trans = Transitions(pq.read_table(f"{out}/{tr['file']}"), inputs, tr["recent"], tr["weight"]) if tr else None

    def served(lo: int, hi: int) -> np.ndarray:
        cos = uvec[lo:hi] @ cat.T
        return (trans.blend(cos, hist[lo:hi], lens[lo:hi]) if trans is not None else cos).numpy()

    ukeys, tkeys = identity_keys(pa.array(users)), identity_keys(pa.array(targets))
    return {
        "served": ranking_rows(served, len(users), ukeys, tkeys, catalog, ref, ks),
        "model": ranking_rows(lambda lo, hi: (uvec[lo:hi] @ cat.T).numpy(), len(users), ukeys, tkeys, catalog, ref, ks),
    }


def _history_reference(users: np.ndarray, histories: list[list[int]], base) -> object:
    """A reference whose "training items" are each user's history (for users new to the model)."""
    from flm_dist.data.reference import Reference

    pu = np.concatenate([np.full(len(h), u) for u, h in zip(users, histories, strict=True)]) if users.size else np.zeros(0, np.int64)
    pi = np.concatenate([np.asarray(h, np.int64) for h in histories]) if users.size else np.zeros(0, np.int64)
    pairs = np.unique(np.stack([identity_keys(pa.array(pu)), identity_keys(pa.array(pi))], axis=1), axis=0)
    return Reference(users=np.unique(pairs[:, 0]), items=base.items, item_counts=base.item_counts, catalog=base.catalog, pair_users=pairs[:, 0].copy(), pair_items=pairs[:, 1].copy())


def _fit_sasrec(warm: tuple, catalog: np.ndarray, quick: bool) -> tuple:
    """A plain SASRec (bench/sasrec.py) on what the sequence model trains on: each warm
    user's events but the last (the test), with the second-to-last for its early
    stopping."""
    _, histories, targets = warm
    sequences = [_catalog_positions(np.append(np.asarray(h, np.int64), t), catalog) for h, t in zip(histories, targets, strict=True)]
    cfg = sasrec.SASRecConfig(epochs=2) if quick else sasrec.SASRecConfig()
    return sasrec.fit([s[s >= 0] + 1 for s in sequences], len(catalog), cfg)


def run_seq(work: str, name: str, file: str, quick: bool, with_sasrec: bool = False) -> dict:
    store = Store()
    info = prepare_sequences(work, name, file)
    d = info["dir"]
    pre_epochs, ft_epochs = (1, 2) if quick else SEQ_EPOCHS[name]
    t0 = time.time()
    pre = _seq_job("pretrain_sequence.yaml", name, work, f"{name}-seq-pre", pre_epochs, **{"data.pretrain": f"{d}/warm"})
    r_pre = launch.train(pre, store, fresh=True, progress=False)
    result = {"data": info, "pretrain": _pretrain_report(r_pre, time.time() - t0)}
    t0 = time.time()
    ft = _seq_job("finetune_retrieval_sequence.yaml", name, work, f"{name}-seq-ft", ft_epochs, **{"data.train": f"{d}/warm", "init_from": r_pre["checkpoint"]})
    res = compare(ft, store, out=f"{work}/compare/{name}-seq")
    hs = HashSpec.build(table_sizes(ft.model, ft.data.features), ft.model.hash_seed)
    _, plans, specs = launch.plan_datasets(ft, store, hs, ft.data.train, None, "retrieval", validate=True)
    ref = launch.training_reference(store, plans["train"], specs["known"], "retrieval")
    catalog = ref.catalog["item_key"]
    pop = np.log1p(ref.item_counts[np.searchsorted(ref.items, catalog)]).astype(np.float32)
    groups = {"warm users": _seq_examples(pq.read_table(f"{d}/warm")), "cold users (never trained on)": _seq_examples(pq.read_table(f"{d}/cold"))}
    # co-occurrence fitted on what the models train on: warm users' events before the
    # validation (second-to-last) one
    fit = [_catalog_positions(np.asarray(h[:-1], np.int64), catalog) for h in groups["warm users"][1]]
    reference_model = _fit_sasrec(groups["warm users"], catalog, quick) if with_sasrec else None
    for arm in ("scratch", "pretrained"):
        export(store, res["arms"][arm]["checkpoint"], f"{work}/export/{name}-seq-{arm}", formats="torchscript")
    tables = {}
    for group, (users, histories, targets) in groups.items():
        gref = ref if group == "warm users" else _history_reference(users, histories, ref)
        rows = {}
        for arm in ("scratch", "pretrained"):
            got = _seq_rows(f"{work}/export/{name}-seq-{arm}", users, histories, targets, catalog, gref)
            rows[arm], rows[f"{arm}, model only"] = got["served"], got["model"]
        ukeys = identity_keys(pa.array(users))
        rows["most popular"] = ranking_rows(lambda lo, hi: np.broadcast_to(pop, (hi - lo, len(pop))).copy(), len(users), ukeys, identity_keys(pa.array(targets)), catalog, gref, (10,))
        positions = [_catalog_positions(np.asarray(h, np.int64), catalog) for h in histories]
        for arm, forward in (("co-occurrence", False), ("co-occurrence, next items", True)):
            rows[arm] = ranking_rows(cooccurrence(fit, positions, len(catalog), pop, forward=forward), len(users), ukeys, identity_keys(pa.array(targets)), catalog, gref, (10,))
        pairs = [("pretrained", "scratch"), ("pretrained", "most popular"), ("scratch", "most popular"), ("pretrained", "co-occurrence"), ("pretrained", "co-occurrence, next items"),
                 ("pretrained, model only", "scratch, model only"), ("pretrained", "pretrained, model only")]
        if reference_model is not None:
            indices = [p[p >= 0] + 1 for p in positions]  # SASRec's item indices: catalog positions + 1
            rows["SASRec"] = ranking_rows(sasrec.scores_for(reference_model[0], indices), len(users), ukeys, identity_keys(pa.array(targets)), catalog, gref, (10,))
            pairs.append(("pretrained", "SASRec"))
        tables[group] = ranking_table(ukeys, rows, pairs)
    merged = {"arms": {}, "differences": {}}
    for group, t in tables.items():
        for arm, m in t["arms"].items():
            merged["arms"].setdefault(arm, {})[group] = m["all"]
        for key, m in t["differences"].items():
            merged["differences"].setdefault(key, {})[group] = m["all"]
    merged.update({"seconds": round(time.time() - t0, 1), "system_eval_overall": {arm: res["arms"][arm]["eval"]["overall"] for arm in ("scratch", "pretrained")},
                   "epochs": {arm: {"best": res["arms"][arm]["best"], "curve": res["arms"][arm]["epochs_curve"]} for arm in ("scratch", "pretrained")}})
    for arm in ("scratch", "pretrained"):  # the blend weight each arm's export fitted on its validation events
        with open(f"{work}/export/{name}-seq-{arm}/manifest.json") as f:
            tr = json.load(f).get("transitions") or {}
        merged.setdefault("transitions", {})[arm] = {k: tr.get(k) for k in ("weight", "window", "keep", "recent", "pairs", "fit", "seconds")}
    if reference_model is not None:
        merged["sasrec"] = reference_model[1]
    result["protocols"] = {"retrieval, sequence model": merged}
    print(f"{name} sequence: {json.dumps(_brief(merged))}", flush=True)
    return result


# ------------------------------------------------------------------ report


def _pretrain_report(r: dict, seconds: float) -> dict:
    """A pretraining run for quality.json: its checkpoint, time, speed, best epoch and
    validation curve (pretraining validates by full ranking of held-out events: where
    it peaked, and whether it overfitted)."""
    m = r["metrics"]
    curve = [{k: c[k] for k in ("epoch", "loss", "valid_recall@10", "valid_ndcg@10") if k in c} for c in m.get("epochs_curve", [])]
    return {"checkpoint": r["checkpoint"], "seconds": round(seconds, 1), "rows_per_s": m["rows_per_s"], "best": m.get("best"), "curve": curve}


def _brief(table: dict) -> dict:
    return {arm: {sl: {k: round(v[0], 4) for k, v in m.items() if isinstance(v, tuple)} for sl, m in slices.items()} for arm, slices in table["arms"].items()}


def _ci(v: tuple) -> str:
    return f"{v[0]:.4f} [{v[1]:.4f}, {v[2]:.4f}]"


def _targets(results: dict) -> list[tuple[str, bool, str]]:
    """Issue 16's bars, checked against the measured values (point estimates)."""
    out = []
    for name, res in results.items():
        if name not in RATINGS:
            continue
        ml = res.get("protocols", {})
        if "ctr" in ml:
            a = ml["ctr"]["arms"]
            pre, scr, bias = a["pretrained"], a["scratch"], a["biases (BaselineOnly)"]
            u = "users without labels"
            out.append((f"{name} ctr: pretrained AUC (users without labels) >= scratch + 0.03", pre[u]["auc"][0] >= scr[u]["auc"][0] + 0.03, f"{pre[u]['auc'][0]:.4f} vs {scr[u]['auc'][0]:.4f} + 0.03"))
            out.append((f"{name} ctr: pretrained AUC (users without labels) >= biases + 0.02", pre[u]["auc"][0] >= bias[u]["auc"][0] + 0.02, f"{pre[u]['auc'][0]:.4f} vs {bias[u]['auc'][0]:.4f} + 0.02"))
            out.append((f"{name} ctr: pretrained overall AUC >= scratch", pre["all"]["auc"][0] >= scr["all"]["auc"][0], f"{pre['all']['auc'][0]:.4f} vs {scr['all']['auc'][0]:.4f}"))
            out.append((f"{name} ctr: pretrained overall log loss <= scratch", pre["all"]["logloss"][0] <= scr["all"]["logloss"][0], f"{pre['all']['logloss'][0]:.4f} vs {scr['all']['logloss'][0]:.4f}"))
            cal = pre["all"]["calibration"][0]
            out.append((f"{name} ctr: pretrained calibration within 0.9-1.1", 0.9 <= cal <= 1.1, f"{cal:.3f}"))
        if "rating" in ml:
            a = ml["rating"]["arms"]
            u = "users without labels"
            p, s = a["pretrained"][u]["rmse"][0], a["scratch"][u]["rmse"][0]
            out.append((f"{name} rating: pretrained RMSE (users without labels) <= scratch - 0.03", p <= s - 0.03, f"{p:.4f} vs {s:.4f} - 0.03"))
        if "rating, all labels" in ml:
            a = ml["rating, all labels"]["arms"]
            p, svd = a["pretrained"]["all"]["rmse"][0], a["SVD"]["all"]["rmse"][0]
            out.append((f"{name} rating, all labels: pretrained RMSE <= SVD", p <= svd, f"{p:.4f} vs {svd:.4f}"))
    for name, res in results.items():
        if "retrieval" in res.get("protocols", {}):
            a = res["protocols"]["retrieval"]["arms"]
            for m in ("recall@10", "ndcg@10"):
                p, s, mp = a["pretrained"]["all"][m][0], a["scratch"]["all"][m][0], a["most popular"]["all"][m][0]
                out.append((f"{name}: pretrained >= scratch >= most popular ({m})", p >= s >= mp, f"{p:.4f} / {s:.4f} / {mp:.4f}"))
    issue17 = {"lastfm-seq": {"recall@10": 0.0743}, "toys-seq": {"recall@10": 0.070, "ndcg@10": 0.038}}
    for name, res in results.items():
        if "retrieval, sequence model" not in res.get("protocols", {}):
            continue
        bars = issue17.get(name, {})
        a = res["protocols"]["retrieval, sequence model"]["arms"]
        w, c = "warm users", "cold users (never trained on)"
        for m, bar in bars.items():
            p = a["pretrained"][w][m][0]
            out.append((f"{name} (issue 17): pretrained {m} (warm users) >= {bar}", p >= bar, f"{p:.4f}"))
        for m in ("recall@10", "ndcg@10"):
            p, s = a["pretrained"][w][m][0], a["scratch"][w][m][0]
            out.append((f"{name}: pretrained >= scratch ({m}, warm users)", p >= s, f"{p:.4f} vs {s:.4f}"))
        p, mp = a["pretrained"][c]["recall@10"][0], a["most popular"][c]["recall@10"][0]
        out.append((f"{name}: cold users (history only) beat most popular (recall@10)", p > mp, f"{p:.4f} vs {mp:.4f}"))
    return out


def markdown(results: dict) -> str:
    lines = []
    for name, res in results.items():
        if name.startswith("_"):
            continue
        lines += [f"### {name}", "", f"Data: `{json.dumps(res['data'])}`; pretraining {res['pretrain']['seconds']} s.", ""]
        for proto, t in res["protocols"].items():
            slices = list(next(iter(t["arms"].values())))
            metrics = [k for k in next(iter(t["arms"].values()))[slices[0]] if k != "rows"]
            lines += [f"**{proto}** ({t['seconds']} s; rows: " + ", ".join(f"{sl} {next(iter(t['arms'].values()))[sl]['rows']:,}" for sl in slices) + ")", ""]
            head = ["arm"] + [f"{m} ({sl})" for sl in slices for m in metrics]
            lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
            for arm, m in t["arms"].items():
                lines.append("| " + " | ".join([arm] + [_ci(m[sl][k]) if k in m[sl] else "—" for sl in slices for k in metrics]) + " |")
            lines += [""]
            for key, d in t["differences"].items():
                lines.append(f"- {key}: " + "; ".join(f"{sl} {k} {_ci(v)}" for sl, mm in d.items() for k, v in mm.items()))
            best = {arm: (e["best"] or {}).get("epoch") for arm, e in t.get("epochs", {}).items()}
            sys_eval = {arm: {k: round(v, 4) for k, v in m.items() if k in ("auc", "rmse", "recall@10", "ndcg@10")} for arm, m in t.get("system_eval_overall", {}).items()}
            lines += [f"- best epoch by the validation criterion (0-based): {best}; the system's own evaluation (the model alone), overall: {sys_eval}"]
            if "transitions" in t:
                lines += ["- transition counts blended into what the export serves (`flm_dist/transitions.py`): weight fitted on each arm's validation events "
                          + ", ".join(f"{arm} {v['weight']} ({v['pairs']:,} pairs, {v['seconds']} s)" for arm, v in t["transitions"].items())]
            if "sasrec" in t:
                lines += [f"- SASRec (`bench/sasrec.py`): best epoch {t['sasrec']['best_epoch']} of {t['sasrec']['epochs']}, {t['sasrec']['seconds']} s"]
            lines += [""]
    for name, res in results.items():
        sig = res.get("rating_signal") if isinstance(res, dict) else None
        if not sig:
            continue
        label = "MovieLens" if name == "ml" else f"`{name}`"
        lines += [f"{label}: the pretrained user vector predicts {sig['cv_r2']:.3f} (cross-validated R², ridge) of the {sig['users']} users' "
                  f"rating level (mean offset from the item means, std {sig['offset_std']:.3f}): the implicit log carries little of what RMSE "
                  "needs for a user without labels."]
        arms = res["protocols"].get("rating", {}).get("arms", {})
        if "user kNN (implicit)" in arms:
            rmse = {a: arms[a]["users without labels"]["rmse"][0] for a in ("pretrained", "scratch", "user kNN (implicit)", "biases (BaselineOnly)")}
            lines[-1] += (f" What a classical method gets from the same log: a user kNN over BaselineOnly's residuals, with users compared by "
                          f"their item sets in the pretraining log, reaches RMSE {rmse['user kNN (implicit)']:.4f} for users without labels "
                          f"(BaselineOnly {rmse['biases (BaselineOnly)']:.4f}; FLM scratch {rmse['scratch']:.4f}, pretrained {rmse['pretrained']:.4f}).")
        lines += [""]
    lines += ["**Targets (issues 16 and 17)**", ""]
    for what, ok, detail in _targets(results):
        lines.append(f"- {'met' if ok else 'MISSED'}: {what} ({detail})")
    return "\n".join(lines)


DEFAULT = ["ml", "lastfm", "toys", "lastfm-seq", "toys-seq"]  # what a run without --only or --data runs


def protocols_for(args) -> dict:
    """Protocol name -> the call that runs it: the five above, `ml-seq` (ml-latest-small's
    ratings read as per-user sequences), and two per --data file or folder."""
    for spec in args.data:
        name, sep, path = spec.partition("=")
        if not sep or not os.path.exists(path):
            raise SystemExit(f"--data {spec}: expected NAME=PATH to a file in LastFM.txt's format or a MovieLens folder")
        print(f"--data {name}: {json.dumps(settings_for(name, os.path.abspath(path)))}", flush=True)
    protocols = {name: lambda name=name: run_ml(args.work, args.quick, name) for name in RATINGS}
    for name, file in SOURCES.items():  # every FLM ID protocol, then every sequence one
        protocols[name] = lambda name=name, file=file: run_loo(args.work, name, file, args.quick)
    for name, file in SOURCES.items():
        protocols[f"{name}-seq"] = lambda name=name, file=file: run_seq(args.work, name, file, args.quick, args.sasrec)
    for name in RATINGS:
        protocols[f"{name}-seq"] = lambda name=name: run_seq(args.work, name, ratings_as_sequences(RATINGS[name], f"{args.work}/{name}.txt"), args.quick, args.sasrec)
    return protocols


def ratings_as_sequences(src: str, out: str) -> str:
    """A MovieLens folder as a file in LastFM.txt's format: each user's rated items in
    time order (ties by item ID), every rating an event. Returns `out`."""
    u, i, ts, _, _ = read_movielens(src)
    order = np.lexsort((i, ts, u))
    u, i = u[order], i[order]
    cut = np.flatnonzero(np.diff(u)) + 1
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        for user, items in zip(np.split(u, cut), np.split(i, cut), strict=True):
            f.write(f"{user[0]} " + " ".join(map(str, items.tolist())) + "\n")
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default=None, help="protocols to run (default: the five of DEFAULT, or those of --data)")
    ap.add_argument("--data", action="append", default=[], metavar="NAME=PATH", help="a file in LastFM.txt's format or a MovieLens folder: adds protocols NAME and NAME-seq")
    ap.add_argument("--quick", action="store_true", help="a few epochs: checks the harness, not the model")
    ap.add_argument("--work", default="/tmp/flm-quality")
    ap.add_argument("--out", default=None, help="default docs/results/quality.json; with --data, WORK/quality.json")
    ap.add_argument("--no-md", action="store_true", help="do not rewrite docs/RESULTS.md")
    ap.add_argument("--merge", action="store_true", help="keep the protocols of --out that this run does not redo")
    ap.add_argument("--sasrec", action="store_true", help="the sequence protocols also fit a plain SASRec (bench/sasrec.py): minutes more on 2 cores")
    args = ap.parse_args()
    protocols = protocols_for(args)
    added = [spec.partition("=")[0] for spec in args.data]
    only = args.only.split(",") if args.only else [p for a in added for p in (a, f"{a}-seq")] or DEFAULT
    unknown = [p for p in only if p not in protocols]
    if unknown:
        raise SystemExit(f"--only {args.only}: no protocol {', '.join(unknown)}; the protocols are {', '.join(protocols)}")
    args.out = args.out or (os.path.join(args.work, "quality.json") if args.data else os.path.join(OUT, "quality.json"))
    if any(p in RATINGS for p in only):
        try:
            import surprise  # noqa: F401
        except ImportError:
            raise SystemExit("the ml protocol's baselines need scikit-surprise: `make quality`, or pip install -e '.[quality]' -c constraints.txt") from None
    info = common.machine_info()
    t0 = time.time()
    results: dict = {}
    for name, run in protocols.items():
        if name in only:
            t = time.time()
            results[name] = run()
            results[name]["wall_s"] = round(time.time() - t, 1)
    if args.merge and os.path.exists(args.out):  # keep the other protocols of an earlier run
        with open(args.out) as f:
            earlier = json.load(f)
        earlier.pop("_meta", None)
        results = {**{k: results.get(k, v) for k, v in earlier.items()}, **results}  # in the earlier run's order
    # runs before wall_s was recorded: pretraining + protocol seconds (data preparation not counted)
    wall = {k: v.get("wall_s") or round(v["pretrain"]["seconds"] + sum(p["seconds"] for p in v["protocols"].values()), 1) for k, v in results.items()}
    results["_meta"] = {"seconds": round(time.time() - t0, 1), "wall_s": wall, "machine": info, "quick": args.quick, "bootstrap": BOOT}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1, default=str)
    wall = results["_meta"]["wall_s"]
    known = list(wall.values())
    parts = ", ".join(f"{k} {v:.0f} s" for k, v in wall.items())
    body = markdown(results) + f"\n\nWall time on this machine: {sum(known) / 60:.1f} min ({parts}). Raw figures: `{os.path.normpath(args.out)}`."
    print(body)
    if not args.no_md and not args.quick and not args.data:  # docs/RESULTS.md holds the files of ../shared/data
        common.update_benchmarks_md("quality", body, "python bench/quality.py", info, path=os.path.join(os.path.dirname(__file__), "..", "docs", "RESULTS.md"))


if __name__ == "__main__":
    main()
