"""A private Ray head on loopback, and what its dashboard and metrics endpoint say about a run.

Used by ``tests/test_dashboard_metrics.py`` and ``benchmarks/dashboard_screenshot.py``: both start one
``ray start --head`` on 127.0.0.1 with its dashboard and a known metrics export port, run a real ``sslrun launch``
on it, then read Ray's own HTTP endpoints the way a user (or a Prometheus) would. Run them only inside a
loopback-only network namespace (``tests/net.py``): Ray does not stay on loopback by itself. Other tests share its
pieces: polling (:func:`wait_for`), committed checkpoints, stopping a process tree, and token authentication for a
driver that reaches an explicit address (:func:`token_auth`).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

from sslrun.tests.net import free_port

__all__ = [
    "RAY",
    "SSLRUN",
    "RayHead",
    "auth_token",
    "dashboard_get",
    "metric_samples",
    "quick_launch_args",
    "simulated_cluster",
    "start_ray_head",
    "stop_process_tree",
    "token_auth",
    "token_env",
    "train_runs",
    "wait_for",
]

RAY = str(Path(sys.executable).with_name("ray"))
SSLRUN = str(Path(sys.executable).with_name("sslrun"))
# One sample line of Prometheus' text format: name{label="value",...} value
_SAMPLE = re.compile(r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)\{(?P<labels>.*)\}\s+(?P<value>\S+)$")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')
# A tiny real run: 512 synthetic 16x16 images, 16 per step (8 per rank on 2 workers), no kNN, images or TensorBoard.
_QUICK = [
    "data.dataset_kwargs.num_samples=512",
    "data.dataset_kwargs.test_samples=64",
    "data.dataset_kwargs.size=16",
    "log.knn_every=0",
    "log.visuals_every=0",
    "log.progress=plain",
    "log.log_every=5",
    "log.checkpoint_every=1000",
    "log.tensorboard=false",
    "schedule.warmup_epochs=0",
]


@dataclass(frozen=True)
class RayHead:
    """A running head: its GCS address, dashboard URL, metrics export port and temp dir (logs, session files)."""

    address: str
    dashboard_url: str
    metrics_port: int
    temp_dir: Path

    @property
    def service_discovery_file(self) -> Path:
        """The Prometheus file-based service discovery list the head keeps up to date (every node's metrics
        address); Ray 2.60 writes it in the session directory and links it from the temp dir's top."""
        return self.temp_dir / "prom_metrics_service_discovery.json"


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, every: float = 0.5) -> Any:
    """Poll ``predicate`` until it returns something true, or fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def committed_steps(run_dir: Path) -> list[int]:
    """Steps of the checkpoints Ray Train has committed (its snapshot), not directories that merely exist (a
    checkpoint directory appears before Ray commits its report)."""
    try:
        data = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return []
    return [int(r["metrics"]["step"]) for r in data.get("checkpoint_results", [])]


def token_env() -> dict[str, str]:
    """The environment for ``ray start`` and ``sslrun launch --address``: token authentication on, with the token
    in ``~/.ray/auth_token`` created first (``ray start --head`` refuses token mode when no token exists yet)."""
    subprocess.run([RAY, "get-auth-token", "--generate"], check=True, capture_output=True, timeout=120)
    return {**os.environ, "RAY_AUTH_MODE": "token", "RAY_USAGE_STATS_ENABLED": "0"}


@contextlib.contextmanager
def token_auth() -> Iterator[None]:
    """:func:`token_env` as this process's environment while the block runs (restored on exit): a Ray 2.60 driver
    reaching an explicit address sends the token only with ``RAY_AUTH_MODE=token``."""
    with mock.patch.dict(os.environ, token_env()):
        yield


def auth_token() -> str:
    """The cluster's token, as ``ray get-auth-token`` prints it (what a person pastes into the dashboard)."""
    out = subprocess.run([RAY, "get-auth-token"], check=True, capture_output=True, text=True, timeout=120)
    return out.stdout.strip()


def quick_launch_args(output: Path, address: str, max_steps: int) -> list[str]:
    """Arguments of ``sslrun`` for a tiny two-worker launch on the head at ``address``: SimCLR + small CNN on the
    synthetic dataset, no ``--name`` (the run is named after ``output``)."""
    args = ["launch", "--method", "simclr", "--encoder", "small_cnn", "--dataset", "synthetic", "--epochs", "100"]
    args += ["--batch-size", "16", "--max-steps", str(max_steps), "--workers-per-node", "2"]
    args += ["--address", address, "--output", str(output)]
    for item in _QUICK:
        args += ["--set", item]
    return args


def stop_process_tree(proc: subprocess.Popen) -> None:
    """Stop a process we started and everything it started, by pid (never ``ray stop``: it kills every Ray
    process on the machine, other people's included)."""
    import psutil

    try:
        family = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for p in family:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.terminate()
    _, alive = psutil.wait_procs(family, timeout=5)
    for p in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    psutil.wait_procs(alive, timeout=5)


@contextlib.contextmanager
def start_ray_head(env: dict[str, str], num_cpus: int = 2, timeout: float = 60) -> Iterator[RayHead]:
    """``ray start --head --block`` on 127.0.0.1 with the dashboard on a free port; stopped (by process tree) and
    its temp dir removed on exit. Yields once the dashboard answers HTTP."""
    port, dashboard_port, metrics_port = free_port(), free_port(), free_port()
    temp_dir = Path(tempfile.mkdtemp(prefix="sslrun-ray-", dir="/tmp"))  # Ray's socket paths must stay < 108 chars
    log = (temp_dir / "ray-start.log").open("wb")
    proc = subprocess.Popen(
        [
            RAY,
            "start",
            "--head",
            "--node-ip-address=127.0.0.1",
            f"--port={port}",
            f"--num-cpus={num_cpus}",
            "--num-gpus=0",
            "--include-dashboard=true",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dashboard_port}",
            f"--metrics-export-port={metrics_port}",
            "--disable-usage-stats",
            f"--temp-dir={temp_dir}",
            "--block",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )
    head = RayHead(f"127.0.0.1:{port}", f"http://127.0.0.1:{dashboard_port}", metrics_port, temp_dir)
    try:

        def dashboard_up() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"ray start exited {proc.returncode}: {(temp_dir / 'ray-start.log').read_text()}")
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", dashboard_port)) == 0

        wait_for(dashboard_up, timeout, f"the Ray head's dashboard on port {dashboard_port}")
        yield head
    finally:
        stop_process_tree(proc)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def dashboard_get(head: RayHead, route: str, token: str | None) -> tuple[int, str]:
    """GET a dashboard route with ``Authorization: Bearer <token>`` (None: no header): ``(status, body)``."""
    req = urllib.request.Request(head.dashboard_url + route)
    if token is not None:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=20) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def train_runs(head: RayHead, token: str) -> list[dict[str, Any]]:
    """The Ray Train V2 runs the dashboard lists (``/api/train/v2/runs/v1``, newest first); [] while the dashboard
    has no Train state yet."""
    status, body = dashboard_get(head, "/api/train/v2/runs/v1", token)
    return json.loads(body)["train_runs"] if status == 200 else []


def metric_samples(port: int, name: str) -> list[tuple[dict[str, str], float]]:
    """``(labels, value)`` of every sample of one metric on a node's Prometheus endpoint; [] while the node's
    metrics agent is not listening yet (it starts a few seconds after the head)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
            text = resp.read().decode()
    except (urllib.error.URLError, ConnectionError):
        return []
    samples = []
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if m and m["name"] == name:
            samples.append((dict(_LABEL.findall(m["labels"])), float(m["value"])))
    return samples


@contextlib.contextmanager
def simulated_cluster(*node_envs: dict[str, str] | None) -> Iterator[tuple[Any, list[Any]]]:
    """A ``ray.cluster_utils.Cluster``: a head without CPUs (so every worker lands on a simulated node) and one
    1-CPU node per entry of ``node_envs`` (its environment variables, or None), all on this machine; yields the
    cluster and its nodes, and shuts it down on exit.

    Every simulated node has the same IP: tests tell them apart by node id."""
    from ray.cluster_utils import Cluster

    # Cluster writes its address to /tmp/ray/ray_current_cluster whatever the temp dir, and does not create the folder
    os.makedirs("/tmp/ray", exist_ok=True)
    temp_dir = tempfile.mkdtemp(prefix="sslrun-ray-", dir="/tmp")  # Ray's socket paths must stay < 108 chars
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 0, "include_dashboard": False, "temp_dir": temp_dir},
    )
    try:
        nodes = [cluster.add_node(num_cpus=1, env_vars=env or {}) for env in node_envs]
        cluster.wait_for_nodes()
        yield cluster, nodes
    finally:
        with contextlib.suppress(Exception):
            cluster.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)
