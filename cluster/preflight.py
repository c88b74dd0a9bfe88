"""What the driver checks and prepares before any Ray worker starts, each failure in one line.

In order: absolute paths, the plan (:mod:`sslrun.cluster.plan`), the run directory (an existing run is continued
only with ``--resume``, and ``--resume`` needs one; a storage URI is probed for its bucket, credentials and write
permission), the dataset (prepared here or reused from a store URI, never in a worker), then, once Ray is reached,
the cluster's resources (waiting a bounded time, asking an autoscaler for nodes meanwhile) and the data on every
node that can host a worker (:mod:`sslrun.cluster.staging`).
Plugins and their kwargs were validated before, by ``experiment_from_cli``.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from sslrun.cluster.plan import LaunchPlan, plan_launch, resource_shortfall
from sslrun.core.config import ExperimentConfig
from sslrun.core.errors import ConfigError
from sslrun.core.system import usable_cores

__all__ = ["data_splits", "prepare_launch", "reserve_resources"]

Echo = Callable[[str], None]
# Ray Train V2 writes this file under storage_path/name once the run has committed a checkpoint, and a trainer
# built with the same (storage_path, name) resumes from it.
_SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"


def prepare_launch(cfg: ExperimentConfig, echo: Echo) -> tuple[ExperimentConfig, LaunchPlan]:
    """Everything before Ray: plan the run, check its directories, prepare its data.

    Returns:
        The config the workers get (absolute paths, ``data.num_workers`` = the plan's loader threads) and the plan.

    Raises:
        ConfigError / DataError: an impossible layout, a run directory in the way, missing data.
    """
    cfg = _absolute_paths(cfg)
    local_cpus, local_gpus = _local_hardware()
    plan = plan_launch(cfg, embedded=cfg.cluster.address is None, local_cpus=local_cpus, local_gpus=local_gpus)
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
    return cfg, plan


def _absolute_paths(cfg: ExperimentConfig) -> ExperimentConfig:
    """Ray Train changes each worker's working directory to its own session folder
    (``<ray temp dir>/session_*/artifacts/<name>``), so every path the workers get must be absolute."""
    data = dataclasses.replace(
        cfg.data,
        data_dir=_abs(cfg.data.data_dir),
        root=_abs(cfg.data.root) if cfg.data.root is not None else None,
    )
    return dataclasses.replace(cfg, output=_abs(cfg.output), data=data)


def _abs(path: str) -> str:
    return path if "://" in path else str(Path(path).expanduser().resolve())


def _local_hardware() -> tuple[int, int]:
    """``(usable CPU cores, CUDA GPUs)`` of this machine."""
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

    from sslrun.core.data.remote import is_uri, open_store

    if is_uri(plan.storage_path):  # a bad bucket, credentials or endpoint: one line now, not on every worker
        store = open_store(plan.storage_path)
        store.check(write=True)
        fs, root = store.fs, store.root
    else:
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


def data_splits(cfg: ExperimentConfig) -> list[str | None]:
    """Every split the workers read: the training split, and the labelled splits of the online kNN monitor."""
    from sslrun.core.plugins.resolve import build_dataset

    splits: list[str | None] = [cfg.data.split]
    if cfg.log.knn_every > 0:  # the online kNN monitor reads the labelled splits on rank 0
        splits += list(getattr(build_dataset(cfg), "eval_splits", None) or [])
    return list(dict.fromkeys(splits))


def _prepare_data(cfg: ExperimentConfig, echo: Echo) -> None:
    """Prepare (or verify) every split the workers will read, here on the driver: FFCV's ``DatasetWriter`` forks
    ``multiprocessing`` workers, which must never happen inside a Ray worker. Under a store URI data dir the split
    is reused from the store (manifest checked) or prepared here and published. Each node gets its copy once Ray
    is reached (:func:`sslrun.cluster.staging.stage_on_nodes`)."""
    from sslrun.core.data.cache import prepare_split

    paths = [prepare_split(cfg.data, split)[0] for split in data_splits(cfg)]
    for path in dict.fromkeys(str(p) for p in paths):  # None (the first split) and its name give the same file
        echo(f"data: {path}")


@contextmanager
def reserve_resources(plan: LaunchPlan, timeout_s: float, echo: Echo) -> Iterator[None]:
    """Wait (bounded) until the connected Ray cluster can place every worker, then run the block.

    On a cluster (not the embedded Ray) that is short, the autoscaler is asked for the nodes meanwhile, and the
    request is withdrawn when the block ends: it persists otherwise and would keep the nodes up after the run.

    Raises:
        ConfigError: still short after ``timeout_s``, naming what is missing.
    """
    asked = _wait_for_resources(plan, timeout_s, echo)
    try:
        yield
    finally:
        if asked:
            _ask_autoscaler(plan, 0)


def _wait_for_resources(plan: LaunchPlan, timeout_s: float, echo: Echo) -> bool:
    """Poll until the plan fits; True when the autoscaler was asked for nodes (to withdraw after the run)."""
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
                f"the Ray cluster cannot start {plan.min_workers} workers: it needs {problem} "
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
    placement group Ray Train creates later claims the nodes); ``nodes=0`` withdraws the request. Harmless on
    clusters without an autoscaler."""
    from ray.autoscaler.sdk import request_resources

    share = {k: v * plan.workers_per_node for k, v in plan.resources_per_worker.items()}
    try:
        request_resources(bundles=[dict(share) for _ in range(nodes)])
    except Exception:  # Ray Client and some managed clusters do not accept the request: just wait
        return False
    return True
