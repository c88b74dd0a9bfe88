"""``sslrun launch``: run the trainer on a Ray cluster (or the embedded local Ray) with Ray Train V2.

The driver validates everything it can before any worker starts, in this order, each failure one line:

1. the plan: how many workers, which resources each, which placement strategy, how many loader threads
   (:func:`plan_launch`: pure, so it is unit-tested without Ray); the global batch must divide by the workers;
2. plugins and their kwargs (already done by ``experiment_from_cli`` -> ``validate_plugins``);
3. the run directory: an existing run is continued only with ``--resume``, and ``--resume`` needs one;
4. the dataset: prepared here, on the driver, never in a worker (FFCV's writer forks: STACK-NOTES A3j);
5. the cluster: enough resources for the workers, or a clear message after ``cluster.resource_wait_s``.

Then one ``TorchTrainer`` runs :func:`sslrun.cluster.worker.train_loop_per_worker` on every worker with the
config as plain data. ``FailureConfig(max_failures=K, controller_failure_limit=1)``: a dead worker restarts the
whole group from the last committed checkpoint at most K times, and a worker group that cannot start fails
instead of being retried for ever (B1). SIGTERM / Ctrl-C write a stop flag that every rank polls; the trainer
then writes a checkpoint and returns, and ``--resume`` continues from it (same ``storage_path`` and ``name``).
"""

from __future__ import annotations

import dataclasses
import math
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sslrun.core.config import ExperimentConfig
from sslrun.core.errors import ConfigError, SslrunError, TrainingError
from sslrun.core.system import usable_cores

__all__ = ["LaunchPlan", "LaunchResult", "launch", "plan_launch", "resource_shortfall"]

Echo = Callable[[str], None]
# A worker group that cannot start is retried once (a node that joined late), then fit() raises (B1).
CONTROLLER_FAILURE_LIMIT = 1
# gloo/NCCL collective timeout. Ray detects a dead worker by polling (~2 s) and restarts the group, so this only
# bounds a rank that hangs while alive; Ray's default of 1800 s would hold the cluster for half an hour.
COLLECTIVE_TIMEOUT_S = 600
CHECKPOINTS_TO_KEEP = 2  # Ray-side copies in storage_path/name; the trainer keeps its own in OUTPUT/checkpoints
_SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"  # written by Ray Train V2 once a run has a checkpoint (B2)
_DEFAULT_CPU_WORKERS = 2  # the embedded default: 2 CPU workers (gloo DDP), which the README demo runs


@dataclass(frozen=True)
class LaunchPlan:
    """How a run is laid out on Ray.

    Attributes:
        nodes: number of nodes the workers are spread over.
        workers_per_node: workers on each node.
        num_workers: ``nodes * workers_per_node``, the DDP world size.
        use_gpu: one GPU per worker (NCCL) or CPU workers (gloo).
        resources_per_worker: what Ray reserves for each worker (``{"CPU": c, "GPU": 1}``).
        placement_strategy: PACK on one node; STRICT_SPREAD for one worker per node; SPREAD otherwise.
        loader_threads: FFCV threads per worker (``data.num_workers`` clipped to the CPUs a worker has).
        storage_path: where Ray Train persists checkpoints (absolute path or ``s3://`` / ``gs://`` URI).
        name: the Ray Train run name; the same ``(storage_path, name)`` resumes the run.
        embedded: True when sslrun starts its own local Ray.
    """

    nodes: int
    workers_per_node: int
    num_workers: int
    use_gpu: bool
    resources_per_worker: dict[str, float]
    placement_strategy: str
    loader_threads: int
    storage_path: str
    name: str
    embedded: bool

    def describe(self) -> str:
        """One line, e.g. ``2 CPU workers (gloo) on 1 node, 1 CPU and 1 loader thread each, PACK``."""
        kind = "GPU workers (NCCL)" if self.use_gpu else "CPU workers (gloo)"
        layout = "on 1 node" if self.nodes == 1 else f"on {self.nodes} nodes ({self.workers_per_node} per node)"
        res = ", ".join(f"{_fmt(v)} {k}" for k, v in self.resources_per_worker.items())
        threads = f"{self.loader_threads} loader thread{'s' if self.loader_threads != 1 else ''}"
        return f"{self.num_workers} {kind} {layout}, {res} and {threads} each, {self.placement_strategy}"


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


# ---- planning (pure) -----------------------------------------------------------------------------------------
def plan_launch(cfg: ExperimentConfig, *, embedded: bool, local_cpus: int, local_gpus: int) -> LaunchPlan:
    """Decide the layout of a run from its config and, on the embedded default, what this machine has.

    Args:
        cfg: the experiment; ``cfg.cluster`` holds the launch settings, ``cfg.output`` must be absolute.
        embedded: True when sslrun starts its own local Ray (no ``--address``).
        local_cpus: CPUs of this machine (used on the embedded default only).
        local_gpus: GPUs of this machine (used on the embedded default only).

    Raises:
        ConfigError: an impossible combination (several nodes without a cluster, more GPU workers than GPUs,
            a global batch that does not divide by the number of workers, ...), naming what to change.
    """
    cl = cfg.cluster
    if cl.address is not None:
        from sslrun.cluster.local_ray import parse_address

        parse_address(cl.address)  # the syntax, before anything is prepared; reachability when connecting
    if embedded and cl.nodes > 1:
        raise ConfigError(
            f"--nodes {cl.nodes} needs a Ray cluster: start one (docs/cluster.md) and pass --address HEAD_IP:6379, "
            f"or drop --nodes to run on this machine"
        )
    gpus = cl.gpus_per_node
    if embedded and gpus == 0 and cfg.system.device != "cpu":
        gpus = local_gpus  # the embedded default runs on what the machine has
    use_gpu = gpus > 0
    if embedded and use_gpu and gpus > local_gpus:
        raise ConfigError(f"--gpus-per-node {gpus} but this machine has {local_gpus} GPU(s); lower it")
    if cfg.system.device == "cuda" and not use_gpu:
        raise ConfigError(
            "system.device is cuda but the launch has no GPUs; pass --gpus-per-node N (GPUs on each node)"
        )
    if cfg.system.device == "cpu" and cl.gpus_per_node > 0:
        raise ConfigError("system.device is cpu but --gpus-per-node asks for GPUs; drop one of them")

    if cl.workers_per_node is not None:
        per_node = cl.workers_per_node
        if per_node < 1:
            raise ConfigError(f"cluster.workers_per_node must be >= 1, got {per_node}")
        if use_gpu and per_node > gpus:
            raise ConfigError(
                f"--workers-per-node {per_node} exceeds --gpus-per-node {gpus}: each GPU worker needs its own GPU"
            )
    elif use_gpu:
        per_node = gpus  # one worker per GPU, the DDP norm
    elif embedded:
        per_node = max(1, min(_DEFAULT_CPU_WORKERS, local_cpus // cl.cpus_per_worker))
    else:
        per_node = 1  # CPU clusters: one worker per node, using its cores through threads
    num_workers = cl.nodes * per_node

    if cfg.data.batch_size % num_workers:
        lo = max(num_workers, cfg.data.batch_size // num_workers * num_workers)
        raise ConfigError(
            f"the global batch size {cfg.data.batch_size} does not divide by {num_workers} workers; "
            f"use a multiple of {num_workers} (e.g. --batch-size {lo})"
        )

    if cl.placement_strategy is not None:
        strategy = cl.placement_strategy
    elif cl.nodes == 1:
        strategy = "PACK"
    elif per_node == 1:
        strategy = "STRICT_SPREAD"  # exactly one worker on each node, or fail clearly
    else:
        strategy = "SPREAD"

    resources: dict[str, float] = {"CPU": float(cl.cpus_per_worker)}
    if use_gpu:
        resources["GPU"] = 1.0
    if embedded:
        # Loader threads share this machine's cores with the other workers (FFCV fails when asked for more
        # threads than cores, and oversubscription slows everyone down: STACK-NOTES A3b).
        threads = max(1, min(cfg.data.num_workers, local_cpus // num_workers))
    else:
        threads = max(1, min(cfg.data.num_workers, cl.cpus_per_worker))

    output = Path(cfg.output)
    storage = cl.storage_path or str(output / "ray")
    if "://" not in storage:
        storage = str(Path(storage).expanduser().resolve())
    name = cl.name or output.name
    if not name or "/" in name or name in (".", ".."):
        raise ConfigError(f"--name {name!r} must be a plain directory name (no '/')")
    return LaunchPlan(
        nodes=cl.nodes,
        workers_per_node=per_node,
        num_workers=num_workers,
        use_gpu=use_gpu,
        resources_per_worker=resources,
        placement_strategy=strategy,
        loader_threads=threads,
        storage_path=storage,
        name=name,
        embedded=embedded,
    )


def resource_shortfall(plan: LaunchPlan, nodes: list[dict[str, Any]], available: dict[str, float]) -> str | None:
    """Why the cluster cannot run ``plan`` now, or None when it can.

    Args:
        plan: the layout.
        nodes: ``ray.nodes()`` (``Alive`` and total ``Resources`` per node).
        available: ``ray.available_resources()`` (what other jobs leave free).

    Returns:
        A phrase naming what is missing ("2 nodes that can each hold a worker of 1 CPU, 1 GPU; the cluster has 1
        (CPU 16, GPU 1)"), or None.
    """
    need = {k: v for k, v in plan.resources_per_worker.items() if v > 0}
    alive = [n for n in nodes if n.get("Alive", n.get("alive", True))]
    fits = [_fits(n.get("Resources", {}), need) for n in alive]
    have = _summary(alive)
    worker = ", ".join(f"{_fmt(v)} {k}" for k, v in need.items())
    if plan.placement_strategy == "STRICT_SPREAD":
        ok_nodes = sum(1 for f in fits if f >= 1)
        if ok_nodes < plan.num_workers:
            return (
                f"{plan.num_workers} nodes that can each hold a worker of {worker}; "
                f"the cluster has {ok_nodes} such node(s) ({have})"
            )
    elif plan.placement_strategy == "STRICT_PACK":
        if max(fits, default=0) < plan.num_workers:
            return f"one node that can hold {plan.num_workers} workers of {worker}; the cluster has {have}"
    elif sum(fits) < plan.num_workers:
        return f"room for {plan.num_workers} workers of {worker}; the cluster has {have}"
    busy = [
        f"{_fmt(v * plan.num_workers)} {k} (free: {_fmt(available.get(k, 0.0))})"
        for k, v in need.items()
        if available.get(k, 0.0) + 1e-9 < v * plan.num_workers
    ]
    if busy:
        return f"{', '.join(busy)} free; other jobs hold the rest"
    return None


# ---- launching -----------------------------------------------------------------------------------------------
def launch(cfg: ExperimentConfig, *, echo: Echo = print, train_fn: Callable[..., Any] | None = None) -> LaunchResult:
    """Run ``cfg`` with Ray Train: validate, start or reach Ray, train on every worker, report where results are.

    Args:
        cfg: the experiment, plugins already validated (``experiment_from_cli`` does it).
        echo: where progress lines go (the CLI passes ``typer.echo``).
        train_fn: what each worker runs instead of calling :func:`sslrun.core.train.trainer.train` directly, with the
            same signature ``(cfg, hooks, device) -> TrainResult``: a wrapper that instruments the real trainer
            (the tests record the batches each rank trains on this way). None = the trainer itself.

    Returns:
        Where the TensorBoard logs and checkpoints are, and how far the run got.

    Raises:
        ConfigError / DataError: bad settings, missing data, a cluster too small, in one line.
        TrainingError: training failed on a worker (after ``cluster.max_failures`` restarts).
        KeyboardInterrupt: a second Ctrl-C / SIGTERM while the first one's checkpoint was being written.
    """
    cfg = _absolute_paths(cfg)
    embedded = cfg.cluster.address is None
    local_cpus, local_gpus = _local_hardware()
    plan = plan_launch(cfg, embedded=embedded, local_cpus=local_cpus, local_gpus=local_gpus)
    if plan.nodes > 1 and "://" not in plan.storage_path:
        echo(
            f"note: storage path {plan.storage_path} is a local path: every node must see it at the same place "
            f"(NFS); use --storage-path s3://... or gs://... otherwise (docs/cluster.md)"
        )
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, num_workers=plan.loader_threads))
    from sslrun.core.train.trainer import check_output_free

    check_output_free(cfg)  # a fresh run must not write over an earlier one's checkpoints (--resume continues)
    _check_run_dir(plan, cfg)
    _prepare_data(cfg, echo)

    from sslrun.cluster.local_ray import connect_or_start

    session = connect_or_start(cfg.cluster.address, include_dashboard=True)
    try:
        where = "embedded local Ray" if session.started_here else f"Ray cluster at {session.address}"
        echo(f"ray: {where}; dashboard {session.dashboard_url or '(not running)'}")
        asked = _wait_for_resources(plan, cfg.cluster.resource_wait_s, echo)
        try:
            echo(f"launch: {plan.describe()}")
            stop = _StopFlag(plan.storage_path, plan.name)
            stop.clear()
            trainer = _build_trainer(cfg, plan, train_fn)
            with _stop_on_signals(stop, echo):
                result = _fit_in_thread(trainer)
            return _summarise(result, plan, echo)
        finally:
            if asked:
                _ask_autoscaler(plan, 0)
    finally:
        session.shutdown()


def _prepare_data(cfg: ExperimentConfig, echo: Echo) -> None:
    """Prepare (or verify) every split the workers will read, here on the driver: FFCV's writer forks
    processes and must never run inside a Ray worker (STACK-NOTES A3j). On several nodes, ``data.data_dir``
    must be shared storage (or prepared on each node at the same path): the workers only read it."""
    from sslrun.core.data.beton import ensure_prepared
    from sslrun.core.plugins.resolve import build_dataset

    splits: list[str | None] = [cfg.data.split]
    if cfg.log.knn_every > 0:  # the online kNN monitor reads the labelled splits on rank 0
        splits += list(getattr(build_dataset(cfg), "eval_splits", None) or [])
    paths = [ensure_prepared(cfg.data, split) for split in dict.fromkeys(splits)]
    for path in dict.fromkeys(paths):  # None (the first split) and its name give the same file
        echo(f"data: {path}")


def _absolute_paths(cfg: ExperimentConfig) -> ExperimentConfig:
    """Workers run in Ray's session directory (B1): every path they get must be absolute."""
    data = dataclasses.replace(
        cfg.data,
        data_dir=_abs(cfg.data.data_dir),
        root=_abs(cfg.data.root) if cfg.data.root is not None else None,
    )
    return dataclasses.replace(cfg, output=_abs(cfg.output), data=data)


def _abs(path: str) -> str:
    return path if "://" in path else str(Path(path).expanduser().resolve())


def _local_hardware() -> tuple[int, int]:
    cpus = usable_cores()
    try:
        import torch

        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:  # a broken CUDA install must not stop a CPU run
        gpus = 0
    return cpus, gpus


def _check_run_dir(plan: LaunchPlan, cfg: ExperimentConfig) -> None:
    """Ray resumes any run whose ``(storage_path, name)`` already holds checkpoints: do that only on request, and
    refuse ``--resume`` with nothing to resume (it would fail on every worker, once per allowed restart)."""
    import pyarrow.fs

    fs, root = pyarrow.fs.FileSystem.from_uri(plan.storage_path)
    snapshot = f"{root.rstrip('/')}/{plan.name}/{_SNAPSHOT_FILE}"
    has_ray_run = fs.get_file_info(snapshot).type != pyarrow.fs.FileType.NotFound
    if has_ray_run and not cfg.resume:
        raise ConfigError(
            f"{plan.storage_path}/{plan.name} already holds a run with checkpoints; pass --resume to continue it, "
            f"or choose another --output or --name for a new run"
        )
    last = Path(cfg.output) / "checkpoints" / "last.pt"
    if cfg.resume and not has_ray_run and not last.exists():
        raise ConfigError(
            f"--resume: nothing to continue: no Ray Train checkpoint under {plan.storage_path}/{plan.name} and no "
            f"{last}; check --output, --storage-path and --name, or drop --resume to start a new run"
        )


def _wait_for_resources(plan: LaunchPlan, timeout_s: float, echo: Echo) -> bool:
    """Wait (bounded) until the cluster can place every worker; autoscaling clusters add nodes meanwhile.

    Returns:
        True when the autoscaler was asked for nodes (the request must be withdrawn after the run).
    """
    import ray

    deadline = time.monotonic() + max(0.0, timeout_s)
    announced = asked = False
    while True:
        problem = resource_shortfall(plan, ray.nodes(), ray.available_resources())
        if problem is None:
            return asked
        if time.monotonic() >= deadline:
            if asked:
                _ask_autoscaler(plan, 0)
            raise ConfigError(
                f"the Ray cluster cannot start {plan.num_workers} workers: it needs {problem} "
                f"(waited {timeout_s:.0f} s); add nodes, or lower --nodes / --workers-per-node / --cpus-per-worker"
            )
        if not announced:
            echo(f"waiting up to {timeout_s:.0f} s for the cluster: it needs {problem}")
            announced = True
            if not plan.embedded:
                asked = _ask_autoscaler(plan, plan.nodes)
        time.sleep(min(2.0, max(0.1, deadline - time.monotonic())))


def _ask_autoscaler(plan: LaunchPlan, nodes: int) -> bool:
    """Tell an autoscaling cluster what the run needs: one bundle per node's share of the workers (a hint; the
    placement group Ray Train creates later claims the nodes); ``nodes=0`` withdraws the request, which otherwise
    persists and would keep the nodes up after the run. Harmless on clusters without an autoscaler."""
    from ray.autoscaler.sdk import request_resources

    share = {k: v * plan.workers_per_node for k, v in plan.resources_per_worker.items()}
    try:
        request_resources(bundles=[dict(share) for _ in range(nodes)])
    except Exception:  # Ray Client and some managed clusters do not accept the request: just wait
        return False
    return True


def _build_trainer(cfg: ExperimentConfig, plan: LaunchPlan, train_fn: Callable[..., Any] | None) -> Any:
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from sslrun.cluster.worker import train_loop_per_worker

    loop_config: dict[str, Any] = {
        "experiment": cfg.to_dict(),  # plain data; rebuilt strictly on each worker
        "storage_path": plan.storage_path,
        "name": plan.name,
    }
    if train_fn is not None:
        loop_config["train_fn"] = train_fn
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        torch_config=TorchConfig(timeout_s=COLLECTIVE_TIMEOUT_S),
        scaling_config=ScalingConfig(
            num_workers=plan.num_workers,
            use_gpu=plan.use_gpu,
            resources_per_worker=dict(plan.resources_per_worker),
            placement_strategy=plan.placement_strategy,
        ),
        run_config=RunConfig(
            name=plan.name,
            storage_path=plan.storage_path,
            failure_config=FailureConfig(
                max_failures=cfg.cluster.max_failures, controller_failure_limit=CONTROLLER_FAILURE_LIMIT
            ),
            checkpoint_config=CheckpointConfig(num_to_keep=CHECKPOINTS_TO_KEEP),
            # Ray Train logs every report at INFO; the trainer prints its own progress, sslrun its own summary.
            logging_config=LoggingConfig(log_level="WARNING"),
        ),
    )


class _StopFlag:
    """The stop request the driver raises and every worker polls (a file in the run's storage)."""

    def __init__(self, storage_path: str, name: str) -> None:
        from sslrun.cluster.reporting import stop_flag_location

        self.fs, self.path = stop_flag_location(storage_path, name)
        self.requested = False

    def clear(self) -> None:
        """Remove a flag left by an earlier, stopped attempt (otherwise ``--resume`` would stop at once)."""
        import pyarrow.fs

        if self.fs.get_file_info(self.path).type != pyarrow.fs.FileType.NotFound:
            self.fs.delete_file(self.path)

    def request(self) -> None:
        self.requested = True
        self.fs.create_dir(self.path.rpartition("/")[0], recursive=True)
        with self.fs.open_output_stream(self.path) as f:
            f.write(f"stop requested at {time.time():.0f}\n".encode())


@contextmanager
def _stop_on_signals(stop: _StopFlag, echo: Echo) -> Iterator[None]:
    """First SIGINT/SIGTERM: ask the workers to checkpoint and stop. Second: abort at once.

    Installed after ``ray.init`` (which replaces the driver's SIGTERM handler with ``sys.exit``) and only in the
    main thread (Python delivers signals there); fit() runs in another thread, so Ray's own SIGINT handler,
    which aborts without a checkpoint, is not installed.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        if stop.requested:
            raise KeyboardInterrupt
        echo(
            f"{signal.Signals(signum).name}: asking the workers to write a checkpoint and stop "
            f"(again to abort without one)"
        )
        stop.request()

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


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
        raise _training_error(box["error"]) from box["error"]
    return box["result"]


def _training_error(exc: BaseException) -> BaseException:
    """A Ray Train failure as one line: the first failing rank's own error when it is an sslrun error."""
    from ray.train import ControllerError, WorkerGroupError

    if isinstance(exc, WorkerGroupError) and exc.worker_failures:
        rank, cause = min(exc.worker_failures.items())
        if isinstance(cause, SslrunError):
            return type(cause)(f"worker rank {rank}: {cause}")
        return TrainingError(
            f"worker rank {rank} failed: {type(cause).__name__}: {_first_line(cause)} (traceback in the worker "
            f"output above); restarts allowed: --max-failures"
        )
    if isinstance(exc, ControllerError):
        return TrainingError(
            f"Ray Train could not run the workers: {_first_line(exc.controller_failure)}; check `ray status` "
            f"and the resources asked for"
        )
    if isinstance(exc, SslrunError | KeyboardInterrupt):
        return exc
    return TrainingError(f"launch failed: {type(exc).__name__}: {_first_line(exc)}")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


def _summarise(result: Any, plan: LaunchPlan, echo: Echo) -> LaunchResult:
    info: dict[str, Any] = dict(result.return_value or {})
    stopped = bool(info.get("interrupted"))
    output = Path(info.get("output") or "")
    checkpoint = Path(info["checkpoint"]) if info.get("checkpoint") else None
    ray_checkpoint = result.checkpoint.path if result.checkpoint is not None else None
    steps = int(info.get("steps", 0))
    loss = float(info.get("final_loss", math.nan))
    verb = "stopped" if stopped else "finished"
    echo(f"{verb}: {steps} steps, final loss {loss:.4f}, {plan.num_workers} workers")
    if info.get("images_per_second"):
        echo(f"  throughput:     {info['images_per_second']:.0f} images/s")
    echo(f"  TensorBoard:    tensorboard --logdir {output / 'tb'}")
    echo(f"  checkpoint:     {checkpoint if checkpoint is not None else '(none written)'}")
    echo(f"  Ray checkpoint: {ray_checkpoint or '(none)'}")
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


def _fits(resources: dict[str, float], need: dict[str, float]) -> int:
    """How many workers of ``need`` fit on a node with ``resources`` in total."""
    return min((math.floor(resources.get(k, 0.0) / v + 1e-9) for k, v in need.items()), default=0)


def _summary(nodes: list[dict[str, Any]]) -> str:
    if not nodes:
        return "no alive nodes"
    parts = []
    for n in nodes:
        res = n.get("Resources", {})
        parts.append(f"CPU {_fmt(res.get('CPU', 0.0))}, GPU {_fmt(res.get('GPU', 0.0))}")
    return f"{len(nodes)} node(s): " + "; ".join(parts)


def _fmt(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"
