"""``sslrun launch``: planning and validation (no Ray), cluster configs, and real Ray Train runs of the real trainer.

The Ray tests start real Ray (a ``ray start --head`` shared by this module, the embedded default through the CLI,
and a two-node ``ray.cluster_utils.Cluster``) and must run inside a loopback-only network namespace, as the
README's test command does; they fail loudly anywhere else rather than open ports on a real interface.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from typer.main import get_command
from typer.testing import CliRunner

from sslrun.cli import app
from sslrun.cli.common import experiment_from_cli
from sslrun.cluster.launcher import launch
from sslrun.cluster.plan import LaunchPlan, parse_nodes, plan_launch, resource_shortfall
from sslrun.core.config import ExperimentConfig
from sslrun.core.errors import ConfigError

# by package path: Ray workers import this module (its `_record_batches`) without tests/ on sys.path
from sslrun.tests.net import free_port, require_loopback_namespace
from sslrun.tests.ray_head import committed_steps, simulated_cluster, stop_process_tree, token_auth, wait_for

CONFIGS = Path(__file__).resolve().parents[1] / "cluster" / "configs"
DOCS = Path(__file__).resolve().parents[1] / "docs" / "cluster.md"
SSLRUN = str(Path(sys.executable).with_name("sslrun"))
RAY = str(Path(sys.executable).with_name("ray"))

# Small, quick runs: 512 synthetic 16x16 images (a real .beton, prepared in a second), 16 per step, 8 per rank.
QUICK = [
    "data.dataset_kwargs.num_samples=512",
    "data.dataset_kwargs.test_samples=64",
    "data.dataset_kwargs.size=16",
    "log.knn_every=0",
    "log.visuals_every=0",
    "log.progress=plain",
    "log.log_every=5",
    "log.checkpoint_every=10",
    "schedule.warmup_epochs=0",
]


def _cfg(output: Path, *overrides: str, **flags: Any) -> ExperimentConfig:
    flags = {"method": "simclr", "encoder": "small_cnn", "dataset": "synthetic", "epochs": 20, **flags}
    return experiment_from_cli(None, [*QUICK, *overrides], output=str(output), **flags)


def _plan(cfg: ExperimentConfig, *, embedded: bool = True, cpus: int = 2, gpus: int = 0) -> LaunchPlan:
    return plan_launch(cfg, embedded=embedded, local_cpus=cpus, local_gpus=gpus)


def _events(output: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (output / "launch.jsonl").read_text().splitlines()]


def _losses(output: Path) -> dict[int, float]:
    """``step -> train/loss`` from the run's metrics.jsonl (rank 0 writes the all-reduced values)."""
    out = {}
    for line in (output / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        metrics = rec.get("metrics", rec)
        if "train/loss" in metrics:
            out[int(rec["step"])] = float(metrics["train/loss"])
    return out


# ---- planning: pure, no Ray ----------------------------------------------------------------------------------
def test_embedded_default_is_two_cpu_workers_with_one_loader_thread_each(tmp_path: Path) -> None:
    plan = _plan(_cfg(tmp_path / "demo", batch_size=256))
    assert (plan.num_workers, plan.use_gpu, plan.placement_strategy) == (2, False, "PACK")
    assert plan.resources_per_worker == {"CPU": 1.0}
    assert plan.loader_threads == 1  # 2 cores shared by 2 workers: more FFCV threads would oversubscribe them
    assert plan.storage_path == str((tmp_path / "demo" / "ray").resolve()) and plan.name == "demo"
    # a bigger machine gives each worker more loader threads, up to data.num_workers
    assert _plan(_cfg(tmp_path / "demo"), cpus=16).loader_threads == 2
    assert _plan(_cfg(tmp_path / "demo"), cpus=1).num_workers == 1


def test_embedded_default_uses_the_local_gpus(tmp_path: Path) -> None:
    plan = _plan(_cfg(tmp_path / "g", batch_size=256), cpus=32, gpus=4)
    assert (plan.num_workers, plan.use_gpu) == (4, True)
    assert plan.resources_per_worker == {"CPU": 1.0, "GPU": 1.0} and plan.loader_threads == 2
    cpu_only = _plan(_cfg(tmp_path / "g", device="cpu", batch_size=256), cpus=32, gpus=4)
    assert not cpu_only.use_gpu and cpu_only.num_workers == 2


def test_cluster_plans_spread_one_group_per_node(tmp_path: Path) -> None:
    two = _plan(_cfg(tmp_path / "r", batch_size=64, extra={"cluster.nodes": 2}), embedded=False)
    assert (two.num_workers, two.workers_per_node, two.placement_strategy) == (2, 1, "STRICT_SPREAD")
    gpu = _plan(
        _cfg(
            tmp_path / "r",
            batch_size=64,
            extra={"cluster.nodes": 2, "cluster.gpus_per_node": 4, "cluster.cpus_per_worker": 8},
        ),
        embedded=False,
    )
    assert (gpu.num_workers, gpu.placement_strategy, gpu.use_gpu) == (8, "SPREAD", True)
    assert gpu.resources_per_worker == {"CPU": 8.0, "GPU": 1.0} and gpu.loader_threads == 2
    named = _plan(
        _cfg(tmp_path / "r", extra={"cluster.storage_path": "s3://bucket/runs", "cluster.name": "exp1"}),
        embedded=False,
    )
    assert (named.storage_path, named.name) == ("s3://bucket/runs", "exp1")


@pytest.mark.parametrize(
    ("flags", "embedded", "message"),
    [
        ({"extra": {"cluster.nodes": 2}}, True, "--nodes 2 needs a Ray cluster"),
        ({"batch_size": 255}, True, "does not divide by 2 workers; use a multiple of 2 (e.g. --batch-size 254)"),
        ({"batch_size": 100, "extra": {"cluster.workers_per_node": 3}}, True, "(e.g. --batch-size 99)"),
        ({"extra": {"cluster.gpus_per_node": 1, "cluster.workers_per_node": 2}}, False, "each GPU worker needs"),
        ({"device": "cuda"}, True, "system.device is cuda but the launch has no GPUs"),
        ({"extra": {"cluster.gpus_per_node": 2}}, True, "--gpus-per-node 2 but this machine has 0 GPU(s)"),
    ],
)
def test_impossible_layouts_fail_with_one_line(tmp_path: Path, flags: dict, embedded: bool, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        _plan(_cfg(tmp_path / "x", **flags), embedded=embedded)
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("text", "expected"), [("4", (None, 4)), ("2:4", (2, 4)), (" 3:3 ", (None, 3)), ("1:1", (None, 1))]
)
def test_nodes_is_a_number_or_an_elastic_range(text: str, expected: tuple) -> None:
    assert parse_nodes(text) == expected


@pytest.mark.parametrize("text", ["x", "2:", "4:2", "0", "0:2", "2:4:6"])
def test_bad_node_ranges_are_one_line(text: str) -> None:
    with pytest.raises(ConfigError, match="--nodes") as err:
        parse_nodes(text)
    assert "\n" not in str(err.value)


def test_an_elastic_plan_spans_its_range_and_needs_room_for_its_minimum(tmp_path: Path) -> None:
    extra = {"cluster.nodes": 3, "cluster.min_nodes": 2, "cluster.resize_interval_s": 5.0}
    plan = _plan(_cfg(tmp_path / "x", batch_size=12, extra=extra), embedded=False)
    assert (plan.min_workers, plan.num_workers, plan.elastic, plan.resize_interval_s) == (2, 3, True, 5.0)
    assert plan.describe().startswith("2..3 CPU workers (gloo) on 2..3 nodes (1 per node), elastic, ")
    assert plan.placement_strategy == "SPREAD"  # Ray may size a group by resources: it may have to share a node
    two = [{"Alive": True, "Resources": {"CPU": 1.0}}] * 2
    assert resource_shortfall(plan, two, {"CPU": 2.0}) is None  # the minimum fits: start on 2, grow later
    assert "room for 2 workers of 1 CPU" in resource_shortfall(plan, two[:1], {"CPU": 1.0})
    fixed = _plan(_cfg(tmp_path / "x", batch_size=12, extra={"cluster.nodes": 3}), embedded=False)
    assert not fixed.elastic and fixed.min_workers == fixed.num_workers == 3


def test_an_elastic_run_survives_a_failed_group_start_per_lost_node(tmp_path: Path) -> None:
    """Ray Train never resets its count of failed worker-group starts, and an elastic restart after a node loss
    may fail one start (it asks for the old size first): the elastic limit follows --max-failures (none: no limit),
    a fixed size keeps one retry."""
    from sslrun.cluster.launcher import controller_failure_limit, max_failures

    elastic = {"cluster.nodes": 3, "cluster.min_nodes": 2}
    for extra, expected in (
        (elastic, (-1, -1)),
        ({**elastic, "cluster.max_failures": 4}, (4, 4)),
        ({"cluster.nodes": 3}, (0, 1)),
        ({"cluster.nodes": 3, "cluster.max_failures": 2}, (2, 1)),
    ):
        cfg = _cfg(tmp_path / "x", batch_size=12, extra=extra)
        plan = _plan(cfg, embedded=False)
        assert (max_failures(cfg, plan), controller_failure_limit(cfg, plan)) == expected, extra


def test_every_size_of_an_elastic_range_must_split_the_global_batch(tmp_path: Path) -> None:
    extra = {"cluster.nodes": 4, "cluster.min_nodes": 2}
    with pytest.raises(ConfigError) as err:
        _plan(_cfg(tmp_path / "x", batch_size=16, extra=extra), embedded=False)
    assert str(err.value) == (
        "the global batch size 16 cannot be split evenly over 3 workers, sizes the elastic range 2..4 may take; "
        "use a multiple of 12 (e.g. --batch-size 12)"
    )
    assert _plan(_cfg(tmp_path / "x", batch_size=24, extra=extra), embedded=False).elastic
    # whole nodes of 4 GPU workers: 8, 12 or 16 workers
    gpus = {**extra, "cluster.gpus_per_node": 4}
    with pytest.raises(ConfigError, match="over 12 workers, sizes the elastic range 8..16 may take; use a multiple"):
        _plan(_cfg(tmp_path / "x", batch_size=1024, extra=gpus), embedded=False)
    assert _plan(_cfg(tmp_path / "x", batch_size=960, extra=gpus), embedded=False).min_workers == 8
    with pytest.raises(ConfigError, match="--nodes 3 needs a Ray cluster"):  # no nodes to come and go here
        _plan(_cfg(tmp_path / "x", batch_size=24, extra={"cluster.nodes": 3, "cluster.min_nodes": 2}))


def test_resource_shortfall_names_what_is_missing(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path / "x", batch_size=64, extra={"cluster.nodes": 2})
    plan = _plan(cfg, embedded=False)  # STRICT_SPREAD, 2 workers of 1 CPU
    one_node = [{"Alive": True, "Resources": {"CPU": 4.0}}]
    assert "2 nodes that can each hold a worker of 1 CPU; the cluster has 1 such node(s)" in resource_shortfall(
        plan, one_node, {"CPU": 4.0}
    )
    two_nodes = [*one_node, {"Alive": True, "Resources": {"CPU": 1.0}}, {"Alive": False, "Resources": {"CPU": 8}}]
    assert resource_shortfall(plan, two_nodes, {"CPU": 5.0}) is None
    assert "2 CPU (free: 1)" in resource_shortfall(plan, two_nodes, {"CPU": 1.0})  # busy with other jobs
    gpu_plan = _plan(_cfg(tmp_path / "x", batch_size=64, extra={"cluster.gpus_per_node": 2}), embedded=False)
    assert "room for 2 workers of 1 CPU, 1 GPU" in resource_shortfall(gpu_plan, one_node, {"CPU": 4.0})


def test_cli_launch_rejects_bad_layouts_before_starting_anything(tmp_path: Path) -> None:
    runner = CliRunner()
    res = runner.invoke(app, ["launch", "--nodes", "3", "--output", str(tmp_path / "r")])
    assert res.exit_code == 2 and res.output.startswith("error: --nodes 3 needs a Ray cluster"), res.output
    res = runner.invoke(app, ["launch", "--batch-size", "255", "--output", str(tmp_path / "r")])
    assert res.exit_code == 2 and "does not divide by 2 workers" in res.output, res.output
    res = runner.invoke(app, ["launch", "--nodes", "4:2", "--output", str(tmp_path / "r")])
    assert res.exit_code == 2 and res.output.startswith("error: --nodes '4:2': need 1 <= MIN <= MAX"), res.output
    res = runner.invoke(app, ["launch", "--address", "nohost", "--output", str(tmp_path / "r")])
    assert res.exit_code == 2 and "is not auto, HOST:PORT or ray://HOST:PORT" in res.output, res.output
    res = runner.invoke(app, ["launch", "--resume", "--output", str(tmp_path / "r")])
    assert res.exit_code == 2 and "--resume: nothing to continue" in res.output, res.output
    assert not (tmp_path / "r").exists()


# ---- cluster configs -----------------------------------------------------------------------------------------
def _launch_args(command: str) -> list[str]:
    """The arguments after ``sslrun launch`` in a shell command line."""
    words = shlex.split(command.replace("\\\n", " "))
    i = words.index("sslrun")
    assert words[i + 1] == "launch", command
    return words[i + 2 :]


def _check_launch_command(args: list[str]) -> None:
    """Parse ``args`` with the real ``sslrun launch`` command (types, ranges, option names), without running it."""
    command = get_command(app).get_command(None, "launch")  # type: ignore[attr-defined]
    command.make_context("launch", list(args), resilient_parsing=False)


def test_aws_cluster_yaml_passes_ray_up_validation() -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((CONFIGS / "aws-gpu.yaml").read_text())
    validate_config(prepare_config(config))  # what `ray up` runs first: Ray's JSON schema plus its own checks
    assert config["docker"]["image"] == "rayproject/ray:2.60.0-py311-gpu"  # the Ray and Python sslrun pins
    starts = " ".join(config["head_start_ray_commands"] + config["worker_start_ray_commands"])
    assert starts.count("--disable-usage-stats") == 2 and "--dashboard-host=127.0.0.1" in starts
    header = "\n".join(line[1:] for line in (CONFIGS / "aws-gpu.yaml").read_text().splitlines() if line[:1] == "#")
    command = header[header.index("sslrun launch --") :].split("ray down")[0]  # the documented job submission
    _check_launch_command(_launch_args(command))


def test_kuberay_manifest_is_a_rayjob_whose_entrypoint_parses() -> None:
    import ray

    docs = list(yaml.safe_load_all((CONFIGS / "kuberay-rayjob.yaml").read_text()))
    kinds = {d["kind"]: d for d in docs}
    assert set(kinds) == {"RayJob"}  # data and runs in object storage: no shared volume
    job = kinds["RayJob"]
    assert job["apiVersion"] == "ray.io/v1" and job["spec"]["rayClusterSpec"]["rayVersion"] == ray.__version__
    args = _launch_args(job["spec"]["entrypoint"])
    _check_launch_command(args)
    assert args[args.index("--address") + 1] == "auto"
    assert args[args.index("--data-dir") + 1].startswith("s3://")
    assert args[args.index("--storage-path") + 1].startswith("s3://")
    spec = job["spec"]["rayClusterSpec"]
    for pod in [spec["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in spec["workerGroupSpecs"]]:
        assert not any("persistentVolumeClaim" in v for v in pod["volumes"])
        assert pod["containers"][0]["envFrom"] == [{"secretRef": {"name": "sslrun-s3"}}]
        env = {e["name"]: e["value"] for e in pod["containers"][0]["env"]}
        assert env["RAY_USAGE_STATS_ENABLED"] == "0"


def test_every_launch_command_in_the_cluster_docs_parses() -> None:
    text = DOCS.read_text()
    commands = [block for block in text.split("```")[1::2] if "sslrun launch" in block]
    assert len(commands) >= 3
    for block in commands:
        for command in block.split("\n\n"):
            if "sslrun launch" in command:
                _check_launch_command(_launch_args(command[command.index("sslrun") :]))


# ---- Ray: shared helpers -------------------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def _token_auth() -> Iterator[None]:
    """Ray 2.60 clusters use token authentication (the token in ~/.ray/auth_token); a driver that connects to an
    explicit address sends it only with RAY_AUTH_MODE=token, as docs/cluster.md tells users to set. On a fresh
    machine no token exists yet and `ray start --head` refuses to start in token mode: create one first."""
    with token_auth():
        yield


@pytest.fixture(scope="module")
def ray_head() -> Iterator[tuple[str, int]]:
    """One `ray start --head` (2 CPUs, loopback) for the in-process tests of this module: its address and the
    port of its Prometheus metrics endpoint."""
    require_loopback_namespace("tests/test_launch.py")
    port, metrics_port = free_port(), free_port()
    temp_dir = tempfile.mkdtemp(prefix="sslrun-ray-", dir="/tmp")  # short: Ray's socket paths must stay < 108 chars
    proc = subprocess.Popen(
        [
            RAY,
            "start",
            "--head",
            "--node-ip-address=127.0.0.1",
            f"--port={port}",
            "--num-cpus=2",
            "--num-gpus=0",
            "--include-dashboard=true",  # Ray Train's state tracking (on by default in sslrun) queries it
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={free_port()}",
            f"--metrics-export-port={metrics_port}",
            "--disable-usage-stats",
            f"--temp-dir={temp_dir}",
            "--block",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:

        def up() -> bool:
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", port)) == 0

        wait_for(up, 60, f"ray start --head on port {port}")
        yield f"127.0.0.1:{port}", metrics_port
    finally:
        stop_process_tree(proc)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _sslrun_metric(port: int, name: str) -> dict[str, float]:
    """``rank -> value`` of one sslrun metric on a node's Prometheus endpoint (summed over worker processes)."""
    import re
    import urllib.request

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    values: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith(name + "{"):
            rank = re.search(r'rank="(\d+)"', line)
            if rank:
                values[rank.group(1)] = values.get(rank.group(1), 0.0) + float(line.rsplit(" ", 1)[1])
    return values


def _record_batches(cfg: Any, hooks: Any, device: Any) -> Any:
    """The real trainer, with its real loader tapped: every batch this rank trains on is also saved to
    OUTPUT/batches/e<epoch>_b<batch>_rank<r>.pt. A test instrument the launcher's ``train_fn`` names."""
    import torch as _torch

    import sslrun.core.data.loader as loader_module
    from sslrun.core.distributed import rank
    from sslrun.core.train.trainer import train

    real = loader_module.ViewLoader
    out = Path(cfg.output) / "batches"
    out.mkdir(parents=True, exist_ok=True)

    class Tapped(real):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            (out / "stats.json").write_text(json.dumps({"mean": list(self.mean), "std": list(self.std)}))

        def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[Any]:
            for i, (views, labels) in enumerate(super().epoch(epoch, start_batch), start=start_batch):
                _torch.save({"views": views, "labels": labels}, out / f"e{epoch}_b{i}_rank{rank()}.pt")
                yield views, labels

    loader_module.ViewLoader = Tapped
    try:
        return train(cfg, hooks, device)
    finally:
        loader_module.ViewLoader = real


class _Replay:
    """Stands in for ``ViewLoader`` in ONE process: yields the global batches the two Ray workers trained on,
    rank 0's half then rank 1's (the order ``gather_with_grad`` and the MoCo queue use)."""

    def __init__(self, batches: Path, steps_per_epoch: int) -> None:
        self.batches, self.steps = batches, steps_per_epoch
        stats = json.loads((batches / "stats.json").read_text())  # the normalisation the workers' loaders used
        self.mean, self.std = stats["mean"], stats["std"]

    def __call__(self, *args: Any, **kwargs: Any) -> _Replay:  # the trainer "constructs" the loader
        return self

    def __len__(self) -> int:
        return self.steps

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[tuple[list[torch.Tensor], torch.Tensor]]:
        for b in range(start_batch, self.steps):
            parts = [self.batches / f"e{epoch}_b{b}_rank{r}.pt" for r in (0, 1)]
            if not all(p.exists() for p in parts):
                return
            halves = [torch.load(p, weights_only=True) for p in parts]
            views = [torch.cat([h["views"][i] for h in halves]) for i in range(len(halves[0]["views"]))]
            yield views, torch.cat([h["labels"] for h in halves])

    def close(self) -> None:
        pass


# ---- Ray: runs of the real trainer ---------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.ray
def test_two_ray_workers_match_one_process_on_the_same_global_batch(
    ray_head: tuple[str, int], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """2-worker gloo DDP through Ray == one process fed the same global batches, step by step.

    Exactly defined because nothing depends on how the batch is split: MoCo v2 on a ViT (LayerNorm only, no
    BatchNorm whose statistics would be per rank), no shuffled BN, a queue that every rank fills with the
    gathered keys in rank order, DDP averaging per-rank mean losses. The two processes draw their colour
    augmentations per rank, so the reference is fed the very tensors the workers trained on. Tolerance: 1e-5
    relative at every step, for float32 summation order (all-reduced gradients vs one batch); measured ~1e-7.
    """
    steps = 5
    common = [
        "encoder.kwargs.depth=1",
        "method.kwargs.shuffle_bn=false",
        "method.kwargs.queue_size=128",
        "method.kwargs.hidden_dim=64",
        "method.kwargs.output_dim=32",
        "log.log_every=1",
        "log.checkpoint_every=1000",
        "log.tensorboard=false",
    ]
    flags = {"method": "mocov2", "encoder": "vit_tiny", "batch_size": 32, "max_steps": steps, "lr": 0.5}
    address, metrics_port = ray_head
    ddp = _cfg(tmp_path / "ddp", *common, extra={"cluster.address": address, "cluster.workers_per_node": 2}, **flags)
    # the workers import the instrument by name (the editable install maps the repository root to sslrun)
    result = launch(ddp, echo=lambda _: None, train_fn="sslrun.tests.test_launch:_record_batches")
    assert result.steps == steps and result.plan.num_workers == 2 and result.info["world_size"] == 2
    # throughput exported as Ray metrics, per rank: 5 steps x 16 images on each rank
    counted: dict[str, float] = {}

    def exported() -> bool:
        counted.update(_sslrun_metric(metrics_port, "ray_sslrun_images_total"))
        return counted == {"0": 80.0, "1": 80.0}

    with contextlib.suppress(AssertionError):
        wait_for(exported, 30, "the exported metrics")  # Ray's agent exports every few seconds
    assert counted == {"0": 80.0, "1": 80.0}
    assert set(_sslrun_metric(metrics_port, "ray_sslrun_images_per_second")) == {"0", "1"}

    single = _cfg(tmp_path / "single", *common, **flags)
    steps_per_epoch = 512 // 32
    monkeypatch.setattr("sslrun.core.data.loader.ViewLoader", _Replay(tmp_path / "ddp" / "batches", steps_per_epoch))
    from sslrun.core.train.trainer import train

    ref = train(single, device=torch.device("cpu"))
    assert ref.steps == steps
    ddp_loss, one_loss = _losses(tmp_path / "ddp"), _losses(tmp_path / "single")
    assert sorted(ddp_loss) == sorted(one_loss) == list(range(1, steps + 1))
    for step in range(1, steps + 1):
        assert ddp_loss[step] == pytest.approx(one_loss[step], rel=1e-5, abs=0), step
    assert abs(ddp_loss[steps] - ddp_loss[1]) > 1e-3  # the weights really moved between the compared steps


@pytest.mark.slow
@pytest.mark.ray
def test_a_killed_worker_is_replaced_and_training_resumes_from_the_checkpoint(
    ray_head: tuple[str, int], tmp_path: Path
) -> None:
    """SIGKILL rank 1 after the first committed checkpoint: Ray restarts the group, the new attempt resumes from
    a committed checkpoint (not step 0) and the run still ends at max_steps."""
    max_steps = 60
    out = tmp_path / "run"
    extra = {"cluster.address": ray_head[0], "cluster.workers_per_node": 2, "cluster.max_failures": 1}
    cfg = _cfg(out, batch_size=16, max_steps=max_steps, extra=extra)
    killed: dict[str, Any] = {}

    def killer() -> None:
        try:
            killed["at"] = wait_for(lambda: committed_steps(out / "ray" / "run"), 240, "a committed checkpoint")
            record = json.loads((out / "workers" / "rank1.json").read_text())
            os.kill(record["pid"], signal.SIGKILL)
            killed["pid"] = record["pid"]
        except Exception as exc:  # reported by the assertions below
            killed["error"] = exc

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    result = launch(cfg, echo=lambda _: None)
    thread.join(timeout=5)
    assert "error" not in killed, killed
    assert result.steps == max_steps and not result.stopped
    attempts = [e for e in _events(out) if e["event"] == "attempt"]
    assert len(attempts) == 2 and attempts[0]["resumed_step"] is None
    resumed = attempts[1]["resumed_step"]
    assert resumed is not None and resumed >= min(killed["at"]) > 0  # a committed checkpoint, not step 0
    firsts = [e["step"] for e in _events(out) if e["event"] == "first_step"]
    assert resumed < firsts[1] <= resumed + 5  # the new attempt's first log (every 5 steps) follows it
    assert json.loads((out / "workers" / "rank1.json").read_text())["pid"] != killed["pid"]


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.parametrize(
    ("method", "encoder", "settings"),
    [
        ("swav", "small_cnn", ["method.kwargs.num_local_crops=2", "method.kwargs.num_prototypes=32"]),
        ("mocov3", "small_cnn", []),
        ("nnclr", "small_cnn", ["method.kwargs.queue_size=64", "method.kwargs.projection_hidden_dim=64"]),
        ("ijepa", "vit_tiny", ["encoder.kwargs.depth=1", "method.kwargs.predictor_depth=1"]),
    ],
)
def test_the_newer_methods_train_through_ray_launch(
    ray_head: tuple[str, int], tmp_path: Path, method: str, encoder: str, settings: list[str]
) -> None:
    """SwAV, MoCo v3, NNCLR and I-JEPA train under ``sslrun launch``: two Ray workers, DDP over gloo, a finite loss
    at every step and a checkpoint at the end."""
    out = tmp_path / "run"
    small = ["method.kwargs.hidden_dim=64"] if method in ("swav", "mocov3") else []
    extra = {"cluster.address": ray_head[0], "cluster.workers_per_node": 2}
    cfg = _cfg(
        out, *small, *settings, "log.log_every=1", method=method, encoder=encoder, batch_size=16, max_steps=3,
        extra=extra,
    )  # fmt: skip
    result = launch(cfg, echo=lambda _: None)
    assert result.steps == 3 and result.checkpoint is not None and result.checkpoint.exists()
    losses = _losses(out)
    assert sorted(losses) == [1, 2, 3] and all(math.isfinite(v) for v in losses.values()), losses


def _run_cli(args: list[str], env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [SSLRUN, "launch", *args], capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})}
    )


def _quick_args(output: Path, max_steps: int) -> list[str]:
    args = ["--method", "simclr", "--encoder", "small_cnn", "--dataset", "synthetic", "--epochs", "20"]
    args += ["--batch-size", "16", "--max-steps", str(max_steps), "--output", str(output)]
    for item in QUICK:
        args += ["--set", item]
    return args


@pytest.mark.slow
@pytest.mark.ray
def test_sigterm_checkpoints_and_stops_then_resume_finishes_on_the_embedded_default(tmp_path: Path) -> None:
    """The CLI on the embedded default (its own local Ray): SIGTERM once training runs makes every rank finish its
    step, write a checkpoint and stop, and the command exit 0; the same command again is refused, and with
    --resume it continues from that checkpoint to max_steps."""
    require_loopback_namespace("tests/test_launch.py")
    out, max_steps = tmp_path / "demo", 60

    def first_step() -> bool:
        return (out / "launch.jsonl").exists() and any(e["event"] == "first_step" for e in _events(out))

    proc = subprocess.Popen(
        [SSLRUN, "launch", *_quick_args(out, max_steps)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        wait_for(lambda: first_step() or proc.poll() is not None, 240, "the first training step")
        proc.send_signal(signal.SIGTERM)
        text, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            stop_process_tree(proc)
    assert proc.returncode == 0, text
    assert "ray: embedded local Ray; dashboard http://127.0.0.1:8265" in text
    assert "SIGTERM: asking the workers to write a checkpoint and stop" in text and "stopped:" in text, text
    stopped_at = max(committed_steps(out / "ray" / "demo"))
    assert 5 <= stopped_at < max_steps and f"stopped: {stopped_at} steps" in text

    again = CliRunner().invoke(app, ["launch", *_quick_args(out, max_steps)])  # no --resume: refused before Ray
    assert again.exit_code == 2 and "pass --resume to continue it" in again.output, again.output
    resumed = _run_cli([*_quick_args(out, max_steps), "--resume"])
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"finished: {max_steps} steps" in resumed.stdout
    assert f"TensorBoard:    tensorboard --logdir {out / 'tb'}" in resumed.stdout
    attempts = [e for e in _events(out) if e["event"] == "attempt"]
    assert [a["resumed_step"] for a in attempts] == [None, stopped_at]
    assert any(out.glob("tb/events.out.tfevents.*")) and (out / "checkpoints" / "last.pt").is_file()


@pytest.mark.slow
@pytest.mark.ray
def test_two_simulated_nodes_get_one_worker_each_with_strict_spread(tmp_path: Path) -> None:
    """`--address` to a two-node ``ray.cluster_utils.Cluster`` (head without CPUs): STRICT_SPREAD puts the two
    ranks on the two worker nodes (checked by node id: every simulated node has the same IP)."""
    require_loopback_namespace("tests/test_launch.py")
    with simulated_cluster(None, None) as (cluster, workers):
        out = tmp_path / "spread"
        res = _run_cli([*_quick_args(out, 20), "--address", cluster.address, "--nodes", "2"])
        assert res.returncode == 0, res.stdout + res.stderr
        assert "2 CPU workers (gloo) on 2 nodes (1 per node)" in res.stdout and "STRICT_SPREAD" in res.stdout
        assert "finished: 20 steps" in res.stdout
        nodes = {json.loads((out / "workers" / f"rank{r}.json").read_text())["node_id"] for r in (0, 1)}
        assert nodes == {w.node_id for w in workers}
