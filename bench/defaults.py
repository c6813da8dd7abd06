"""Issue 10 — where the data defaults come from: flm_dist's read path (InteractionDatasource
-> Ray Data -> BatchStream) swept over `data.read_block_rows`, `data.prefetch_batches`,
`data.shuffle_window` and `data.batch_size`, one setting changed at a time from the
defaults, interleaved rounds, medians. Measured in the driver (no train workers, so the
figures are the read path's own), end to end from the first request to the last batch,
in skip mode and with a 5 ms sleep per batch (a fast device's step).

    python bench/defaults.py [--quick] [--repeats N] [--out bench/results/defaults.json]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
import run_all  # noqa: E402

from flm_dist.config import DataConfig  # noqa: E402

DEFAULTS = {"read_block_rows": 65536, "prefetch_batches": 4, "shuffle_window": 8, "batch_size": 4096}
SWEEP = {
    "read_block_rows": [65536, 262144, 1048576],  # the files have 64K-row row groups: never split
    "prefetch_batches": [1, 4, 8],
    "shuffle_window": [1, 8, 32],
    "batch_size": [1024, 4096, 16384],
}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--data-dir", default=os.path.join("/tmp", "flm-bench-run-all"))
    p.add_argument("--out", default="bench/results/defaults.json")
    return p.parse_args()


def one(plan, spec, store, s: dict, sleep_s: float) -> dict:
    from flm_dist.data.batches import BatchStream
    from flm_dist.data.pipeline import InteractionDatasource, read

    src = InteractionDatasource(plan, spec, store, True, 0, s["read_block_rows"], "fail").for_rank(0, 1)
    stream = BatchStream(read(src), s["batch_size"], run_all.FEATURES, shuffle_window=s["shuffle_window"], seed=0, prefetch_batches=s["prefetch_batches"])
    t0 = time.monotonic()
    n, first, waits = 0, None, []
    for b, *_ in stream.epoch(0):
        t = time.monotonic()
        if b is None:
            continue
        first = first or t
        n += len(b)
        if sleep_s:
            time.sleep(sleep_s)
        waits.append(time.monotonic() - t)
    t1 = time.monotonic()
    return {"rows_per_s": n / (t1 - t0), "ttfb_s": first - t0, "sleep_limit_share": (len(waits) * sleep_s) / (t1 - t0) if sleep_s else None}


def main() -> None:
    args = parse_args()
    repeats = args.repeats or (1 if args.quick else 3)
    rows = 1 << 18 if args.quick else 1 << 21
    info = common.machine_info()
    common.print_header("defaults: the read path's settings", info, args)
    files = common.write_interaction_log(os.path.join(args.data_dir, "zipf" if not args.quick else "zipf-quick"), rows, 16 if not args.quick else 8, 65536 if not args.quick else 32768, "zipf")
    common.warm_page_cache(files)
    from flm_dist.data.plan import plan_read
    from flm_dist.storage import Store

    common.start_ray()
    spec, store = run_all.encode_spec(), Store()
    plan = plan_read(store, os.path.dirname(files[0]), spec.read)
    d = DataConfig()
    assert {k: getattr(d, k) for k in DEFAULTS} == DEFAULTS, "bench/defaults.py is out of date with DataConfig's defaults"
    settings = {"defaults": dict(DEFAULTS)}
    for key, values in SWEEP.items():
        for v in values:
            if v != DEFAULTS[key]:
                settings[f"{key}={v}"] = {**DEFAULTS, key: v}
    arms = {}
    for name, s in settings.items():
        arms[f"{name} skip"] = lambda s=s: one(plan, spec, store, s, 0.0)
        arms[f"{name} sleep5"] = lambda s=s: one(plan, spec, store, s, 0.005 * s["batch_size"] / 4096)
    one(plan, spec, store, DEFAULTS, 0.0)  # warm-up: Ray Data's actors and worker processes
    runs = common.interleaved(arms, repeats)
    med = {k: common.medians(v) for k, v in runs.items()}
    with common.captured() as cap:
        print(f"\nread path in the driver, {rows:,} rows, medians of {repeats} interleaved rounds; sleep5 sleeps 5 ms per 4,096 rows "
              f"(so every batch size asks the same device time per row); 'device busy' = share of the wall time spent in the sleep\n")
        table = []
        for name in settings:
            a, b = med[f"{name} skip"], med[f"{name} sleep5"]
            table.append([name, a["rows_per_s"], common.ratio(a["rows_per_s"], med["defaults skip"]["rows_per_s"]), a["ttfb_s"], b["rows_per_s"], b["sleep_limit_share"]])
        print(common.markdown_table(["setting", "skip rows/s", "vs defaults", "TTFB s", "sleep5 rows/s", "device busy"], table))
    common.write_result(args.out, {"benchmark": "defaults", "machine": info, "medians": med, "runs": runs, "settings": settings})
    if not args.quick:
        common.update_benchmarks_md("defaults", cap.text(), "python bench/defaults.py", info)


if __name__ == "__main__":
    main()
