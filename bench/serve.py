"""Issue 7 — the reference server: latency and throughput of /score and /recommend,
against the in-process TorchScript call as the limit.

Export: a synthetic retrieval export (random weights; latency does not depend on what
the model learned) over a uniform interaction log with `--items` distinct items
(default 100,000) and `--users` users, two string features (u_segment, i_category),
the job defaults' architecture (dim 32, hidden [128], latent 64) with 2^18-row
user/item tables. Built once per parameter set under --workdir and reused.

Arms, per endpoint (/score with 100 items; /recommend with k=10 over all items),
interleaved L H S L H S ..., each a window of --seconds after a warm-up:
  L  limit: the TorchScript call alone on prebuilt tensors, in this process
     (score: scorer(100 pairs, features); recommend: user_vectors(1 user) @ items.T,
     top-k). One thread, as the replica runs.
  H  handler: the server's own request path without HTTP or Ray, in this process
     (JSON body -> validation, ID coercion, snapshot lookups -> a batch of one).
  E  empty: a Ray Serve deployment that reads the body and answers {"ok": 1}, driven
     like S: the framework's own floor on this machine, for S / E.
  S  served: `flm-dist serve`'s deployment on the local Ray (one replica, 1 CPU), HTTP
     on 127.0.0.1, driven by a second process with --clients closed-loop clients
     (each sends its next request when the last answer arrives: bounded concurrency),
     keep-alive connections, distinct prebuilt request bodies.
Figures: p50 / p99 latency (ms) and requests/s (S: answers per second of the window,
all clients; L and H: one thread, 1 / mean latency); medians over --repeats rounds.
Ratios: S p50 / L p50 (the price of HTTP, Ray Serve and request encoding per request),
S req/s / L req/s (the server's throughput against one thread calling the graph),
S req/s / E req/s (what this server keeps of Ray Serve's own ceiling), and the mean
requests per batch the replica formed under the load.
On a 2-core machine the clients, Ray's proxy and the replica share the cores: the
served figures are the machine's, not the server's alone.

With --sequence the export is the sequence model's instead (issue 17): the model of
jobs/finetune_retrieval_sequence.yaml (a Transformer over the user's 50 latest items,
no user ID, no other feature) over per-user sequences that walk the items (each next
item 1-4 ahead, so that the transition counts earn a blend weight), with the counts
and the weight its export fits. Every request carries the user's "history" (their
latest items, up to 50). L then computes what the server answers: the graph with the
history, plus the counts' blend (`flm_dist.transitions`); M is L without the blend
(the model alone), so L / M is the counts' cost. Written to its own section.

    python bench/serve.py [--quick] [--sequence] [--items 100000] [--clients 16] [--seconds 10] [--repeats 3] [--out bench/results/serve.json]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
FEATURE_NAMES = ("u_segment", "i_category")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="one round of 3 s windows (a check that the script works)")
    p.add_argument("--items", type=int, default=100_000, help="distinct items in the export (the /recommend ranking size)")
    p.add_argument("--users", type=int, default=20_000)
    p.add_argument("--score-items", type=int, default=100, help="items per /score request")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--clients", type=int, default=16, help="concurrent closed-loop HTTP clients")
    p.add_argument("--seconds", type=float, default=10.0, help="measured window per arm and round")
    p.add_argument("--warmup", type=float, default=2.0, help="untimed seconds before each window")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--max-batch-size", type=int, default=64, help="serve.max_batch_size")
    p.add_argument("--batch-wait-ms", type=float, default=5.0, help="serve.batch_wait_timeout_s, in ms")
    p.add_argument("--sequence", action="store_true", help="the sequence model's export: requests with a history, transition counts")
    p.add_argument("--workdir", default="/tmp/flm-bench-serve", help="synthetic data and export (reused)")
    p.add_argument("--out", default=None, help="default bench/results/serve.json (serve-sequence.json with --sequence)")
    # the load generator (second process): stdlib only
    p.add_argument("--client", help=argparse.SUPPRESS)
    p.add_argument("--client-path", help=argparse.SUPPRESS)
    p.add_argument("--client-bodies", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.seconds, args.warmup, args.repeats = 3.0, 1.0, 1
    args.out = args.out or os.path.join(HERE, "results", "serve-sequence.json" if args.sequence else "serve.json")
    return args


# ------------------------------------------------------------------ load generator (second process)


def client_main(args) -> None:
    """Closed-loop clients on keep-alive connections; prints one JSON line of figures."""
    host, port = args.client.split("://", 1)[1].split("/", 1)[0].split(":")
    with open(args.client_bodies) as f:
        bodies = [json.dumps(b).encode() for b in json.load(f)]
    start = time.perf_counter()
    t_measure = start + args.warmup
    t_end = t_measure + args.seconds
    lat: list[list[float]] = [[] for _ in range(args.clients)]
    errors = [0] * args.clients

    def client(c: int) -> None:
        conn = http.client.HTTPConnection(host, int(port), timeout=60)
        k = c
        while True:
            t0 = time.perf_counter()
            if t0 >= t_end:
                break
            body = bodies[k % len(bodies)]
            k += args.clients
            try:
                conn.request("POST", args.client_path, body, {"Content-Type": "application/json"})
                resp = conn.getresponse()
                resp.read()
                ok = resp.status == 200
            except (OSError, http.client.HTTPException):
                ok = False
                conn.close()
                conn = http.client.HTTPConnection(host, int(port), timeout=60)
            t1 = time.perf_counter()
            if t0 >= t_measure and t1 <= t_end:  # requests wholly inside the window
                if ok:
                    lat[c].append(t1 - t0)
                else:
                    errors[c] += 1
        conn.close()

    threads = [threading.Thread(target=client, args=(c,)) for c in range(args.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(json.dumps({"latencies_s": [x for per in lat for x in per], "errors": sum(errors), "window_s": args.seconds}))


# ------------------------------------------------------------------ the export


def _cached_export(out: str, params: dict, build) -> str:
    """The export at `out`, written from `build()` -> (model, source) unless the stamp
    beside it says it was built with the same `params`."""
    from flm_dist.export import write_export
    from flm_dist.storage import Store

    stamp = out + ".json"
    try:
        with open(stamp) as f:
            if json.load(f) == params and os.path.exists(os.path.join(out, "manifest.json")):
                return out
    except (OSError, ValueError):
        pass
    model, source = build()
    t0 = time.perf_counter()
    m = write_export(Store(), model, source, out, formats="torchscript")
    weight = f", transition weight {m['transitions']['weight']}" if m.get("transitions") else ""
    print(f"built the export in {time.perf_counter() - t0:.1f}s: {m['vectors']['items']['rows']:,} items, "
          f"{m['vectors']['users']['rows']:,} users{weight} -> {out}", flush=True)
    with open(stamp, "w") as f:
        json.dump(params, f)
    return out


def build_export(args) -> str:
    """Write (once) the interaction log and the retrieval export; returns the export dir."""
    rows = 10 * args.items  # uniform draws: every item appears (P(missing) = e^-10)

    def build():
        import common
        import pyarrow.parquet as pq
        import torch

        from flm_dist.config import FeatureConfig, load_job, to_dict
        from flm_dist.data.hashing import HashSpec
        from flm_dist.model import FLM, table_sizes

        files = common.write_interaction_log(os.path.join(args.workdir, "data"), rows=rows, files=8, row_group_rows=65536, dist="uniform", users=args.users, items=args.items, seed=7)
        job = load_job(None, ["task=retrieval", "model.user_rows=262144", "model.item_rows=262144"])
        job.data.features = [FeatureConfig(name="u_segment", side="user"), FeatureConfig(name="i_category", side="item")]
        torch.manual_seed(0)
        model = FLM(job.model, job.data.features).eval()
        spec = HashSpec.build(table_sizes(job.model, job.data.features), job.model.hash_seed)
        source = {
            "task": "retrieval",
            "config": to_dict(job),
            "hash_spec": spec.to_dict(),
            "data_columns": {"user_id": "int", "item_id": "int", "u_segment": "string", "i_category": "string"},
            "data_files": [{"uri": p, "size": os.path.getsize(p), "rows": pq.read_metadata(p).num_rows} for p in files],
            "run": "bench-serve",
        }
        return model, source

    # v2: the scorer exports its towers apart
    return _cached_export(os.path.join(args.workdir, f"export-{args.items}-{args.users}"), {"items": args.items, "users": args.users, "rows": rows, "v": 2}, build)


def build_sequence_export(args) -> str:
    """Write (once) per-user sequences and the sequence model's export (counts included)."""

    def build():
        import numpy as np
        import pyarrow as pa
        import pyarrow.parquet as pq
        import torch

        from flm_dist.config import load_job, to_dict
        from flm_dist.data.hashing import HashSpec
        from flm_dist.model import FLM, table_sizes

        rng = np.random.default_rng(7)
        lengths = rng.integers(10, 61, args.users)
        seqs = [(int(s) + np.cumsum(rng.integers(1, 5, n))) % args.items for s, n in zip(rng.integers(0, args.items, args.users), lengths, strict=True)]
        t = pa.table({"user_id": pa.array(np.arange(args.users) + 1, pa.int64()), "item_id": pa.array(seqs, pa.list_(pa.int64())),
                      "ts": pa.array([np.arange(len(q)) for q in seqs], pa.list_(pa.int64()))})
        data_dir = os.path.join(args.workdir, f"sequences-{args.items}-{args.users}")
        os.makedirs(data_dir, exist_ok=True)
        files = []
        for k in range(8):
            path = os.path.join(data_dir, f"part-{k}.parquet")
            pq.write_table(t.slice(k * args.users // 8, (k + 1) * args.users // 8 - k * args.users // 8), path)
            files.append({"uri": path, "size": os.path.getsize(path), "rows": pq.read_metadata(path).num_rows})
        job = load_job(os.path.join(HERE, "..", "jobs", "finetune_retrieval_sequence.yaml"), ["model.user_rows=1024", "model.item_rows=262144", "transitions.fit_users=2000"])
        torch.manual_seed(0)
        model = FLM(job.model, []).eval()  # untrained: latency does not depend on what it learned; the counts earn the weight
        spec = HashSpec.build(table_sizes(job.model, []), job.model.hash_seed)
        source = {"task": "retrieval", "config": to_dict(job), "hash_spec": spec.to_dict(), "data_columns": {"user_id": "int", "item_id": "int"},
                  "data_files": files, "run": "bench-serve-sequence"}
        return model, source

    return _cached_export(os.path.join(args.workdir, f"export-seq-{args.items}-{args.users}"), {"items": args.items, "users": args.users, "v": 2}, build)


def request_bodies(export_dir: str, args, n: int = 256) -> dict[str, list[dict]]:
    """Distinct, known-ID request bodies for both endpoints."""
    import numpy as np
    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)
    users = pq.read_table(os.path.join(export_dir, "user_vectors.parquet"), columns=["user_id"]).column(0).to_numpy()
    items = pq.read_table(os.path.join(export_dir, "item_vectors.parquet"), columns=["item_id"]).column(0).to_numpy()
    score = [
        {"user_id": int(rng.choice(users)), "item_ids": [int(x) for x in rng.choice(items, args.score_items, replace=False)]}
        for _ in range(n)
    ]
    recommend = [{"user_id": int(rng.choice(users)), "k": args.k} for _ in range(n)]
    if args.sequence:  # each request sends the user's latest items (a walk, as the export's data)
        for body in score + recommend:
            start = int(rng.integers(0, args.items))
            body["history"] = [int(x) for x in (start + np.cumsum(rng.integers(1, 5, int(rng.integers(10, 51))))) % args.items]
    return {"score": score, "recommend": recommend}


# ------------------------------------------------------------------ arms


def _figures(latencies_s: list[float], window_s: float | None, errors: int = 0) -> dict:
    import numpy as np

    ms = np.asarray(latencies_s) * 1e3
    if len(ms) == 0:
        return {"p50_ms": None, "p99_ms": None, "rps": 0.0, "requests": 0, "errors": errors}
    rps = len(ms) / window_s if window_s else 1e3 / float(ms.mean())
    return {"p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)), "rps": rps, "requests": int(len(ms)), "errors": errors}


def _timed_loop(fn, bodies: list, seconds: float, warmup: float) -> dict:
    """Call fn(body) back to back: warm-up, then a window of `seconds`."""
    t_measure = time.perf_counter() + warmup
    t_end = t_measure + seconds
    lat, k = [], 0
    while True:
        t0 = time.perf_counter()
        if t0 >= t_end:
            break
        fn(bodies[k % len(bodies)])
        k += 1
        t1 = time.perf_counter()
        if t0 >= t_measure:
            lat.append(t1 - t0)
    return _figures(lat, None)


def start_empty(port: int) -> str:
    """The E arm's deployment: Ray Serve with nothing behind it, on /empty."""
    from ray import serve

    @serve.deployment(ray_actor_options={"num_cpus": 1}, max_ongoing_requests=128)
    class Empty:
        async def __call__(self, request):
            from starlette.responses import JSONResponse

            await request.body()
            return JSONResponse({"ok": 1})

    serve.run(Empty.bind(), name="empty", route_prefix="/empty", logging_config={"enable_access_log": False})
    return f"http://127.0.0.1:{port}/empty"


def make_arms(args, export_dir: str, url: str, empty_url: str, bodies: dict, bodies_files: dict) -> dict:
    import subprocess

    import torch

    from flm_dist.config import ServeConfig
    from flm_dist.serve import LoadedExport, input_keys

    torch.set_num_threads(1)  # as the replica (num_cpus=1) runs
    loaded = LoadedExport(export_dir, ServeConfig(max_items=max(1000, args.score_items), max_batch_size=args.max_batch_size))
    scorer, matrix, trans = loaded.scorer, loaded.item_matrix, loaded.transitions
    if args.sequence and trans is None:
        raise SystemExit(f"{export_dir}: the export fitted no transition weight (0): the L / M arms would time the same thing")
    user_keys = {k for f in loaded.features["user"] for k in input_keys(f)}

    # L: tensors prebuilt from the handler's own encoding, so L and H score the same inputs
    score_inputs = []  # (user [1], items [n], user features [1, ...], item features [n, ...])
    for b in bodies["score"]:
        r = loaded.parse_score(b)
        score_inputs.append((r.user, r.items, {k: v for k, v in r.features.items() if k in user_keys}, {k: v for k, v in r.features.items() if k not in user_keys}))
    rec_inputs = [(r.user, r.features) for r in (loaded.parse_recommend(b) for b in bodies["recommend"])]

    def with_counts(counts: bool):
        """The limit arms: what the server computes for an answer, without the request's
        handling (L; with the transition counts' blend where the export has them), or the
        model alone (M)."""
        blend = counts and trans is not None

        @torch.no_grad()
        def score(x):
            user, items, ufeat, ifeat = x
            if loaded.split_towers:  # as the server: the user tower once, then the items
                s = scorer.score_latents(scorer.user_latents(user, ufeat).expand(len(items), -1), scorer.item_latents(items, ifeat))
            else:
                s = scorer(user.expand(len(items)), items, {**{k: v.expand(len(items), *v.shape[1:]) for k, v in ufeat.items()}, **ifeat})
            return trans.blend_items(s, ufeat["history"], ufeat["history__len"], items) if blend else s

        @torch.no_grad()
        def recommend(x):
            s = scorer.user_vectors(*x) @ matrix.T
            if blend:
                s = trans.blend(s, x[1]["history"], x[1]["history__len"])
            return torch.topk(s, args.k, dim=1)

        return score, recommend

    limit_score, limit_recommend = with_counts(True)
    model_score, model_recommend = with_counts(False)

    def served(endpoint: str, base: str, path: str):
        def run() -> dict:
            cmd = [sys.executable, os.path.abspath(__file__), "--client", base, "--client-path", path,
                   "--client-bodies", bodies_files[endpoint], "--clients", str(args.clients),
                   "--seconds", str(args.seconds), "--warmup", str(args.warmup)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=args.seconds + args.warmup + 300)
            res = json.loads(out.stdout.strip().splitlines()[-1])
            return _figures(res["latencies_s"], res["window_s"], res["errors"])
        return run

    model_only = {
        "M score": lambda: _timed_loop(model_score, score_inputs, args.seconds, args.warmup),
        "M recommend": lambda: _timed_loop(model_recommend, rec_inputs, args.seconds, args.warmup),
    } if args.sequence else {}
    return model_only | {
        "L score": lambda: _timed_loop(limit_score, score_inputs, args.seconds, args.warmup),
        "H score": lambda: _timed_loop(lambda b: loaded.score_batch([loaded.parse_score(b)]), bodies["score"], args.seconds, args.warmup),
        "E score": served("score", empty_url, "/empty"),
        "S score": served("score", url, "/score"),
        "L recommend": lambda: _timed_loop(limit_recommend, rec_inputs, args.seconds, args.warmup),
        "H recommend": lambda: _timed_loop(lambda b: loaded.recommend_batch([loaded.parse_recommend(b)]), bodies["recommend"], args.seconds, args.warmup),
        "E recommend": served("recommend", empty_url, "/empty"),
        "S recommend": served("recommend", url, "/recommend"),
    }


def loaded_weight(export_dir: str) -> float | None:
    with open(os.path.join(export_dir, "manifest.json")) as f:
        return (json.load(f).get("transitions") or {}).get("weight")


def main() -> None:
    args = parse_args()
    if args.client:
        client_main(args)
        return
    sys.path.insert(0, HERE)
    import socket

    import common

    from flm_dist import serve as fserve
    from flm_dist.config import ServeConfig
    from flm_dist.launch import ensure_ray
    from flm_dist.storage import Store

    info = common.machine_info()
    section = "serve-sequence" if args.sequence else "serve"
    common.print_header(f"{section}: /score and /recommend over HTTP vs the TorchScript call", info, args)
    os.makedirs(args.workdir, exist_ok=True)
    export_dir = build_sequence_export(args) if args.sequence else build_export(args)
    bodies = request_bodies(export_dir, args)
    files = {}
    for endpoint, b in bodies.items():
        files[endpoint] = os.path.join(args.workdir, f"bodies-{endpoint}.json")
        with open(files[endpoint], "w") as f:
            json.dump(b, f)

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = ServeConfig(max_items=max(1000, args.score_items), max_batch_size=args.max_batch_size, batch_wait_timeout_s=args.batch_wait_ms / 1e3)
    ensure_ray(num_cpus=os.cpu_count())
    t0 = time.perf_counter()
    url = fserve.start(export_dir, Store(), cfg, port=port, name="bench", num_cpus=1)
    print(f"server up on {url} in {time.perf_counter() - t0:.1f}s", flush=True)
    try:
        empty_url = start_empty(port)
        runs = common.interleaved(make_arms(args, export_dir, url, empty_url, bodies, files), args.repeats)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        conn.request("GET", "/healthz")
        batches = json.loads(conn.getresponse().read())["batches"]  # the replica's counts, warm-ups included
    finally:
        fserve.serve.shutdown()
    med = {name: common.medians(r) for name, r in runs.items()}
    rows, ratios = [], {}
    for endpoint in ("score", "recommend"):
        lim = med[f"L {endpoint}"]
        names = {"M": "M model alone (no counts)", "L": "L limit (TorchScript call" + (" + counts)" if args.sequence else ")"), "H": "H handler (no HTTP)",
                 "E": f"E empty Serve app ({args.clients} clients)", "S": f"S served ({args.clients} clients)"}
        for arm in ("M", "L", "H", "E", "S") if args.sequence else ("L", "H", "E", "S"):
            m = med[f"{arm} {endpoint}"]
            rows.append([f"/{endpoint}", names[arm], m["p50_ms"], m["p99_ms"], m["rps"], common.ratio(m["p50_ms"], lim["p50_ms"])])
        if args.sequence:
            ratios[f"{endpoint}: L p50 / M p50 (the counts' cost)"] = common.ratio(lim["p50_ms"], med[f"M {endpoint}"]["p50_ms"])
        ratios[f"{endpoint}: S p50 / L p50"] = common.ratio(med[f"S {endpoint}"]["p50_ms"], lim["p50_ms"])
        ratios[f"{endpoint}: S req/s / L req/s"] = common.ratio(med[f"S {endpoint}"]["rps"], lim["rps"])
        ratios[f"{endpoint}: S req/s / E req/s"] = common.ratio(med[f"S {endpoint}"]["rps"], med[f"E {endpoint}"]["rps"])
        ratios[f"{endpoint}: served requests per batch"] = common.ratio(batches[endpoint]["requests"], batches[endpoint]["batches"])
    with common.captured() as cap:
        print()
        print(("The sequence model's export (jobs/finetune_retrieval_sequence.yaml's model, transition counts, "
               f"weight {loaded_weight(export_dir)}); every request carries a history of 10-50 items. ") * args.sequence
              + f"/score: {args.score_items} items per request; /recommend: k={args.k} over {args.items:,} items; "
              f"medians of {args.repeats} round(s) of {args.seconds:g} s; serve.max_batch_size={args.max_batch_size}, "
              f"batch wait {args.batch_wait_ms:g} ms; {args.clients} concurrent clients in a second process")
        print(common.markdown_table(["endpoint", "arm", "p50 ms", "p99 ms", "req/s", "p50 / limit"], rows))
        print()
        print(common.markdown_table(["ratio", "value"], [[k, v] for k, v in ratios.items()]))
    if not args.quick:
        common.update_benchmarks_md(section, cap.text(), "python bench/serve.py" + " --sequence" * args.sequence, info)
    common.write_result(args.out, {
        "benchmark": section,
        "machine": info,
        "args": vars(args),
        "export": export_dir,
        "runs": runs,
        "medians": med,
        "ratios": ratios,
        "server_batches": batches,
    })


if __name__ == "__main__":
    main()
