"""`flm-dist` command line. Knobs live in job files (`--config jobs/X.yaml`, with
repeatable `--set key=value`); the CLI stays small."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from dataclasses import replace

from flm_dist.config import (
    FINETUNE_TASKS,
    ConfigError,
    DemoConfig,
    JobConfig,
    absolute_path,
    load_job,
)
from flm_dist.data.schema import DataError
from flm_dist.storage import EmbeddedS3, StorageError, Store, join

__all__ = ["main"]


def _write_output(path: str | None, obj: dict, store: Store) -> None:
    text = json.dumps(obj, indent=2, sort_keys=True, default=str)
    if not path:
        return
    if "://" in path:
        store.write_bytes(path, text.encode())
    else:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            f.write(text + "\n")


@contextlib.contextmanager
def _storage(job: JobConfig):
    """Yield (job, store); starts the embedded S3 endpoint when the job asks for it."""
    if job.storage.endpoint_url == "embedded":
        with EmbeddedS3() as s3:
            print(f"embedded S3 endpoint (moto) on {s3.url}; its contents last for this command only", flush=True)
            job = replace(job, storage=s3.storage_config(job.storage))
            yield job, Store.from_config(job.storage)
    else:
        yield job, Store.from_config(job.storage)


def _load(args, reads: tuple[str, ...] | None = None) -> JobConfig:
    """The job of --config and --set. `reads`: the sections a command takes from it
    (the rest comes from a checkpoint or the command's flags); a --set outside them
    would be silently unused, so it is refused."""
    for item in args.set or []:
        key = item.split("=", 1)[0].strip()
        if reads is not None and key.split(".", 1)[0] not in reads:
            raise ConfigError(
                f"--set {key}: `flm-dist {args.cmd}` reads only {', '.join(s + '.*' for s in reads)} from a job; "
                f"the rest comes from the checkpoint or this command's flags (see --help)"
            )
    return load_job(args.config, args.set or [])


def cmd_train(args, task_kind: str) -> int:
    from flm_dist import launch

    job = _load(args)
    src = args.config or "<defaults>"
    if task_kind == "pretrain" and job.task != "pretrain":
        raise ConfigError(f"{src}: task is '{job.task}'; `flm-dist pretrain` needs task: pretrain (use `flm-dist finetune`)")
    if task_kind == "finetune" and job.task not in FINETUNE_TASKS:
        raise ConfigError(f"{src}: task is '{job.task}'; `flm-dist finetune` needs task: one of {', '.join(FINETUNE_TASKS)}")
    job.check_runnable(src)
    with _storage(job) as (job, store):
        res = launch.train(job, store, fresh=args.fresh, progress=not args.no_progress, address=args.address, log_steps=args.log_steps)
        print(json.dumps(res, indent=2, default=str))
        _write_output(args.output, res, store)
    return 0


def cmd_evaluate(args) -> int:
    from flm_dist import launch

    job = _load(args, reads=("storage", "scaling"))
    # the scaling keys --set names override the checkpoint's (`launch.evaluation_scaling`)
    named = {item.split("=", 1)[0].strip().removeprefix("scaling.") for item in args.set or [] if item.startswith("scaling.")}
    with _storage(job) as (job, store):
        res = launch.evaluate(args.checkpoint, store, args.data, reference=args.reference, workers=args.workers, address=args.address,
                              scaling={k: getattr(job.scaling, k) for k in named})
        print(json.dumps(res, indent=2, default=str))
        _write_output(args.output, res, store)
    return 0


def cmd_export(args) -> int:
    from flm_dist.export import export

    job = _load(args, reads=("storage",))
    with _storage(job) as (job, store):
        m = export(store, args.checkpoint, args.out, dtype=args.dtype, formats=args.format)
        print(json.dumps({"export": args.out, "task": m["task"], "formats": m["formats"], "files": sorted(m["files"])}, indent=2))
    return 0


def _export_formats(text: str) -> list[str]:
    """`--format torchscript,onnx` -> ["torchscript", "onnx"] (checked before any work)."""
    names = [s.strip() for s in text.split(",") if s.strip()]
    bad = [n for n in names if n not in ("torchscript", "onnx")]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"expected a comma-separated subset of torchscript,onnx, got {text!r}")
    return names


def cmd_serve(args) -> int:
    from flm_dist import serve

    job = _load(args, reads=("storage", "serve"))
    flags = {"max_items": args.max_items, "max_batch_size": args.max_batch_size, "batch_wait_timeout_s": args.batch_wait_timeout_s}
    cfg = serve.check_serve_config(replace(job.serve, **{k: v for k, v in flags.items() if v is not None}), args.config or "<flags>")
    with _storage(job) as (job, store):
        serve.run(args.export, store, cfg, host=args.host, port=args.port, address=args.address)
    return 0


def cmd_synth(args) -> int:
    from flm_dist.data.synth import synth

    job = _load(args, reads=("storage",))
    with _storage(job) as (job, store):
        rep = synth(
            store, args.out, args.rows, args.users, args.items, seed=args.seed, files=args.files,
            labeled_users=args.labeled_users, feature_share=args.feature_share,
        )
        print(json.dumps(rep, indent=2))
    return 0


MAP_NAMES = ("user_id", "item_id", "ts", "label", "rating")  # what --map renames to


def _parse_map(items: list[str] | None) -> dict[str, str]:
    """`--map user_id=uid,item_id=iid` (repeatable) -> {"user_id": "uid", "item_id": "iid"}."""
    out: dict[str, str] = {}
    for item in ",".join(items or []).split(","):
        if not item.strip():
            continue
        key, eq, col = item.partition("=")
        if not eq or not key.strip() or not col.strip():
            raise DataError(f"--map {item!r}: expected NAME=COLUMN, e.g. --map user_id=uid,item_id=movie")
        key = key.strip()
        if key not in MAP_NAMES:
            raise DataError(f"--map {item!r}: {key!r} is not a schema column ({', '.join(MAP_NAMES)}); other columns are kept as features under their own names")
        if key in out:
            raise DataError(f"--map {key}= is given twice ({out[key]!r} and {col.strip()!r})")
        out[key] = col.strip()
    return out


def _positive_int(text: str) -> int:
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {n}")
    return n


def cmd_convert(args) -> int:
    from flm_dist.data.convert import convert

    job = _load(args, reads=("storage",))
    delimiter = {"\\t": "\t", "tab": "\t"}.get(args.delimiter, args.delimiter)
    with _storage(job) as (job, store):
        rep = convert(store, args.format, args.src, args.out, mapping=_parse_map(args.map), delimiter=delimiter, files=args.files)
        skipped = ", ".join(f"{n:,} {why}" for why, n in rep["skipped"].items()) or "none"
        print(f"wrote {rep['rows']:,} rows in {rep['files']} files to {rep['out']} (report: {join(rep['out'], '_convert.json')})")
        print(f"skipped lines: {skipped}")
        print("schema: " + ", ".join(f"{k} {v}" for k, v in rep["schema"].items()))
    return 0


def cmd_sequences(args) -> int:
    from flm_dist import launch
    from flm_dist.data.sequences import build_sequences

    job = _load(args, reads=("storage",))
    with _storage(job) as (job, store):
        launch.ensure_ray(args.address)
        rep = build_sequences(store, args.src, args.out, files=args.files)
        print(f"wrote {rep['users']:,} users' sequences ({rep['events']:,} events) in {rep['files']} files to {rep['out']} "
              f"in {rep['seconds']} s; dropped {rep['dropped_null_keys']:,} rows without a user_id, item_id or ts")
        _write_output(args.json, rep, store)
    return 0


def cmd_inspect(args) -> int:
    from flm_dist.data.inspect import inspect, summary

    job = _load(args)
    rows = {"user": args.user_rows or job.model.user_rows, "item": args.item_rows or job.model.item_rows}
    with _storage(job) as (job, store):
        rep = inspect(store, args.uri, table_rows=rows, plot=args.plot, rating_range=tuple(job.data.rating_range))
        print(summary(rep))
        _write_output(args.json, rep, store)
    return 0


def cmd_compare(args) -> int:
    from flm_dist.payoff import compare, summary_markdown

    job = _load(args)
    with _storage(job) as (job, store):
        res = compare(job, store, out=args.out, progress=not args.no_progress, address=args.address)
        print(summary_markdown(res))
        print(f"report: {res['out']}/summary.md")
    return 0


def cmd_lineage(args) -> int:
    from flm_dist.checkpoint import lineage

    job = _load(args)
    with _storage(job) as (job, store):
        chain = lineage(store, args.uri)
        if args.json:
            print(json.dumps(chain, indent=2))
            return 0
        for depth, node in enumerate(chain):
            pad = "  " * depth + ("<- " if depth else "")
            if "export" in node:
                print(f"{pad}export {node['export']} (task {node['task']}, {node['exported_at']})")
                continue
            d = node["data"]
            print(f"{pad}{node['task']} checkpoint {node['checkpoint']} (run {node['run']}, step {node['step']}, {node['world_size']} workers)")
            print(f"{'  ' * depth}   data {d['uri']}: {d['files']} files, {d['rows']:,} rows, sha256 {str(d['sha256'])[:16]}...")
    return 0


def cmd_store(args) -> int:
    s3 = EmbeddedS3(port=args.port, verbose=args.verbose).start()
    print(f"embedded S3 endpoint on {s3.url} (access key {s3.ACCESS_KEY}, secret {s3.SECRET_KEY}); Ctrl-C stops it", flush=True)
    try:
        s3.wait()
    except KeyboardInterrupt:
        pass
    finally:
        s3.stop()
    return 0


def cmd_demo(args) -> int:
    """Synthetic data -> pretrain (2 workers) -> fine-tune -> evaluate -> export."""
    import time

    from flm_dist import launch
    from flm_dist.data.synth import synth
    from flm_dist.export import export

    job = _load(args)
    demo = job.demo or DemoConfig()
    t_all = time.perf_counter()
    with _storage(job) as (job, store):
        root = demo.data_root
        print(f"[1/5] synthetic data: {demo.rows:,} rows, {demo.users:,} users, {demo.items:,} items -> {root}", flush=True)
        rep = synth(store, root, demo.rows, demo.users, demo.items, seed=demo.seed)
        print(f"      planted model's AUC on the eval split (the ceiling): {rep['ceiling_auc']:.4f}", flush=True)
        name = job.run.name
        pre = replace(
            job,
            task="pretrain",
            init_from="",
            run=replace(job.run, name=f"{name}-pretrain"),
            data=replace(job.data, pretrain=join(root, "pretrain"), eval=""),
        )
        print("[2/5] pretraining (self-supervised, no labels)", flush=True)
        r_pre = launch.train(pre, store, fresh=True, progress=not args.no_progress)
        ft = replace(
            job,
            task=demo.finetune_task,
            init_from=r_pre["checkpoint"],
            run=replace(job.run, name=f"{name}-{demo.finetune_task}"),
            data=replace(job.data, train=join(root, "train"), eval=""),
            train=replace(job.train, epochs=demo.finetune_epochs, recon_weight=0.0, freeze=list(demo.finetune_freeze)),
        )
        print(f"[3/5] fine-tuning task={demo.finetune_task} from {r_pre['checkpoint']}", flush=True)
        r_ft = launch.train(ft, store, fresh=True, progress=not args.no_progress)
        print("[4/5] evaluating on the held-out split", flush=True)
        ev = launch.evaluate(r_ft["checkpoint"], store, join(root, "eval"))
        out = join(job.run.storage, name, "export")
        print(f"[5/5] exporting to {out}", flush=True)
        export(store, r_ft["checkpoint"], out)
        o = ev["overall"]
        summary = {
            "pretrain_checkpoint": r_pre["checkpoint"],
            "finetune_checkpoint": r_ft["checkpoint"],
            "export": out,
            "eval": o,
            "ceiling_auc": rep["ceiling_auc"],
            "pretrain_rows_per_s": r_pre["metrics"]["rows_per_s"],
            "finetune_rows_per_s": r_ft["metrics"]["rows_per_s"],
            "seconds": time.perf_counter() - t_all,
        }
        print("\n==================== flm-dist demo summary ====================")
        print(f"pretrain checkpoint : {r_pre['checkpoint']}")
        print(f"finetune checkpoint : {r_ft['checkpoint']}")
        print(f"export              : {out}")
        if "auc" in o:
            gap = rep["ceiling_auc"] - o["auc"]
            print(f"eval AUC            : {o['auc']:.4f}  (planted ceiling {rep['ceiling_auc']:.4f}, gap {gap:+.4f})")
            print(f"eval logloss        : {o['logloss']:.4f}   calibration {o['calibration']:.3f}   GAUC {o.get('gauc', float('nan')):.4f}")
        else:
            print(f"eval RMSE / MAE     : {o['rmse']:.4f} / {o['mae']:.4f}  (planted noise RMSE {rep['ceiling_rmse']:.4f})")
        print(f"training rows/s     : pretrain {r_pre['metrics']['rows_per_s']:,.0f}, fine-tune {r_ft['metrics']['rows_per_s']:,.0f}")
        print(f"wall time           : {summary['seconds']:.0f} s")
        print("===============================================================")
        _write_output(args.output, summary, store)
    return 0


# Cluster jobs (Ray Jobs API). Exit status: 0 done (or, without following, submitted or
# still running), 1 the job FAILED or was STOPPED, 2 an error to fix (job file, address,
# unknown job id), 3 the Jobs API lost while following (the job may still run).


def cmd_job(args) -> int:
    """submit / status / logs / stop against a running cluster."""
    from flm_dist.submit import Cluster, SubmitError

    handlers = {"submit": _job_submit, "status": _job_status, "logs": _job_logs, "stop": _job_stop}
    try:
        return handlers[args.cmd](Cluster(args.address), args)
    except SubmitError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _job_submit(cluster, args) -> int:
    from pathlib import Path

    from flm_dist.submit import Submission, redact

    sub = Submission(Path(args.job_file), tuple(args.set or ()), Path(args.working_dir) if args.working_dir else None, args.fresh)
    sid, entrypoint = cluster.submit(sub)
    a = f"--address {cluster.address}"
    print(f"submitted {sid} to {cluster.address}\n  entrypoint: {redact(entrypoint)}\n"
          f"  flm-dist status {sid} {a}\n  flm-dist logs {sid} {a} --follow\n  flm-dist stop {sid} {a}", flush=True)
    return 0 if args.no_wait else _job_follow(cluster, sid)


def _job_follow(cluster, sid: str) -> int:
    from flm_dist.submit import SubmitError

    cluster.state(sid)  # an unknown id or an unreachable API: an error to fix (2)
    try:
        st = cluster.follow(sid, lambda chunk: print(chunk, end="", flush=True))
    except KeyboardInterrupt:
        print(f"\ndetached: {sid} keeps running; `flm-dist stop {sid} --address {cluster.address}` stops it", file=sys.stderr)
        return 130
    except SubmitError as e:  # the API went away while the job ran: its fate is unknown, not a failure
        print(f"error: {e}\n{sid} may still be running; `flm-dist status {sid} --address {cluster.address}` says how it stands", file=sys.stderr)
        return 3
    print(st.describe(), file=sys.stderr)
    return 0 if st.status == "SUCCEEDED" else 1


def _job_status(cluster, args) -> int:
    from dataclasses import asdict

    st = cluster.state(args.job_id)
    print(json.dumps(asdict(st), indent=2) if args.json else st.describe())
    return 0 if st.ok else 1


def _job_logs(cluster, args) -> int:
    if args.follow:
        return _job_follow(cluster, args.job_id)
    print(cluster.logs(args.job_id), end="")
    return 0


def _job_stop(cluster, args) -> int:
    st = cluster.stop(args.job_id, timeout_s=args.timeout)
    print(st.describe())
    if not st.terminal:
        print(f"error: {args.job_id} is still {st.status} {args.timeout:.0f} s after the stop request", file=sys.stderr)
        return 1
    return 0


def _common(p: argparse.ArgumentParser, config_required: bool = True) -> None:
    p.add_argument("--config", required=config_required, help="job file (YAML)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a job-file key (repeatable)")


def _data_parsers(data) -> None:
    """`flm-dist data synth | convert | sequences | inspect`."""
    p = data.add_parser("synth", help="write a synthetic interaction log with a planted structure")
    _common(p, config_required=False)
    p.add_argument("--out", required=True)
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--users", type=int, default=50_000)
    p.add_argument("--items", type=int, default=10_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--files", type=int, default=8)
    p.add_argument("--labeled-users", type=float, default=1.0, help="share of users whose rows carry labels in train/")
    p.add_argument("--feature-share", type=float, default=0.9, help="share of latent variance the categorical features explain")

    from flm_dist.data.convert import FORMATS

    p = data.add_parser("convert", help="convert MovieLens / RecBole / sequence / CSV files to interaction-log Parquet")
    _common(p, config_required=False)
    p.add_argument("--format", required=True, choices=FORMATS)
    p.add_argument("src", metavar="IN", help="input file or folder (any URI)")
    p.add_argument("out", metavar="OUT_URI", help="output folder; must hold no data files yet")
    p.add_argument("--map", action="append", metavar="NAME=COLUMN,...", help="csv: columns to rename, e.g. user_id=uid,item_id=movie,ts=time")
    p.add_argument("--delimiter", help="csv: one character (default ','; '\\t' or 'tab' for tabs)")
    p.add_argument("--files", type=int, default=8, help="Parquet parts to write (at least min(files, rows))")

    p = data.add_parser("sequences", help="group an interaction log into per-user sequences ordered by ts (for model.history_len)")
    _common(p, config_required=False)
    p.add_argument("src", metavar="IN", help="interaction log: Parquet file or prefix (any URI)")
    p.add_argument("out", metavar="OUT_URI", help="output folder; must hold no data files yet")
    p.add_argument("--files", type=int, help="output files (default: one per 500k input rows)")
    p.add_argument("--address", help="Ray address (default: RAY_ADDRESS, else a local Ray)")
    p.add_argument("--json", help="write the report as JSON here (any URI)")

    p = data.add_parser("inspect", help="files, rows, schema, distinct IDs, bad rows and hash collisions of a dataset")
    _common(p, config_required=False)
    p.add_argument("uri", metavar="URI", help="Parquet file or prefix")
    p.add_argument("--user-rows", type=_positive_int, help="user table rows for the collision estimate (default: the job's model.user_rows)")
    p.add_argument("--item-rows", type=_positive_int, help="item table rows for the collision estimate (default: the job's model.item_rows)")
    p.add_argument("--plot", help="write item popularity and user activity plots here (PNG, any URI)")
    p.add_argument("--json", help="write the full report as JSON here (any URI)")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="flm-dist", description="Distributed FLM pretraining and fine-tuning on Ray")
    sub = ap.add_subparsers(dest="cmd", required=True)

    for name, help_ in (("pretrain", "self-supervised pretraining (task: pretrain)"), ("finetune", "fine-tune for ctr / rating / retrieval")):
        p = sub.add_parser(name, help=help_)
        _common(p)
        p.add_argument("--output", help="write {checkpoint, metrics} JSON here")
        p.add_argument("--fresh", action="store_true", help="delete the run's checkpoints and start over")
        p.add_argument("--address", help="Ray address (default: RAY_ADDRESS, else a local Ray)")
        p.add_argument("--no-progress", action="store_true")
        p.add_argument("--log-steps", action="store_true", help="print rank 0's step records (loss, rows/s) every train.log_every steps")

    p = sub.add_parser("evaluate", help="evaluate a checkpoint")
    _common(p, config_required=False)
    p.add_argument("--checkpoint", required=True, help="checkpoint, step folder or run folder URI")
    p.add_argument("--data", help="evaluation data URI (default: the job's data.eval)")
    p.add_argument("--workers", type=_positive_int, help="Ray Train workers (default: as trained)")
    p.add_argument("--reference", help="data defining the cold/long-tail/warm slices (default: the checkpoint's training data)")
    p.add_argument("--output", help="write metrics JSON here")
    p.add_argument("--address")

    p = sub.add_parser("export", help="export a checkpoint for serving")
    _common(p, config_required=False)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--out", required=True, help="output folder URI")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "fp16"], help="fp16: tables stored in fp16, arithmetic in fp32")
    p.add_argument("--format", type=_export_formats, default=["torchscript", "onnx"], metavar="torchscript,onnx", help="scorer formats to write (default: both)")

    p = sub.add_parser("serve", help="serve an export over HTTP (Ray Serve): /score, /recommend, /healthz")
    _common(p, config_required=False)
    p.add_argument("export", metavar="EXPORT_URI", help="folder written by `flm-dist export`")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-items", type=int, help="items per /score request and largest k (default: the job's serve.max_items)")
    p.add_argument("--max-batch-size", type=int, help="requests per batch (default: serve.max_batch_size)")
    p.add_argument("--batch-wait-timeout-s", type=float, help="longest wait to fill a batch (default: serve.batch_wait_timeout_s)")
    p.add_argument("--address", help="Ray address (default: RAY_ADDRESS, else a local Ray)")

    p = sub.add_parser("demo", help="the whole pipeline on synthetic data (make demo)")
    _common(p)
    p.add_argument("--output", help="write the summary JSON here")
    p.add_argument("--no-progress", action="store_true")

    _data_parsers(sub.add_parser("data", help="data tools").add_subparsers(dest="data_cmd", required=True))

    p = sub.add_parser("compare", help="fine-tune from scratch and from init_from on the same budget; report the payoff")
    _common(p)
    p.add_argument("--out", help="report folder URI (default: run.storage/run.name-compare)")
    p.add_argument("--address")
    p.add_argument("--no-progress", action="store_true")

    p = sub.add_parser("lineage", help="the chain from an export or checkpoint back to the pretraining data")
    _common(p, config_required=False)
    p.add_argument("uri", help="export folder, checkpoint, step folder or run folder")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("store", help="run the embedded S3 endpoint in the foreground")
    p.add_argument("--port", type=int, default=9000)
    p.add_argument("--verbose", action="store_true")

    address_help = "the cluster's Ray Jobs API, http://HOST:8265 (default: RAY_API_SERVER_ADDRESS, else RAY_ADDRESS, else http://127.0.0.1:8265)"
    p = sub.add_parser("submit", help="run a job file on a Ray cluster through the Ray Jobs API")
    p.add_argument("job_file", help="job file (YAML); it travels with the job")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a job-file key (repeatable)")
    p.add_argument("--address", help=address_help)
    p.add_argument("--working-dir", help="ship this source tree with the job (development); default: the cluster's installed flm_dist")
    p.add_argument("--fresh", action="store_true", help="delete the run's checkpoints and start over")
    p.add_argument("--no-wait", action="store_true", help="return once submitted instead of following the logs")
    for name, help_ in (("status", "a submitted job's status and message"), ("logs", "a submitted job's logs"), ("stop", "stop a submitted job")):
        p = sub.add_parser(name, help=help_)
        p.add_argument("job_id", help="the submission id `flm-dist submit` printed")
        p.add_argument("--address", help=address_help)
    sub.choices["status"].add_argument("--json", action="store_true", help="print the status as JSON")
    sub.choices["logs"].add_argument("--follow", action="store_true", help="stream until the job ends")
    sub.choices["stop"].add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the job to stop")
    return ap


def _absolute_args(args):
    """Local paths among a command's URI arguments made absolute (`config.absolute_path`):
    evaluation's workers and the server's replicas read them from folders of their own."""
    for name in ("checkpoint", "data", "reference", "export", "out", "src", "uri"):
        if isinstance(getattr(args, name, None), str):
            setattr(args, name, absolute_path(getattr(args, name)))
    return args


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=os.environ.get("FLM_LOG", "WARNING"), format="%(levelname)s %(name)s: %(message)s")
    args = _absolute_args(build_parser().parse_args(argv))
    try:
        if args.cmd in ("pretrain", "finetune"):
            return cmd_train(args, args.cmd)
        if args.cmd == "evaluate":
            return cmd_evaluate(args)
        if args.cmd == "export":
            return cmd_export(args)
        if args.cmd == "serve":
            return cmd_serve(args)
        if args.cmd == "demo":
            return cmd_demo(args)
        if args.cmd == "store":
            return cmd_store(args)
        if args.cmd == "lineage":
            return cmd_lineage(args)
        if args.cmd == "compare":
            return cmd_compare(args)
        if args.cmd == "data" and args.data_cmd == "synth":
            return cmd_synth(args)
        if args.cmd == "data" and args.data_cmd == "convert":
            return cmd_convert(args)
        if args.cmd == "data" and args.data_cmd == "inspect":
            return cmd_inspect(args)
        if args.cmd == "data" and args.data_cmd == "sequences":
            return cmd_sequences(args)
        if args.cmd in ("submit", "status", "logs", "stop"):
            return cmd_job(args)
    except (ConfigError, DataError, StorageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        # Failures a user can act on are printed plainly; anything else keeps its traceback.
        from flm_dist.checkpoint import CheckpointCorruptError
        from flm_dist.launch import TrainingFailed
        from flm_dist.train_loop import NonFiniteLossError

        if isinstance(e, (CheckpointCorruptError, NonFiniteLossError, TrainingFailed, FileNotFoundError)):
            print(f"error: {e}", file=sys.stderr)
            return 1
        raise
    return 1


if __name__ == "__main__":
    sys.exit(main())
