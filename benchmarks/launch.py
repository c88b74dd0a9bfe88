"""Benchmark ``sslrun launch`` on the embedded local Ray: time to first step, and 1- vs N-worker throughput.

Runs the real launcher and the real trainer once per worker count on one local Ray (started once), and prints:

* **time to first step**: from the ``launch()`` call to the end of the first optimiser step (dataset check, Ray
  worker group, process group, FFCV's JIT, model build, one step). Ray itself is already up; its start-up time is
  printed on its own line.
* **throughput**: global images per second between the first and the last step of the run (every step is logged,
  so the figure includes sslrun's per-step reporting to Ray);
* **scaling efficiency**: ``throughput(N) / (N * throughput(1))``.

The last line is JSON with ``--json``. Run it inside a loopback-only network namespace:

    unshare -n sh -c 'ip link set lo up; export GLOO_SOCKET_IFNAME=lo RAY_USAGE_STATS_ENABLED=0; \
        .venv/bin/python benchmarks/launch.py --json'
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workers", default="1,2", help="comma-separated worker counts (default 1,2)")
    p.add_argument("--steps", type=int, default=40, help="optimiser steps per run")
    p.add_argument("--batch-size", type=int, default=256, help="GLOBAL batch size")
    p.add_argument("--method", default="simclr")
    p.add_argument("--encoder", default="small_cnn")
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--set", action="append", default=[], dest="overrides", help="extra config overrides")
    p.add_argument("--json", action="store_true", help="print a JSON summary as the last line")
    p.add_argument(
        "--result",
        default=None,
        help="write the JSON result, with the command, date and machine, to this file (e.g. docs/results/X.json)",
    )
    args = p.parse_args()
    counts = [int(w) for w in args.workers.split(",")]

    from sslrun.cli.common import experiment_from_cli
    from sslrun.cluster.launcher import launch
    from sslrun.cluster.local_ray import connect_or_start

    t = time.perf_counter()
    session = connect_or_start(None)  # the embedded default, dashboard included
    ray_start_s = time.perf_counter() - t
    print(f"ray start: {ray_start_s:.1f} s")
    rows: list[dict[str, Any]] = []
    try:
        with tempfile.TemporaryDirectory(prefix="sslrun-bench-launch-") as tmp:
            for i, n in enumerate(counts):
                out = Path(tmp) / f"run{i}-w{n}"  # a count may repeat (interleaved A/B runs)
                cfg = experiment_from_cli(
                    None,
                    [
                        "log.log_every=1",
                        f"log.checkpoint_every={args.steps * 10}",  # only the final checkpoint
                        "log.knn_every=0",
                        "log.visuals_every=0",
                        "log.tensorboard=false",
                        "log.progress=off",
                        *args.overrides,
                    ],
                    method=args.method,
                    encoder=args.encoder,
                    dataset=args.dataset,
                    batch_size=args.batch_size,
                    max_steps=args.steps,
                    epochs=100,
                    output=str(out),
                    extra={"cluster.workers_per_node": n},
                )
                started = time.time()
                result = launch(cfg, echo=lambda _: None)
                events = [json.loads(line) for line in (out / "launch.jsonl").read_text().splitlines()]
                first = next(e["time"] for e in events if e["event"] == "first_step")
                rows.append(
                    {
                        "workers": n,
                        "steps": result.steps,
                        "time_to_first_step_s": round(first - started, 2),
                        "images_per_second": round(float(result.info["images_per_second"]), 1),
                        "loader_threads": result.plan.loader_threads,
                    }
                )
                r = rows[-1]
                print(
                    f"{n} worker(s): first step after {r['time_to_first_step_s']:.1f} s, "
                    f"{r['images_per_second']:.0f} images/s ({r['steps']} steps, "
                    f"{r['loader_threads']} loader thread(s) each)"
                )
    finally:
        session.shutdown()
    base = next((r["images_per_second"] for r in rows if r["workers"] == 1), None)
    for r in rows:
        r["scaling_efficiency"] = round(r["images_per_second"] / (r["workers"] * base), 3) if base else None
        if base and r["workers"] > 1:
            print(f"scaling efficiency at {r['workers']} workers: {r['scaling_efficiency']:.0%}")
    summary = {
        "benchmark": "launch",
        "method": args.method,
        "encoder": args.encoder,
        "dataset": args.dataset,
        "global_batch": args.batch_size,
        "cpus": len(os.sched_getaffinity(0)),
        "ray_start_s": round(ray_start_s, 2),
        "runs": rows,
    }
    if args.json:
        print(json.dumps(summary))
    if args.result:
        from _common import write_result  # the benchmarks' helpers live beside this script

        write_result(args.result, summary)


if __name__ == "__main__":
    main()
