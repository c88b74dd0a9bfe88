"""The training engine: one loop for every method, on one process or under DDP (torchrun or Ray Train).

``train(cfg, hooks, device)`` builds the data, the method, the optimiser and the schedules, resumes from a
checkpoint when asked, and runs global steps until ``schedule.epochs`` (or ``schedule.max_steps``) is reached or
a stop is requested. The loop knows nothing method-specific: it calls the (DDP-wrapped) method with the views,
minimises ``out["loss"]``, and calls ``method.on_after_step(step, momentum)`` for EMA teachers and queues.

Stages of a step (``s`` = global step index, 0-based):

1. lr / weight decay / momentum for step ``s`` from the per-iteration schedules (:mod:`sslrun.core.train.schedules`);
2. forward under bf16 autocast on CUDA (fp32 on CPU);
3. one small all-reduce of ``[loss is not finite, stop requested]`` so every rank takes the same decision:
   a non-finite loss raises :class:`TrainingError` *before* the optimiser touches the weights, so the last
   checkpoint on disk stays the last good state; a stop finishes this step, checkpoints and returns;
4. backward, optional gradient clipping, optimiser step, ``on_after_step``;
5. logging every ``log.log_every`` steps, checkpoints every ``log.checkpoint_every`` steps and at epoch ends,
   the online kNN monitor every ``log.knn_every`` epochs.

Distributed contract (used by ``sslrun.cluster.worker``): an already initialised process group (Ray Train) is
used as is; with ``WORLD_SIZE > 1`` in the environment (torchrun) one is created and destroyed here.
``TrainHooks.on_log`` and ``on_checkpoint`` are called on every rank at the same steps (Ray's ``report`` is a
barrier); only rank 0 writes files.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from sslrun.core.config import ExperimentConfig
from sslrun.core.distributed import is_dist, rank, world_size
from sslrun.core.errors import CheckpointError, ConfigError, DataError, SslrunError, TrainingError
from sslrun.core.plugins import resolve
from sslrun.core.system import parse_device, usable_cores
from sslrun.core.train.checkpoint import capture_rng, check_compatible, load_checkpoint, restore_rng, save_checkpoint
from sslrun.core.train.monitor import Monitor
from sslrun.core.train.optim import apply_schedules, build_optimizer
from sslrun.core.train.schedules import Schedules, build_schedules

__all__ = [
    "TrainHooks",
    "TrainResult",
    "check_output_free",
    "checkpoint_dir",
    "load_checkpoint",
    "resolve_device",
    "summary_line",
    "train",
]

log = logging.getLogger(__name__)

#: Step files kept in OUTPUT/checkpoints besides last.pt (older ones are deleted as new ones are written).
KEEP_STEP_FILES = 3
#: Images per view shown in the start-of-run grid of augmented views.
GRID_IMAGES = 8


# ---- public API --------------------------------------------------------------------------------------------
class TrainHooks:
    """Callbacks from the loop (all no-ops here). Subclass to integrate with a launcher (Ray Train) or tests."""

    def on_log(self, step: int, metrics: dict[str, float]) -> None:
        """Called on every rank at the same steps with the same (all-reduced) metrics."""

    def on_checkpoint(self, step: int, epoch: int, path: Path | None, metrics: dict[str, float]) -> None:
        """Called on every rank after every checkpoint; rank 0 gets the file just written, the others None.

        ``step`` is the number of optimiser steps done and ``epoch`` the epoch the run continues in.
        """

    def should_stop(self) -> bool:
        """Polled every step; if any rank says True, all ranks finish the step, checkpoint and return."""
        return False

    def resume_from(self) -> Path | None:
        """A checkpoint file to resume from (wins over ``cfg.resume``), e.g. Ray's ``get_checkpoint()``."""
        return None


@dataclass
class TrainResult:
    """What a finished (or stopped) run produced.

    Attributes:
        output: the output directory.
        checkpoint: ``OUTPUT/checkpoints/last.pt`` on rank 0 (None on other ranks or if none was written).
        steps: optimiser steps done in total (including those before a resume).
        epochs: epochs completed.
        final_loss: mean loss over the last logging window (NaN if no step ran).
        metrics: the last value of every logged metric.
        interrupted: True when a stop request (signal or ``should_stop``) ended the run early.
    """

    output: Path
    checkpoint: Path | None
    steps: int
    epochs: int
    final_loss: float
    metrics: dict[str, float] = field(default_factory=dict)
    interrupted: bool = False


def checkpoint_dir(cfg: ExperimentConfig) -> Path:
    """``OUTPUT/checkpoints``."""
    return Path(cfg.output).expanduser() / "checkpoints"


def check_output_free(cfg: ExperimentConfig) -> None:
    """Refuse to start a fresh run over an existing one (its checkpoints would be mixed with the new ones).

    Raises:
        ConfigError: ``OUTPUT/checkpoints/last.pt`` exists and ``cfg.resume`` is off.
    """
    last = checkpoint_dir(cfg) / "last.pt"
    if not cfg.resume and last.exists():
        raise ConfigError(
            f"{cfg.output} already holds a run ({last}); pass --resume to continue it or choose another --output"
        )


def resolve_device(cfg: ExperimentConfig, device: torch.device | None = None) -> torch.device:
    """``device`` if given, else ``system.device`` (``auto`` = CUDA when available); CUDA uses ``LOCAL_RANK``.

    Raises:
        ConfigError: ``cuda`` was asked for but no GPU is visible.
    """
    if device is not None:
        return device
    dev = parse_device(cfg.system.device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    return dev


def summary_line(result: TrainResult) -> str:
    """The one line printed at the end of ``sslrun train``: where everything is and how to look at it."""
    out = result.output
    ckpt = result.checkpoint or "(none written)"
    return (
        f"checkpoint: {ckpt} | TensorBoard logs: {out / 'tb'} | metrics: {out / 'metrics.jsonl'} | "
        f"view with: tensorboard --logdir {out / 'tb'}"
    )


def train(cfg: ExperimentConfig, hooks: TrainHooks | None = None, device: torch.device | None = None) -> TrainResult:
    """Pretrain ``cfg.method`` on ``cfg.data`` and return where the results are.

    Args:
        cfg: the experiment (not modified).
        hooks: callbacks for launchers and tests.
        device: the device to train on (Ray passes ``ray.train.torch.get_device()``); None = ``system.device``.

    Raises:
        ConfigError / DataError / PluginError: bad input, before any step runs.
        CheckpointError: the checkpoint to resume from is missing, unreadable or from another architecture.
        TrainingError: a non-finite loss (naming the step), or a method that returns no ``"loss"``.
    """
    cfg = ExperimentConfig.from_dict(cfg.to_dict())  # a private copy: plugin versions are filled in below
    dev = resolve_device(cfg, device)
    created_group = False
    if not is_dist() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
        created_group = True
    try:
        return _Trainer(cfg, hooks or TrainHooks(), dev).run()
    finally:
        if created_group and is_dist():
            dist.destroy_process_group()


# ---- helpers -----------------------------------------------------------------------------------------------
def _intended_threads() -> int:
    """torch's intra-op threads for this process: ``OMP_NUM_THREADS`` if set, else the usable cores shared
    among the ranks of this node. Needed because importing FFCV sets torch to 1 thread (STACK-NOTES A0)."""
    if env := os.environ.get("OMP_NUM_THREADS"):
        with contextlib.suppress(ValueError):
            return max(1, int(env))
    cores = usable_cores()
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(1, cores // max(1, local_ranks))


def _seed_all(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device


def _all_ranks_try(fn: Any, *, first: bool, device: torch.device) -> Any:
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
    return result


def _unnormalize(x: torch.Tensor, mean: list[float], std: list[float]) -> torch.Tensor:
    m = torch.tensor(mean, device=x.device, dtype=torch.float32).view(1, 3, 1, 1)
    s = torch.tensor(std, device=x.device, dtype=torch.float32).view(1, 3, 1, 1)
    return (x.float() * s + m).clamp(0, 1)


class _Trainer:
    """One run: set-up, the loop, checkpoints, monitoring. Built and used once by :func:`train`."""

    def __init__(self, cfg: ExperimentConfig, hooks: TrainHooks, device: torch.device) -> None:
        self.cfg = cfg
        self.hooks = hooks
        self.device = device
        self.rank = rank()
        self.world = world_size()
        self.output = Path(cfg.output).expanduser()
        self.ckpt_dir = self.output / "checkpoints"
        self.cuda = device.type == "cuda"
        if self.cuda and device.index is not None:
            torch.cuda.set_device(device)  # NCCL collectives and all_gather_object use the current device
        prec = cfg.system.precision
        self.bf16 = prec == "bf16" or (prec == "auto" and self.cuda)
        # channels_last speeds up convolutions on CUDA (tensor cores) and on the CPU (oneDNN): measured here,
        # small_cnn steps 1.46x and resnet18 1.07x faster (docs/benchmarks.md).
        self.channels_last = cfg.system.channels_last
        # run state
        self.step = 0
        self.epoch = 0
        self.batch = 0  # index of the next batch within self.epoch
        self.last_ckpt_step = -1
        self.last_ckpt_path: Path | None = None
        self.metrics: dict[str, float] = {}
        self.final_loss = math.nan
        self._signal_stop = False
        self._stopped = False
        self._old_handlers: dict[int, Any] = {}
        self._window: dict[str, Any] = {}
        self.loader: Any = None
        self.knn: Any = None
        self.knn_enabled = False
        self.last_knn_step = -1
        self.start_step = 0
        self.resume_path: Path | None = None
        self.monitor: Monitor | None = None

    # ---- set-up ---------------------------------------------------------------------------------------
    def _setup(self) -> dict[str, Any] | None:
        cfg = self.cfg
        if cfg.data.batch_size % self.world:
            raise ConfigError(
                f"data.batch_size {cfg.data.batch_size} (global) is not divisible by the {self.world} workers; "
                f"use a multiple of {self.world}"
            )
        self.per_rank_batch = cfg.data.batch_size // self.world
        for key in ("log_every", "checkpoint_every"):
            if getattr(cfg.log, key) < 1:
                raise ConfigError(f"log.{key} must be >= 1, got {getattr(cfg.log, key)}")
        if cfg.plugin_versions:
            resolve.check_plugin_versions(cfg)
        else:
            resolve.validate_plugins(cfg)

        # resume source first: a bad checkpoint fails before paying for data preparation and FFCV's JIT
        ckpt = None
        path = self.hooks.resume_from()
        if path is None and cfg.resume:
            path = self.ckpt_dir / "last.pt"
            if not path.exists():
                raise CheckpointError(f"--resume: no checkpoint at {path}; run without --resume to start fresh")
        if path is not None:
            ckpt = load_checkpoint(path)
            check_compatible(ckpt, cfg, path)
            self.resume_path = Path(path)

        from sslrun.core.data.beton import ensure_prepared, verify_beton

        local_first = int(os.environ.get("LOCAL_RANK", str(self.rank))) == 0
        dataset = resolve.build_dataset(cfg)
        train_path = _all_ranks_try(
            lambda: ensure_prepared(cfg.data, cfg.data.split), first=local_first, device=self.device
        )
        self.manifest = verify_beton(train_path)
        self.image_size = int(max(self.manifest.image_size))
        eval_splits = getattr(dataset, "eval_splits", None)
        self._knn_note = None
        if cfg.log.knn_every > 0:
            if eval_splits:
                for split in eval_splits:
                    _all_ranks_try(lambda s=split: ensure_prepared(cfg.data, s), first=local_first, device=self.device)
            else:
                self._knn_note = f"online kNN monitor off: dataset {cfg.data.dataset!r} has no labelled splits"

        # method (same initial weights on every rank; DDP also broadcasts rank 0's)
        _seed_all(cfg.system.seed)
        views = resolve.method_views(cfg, self.image_size)
        method = resolve.build_method(cfg, self.image_size).to(self.device)
        if self.channels_last:
            method = method.to(memory_format=torch.channels_last)
        if self.cuda and self.world > 1 and cfg.system.sync_bn:
            # CUDA only: gloo cannot run SyncBatchNorm (STACK-NOTES C3)
            method = nn.SyncBatchNorm.convert_sync_batchnorm(method)
        self.method = method

        # data: built once, reused every epoch (each FFCV Loader pays its JIT again)
        # importing FFCV sets torch to 1 thread (STACK-NOTES A0): remember what was intended before it happens
        threads = torch.get_num_threads() if "ffcv" not in sys.modules else _intended_threads()
        from sslrun.core.data.loader import ViewLoader

        self.loader = ViewLoader(
            train_path,
            views,
            self.per_rank_batch,
            device=self.device,
            distributed=self.world > 1,
            seed=cfg.system.seed,
            num_workers=min(cfg.data.num_workers, usable_cores()),
            max_samples=cfg.data.max_samples,
        )
        self.threads = threads
        torch.set_num_threads(threads)
        # the views are normalised with the split's statistics; pixel-space methods (pretext tasks) undo it
        self.norm = (list(self.loader.mean), list(self.loader.std))
        method.set_normalization(*self.norm)
        self.steps_per_epoch = len(self.loader)
        if self.steps_per_epoch == 0:
            raise DataError(
                f"{train_path} gives no full batch of {self.per_rank_batch} per worker "
                f"(max_samples={cfg.data.max_samples}); use a smaller data.batch_size or more samples"
            )
        self.sched: Schedules = build_schedules(cfg, self.steps_per_epoch, method.momentum_schedule())
        lr0, _, _ = self.sched.at(0)
        self.peak_lr = float(self.sched.lr.max())
        self.optimizer = build_optimizer(method.param_groups(), cfg.optim, lr0)
        return ckpt

    def _restore(self, ckpt: dict[str, Any]) -> None:
        try:
            self.method.load_state_dict(ckpt["model"])
        except RuntimeError as exc:
            msg = str(exc).splitlines()[0]
            raise CheckpointError(f"checkpoint {self.resume_path} does not fit this model ({msg})") from exc
        sched = ckpt.get("schedules", {})
        if sched.get("steps_per_epoch", self.steps_per_epoch) != self.steps_per_epoch:
            raise CheckpointError(
                f"checkpoint {self.resume_path} was written with {sched['steps_per_epoch']} steps per epoch but this "
                f"config gives {self.steps_per_epoch}; resume with the same data.batch_size and data.max_samples"
            )
        try:
            self.optimizer.load_state_dict(ckpt["optimizer"])
        except (KeyError, ValueError) as exc:
            raise CheckpointError(f"optimiser state in {self.resume_path} does not fit optim.name") from exc
        self.step = int(ckpt["step"])
        self.epoch = int(ckpt["epoch"])
        self.batch = int(ckpt["batch_in_epoch"])
        self.last_ckpt_step = self.step
        self.metrics = {k: float(v) for k, v in ckpt.get("metrics", {}).items()}
        self.final_loss = self.metrics.get("train/loss", math.nan)
        rng = ckpt.get("rng", {})
        ranks = rng.get("ranks", [])
        if rng.get("world_size") == self.world and len(ranks) == self.world:
            restore_rng(ranks[self.rank])
        else:
            # another world size: the position in the epoch is kept (same global batch and steps per epoch) but
            # the images are sharded differently, and the method's own randomness is reseeded from the step
            _seed_all(self.cfg.system.seed + 1000 * self.step + self.rank)
        if self.rank == 0:
            old = ckpt.get("plugins", {})
            changed = [k for k, v in self.cfg.plugin_versions.items() if old.get(k, v) != v]
            if changed:
                log.warning("plugins changed since the checkpoint: %s", ", ".join(changed))

    def _wrap(self) -> nn.Module:
        model: nn.Module = self.method
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            # broadcast_buffers=False: the buffers that must agree (MoCo queue, DINO centre, step counters) are
            # kept identical by the methods themselves; re-sending them (MoCo: 32 MiB) every step buys nothing.
            # BN running stats stay per rank; rank 0's are the ones checkpointed and evaluated.
            # (torch >= 2.13 renamed the flag; init still syncs buffers, so all ranks start identical)
            no_sync = (
                {"forward_sync_buffers": False}
                if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
                else {"broadcast_buffers": False}
            )
            model = DistributedDataParallel(model, device_ids=[self.device.index] if self.cuda else None, **no_sync)
        if self.cfg.system.compile:
            model = torch.compile(model)  # type: ignore[assignment]
        return model

    # ---- signals --------------------------------------------------------------------------------------
    def _install_signals(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # Ray runs train functions in a thread; the launcher handles signals there

        def handler(signum: int, _frame: Any) -> None:
            if self._signal_stop and signum == signal.SIGINT:
                raise KeyboardInterrupt  # a second Ctrl-C aborts at once
            self._signal_stop = True
            if self.monitor is not None:
                self.monitor.echo(
                    f"{signal.Signals(signum).name}: stopping after this step and writing a checkpoint "
                    f"(Ctrl-C again to abort without one)"
                )

        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old_handlers[sig] = signal.signal(sig, handler)

    def _restore_signals(self) -> None:
        for sig, old in self._old_handlers.items():
            signal.signal(sig, old)
        self._old_handlers.clear()

    # ---- the run --------------------------------------------------------------------------------------
    def run(self) -> TrainResult:
        try:
            ckpt = self._setup()
            if ckpt is not None:
                self._restore(ckpt)
            else:
                # per-rank randomness of the method itself (crops and colour are seeded by the loader)
                _seed_all(self.cfg.system.seed + self.rank)
            self.start_step = self.step
            del ckpt
            self.model = self._wrap()
            self.max_steps = min(self.sched.total_steps, self.cfg.schedule.max_steps or self.sched.total_steps)
            self.monitor = Monitor(
                self.output,
                enabled=self.rank == 0,
                tensorboard=self.cfg.log.tensorboard,
                progress=self.cfg.log.progress,
                total_steps=self.max_steps,
                epochs=self.cfg.schedule.epochs,
                start_step=self.step,
            )
            if self.rank == 0:
                (self.output / "config.toml").write_text(self.cfg.to_toml())
            self._setup_knn()
            self._install_signals()
            self._loop()
            return self._finish()
        finally:
            self._restore_signals()
            if self.monitor is not None:
                self.monitor.close()
            if self.knn is not None:
                self.knn.close()
            if self.loader is not None:
                self.loader.close()

    def _setup_knn(self) -> None:
        if self.cfg.log.knn_every <= 0:
            return
        if self._knn_note:
            self.monitor.text("notes", self._knn_note, self.step)  # type: ignore[union-attr]
            return
        if self.rank == 0:
            from sslrun.core.train.online_knn import OnlineKnn

            dataset = resolve.build_dataset(self.cfg)
            self.knn = OnlineKnn(
                self.cfg.data,
                tuple(dataset.eval_splits),  # type: ignore[arg-type]
                self.device,
                k=self.cfg.log.knn_k,
                t=self.cfg.log.knn_t,
                max_samples=self.cfg.log.knn_max_samples,
                bf16=self.bf16 and self.cuda,
            )
        self.knn_enabled = True

    def _loop(self) -> None:
        mon = self.monitor
        assert mon is not None
        if self.step == 0 and self.rank == 0:
            lr, wd, _ = self.sched.at(0)
            mon.echo(
                f"training {self.cfg.method.name} + {self.cfg.encoder.name} on {self.cfg.data.dataset}: "
                f"{self.steps_per_epoch} steps/epoch x {self.cfg.schedule.epochs} epochs "
                f"(global batch {self.cfg.data.batch_size} on {self.world} worker(s), {self.device}); "
                f"peak lr {float(self.sched.lr.max()):.4g}"
            )
        elif self.rank == 0:
            where = f"step {self.step} (epoch {self.epoch + 1}, batch {self.batch})"
            mon.echo(f"resumed at {where} from {self.resume_path}")
        self._reset_window()
        first = True
        while self.epoch < self.cfg.schedule.epochs and self.step < self.max_steps and not self._stopped:
            epoch_start = time.perf_counter()
            broke = False
            with contextlib.closing(self.loader.epoch(self.epoch, self.batch)) as batches:
                for views in self._timed(batches):
                    if first:
                        self._views_grid(views)
                        first = False
                    self._train_step(views)
                    if self._stopped or self.step >= self.max_steps:
                        broke = True
                        break
            if not broke or self.batch >= self.steps_per_epoch:
                self._end_epoch(time.perf_counter() - epoch_start)
        ran = self.step > self.start_step
        if self.knn_enabled and ran and not self._stopped and self.last_knn_step != self.step:
            self._run_knn()  # a run cut short by max_steps still reports where its features stand

    def _timed(self, batches: Iterator[Any]) -> Iterator[list[torch.Tensor]]:
        """Yield the views of each batch, adding the time spent waiting for it to the logging window."""
        it = iter(batches)
        while True:
            t0 = time.perf_counter()
            try:
                views, _labels = next(it)
            except StopIteration:
                return
            self._window["data_s"] += time.perf_counter() - t0
            yield views

    # ---- one step -------------------------------------------------------------------------------------
    def _train_step(self, views: list[torch.Tensor]) -> None:
        t0 = time.perf_counter()
        step = self.step
        lr, wd, momentum = self.sched.at(step)
        apply_schedules(self.optimizer, lr, wd, self.peak_lr)
        if torch.get_num_threads() != self.threads:  # FFCV resets it on every new epoch iterator
            torch.set_num_threads(self.threads)
        if self.channels_last:
            views = [v.contiguous(memory_format=torch.channels_last) for v in views]
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            out = self.model(views)
        loss = out.get("loss") if isinstance(out, dict) else None
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise TrainingError(
                f"method {self.cfg.method.name!r} must return a dict with a scalar tensor 'loss', got "
                f"{type(out).__name__} with keys {sorted(out) if isinstance(out, dict) else '-'}"
            )
        stop_local = self._signal_stop or bool(self.hooks.should_stop())
        flags = torch.stack(
            [(~torch.isfinite(loss.detach().float())).float(), torch.tensor(float(stop_local), device=loss.device)]
        )
        if self.world > 1:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)  # every rank takes the same decision at the same step
        bad, stop = flags.tolist()  # the one host sync of the step
        if bad > 0:
            last = self.last_ckpt_path or self.resume_path
            raise TrainingError(
                f"non-finite loss at step {step} (epoch {self.epoch + 1}, batch {self.batch}); weights were not "
                f"updated and the last good checkpoint is {last or '(none written yet)'}; lower optim.lr, set "
                f"optim.grad_clip, or check the data"
            )
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.cfg.optim.grad_clip is not None:
            norm = nn.utils.clip_grad_norm_(self.method.parameters(), self.cfg.optim.grad_clip)
            self._window["terms"]["grad_norm"] = self._window["terms"].get("grad_norm", 0.0) + norm.detach().float()
        self.optimizer.step()
        self.method.on_after_step(step, momentum)

        w = self._window
        for k, v in out.items():
            if isinstance(v, torch.Tensor):
                if v.numel() != 1:
                    continue  # only scalar terms are logged
                v = v.detach().float().reshape(())
            w["terms"][k] = w["terms"].get(k, 0.0) + v
        w["steps"] += 1
        w["compute_s"] += time.perf_counter() - t0
        self.step += 1
        self.batch += 1
        if stop > 0:
            self._stopped = True
        if self.cfg.log.visuals_every > 0 and self.step % self.cfg.log.visuals_every == 0 and self.rank == 0:
            self._method_visuals()
        if self.step % self.cfg.log.log_every == 0 or self._stopped or self.step >= self.max_steps:
            self._log()
        if self.step % self.cfg.log.checkpoint_every == 0 or self._stopped:
            self._checkpoint()

    # ---- logging --------------------------------------------------------------------------------------
    def _reset_window(self) -> None:
        self._window = {"terms": {}, "steps": 0, "data_s": 0.0, "compute_s": 0.0, "t0": time.perf_counter()}

    def _log(self) -> None:
        w = self._window
        n = max(w["steps"], 1)
        wall = time.perf_counter() - w["t0"]
        names = sorted(w["terms"])
        values = [torch.as_tensor(w["terms"][k], dtype=torch.float32, device=self.device) / n for k in names]
        perf = (w["data_s"] / n, w["compute_s"] / n, wall)
        values += [torch.tensor(x, dtype=torch.float32, device=self.device) for x in perf]
        packed = torch.stack(values)
        if self.world > 1:
            dist.all_reduce(packed)
            packed /= self.world
        vals = packed.tolist()
        lr, wd, mom = self.sched.at(max(self.step - 1, 0))
        metrics = {("opt/" if k == "grad_norm" else "train/") + k: v for k, v in zip(names, vals, strict=False)}
        data_s, compute_s, wall_s = vals[len(names) :]
        metrics.update(
            {
                "opt/lr": lr,
                "opt/weight_decay": wd,
                "perf/images_per_s": w["steps"] * self.cfg.data.batch_size / max(wall_s, 1e-9),
                "perf/data_time_s": data_s,
                "perf/compute_time_s": compute_s,
                "epoch": self.step / self.steps_per_epoch,
            }
        )
        if mom is not None:
            metrics["opt/momentum"] = mom
        if self.cuda:
            metrics["perf/gpu_mem_gb"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        self.final_loss = metrics.get("train/loss", math.nan)
        self._emit(metrics)
        assert self.monitor is not None
        self.monitor.progress(
            self.step, self.epoch, self.final_loss, metrics["perf/images_per_s"], force=self.step >= self.max_steps
        )
        self._reset_window()

    def _emit(self, metrics: dict[str, float]) -> None:
        """Record metrics: TensorBoard + metrics.jsonl on rank 0, ``on_log`` on every rank."""
        self.metrics.update(metrics)
        assert self.monitor is not None
        epoch = self.step / self.steps_per_epoch  # fractional progress: 1.5 = half-way through the 2nd epoch
        self.monitor.scalars(self.step, round(epoch, 4), {k: v for k, v in metrics.items() if k != "epoch"})
        self.hooks.on_log(self.step, dict(metrics))

    def _views_grid(self, views: list[torch.Tensor]) -> None:
        if self.rank != 0 or self.monitor is None:
            return
        rows = [_unnormalize(v[:GRID_IMAGES].detach(), *self.norm).cpu() for v in views]  # copy: FFCV reuses buffers
        self.monitor.image_grid("views/augmented", rows, self.step, nrow=GRID_IMAGES)

    def _method_visuals(self) -> None:
        vis = self.method.visuals()
        if not vis or self.monitor is None:
            return
        for name, images in vis.items():
            self.monitor.image_grid(f"visuals/{name}", images, self.step, nrow=GRID_IMAGES)

    # ---- epoch end, kNN -------------------------------------------------------------------------------
    def _end_epoch(self, seconds: float) -> None:
        done = self.epoch + 1
        self.epoch += 1
        self.batch = 0
        if self.world > 1:  # the slowest rank's time, so that every rank logs the same value
            t = torch.tensor([seconds], device=self.device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            seconds = t.item()
        self._emit({"perf/epoch_time_s": seconds, "epoch": self.step / self.steps_per_epoch})
        knn_every = self.cfg.log.knn_every
        if self.knn_enabled and done % knn_every == 0:
            self._run_knn()
        if self.last_ckpt_step != self.step:
            self._checkpoint()

    def _run_knn(self) -> None:
        # rank 0 evaluates, the others wait in the broadcast (which is the barrier)
        result = torch.zeros(4, device=self.device)
        if self.rank == 0:
            try:
                r = self.knn.evaluate(self.method.encoder)
                result = torch.tensor([1.0, r["knn/top1"], r["knn/top5"], r["knn/time_s"]], device=self.device)
            except Exception as exc:
                if self.world == 1:
                    raise
                log.error("online kNN failed on rank 0: %s", exc)
        if self.world > 1:
            dist.broadcast(result, src=0)
        ok, top1, top5, secs = result.tolist()
        if ok == 0:
            raise TrainingError("the online kNN monitor failed on rank 0 (see its error above); set log.knn_every=0")
        self.last_knn_step = self.step
        self._emit({"knn/top1": top1, "knn/top5": top5, "knn/time_s": secs})
        assert self.monitor is not None
        self.monitor.echo(f"epoch {self.epoch}: kNN top-1 {top1:.2f}% (top-5 {top5:.2f}%, {secs:.1f} s)")

    # ---- checkpoints ----------------------------------------------------------------------------------
    def _checkpoint(self) -> None:
        rng_states: list[Any] = [capture_rng()]
        if self.world > 1:
            gathered: list[Any] = [None] * self.world
            dist.all_gather_object(gathered, rng_states[0])
            rng_states = gathered
        path = None
        if self.rank == 0:
            state = {
                "config": self.cfg.to_dict(),
                "model": self.method.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "step": self.step,
                "epoch": self.epoch,
                "batch_in_epoch": self.batch,
                "image_size": self.image_size,
                "schedules": self.sched.position(),
                "rng": {"world_size": self.world, "ranks": rng_states},
                "plugins": dict(self.cfg.plugin_versions),
                "metrics": {k: float(v) for k, v in self.metrics.items()},
            }
            step_file = self.ckpt_dir / f"step_{self.step:08d}.pt"
            save_checkpoint(state, step_file, also=self.ckpt_dir / "last.pt")
            for old in sorted(self.ckpt_dir.glob("step_*.pt"))[:-KEEP_STEP_FILES]:
                old.unlink(missing_ok=True)
            path = step_file
            self.last_ckpt_path = self.ckpt_dir / "last.pt"
        if self.world > 1:
            dist.barrier()  # the file exists before any rank reports it
        self.last_ckpt_step = self.step
        self.hooks.on_checkpoint(self.step, self.epoch, path, dict(self.metrics))

    # ---- the end --------------------------------------------------------------------------------------
    def _finish(self) -> TrainResult:
        if self._window["steps"] > 0:
            self._log()
        if self.last_ckpt_step != self.step:
            self._checkpoint()
        assert self.monitor is not None
        final = {"final_loss": self.final_loss}
        if "knn/top1" in self.metrics:
            final["knn/top1"] = self.metrics["knn/top1"]
        self.monitor.hparams(self.cfg.to_dict(), final)
        last = self.ckpt_dir / "last.pt"
        return TrainResult(
            output=self.output,
            checkpoint=last if self.rank == 0 and last.exists() else None,
            steps=self.step,
            epochs=self.epoch,
            final_loss=self.final_loss,
            metrics=dict(self.metrics),
            interrupted=self._stopped,
        )
