"""The function every Ray Train worker runs: rebuild the config, check plugins, train with Ray hooks.

The launcher sends the experiment as plain data (``cfg.to_dict()``, Ray's advice for ``train_loop_config``) and
this side rebuilds it strictly with :meth:`ExperimentConfig.from_dict`. Entry points are per environment, so
each worker discovers the plugins again and checks their distributions and versions equal the driver's before
any work starts. Ray Train has already created the process group (gloo on CPU, NCCL on GPU); the trainer uses it,
builds its FFCV loader in distributed mode and writes TensorBoard on rank 0 only.

Every path in the config is absolute by the time it gets here: Ray Train changes each worker's working directory to
its own session folder (``<ray temp dir>/session_*/artifacts/<name>``).
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sslrun.core.config import ExperimentConfig
from sslrun.core.data.cache import refuse_preparing
from sslrun.core.errors import ConfigError
from sslrun.core.files import atomic_write_text
from sslrun.core.plugins.resolve import check_plugin_versions
from sslrun.core.train.progress import EVENTS_ENV

__all__ = ["WORKERS_DIR", "TrainFn", "resolve_train_fn", "train_loop_per_worker"]

WORKERS_DIR = "workers"  # OUTPUT/workers/rank<r>.json: pid, node and attempt start of each rank
TrainFn = Callable[..., Any]  # (cfg, hooks, device) -> TrainResult, i.e. sslrun.core.train.trainer.train


def train_loop_per_worker(config: dict[str, Any]) -> dict[str, Any]:
    """Ray Train's per-worker entry point.

    Args:
        config: ``{"experiment": cfg.to_dict(), "storage_path": str, "name": str, "train_fn": str | None}`` from
            the launcher, plain data only; ``train_fn`` names what to run (see :func:`resolve_train_fn`).

    Returns:
        Plain data about the run (Ray hands rank 0's value to the driver as ``Result.return_value``).

    Raises:
        ConfigError: the worker's plugins differ from the driver's (install the same versions everywhere).
    """
    import ray.train
    import ray.train.torch

    from sslrun.cluster.reporting import RayTrainHooks

    _quiet_ray_reports()
    os.environ[EVENTS_ENV] = "1"  # rank 0 sends its progress to the driver's console as event lines
    # the driver prepared (and copied to every node) each split before the workers started; preparing here would
    # keep the other ranks in a collective that times out
    refuse_preparing(
        "the driver prepares the data and copies it to the nodes the cluster has when the launch starts; a node "
        "that joins later cannot get it from a worker: pass --data-dir s3://bucket/prefix for clusters whose nodes "
        "change (or a path every node shares)"
    )
    cfg = ExperimentConfig.from_dict(config["experiment"])
    check_plugin_versions(cfg)
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    output = Path(cfg.output)
    _record_worker(output / WORKERS_DIR / f"rank{rank}.json", rank, ctx.get_world_size())

    hooks = RayTrainHooks(
        storage_path=config["storage_path"],
        name=config["name"],
        global_batch=cfg.data.batch_size,
        events=output / "launch.jsonl",
        output=output,
    )
    train_fn = resolve_train_fn(config.get("train_fn"))
    try:
        result = train_fn(cfg, hooks, ray.train.torch.get_device())
    finally:
        hooks.close()
    return {
        "output": str(result.output),
        "checkpoint": str(result.checkpoint) if result.checkpoint is not None else None,
        "steps": int(result.steps),
        "epochs": int(result.epochs),
        "final_loss": float(result.final_loss),
        "metrics": {k: float(v) for k, v in result.metrics.items()},
        "interrupted": bool(result.interrupted),
        "world_size": ctx.get_world_size(),
        "resumed_step": hooks.resumed_step,
        "first_step": hooks.first_step,
        "images_per_second": hooks.images_per_second,
    }


def resolve_train_fn(path: str | None) -> TrainFn:
    """The function a worker trains with: :func:`sslrun.core.train.trainer.train`, or the one ``path`` names.

    Args:
        path: ``"package.module:function"``, importable on every node, with the trainer's signature
            ``(cfg, hooks, device) -> TrainResult`` (a wrapper that instruments the real trainer); None = the trainer.

    Raises:
        ConfigError: ``path`` is malformed or does not import, in one line.
    """
    if path is None:
        from sslrun.core.train.trainer import train

        return train
    module, sep, attr = path.partition(":")
    if not (module and sep and attr):
        raise ConfigError(f"train function {path!r} is not 'package.module:function'")
    try:
        fn = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"train function {path!r} cannot be imported: {exc}") from exc
    if not callable(fn):
        raise ConfigError(f"train function {path!r} is not callable")
    return fn


def _record_worker(path: Path, rank: int, world_size: int) -> None:
    """Write where this rank runs (pid, node, host) at the start of each attempt: for operators who need to
    find a rank's process, and for the fault-injection tests, which kill a rank by this pid."""
    import ray

    path.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "rank": rank,
        "world_size": world_size,
        "pid": os.getpid(),
        "node_id": ray.get_runtime_context().get_node_id(),
        "hostname": socket.gethostname(),
        "started": time.time(),
    }
    atomic_write_text(path, json.dumps(record))  # readers never see a half-written file


def _quiet_ray_reports() -> None:
    """Ray Train logs every ``report`` of every rank at INFO, on a logger named after its *file* (so neither
    ``LoggingConfig`` nor the ``ray.train`` logger level reaches it); the trainer prints its own progress."""
    try:
        from ray.train.v2._internal.execution import context
    except ImportError:  # another Ray layout: keep its logs
        return
    logging.getLogger(context.__file__).setLevel(logging.WARNING)
