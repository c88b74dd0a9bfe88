"""Everything a run is made of, built in one place: :func:`build_run` (data, method, optimiser, schedules) for the
trainer and :func:`build_model` (the method alone) for anything that only needs the weights.

Order matters for exact resumes and for multi-rank runs: the training split is prepared by one rank per node
first (the others reuse its file), the method is built from ``system.seed`` (identical initial weights on every
rank), the loader is built once (each FFCV loader pays its numba JIT again), and ``method.setup`` runs once steps
per epoch are known, before the schedules and the optimiser are built from the method.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from sslrun.core.config import ExperimentConfig
from sslrun.core.distributed import is_dist, rank, world_size
from sslrun.core.errors import CheckpointError, ConfigError, DataError, SslrunError
from sslrun.core.interfaces import Method, SetupContext
from sslrun.core.plugins import resolve
from sslrun.core.system import usable_cores
from sslrun.core.train.checkpoint import checkpoint_dir, seed_all
from sslrun.core.train.optim import build_optimizer
from sslrun.core.train.schedules import Schedules, build_schedules

__all__ = [
    "Run",
    "build_model",
    "build_run",
    "check_run_config",
    "pin_threads",
    "prepare_for_ranks",
    "use_sync_bn",
]

T = TypeVar("T")

log = logging.getLogger(__name__)


@dataclass
class Run:
    """The built objects of one training run on this rank.

    Attributes:
        cfg: the experiment (plugin versions filled in).
        device: where the method lives and the views arrive.
        rank, world: this process's rank and the number of data-parallel processes.
        method: the unwrapped method (what checkpoints store and evaluation reads).
        loader: the training :class:`~sslrun.core.data.loader.ViewLoader` (batches of this rank).
        optimizer: over ``method.param_groups()``.
        schedules: lr / weight decay / momentum for every global step.
        image_size: side of the training split's images (what the method was built for).
        steps_per_epoch: batches per epoch on this rank (every rank has the same).
        threads: torch's intra-op threads for this process (see :func:`pin_threads`).
        bf16: forward passes under bf16 autocast.
        peak_lr: the largest lr of the schedule (the fixed lr of ``fixed_lr`` parameter groups).
    """

    cfg: ExperimentConfig
    device: torch.device
    rank: int
    world: int
    method: Method
    loader: Any
    optimizer: torch.optim.Optimizer
    schedules: Schedules
    image_size: int
    steps_per_epoch: int
    threads: int
    bf16: bool
    peak_lr: float

    @property
    def output(self) -> Path:
        """The run's output directory."""
        return Path(self.cfg.output).expanduser()

    @property
    def checkpoint_dir(self) -> Path:
        """``OUTPUT/checkpoints``."""
        return checkpoint_dir(self.cfg)

    @property
    def max_steps(self) -> int:
        """Where this run stops: the end of the schedule, or ``schedule.max_steps`` if that comes first."""
        total = self.schedules.total_steps
        return min(total, self.cfg.schedule.max_steps or total)

    def state_dict(self) -> dict[str, Any]:
        """The checkpoint keys of what was built: config, weights, optimiser state, schedules, plugins."""
        return {
            "config": self.cfg.to_dict(),
            "model": self.method.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "image_size": self.image_size,
            "schedules": self.schedules.position(),
            "plugins": dict(self.cfg.plugin_versions),
        }

    def load_state_dict(self, ckpt: dict[str, Any], source: Path) -> None:
        """Load a checkpoint's weights and optimiser state (``source``: the file, for error messages).

        Raises:
            CheckpointError: the weights, the steps per epoch or the optimiser state do not fit this run.
        """
        try:
            self.method.load_state_dict(ckpt["model"])
        except RuntimeError as exc:
            msg = str(exc).splitlines()[0]
            raise CheckpointError(f"checkpoint {source} does not fit this model ({msg})") from exc
        theirs = ckpt.get("schedules", {}).get("steps_per_epoch", self.steps_per_epoch)
        if theirs != self.steps_per_epoch:
            raise CheckpointError(
                f"checkpoint {source} was written with {theirs} steps per epoch but this config gives "
                f"{self.steps_per_epoch}; resume with the same data.batch_size and data.max_samples"
            )
        try:
            self.optimizer.load_state_dict(ckpt["optimizer"])
        except (KeyError, ValueError) as exc:
            raise CheckpointError(f"optimiser state in {source} does not fit optim.name") from exc

    def close(self) -> None:
        """Release the loader."""
        self.loader.close()


def check_run_config(cfg: ExperimentConfig, world: int) -> None:
    """Refuse what cannot run before anything is built, and record the plugins' versions in ``cfg``.

    Raises:
        ConfigError / PluginError: a batch that does not split over the ranks, a bad logging interval, plugins
            that are missing, misconfigured or of other versions than ``cfg.plugin_versions``.
    """
    if cfg.data.batch_size % world:
        raise ConfigError(
            f"data.batch_size {cfg.data.batch_size} (global) is not divisible by the {world} workers; "
            f"use a multiple of {world} (an elastic run gets a size like this only when Ray finds part of a node "
            f"free: keep other jobs off its nodes)"
        )
    for key in ("log_every", "checkpoint_every"):
        if getattr(cfg.log, key) < 1:
            raise ConfigError(f"log.{key} must be >= 1, got {getattr(cfg.log, key)}")
    if cfg.plugin_versions:
        resolve.check_plugin_versions(cfg)
    else:
        resolve.validate_plugins(cfg)


def build_model(cfg: ExperimentConfig, image_size: int, device: torch.device | None = None) -> Method:
    """The method of ``cfg`` for ``image_size`` pixel images, on ``device``, in the run's memory format.

    ``system.channels_last`` speeds up convolutions on CUDA (tensor cores) and on the CPU (oneDNN): small_cnn
    steps 1.46x and resnet18 1.07x faster (docs/benchmarks.md). BatchNorm becomes SyncBatchNorm where
    :func:`use_sync_bn` says so.
    """
    device = device or torch.device("cpu")
    method = resolve.build_method(cfg, image_size).to(device)
    if cfg.system.channels_last:
        method = method.to(memory_format=torch.channels_last)
    if use_sync_bn(cfg, method, device, world_size()):
        method = nn.SyncBatchNorm.convert_sync_batchnorm(method)
    return method


def use_sync_bn(cfg: ExperimentConfig, method: Method, device: torch.device, world: int) -> bool:
    """Whether the method's BatchNorm layers become SyncBatchNorm: under DDP on CUDA with ``system.sync_bn``,
    unless the method keeps BatchNorm per rank on purpose: a non-empty ``per_rank_batchnorm`` attribute (the
    reason, e.g. MoCo v2's shuffling BN), which is then said in one log line.

    On CPU ranks BatchNorm always stays per rank: DDP over gloo refuses SyncBatchNorm (``ValueError:
    SyncBatchNorm layers only work with GPU modules``).
    """
    if device.type != "cuda" or world < 2 or not cfg.system.sync_bn:
        return False
    reason = method.per_rank_batchnorm
    if reason:
        if rank() == 0:
            log.warning("%s keeps BatchNorm per rank, system.sync_bn does not apply to it: %s", cfg.method.name, reason)
        return False
    return True


def build_run(cfg: ExperimentConfig, device: torch.device) -> Run:
    """Prepare the training split and build the method, its loader, schedules and optimiser (after
    :func:`check_run_config`).

    Raises:
        DataError: the split cannot be prepared (on any rank), or gives no full batch per rank.
    """
    from sslrun.core.data.format import verify_beton

    world = world_size()
    train_path = prepare_for_ranks(cfg, cfg.data.split, device)
    image_size = int(max(verify_beton(train_path).image_size))

    seed_all(cfg.system.seed)  # the same initial weights on every rank (DDP also broadcasts rank 0's)
    method = build_model(cfg, image_size, device)
    threads = pin_threads()
    from sslrun.core.data.loader import ViewLoader  # imports FFCV (which resets torch's threads) on first use

    with contextlib.ExitStack() as on_error:
        loader = ViewLoader(
            train_path,
            resolve.method_views(cfg, image_size),
            cfg.data.batch_size // world,
            device=device,
            distributed=world > 1,
            seed=cfg.system.seed,
            num_workers=min(cfg.data.num_workers, usable_cores()),
            max_samples=cfg.data.max_samples,
        )
        on_error.callback(loader.close)
        pin_threads(threads)
        # the views are normalised with the split's statistics; pixel-space methods (pretext tasks) undo it
        method.set_normalization(list(loader.mean), list(loader.std))
        steps_per_epoch = len(loader)
        if steps_per_epoch == 0:
            raise DataError(
                f"{train_path} gives no full batch of {cfg.data.batch_size // world} per worker "
                f"(max_samples={cfg.data.max_samples}); use a smaller data.batch_size or more samples"
            )
        total = cfg.schedule.epochs * steps_per_epoch
        method.setup(
            SetupContext(image_size=image_size, steps_per_epoch=steps_per_epoch, total_steps=total, world_size=world)
        )
        schedules = build_schedules(cfg, steps_per_epoch, method.momentum_schedule())
        optimizer = build_optimizer(method.param_groups(), cfg.optim, schedules.at(0)[0])
        on_error.pop_all()  # built: the run owns the loader now
    precision = cfg.system.precision
    return Run(
        cfg=cfg,
        device=device,
        rank=rank(),
        world=world,
        method=method,
        loader=loader,
        optimizer=optimizer,
        schedules=schedules,
        image_size=image_size,
        steps_per_epoch=steps_per_epoch,
        threads=threads,
        bf16=precision == "bf16" or (precision == "auto" and device.type == "cuda"),
        peak_lr=float(schedules.lr.max()),
    )


def prepare_for_ranks(cfg: ExperimentConfig, split: str | None, device: torch.device) -> Path:
    """The local ``.beton`` of ``split``: the first rank of each node prepares it (or, under a store URI data dir,
    copies it to the node), the others then reuse it. In a process that refuses to prepare (Ray workers, see
    :func:`sslrun.core.data.cache.refuse_preparing`) a split that is not there is one line on every rank instead."""
    from sslrun.core.data.cache import ensure_prepared

    local_first = int(os.environ.get("LOCAL_RANK", str(rank()))) == 0
    return _all_ranks_try(lambda: ensure_prepared(cfg.data, split), first=local_first, device=device)


def _all_ranks_try(fn: Callable[[], T], *, first: bool, device: torch.device) -> T:
    """Run ``fn`` on the ranks where ``first`` is True, then on the others, without letting a failure on one rank
    leave the others waiting forever in a collective: the error flag is all-reduced after each phase."""
    if not is_dist():
        return fn()
    result, error = None, None
    for phase in (True, False):
        if first == phase:
            try:
                result = fn()
            except SslrunError as exc:
                error = exc
        flag = torch.tensor([1.0 if error is not None else 0.0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() > 0:
            if error is not None:
                raise error
            raise DataError("another rank failed while preparing the data (see its error above); fix that first")
    return result  # type: ignore[return-value]


def pin_threads(threads: int | None = None) -> int:
    """Set torch's intra-op thread count to ``threads`` if it differs, and return it.

    FFCV changes torch's thread count when imported and for every loader and epoch iterator (see
    docs/internals.md, section 'FFCV changes torch's thread count'), so the trainer puts it back after building
    the loader and before every step. ``None`` picks the count: the current one while FFCV is not imported yet,
    else ``OMP_NUM_THREADS`` if set, else the usable cores shared among the ranks of this node.
    """
    if threads is None:
        threads = torch.get_num_threads() if "ffcv" not in sys.modules else _threads_per_rank()
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return threads


def _threads_per_rank() -> int:
    if env := os.environ.get("OMP_NUM_THREADS"):
        with contextlib.suppress(ValueError):
            return max(1, int(env))
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(1, usable_cores() // max(1, local_ranks))
