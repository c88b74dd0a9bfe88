"""Elastic runs: the worker group shrinks when a node goes, grows when one comes back, and a stopped run continues
on another number of workers, all with the same global batches, data order and schedules.

Real Ray Train workers, real FFCV files, real gloo DDP; a ``ray.cluster_utils.Cluster`` of simulated nodes for the
elastic range. Every rank records the sample ids of each batch it trains (``_record_ids``, the ``train_fn`` the
launcher runs), so the tests check from the run's own record that no image of the interrupted epoch was lost or
repeated. Run inside a loopback-only network namespace (see README).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from sslrun.cli.common import experiment_from_cli
from sslrun.cluster.launcher import launch
from sslrun.core.config import ExperimentConfig

# by package path: Ray workers import this module (its `_record_ids`) without tests/ on sys.path
from sslrun.tests.net import require_loopback_namespace
from sslrun.tests.ray_head import committed_steps, simulated_cluster, wait_for

RECORD = "sslrun.tests.test_elastic:_record_ids"
QUICK = [
    "data.dataset_kwargs.test_samples=64",
    "data.dataset_kwargs.size=16",
    "log.knn_every=0",
    "log.visuals_every=0",
    "log.progress=plain",
    "log.log_every=2",
    "schedule.warmup_epochs=0",
]


def _cfg(output: Path, samples: int, *overrides: str, **flags: Any) -> ExperimentConfig:
    flags = {"method": "simclr", "encoder": "small_cnn", "dataset": "synthetic", **flags}
    args = [*QUICK, f"data.dataset_kwargs.num_samples={samples}", *overrides]
    return experiment_from_cli(None, args, output=str(output), **flags)


def _record_ids(cfg: Any, hooks: Any, device: Any) -> Any:
    """The real trainer with its loader tapped: each batch this rank trains on is appended to
    ``OUTPUT/ids/rank<r>.jsonl`` as ``{"attempt", "world", "epoch", "batch", "ids"}`` (``attempt``: rank 0's start
    time, shared by every rank of one worker group). ``SSLRUN_TEST_STEP_SLEEP`` seconds of sleep per batch keep a
    short run going long enough for nodes to come and go. ``SSLRUN_TEST_HOLD=W:N``: a group of ``W`` workers stops
    before its ``N+1``-th batch and waits there until Ray Train replaces it, so a test that adds a node sees the
    group grow however fast the machine trains (a fast one could otherwise finish before the new node is up)."""
    import os

    import torch.distributed as dist

    import sslrun.core.data.loader as loader_module
    from sslrun.core.distributed import rank, world_size
    from sslrun.core.train.trainer import train

    attempt = [time.time()]
    if dist.is_initialized():
        dist.broadcast_object_list(attempt, src=0)
    pause = float(os.environ.get("SSLRUN_TEST_STEP_SLEEP", "0"))
    hold_world, hold_after = (int(v) for v in os.environ.get("SSLRUN_TEST_HOLD", "0:0").split(":"))
    started = [0]  # batches this attempt has started, over its epochs
    world = world_size()
    real = loader_module.ViewLoader
    out = Path(cfg.output) / "ids"
    out.mkdir(parents=True, exist_ok=True)

    class Tapped(real):  # type: ignore[misc, valid-type]
        def epoch(self, epoch: int, start_batch: int = 0) -> Any:
            for b, item in enumerate(super().epoch(epoch, start_batch), start=start_batch):
                started[0] += 1
                while world == hold_world and started[0] > hold_after:
                    # until Ray Train kills this group to resize it (the size read at the start: Ray destroys the
                    # process group before it kills the workers, and a released rank would train a batch alone)
                    time.sleep(0.2)
                record = {"attempt": attempt[0], "world": world, "epoch": epoch, "batch": b}
                record["ids"] = self.batch_indices(epoch, b).tolist()
                with open(out / f"rank{rank()}.jsonl", "a") as f:
                    f.write(json.dumps(record) + "\n")
                time.sleep(pause)
                yield item

    loader_module.ViewLoader = Tapped
    try:
        return train(cfg, hooks, device)
    finally:
        loader_module.ViewLoader = real


def _final_batches(output: Path) -> dict[tuple[int, int], list[int]]:
    """``(epoch, batch) -> sample ids`` of the global batch as finally trained: the last attempt that read it
    (an earlier attempt's batches after its last checkpoint were trained again). Also checks that every attempt
    that read a global batch read the same images, whatever its number of workers."""
    records = [json.loads(line) for f in sorted((output / "ids").glob("rank*.jsonl")) for line in f.open()]
    by_attempt: dict[tuple[int, int], dict[float, list[int]]] = {}
    for r in records:
        by_attempt.setdefault((r["epoch"], r["batch"]), {}).setdefault(r["attempt"], []).extend(r["ids"])
    final = {}
    for key, attempts in by_attempt.items():
        sets = {tuple(sorted(ids)) for ids in attempts.values()}
        assert len(sets) == 1, f"global batch {key} differed between attempts: {attempts}"
        final[key] = attempts[max(attempts)]
    return final


def _metrics(output: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]


def _events(output: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (output / "launch.jsonl").read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.ray
def test_a_run_stopped_on_two_workers_continues_on_one_exactly(tmp_path: Path) -> None:
    """2 workers for 4 steps, then ``--resume`` on 1 worker to step 8 == 8 uninterrupted steps on 2 workers:
    the same images in every global batch and the same losses, step by step.

    MoCo v2 on a ViT (LayerNorm only: no BatchNorm statistics that would be per rank) without shuffled BN; the
    queue is filled with the gathered keys in rank order, which is the one process's batch order. Tolerance 1e-5
    relative: float32 sums in another order (all-reduced gradients of two halves vs one batch).
    """
    require_loopback_namespace("tests/test_elastic.py")
    common = [
        "encoder.kwargs.depth=1",
        "method.kwargs.shuffle_bn=false",
        "method.kwargs.queue_size=64",
        "method.kwargs.hidden_dim=64",
        "method.kwargs.output_dim=32",
        "log.log_every=1",
        "log.checkpoint_every=1000",
        "log.tensorboard=false",
    ]
    flags = {"method": "mocov2", "encoder": "vit_tiny", "batch_size": 16, "epochs": 4, "lr": 0.5}

    def run(name: str, steps: int, workers: int, resume: bool = False) -> Any:
        extra = {"cluster.workers_per_node": workers}
        cfg = _cfg(tmp_path / name, 64, *common, max_steps=steps, resume=resume, extra=extra, **flags)
        return launch(cfg, echo=lambda _: None, train_fn=RECORD)

    whole = run("whole", 8, 2)
    first = run("resized", 4, 2)
    assert (whole.steps, first.steps) == (8, 4)
    second = run("resized", 8, 1, resume=True)
    assert second.steps == 8 and second.info["world_size"] == 1
    resizes = [(e["from"], e["to"], e["step"]) for e in _events(tmp_path / "resized") if e["event"] == "resize"]
    assert resizes == [(2, 1, 4)]

    ours, theirs = _final_batches(tmp_path / "resized"), _final_batches(tmp_path / "whole")
    assert sorted(ours) == sorted(theirs) == [(e, b) for e in (0, 1) for b in range(4)]  # 4 global batches/epoch
    for key in theirs:
        assert ours[key] == theirs[key], key  # rank 0's part then rank 1's == the one worker's batch, in order
    losses = {
        n: {m["step"]: m["train/loss"] for m in _metrics(tmp_path / n) if "train/loss" in m}
        for n in ("whole", "resized")
    }
    assert sorted(losses["resized"]) == sorted(losses["whole"]) == list(range(1, 9))
    for step in range(1, 9):
        assert losses["resized"][step] == pytest.approx(losses["whole"][step], rel=1e-5, abs=0), step
    assert abs(losses["whole"][8] - losses["whole"][5]) > 1e-3  # the resumed steps really trained


@pytest.mark.slow
@pytest.mark.ray
def test_an_elastic_run_shrinks_when_a_node_goes_and_grows_when_one_comes_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--nodes 2:3`` on a Cluster of 3 one-CPU nodes, one epoch: remove one after the first committed checkpoint
    -> the run continues on 2 workers; add a node back mid-epoch -> it grows to 3 and finishes. Each image of the
    epoch is trained exactly once in total, every global batch has the same 12 images as at any other size, the lr at
    every logged step is the uninterrupted schedule's, and TensorBoard's world size shows 3, 2, 3."""
    require_loopback_namespace("tests/test_elastic.py")

    from sslrun.core.train.schedules import build_schedules

    monkeypatch.setenv("SSLRUN_TEST_STEP_SLEEP", "0.15")  # read by the workers (Ray passes the environment on)
    # the 2-worker group holds after 5 batches, past its own first checkpoint (every 5 steps), until it grows
    monkeypatch.setenv("SSLRUN_TEST_HOLD", "2:5")
    # the restart after the lost node first asks for 3 workers (Ray Train's view of the cluster lags) and waits out
    # this timeout before it starts 2; a start that times out is retried, so a shorter wait only saves time
    monkeypatch.setenv("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "30")
    samples, batch, epochs = 240, 12, 1  # 20 global batches; 12 splits over 2 and 3 workers
    with simulated_cluster(None, None, None) as (cluster, nodes):
        out = tmp_path / "elastic"
        extra = {
            "cluster.address": cluster.address,
            "cluster.nodes": 3,
            "cluster.min_nodes": 2,
            "cluster.resize_interval_s": 2.0,
            "cluster.resource_wait_s": 120.0,
        }
        cfg = _cfg(out, samples, "log.checkpoint_every=5", batch_size=batch, epochs=epochs, extra=extra)
        # the launch in its own process: Cluster.add_node must run in this process's main thread (it installs
        # signal handlers), and so must the launcher's
        (tmp_path / "cfg.json").write_text(json.dumps(cfg.to_dict()))
        script = (
            "import json, sys\n"
            "from sslrun.cluster.launcher import launch\n"
            "from sslrun.core.config import ExperimentConfig\n"
            "cfg = ExperimentConfig.from_dict(json.load(open(sys.argv[1])))\n"
            f"result = launch(cfg, train_fn={RECORD!r})\n"
            "print('RESULT', json.dumps({'steps': result.steps, 'stopped': result.stopped}))\n"
        )
        proc = subprocess.Popen(
            [sys.executable, "-c", script, str(tmp_path / "cfg.json")],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        try:
            removed_after = wait_for(lambda: committed_steps(out / "ray" / "elastic"), 240, "a checkpoint")
            rank2 = json.loads((out / "workers" / "rank2.json").read_text())["node_id"]
            cluster.remove_node(next(n for n in nodes if n.node_id == rank2), allow_graceful=False)
            # back once the 2-worker group has trained and committed a checkpoint of its own
            wait_for(lambda: any(e.get("to") == 2 for e in _events(out)), 240, "the shrink")
            wait_for(lambda: max(committed_steps(out / "ray" / "elastic"), default=0) > max(removed_after), 240, "")
            cluster.add_node(num_cpus=1)
            stdout, _ = proc.communicate(timeout=400)
        finally:
            if proc.poll() is None:
                proc.kill()
        assert proc.returncode == 0, stdout[-3000:]
        result = json.loads(stdout.split("RESULT ", 1)[1].splitlines()[0])
        total = epochs * samples // batch
        assert result == {"steps": total, "stopped": False}

        resizes = [(e["from"], e["to"]) for e in _events(out) if e["event"] == "resize"]
        assert resizes == [(3, 2), (2, 3)], _events(out)
        assert "2..3 CPU workers (gloo) on 2..3 nodes (1 per node), elastic" in stdout
        assert "resize: 3 -> 2 workers" in stdout and "resize: 2 -> 3 workers" in stdout

        final = _final_batches(out)
        assert sorted(final) == [(e, b) for e in range(epochs) for b in range(samples // batch)]
        for e in range(epochs):
            ids = [i for b in range(samples // batch) for i in final[(e, b)]]
            assert sorted(ids) == list(range(samples)), f"epoch {e}: an image was lost or trained twice"
        assert all(len(v) == batch for v in final.values())  # the global batch at every step, at every size

        lr = build_schedules(cfg, samples // batch).lr
        logged = [m for m in _metrics(out) if "opt/lr" in m]
        for m in logged:
            assert m["opt/lr"] == pytest.approx(float(lr[m["step"] - 1]), rel=1e-6), m["step"]
        worlds = [int(m["perf/world_size"]) for m in logged]
        assert [w for i, w in enumerate(worlds) if i == 0 or w != worlds[i - 1]] == [3, 2, 3], worlds
