"""What Ray's own endpoints say about an ``sslrun launch``: the run's name in the dashboard's Train API and the
per-rank throughput on the node's Prometheus endpoint, with token authentication on, as docs/cluster.md
('Seeing a run in the Ray dashboard') describes.

A real ``ray start --head`` (loopback, dashboard, fixed metrics export port) and a real ``sslrun launch --address``
of two CPU workers on a tiny synthetic dataset (15 steps of 8 images per rank). Must run inside a loopback-only
network namespace.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

# by package path, like tests/test_launch.py: the helpers are shared with benchmarks/dashboard_screenshot.py
from sslrun.tests.net import require_loopback_namespace
from sslrun.tests.ray_head import (
    SSLRUN,
    auth_token,
    dashboard_get,
    metric_samples,
    quick_launch_args,
    start_ray_head,
    token_env,
    train_runs,
    wait_for,
)


@pytest.mark.slow
@pytest.mark.ray
def test_the_dashboard_and_the_metrics_endpoint_name_the_run(tmp_path: Path) -> None:
    """The run is named after the output directory in Ray Train's run list (dashboard API, token required), and
    each rank's ``ray_sslrun_images_per_second`` / ``ray_sslrun_images_total`` carry ``run=<that name>`` on the
    node's Prometheus endpoint, which the head's service-discovery file lists for a Prometheus to scrape."""
    require_loopback_namespace("tests/test_dashboard_metrics.py")
    env = token_env()
    output = tmp_path / "dash-demo"  # the run name sslrun derives when --name is not given
    with start_ray_head(env) as head:
        token = auth_token()
        proc = subprocess.run(
            [SSLRUN, *quick_launch_args(output, head.address, max_steps=15)],
            capture_output=True,
            text=True,
            timeout=240,
            env=env,
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "finished: 15 steps" in proc.stdout, proc.stdout

        # Prometheus text on the node: per-rank samples tagged with the run name. The agent exports every few
        # seconds, so poll; the counter must reach every image each rank trained on (15 steps x 8 images).
        def per_rank() -> dict[str, tuple[float, float]] | None:
            rates = metric_samples(head.metrics_port, "ray_sslrun_images_per_second")
            totals = metric_samples(head.metrics_port, "ray_sslrun_images_total")
            ranks = {
                labels["rank"]: (value, sum(v for t, v in totals if t.get("rank") == labels["rank"]))
                for labels, value in rates
                if labels.get("run") == "dash-demo"
            }
            return ranks if set(ranks) == {"0", "1"} and all(t == 120.0 for _, t in ranks.values()) else None

        ranks = wait_for(per_rank, 30, "ray_sslrun_* samples for run dash-demo, ranks 0 and 1")
        assert all(rate > 0 for rate, _ in ranks.values()), ranks
        for labels, _ in metric_samples(head.metrics_port, "ray_sslrun_images_total"):
            assert labels["run"] == "dash-demo" and labels["rank"] in {"0", "1"}, labels

        # The head tells a Prometheus where to scrape: the node's metrics port is in its file-SD list.
        def discovery_targets() -> list[str]:
            try:
                return json.loads(head.service_discovery_file.read_text())[0]["targets"]
            except (FileNotFoundError, json.JSONDecodeError, IndexError, KeyError):
                return []

        targets = wait_for(discovery_targets, 20, f"{head.service_discovery_file}")
        assert f"127.0.0.1:{head.metrics_port}" in targets, targets
        # ... and writes a ready Prometheus config that reads that list (the session's own path, not /tmp/ray's).
        prom_yml = (head.temp_dir / "session_latest" / "metrics" / "prometheus" / "prometheus.yml").read_text()
        assert str(head.temp_dir) in prom_yml and "prom_metrics_service_discovery.json" in prom_yml, prom_yml

        # The dashboard's Train API: refused without the token, the run by name with it.
        status, body = dashboard_get(head, "/api/train/v2/runs/v1", None)
        assert status == 401 and "Missing authentication token" in body, (status, body)
        assert dashboard_get(head, "/api/train/v2/runs/v1", "not-the-token")[0] == 403
        runs = wait_for(lambda: train_runs(head, token), 20, "the Train run in /api/train/v2/runs/v1")
        assert [r["name"] for r in runs] == ["dash-demo"], runs
        run = runs[0]
        assert run["status"] == "FINISHED", run["status"]
        assert run["run_settings"]["run_config"]["storage_path"] == str(output / "ray")
        workers = [w for attempt in run["attempts"] for w in attempt["workers"]]
        assert sorted(w["world_rank"] for w in workers) == [0, 1]
        assert {w["node_ip"] for w in workers} == {"127.0.0.1"}
