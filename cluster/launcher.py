"""``sslrun launch``: run the trainer on a Ray cluster (or the embedded local Ray) with Ray Train V2.

The steps, each in its own module:

1. :func:`sslrun.cluster.preflight.prepare_launch`: absolute paths, the plan (:mod:`sslrun.cluster.plan`), the run
   directory and the dataset, all before Ray is reached;
2. :func:`sslrun.cluster.local_ray.connect_or_start`: the embedded Ray or the cluster at ``--address``;
3. :func:`sslrun.cluster.preflight.reserve_resources`: room for every worker, or a clear message in bounded time;
4. here: one ``TorchTrainer`` runs :func:`sslrun.cluster.worker.train_loop_per_worker` on every worker with the
   config as plain data, ``fit()`` in a helper thread while the main thread handles signals
   (:mod:`sslrun.cluster.stop`), then a summary of where the results are. Throughout, the driver's console
   (:mod:`sslrun.cluster.console`) shows one progress view and the lines that matter, and keeps every process's
   output in ``OUTPUT/logs/``.

``FailureConfig(max_failures=K, controller_failure_limit=1)``: a dead worker restarts the whole group from the last
committed checkpoint at most K times (an elastic run, ``--nodes MIN:MAX``, restarts at whatever size in its range the
cluster holds, without limit unless ``--max-failures`` is given), and a worker group that cannot start fails instead
of being retried for ever (see docs/internals.md, section 'Ray Train V2 retries a worker group that cannot start for
ever'). SIGTERM / Ctrl-C raise a stop flag that every rank polls; the trainer then writes a checkpoint and returns,
and ``--resume`` continues from it (same ``storage_path`` and ``name``), on the same or another number of workers.
"""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sslrun.cluster.console import LOGS_DIR, LaunchConsole
from sslrun.cluster.plan import LaunchPlan
from sslrun.cluster.preflight import data_splits, prepare_launch, reserve_resources
from sslrun.cluster.staging import stage_on_nodes
from sslrun.cluster.stop import StopFlag, stop_workers_on_signals
from sslrun.cluster.worker import WORKERS_DIR, resolve_train_fn
from sslrun.core.config import ExperimentConfig
from sslrun.core.errors import SslrunError, TrainingError

__all__ = ["LaunchResult", "launch"]

Echo = Callable[[str], None]
# A fixed-size worker group that cannot start is retried once (a node that joined late), then fit() raises; Ray's
# default (-1) retries it for ever. Elastic runs use controller_failure_limit() instead.
CONTROLLER_FAILURE_LIMIT = 1
# gloo/NCCL collective timeout. Ray detects a dead worker by polling (~2 s) and restarts the group, so this only
# bounds a rank that hangs while alive; Ray's default of 1800 s would hold the cluster for half an hour.
COLLECTIVE_TIMEOUT_S = 600
CHECKPOINTS_TO_KEEP = 2  # Ray-side copies in storage_path/name; the trainer keeps its own in OUTPUT/checkpoints


@dataclass(frozen=True)
class LaunchResult:
    """What a finished (or stopped) launch produced.

    Attributes:
        output: the run's output directory (config.toml, checkpoints/, tb/, metrics.jsonl, launch.jsonl).
        checkpoint: the trainer's last checkpoint file (on rank 0's node), or None.
        ray_checkpoint: the Ray Train checkpoint directory in ``storage_path/name``, or None.
        steps: optimiser steps done in total.
        final_loss: the last logged loss.
        stopped: True when SIGTERM / Ctrl-C stopped the run early (continue it with ``--resume``).
        plan: the layout it ran with.
        info: everything rank 0 returned (metrics, resumed step, throughput).
    """

    output: Path
    checkpoint: Path | None
    ray_checkpoint: str | None
    steps: int
    final_loss: float
    stopped: bool
    plan: LaunchPlan
    info: dict[str, Any]


def launch(
    cfg: ExperimentConfig, *, echo: Echo = print, train_fn: str | None = None, verbose: bool = False
) -> LaunchResult:
    """Run ``cfg`` with Ray Train: validate, start or reach Ray, train on every worker, report where results are.

    Args:
        cfg: the experiment, plugins already validated (``experiment_from_cli`` does it).
        echo: where the driver's own lines go (the CLI passes ``typer.echo``); the workers' messages and the
            progress view go to stdout (:class:`~sslrun.cluster.console.LaunchConsole`, as ``cfg.log.progress``
            says), every process's full output to ``OUTPUT/logs/``.
        train_fn: ``"package.module:function"`` that each worker imports and runs instead of
            :func:`sslrun.core.train.trainer.train`, with the same signature ``(cfg, hooks, device) -> TrainResult``:
            a wrapper that instruments the real trainer (the tests record the batches each rank trains on this
            way). A name, not a callable, so that Ray's ``train_loop_config`` stays plain data. None = the trainer.
        verbose: show every line Ray's processes print, as Ray would (they are in ``OUTPUT/logs/`` either way).

    Returns:
        Where the TensorBoard logs and checkpoints are, and how far the run got.

    Raises:
        ConfigError / DataError: bad settings, missing data, a cluster too small, in one line.
        TrainingError: training failed on a worker (after ``cluster.max_failures`` restarts).
        KeyboardInterrupt: a second Ctrl-C / SIGTERM while the first one's checkpoint was being written.
    """
    if train_fn is not None:
        resolve_train_fn(train_fn)  # a typo fails here, not on every worker once per allowed restart
    cfg, plan = prepare_launch(cfg, echo)

    from sslrun.cluster.local_ray import connect_or_start

    output = Path(cfg.output)
    progress = cfg.log.progress
    with LaunchConsole(output, verbose=verbose, progress=progress, world_size=plan.num_workers) as console:
        session = connect_or_start(cfg.cluster.address, include_dashboard=True)
        try:
            console.attach_ray()
            where = "embedded local Ray" if session.started_here else f"Ray cluster at {session.address}"
            echo(f"ray: {where}; {session.dashboard_hint()}")
            with reserve_resources(plan, cfg.cluster.resource_wait_s, echo):
                stage_on_nodes(cfg.data, data_splits(cfg), plan, echo)  # each node's copy, before any worker
                echo(f"launch: {plan.describe()}")
                flag = StopFlag(plan.storage_path, plan.name)
                flag.clear()
                trainer = _build_trainer(cfg, plan, train_fn)
                with stop_workers_on_signals(flag, echo):
                    try:
                        result = _fit_in_thread(trainer)
                    except BaseException as exc:
                        error = _training_error(exc, output)
                        if error is exc:
                            raise
                        raise error from exc
        finally:
            console.detach_ray()
            session.shutdown()
    return _summarise(result, plan, echo, console.logs)


def _build_trainer(cfg: ExperimentConfig, plan: LaunchPlan, train_fn: str | None) -> Any:
    """The ``TorchTrainer`` for ``plan``; its ``train_loop_config`` is plain data only."""
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from sslrun.cluster.worker import train_loop_per_worker

    loop_config: dict[str, Any] = {
        "experiment": cfg.to_dict(),  # rebuilt strictly on each worker
        "storage_path": plan.storage_path,
        "name": plan.name,
        "train_fn": train_fn,
    }
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        torch_config=TorchConfig(timeout_s=COLLECTIVE_TIMEOUT_S),
        scaling_config=ScalingConfig(
            # elastic: Ray Train starts the group at the size the cluster holds within the range, restarts it
            # smaller when a node goes, and larger (every resize_interval_s) when room comes back
            num_workers=(plan.min_workers, plan.num_workers) if plan.elastic else plan.num_workers,
            elastic_resize_monitor_interval_s=plan.resize_interval_s,
            use_gpu=plan.use_gpu,
            resources_per_worker=dict(plan.resources_per_worker),
            placement_strategy=plan.placement_strategy,
        ),
        run_config=RunConfig(
            name=plan.name,
            storage_path=plan.storage_path,
            failure_config=FailureConfig(
                max_failures=max_failures(cfg, plan), controller_failure_limit=controller_failure_limit(cfg, plan)
            ),
            checkpoint_config=CheckpointConfig(num_to_keep=CHECKPOINTS_TO_KEEP),
            # Ray Train logs every report at INFO; the trainer prints its own progress, sslrun its own summary.
            logging_config=LoggingConfig(log_level="WARNING"),
        ),
    )


def max_failures(cfg: ExperimentConfig, plan: LaunchPlan) -> int:
    """Restarts allowed after a worker dies: ``--max-failures``; an elastic run with none given restarts for as
    long as its range can be held (-1, Ray's "no limit"), since losing a node is what it is for."""
    if plan.elastic and cfg.cluster.max_failures == 0:
        return -1
    return cfg.cluster.max_failures


def controller_failure_limit(cfg: ExperimentConfig, plan: LaunchPlan) -> int:
    """Worker-group starts that may fail: once for a fixed size (a node that joins late); for an elastic run as
    many as its restarts (:func:`max_failures`). Ray Train counts failed starts over the whole run and never resets
    the count, and after a node is lost its view of the cluster lags (refreshed every 20 s), so the restart often
    asks for the old size first and times out: one failed start per lost node, which a limit of 1 would turn
    into the end of a spot run at its second lost node."""
    return max_failures(cfg, plan) if plan.elastic else CONTROLLER_FAILURE_LIMIT


def _fit_in_thread(trainer: Any) -> Any:
    """``trainer.fit()`` in a helper thread, the main thread waiting with a timeout so signals reach it."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["result"] = trainer.fit()
        except BaseException as exc:  # handed to the main thread below
            box["error"] = exc

    thread = threading.Thread(target=run, name="sslrun-fit", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(timeout=0.5)
    if "error" in box:
        raise box["error"]
    return box["result"]


def _training_error(exc: BaseException, output: Path) -> BaseException:
    """A Ray Train failure as one line: the first failing rank's own error when it is an sslrun error."""
    from ray.train import ControllerError, WorkerGroupError

    if isinstance(exc, WorkerGroupError) and exc.worker_failures:
        rank, cause = min(exc.worker_failures.items())
        if isinstance(cause, SslrunError):
            return type(cause)(f"worker rank {rank}: {cause}")
        return TrainingError(
            f"worker rank {rank} failed: {type(cause).__name__}: {_first_line(cause)} (traceback in "
            f"{_worker_log(output, rank)}); restarts allowed: --max-failures"
        )
    if isinstance(exc, ControllerError):
        return TrainingError(
            f"Ray Train could not run the workers: {_first_line(exc.controller_failure)}; check `ray status` "
            f"and the resources asked for"
        )
    if isinstance(exc, SslrunError | KeyboardInterrupt):
        return exc
    return TrainingError(f"launch failed: {type(exc).__name__}: {_first_line(exc)}")


def _worker_log(output: Path, rank: int) -> Path:
    """The log file of ``rank``'s last process (its pid is in ``OUTPUT/workers/rank<r>.json``), else the log folder."""
    try:
        pid = json.loads((output / WORKERS_DIR / f"rank{rank}.json").read_text())["pid"]
    except (OSError, ValueError, KeyError):
        return output / LOGS_DIR
    return output / LOGS_DIR / f"RayTrainWorker-{pid}.log"


def _under(uri: str, path: str) -> str:
    """``path`` under ``uri``, keeping the URI's query (``s3://b/runs?endpoint_override=...``)."""
    base, sep, query = uri.partition("?")
    return f"{base.rstrip('/')}/{path}{sep}{query}"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


def _summarise(result: Any, plan: LaunchPlan, echo: Echo, logs: Path) -> LaunchResult:
    """Print where the results are and turn rank 0's return value into a :class:`LaunchResult`."""
    info: dict[str, Any] = dict(result.return_value or {})
    stopped = bool(info.get("interrupted"))
    output = Path(info.get("output") or "")
    checkpoint = Path(info["checkpoint"]) if info.get("checkpoint") else None
    ray_checkpoint = result.checkpoint.path if result.checkpoint is not None else None
    steps = int(info.get("steps", 0))
    loss = float(info.get("final_loss", math.nan))
    verb = "stopped" if stopped else "finished"
    workers = info.get("world_size") or plan.num_workers
    echo(f"{verb}: {steps} steps, final loss {loss:.4f}, {workers} workers")
    if info.get("images_per_second"):
        echo(f"  throughput:     {info['images_per_second']:.0f} images/s")
    echo(f"  TensorBoard:    tensorboard --logdir {output / 'tb'}")
    if "://" in plan.storage_path:  # the run's copy in object storage (cluster/mirror.py), readable from anywhere
        run_copy = _under(plan.storage_path, f"{plan.name}/run")
        echo(f"  run in storage: {run_copy} (tensorboard --logdir {_under(run_copy, 'tb')} with boto3 installed)")
    echo(f"  checkpoint:     {checkpoint if checkpoint is not None else '(none written)'}")
    echo(f"  Ray checkpoint: {ray_checkpoint or '(none)'}")
    echo(f"  logs:           {logs} (every process's full output)")
    if stopped:
        echo("  continue with the same command plus --resume")
    return LaunchResult(
        output=output,
        checkpoint=checkpoint,
        ray_checkpoint=ray_checkpoint,
        steps=steps,
        final_loss=loss,
        stopped=stopped,
        plan=plan,
        info=info,
    )
