"""Make ``docs/img/ray-dashboard-train.png``: what Ray's dashboard API and a node's metrics endpoint say about a
live ``sslrun launch``, rendered by headless Chromium.

Ray 2.60's open-source dashboard has no Train page (its pages are Overview, Jobs, Serve, Cluster, Actors, Metrics
and Logs; the Train runs are served only by its REST API), and its Metrics page needs a Prometheus and a Grafana.
So this script starts a private Ray head on loopback (token authentication on, dashboard, fixed metrics export
port), launches a tiny real two-worker run on it named after its output directory (``dashboard-demo``), and while
the run trains reads the two things a user would read:

* ``GET /api/train/v2/runs/v1`` on the dashboard, with ``Authorization: Bearer <token>``: the run by name, its
  status and its workers;
* ``GET http://127.0.0.1:<metrics port>/metrics``: the ``ray_sslrun_*`` samples, one per rank, tagged
  ``run="dashboard-demo"``.

It writes both into a small HTML page, renders it at 1280 px wide with Chromium (``sslrun.cli.report_browser``),
stops the run with SIGTERM (a checkpoint, exit 0) and the head, and keeps the PNG under 300 KB. About 100 s on a busy
2-core machine. Run it inside a loopback-only network namespace, from the repository root:

    unshare -n sh -c 'ip link set lo up; export GLOO_SOCKET_IFNAME=lo RAY_USAGE_STATS_ENABLED=0; \\
        .venv/bin/python benchmarks/dashboard_screenshot.py'

``--json`` prints a summary as the last line.
"""

from __future__ import annotations

import argparse
import html
import json
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RUN = "dashboard-demo"
MAX_BYTES = 300_000  # docs images stay small
Sample = tuple[str, dict[str, str], float]  # (metric name, labels, value)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--output", type=Path, default=REPO / "docs" / "img" / "ray-dashboard-train.png")
    p.add_argument("--json", action="store_true", help="print a JSON summary as the last line")
    args = p.parse_args()

    from sslrun.tests.net import require_loopback_namespace

    require_loopback_namespace("benchmarks/dashboard_screenshot.py")
    summary = capture(args.output)
    print(f"wrote {args.output} ({summary['bytes'] / 1000:.0f} KB): run {RUN}, ranks {summary['ranks']}")
    if args.json:
        print(json.dumps(summary))


def capture(png: Path) -> dict[str, Any]:
    """Start a head, launch a run on it, read the dashboard's Train API and the metrics endpoint while it trains,
    and render them to ``png``."""
    from sslrun.cli.report_browser import render_page
    from sslrun.tests.ray_head import (
        SSLRUN,
        auth_token,
        metric_samples,
        quick_launch_args,
        start_ray_head,
        stop_process_tree,
        token_env,
        train_runs,
        wait_for,
    )

    env = token_env()
    with tempfile.TemporaryDirectory(prefix="sslrun-dash-") as tmp, start_ray_head(env) as head:
        token = auth_token()
        log = Path(tmp) / "launch.log"  # a file, not a pipe: nobody reads a pipe while the run trains
        # Long enough to be still training when the metrics appear; SIGTERM ends it below.
        launch = subprocess.Popen(
            [SSLRUN, *quick_launch_args(Path(tmp) / RUN, head.address, max_steps=100_000)],
            stdout=log.open("w"),
            stderr=subprocess.STDOUT,
            env=env,
        )
        try:

            def both_ranks() -> list[Sample] | None:
                if launch.poll() is not None:
                    raise RuntimeError(f"sslrun launch exited {launch.returncode}: {log.read_text()[-2000:]}")
                found = [
                    (name, labels, value)
                    for name in ("ray_sslrun_images_per_second", "ray_sslrun_images_total")
                    for labels, value in metric_samples(head.metrics_port, name)
                    if labels.get("run") == RUN
                ]
                return found if {labels["rank"] for _, labels, _ in found} == {"0", "1"} else None

            samples = wait_for(both_ranks, 180, f"ray_sslrun_* samples of run {RUN} for ranks 0 and 1")
            runs = wait_for(lambda: train_runs(head, token), 30, "the run in /api/train/v2/runs/v1")
            page = Path(tmp) / "page.html"
            page.write_text(_page(runs[0], samples, head.dashboard_url, head.metrics_port))
            rendered = render_page(page, png, width=1280)
        finally:
            if launch.poll() is None:
                launch.send_signal(signal.SIGTERM)  # every rank checkpoints and stops; exit 0
                try:
                    launch.wait(timeout=120)
                except subprocess.TimeoutExpired:
                    stop_process_tree(launch)
    _shrink(png)
    return {
        "png": str(png),
        "bytes": png.stat().st_size,
        "ranks": sorted({labels["rank"] for _, labels, _ in samples}),
        "run_status": runs[0]["status"],
        "page_errors": rendered.errors,
        "date": time.strftime("%Y-%m-%d"),
    }


_STYLE = """
 body { font: 15px/1.45 system-ui, sans-serif; margin: 24px 32px; color: #1d2330; }
 h1 { font-size: 22px; margin: 0 0 4px; } h2 { font-size: 16px; margin: 22px 0 6px; }
 code, td { font-family: ui-monospace, monospace; font-size: 13px; }
 table { border-collapse: collapse; }
 td, th { border-bottom: 1px solid #dde1e8; padding: 4px 14px 4px 0; text-align: left; vertical-align: top; }
 th { font-size: 13px; color: #5b6474; font-weight: 600; }
 .dim { color: #8a93a3; } .k { color: #5b6474; padding-right: 18px; } .ok { color: #137333; font-weight: 600; }
"""


def _page(run: dict[str, Any], samples: list[Sample], dashboard: str, port: int) -> str:
    """The HTML page: the Train run as the dashboard API lists it, and the per-rank samples as the node exports
    them."""
    esc = html.escape
    name = esc(run["name"])
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(run["start_time_ns"] / 1e9))
    facts = [
        ("name", f"<b>{name}</b> (the output directory's name; <code>--name</code> sets another)"),
        ("status", f"<span class=ok>{esc(run['status'])}</span>"),
        ("started", started),
        ("storage", esc(run["run_settings"]["run_config"]["storage_path"])),
        ("job id", esc(run["job_id"])),
    ]
    fact_rows = "".join(f"<tr><td class=k>{k}</td><td>{v}</td></tr>" for k, v in facts)
    api = f"GET {esc(dashboard)}/api/train/v2/runs/v1"
    return (
        f"<!doctype html><meta charset=utf-8><title>Ray sees sslrun run {name}</title><style>{_STYLE}</style>"
        f"<h1>Ray sees the sslrun run <code>{name}</code></h1>"
        "<div class=dim>Ray 2.60 head on 127.0.0.1, token authentication on. Read live, while the run trains.</div>"
        f"<h2>Dashboard Train API: <code>{api}</code> (Authorization: Bearer &lt;token&gt;)</h2>"
        f"<table>{fact_rows}</table>"
        f"<h2>Workers (attempt {len(run['attempts'])})</h2>"
        f"<table><tr><th>rank</th><th>node</th><th>pid</th><th>actor status</th></tr>{_worker_rows(run)}</table>"
        f"<h2>Node metrics endpoint: <code>GET http://127.0.0.1:{port}/metrics</code>, the "
        "<code>ray_sslrun_*</code> samples</h2>"
        f"<table><tr><th>metric</th><th>labels</th><th>value</th></tr>{_sample_rows(samples)}</table>"
        "<p class=dim>A Prometheus scraping this endpoint charts them with "
        "<code>sum by (run) (ray_sslrun_images_per_second)</code>.</p>"
    )


def _worker_rows(run: dict[str, Any]) -> str:
    """One table row per worker of the run's latest attempt, by rank."""
    workers = sorted(run["attempts"][-1]["workers"], key=lambda w: w["world_rank"])
    return "".join(
        f"<tr><td>{w['world_rank']}</td><td>{html.escape(w['node_ip'])}</td><td>{w['pid']}</td>"
        f"<td>{html.escape(str(w.get('status') or ''))}</td></tr>"
        for w in workers
    )


def _sample_rows(samples: list[Sample]) -> str:
    """One table row per sample: run and rank in bold, Ray's own labels after them, dimmed and shortened."""
    rows = ""
    for name, labels, value in sorted(samples, key=lambda s: (s[0], s[1]["rank"])):
        own = f'run="{html.escape(labels["run"])}", rank="{html.escape(labels["rank"])}"'
        rest = ", ".join(
            f'{k}="{html.escape(v[:12])}{"…" if len(v) > 12 else ""}"'
            for k, v in sorted(labels.items())
            if k not in ("run", "rank")
        )
        rows += f"<tr><td>{name}</td><td><b>{own}</b> <span class=dim>{rest}</span></td><td>{value:,.1f}</td></tr>"
    return rows


def _shrink(png: Path) -> None:
    """Keep the PNG under MAX_BYTES: palette-quantise it (flat colours and text lose nothing visible), then
    downscale if that is not enough."""
    from PIL import Image

    if png.stat().st_size <= MAX_BYTES:
        return
    img = Image.open(png).convert("RGB")
    while True:
        img.quantize(colors=128).save(png, optimize=True)
        if png.stat().st_size <= MAX_BYTES:
            return
        img = img.resize((int(img.width * 0.85), int(img.height * 0.85)), Image.LANCZOS)


if __name__ == "__main__":
    main()
