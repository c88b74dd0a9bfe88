"""The training engine: one loop for every method, on one process or under DDP (torchrun or Ray Train).

``train(cfg, hooks, device)`` checks the config, builds the run (:func:`~sslrun.core.train.build.build_run`),
resumes from a checkpoint when asked, and hands it to :func:`fit`: the epoch and step loop, which runs
:func:`train_step` until ``schedule.epochs`` (or ``schedule.max_steps``) is reached or a stop is agreed. The loop
knows nothing method-specific: it calls the (DDP-wrapped) method with the views, minimises ``out["loss"]``, and
calls ``method.on_after_step(step, momentum)`` for EMA teachers and queues. Logging, checkpoints, the online kNN
monitor, image grids and stop signals are callbacks (:mod:`sslrun.core.train.callbacks`).

Distributed contract (used by ``sslrun.cluster.worker``): an already initialised process group (Ray Train) is
used as is; with ``WORLD_SIZE > 1`` in the environment (torchrun) one is created and destroyed here. Callbacks
run on every rank at the same steps (Ray's ``report`` is a barrier); only rank 0 writes files.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from sslrun.core.config import ExperimentConfig
from sslrun.core.distributed import is_dist, world_size
from sslrun.core.errors import CheckpointError, ConfigError, TrainingError
from sslrun.core.system import parse_device
from sslrun.core.train.build import Run, build_run, check_run_config, pin_threads
from sslrun.core.train.callbacks import Callbacks, CheckpointCadence, ImageGrids, Loop, SignalStop, TrainHooks
from sslrun.core.train.checkpoint import check_compatible, checkpoint_dir, load_checkpoint, restore_rank_rng, seed_all
from sslrun.core.train.metrics import MetricsLogger
from sslrun.core.train.monitor import Monitor
from sslrun.core.train.online_knn import KnnMonitor
from sslrun.core.train.optim import apply_schedules, drop_frozen_grads
from sslrun.core.train.state import StepResult, TrainState
from sslrun.core.train.stop import stop_on_signals

__all__ = [
    "TrainResult",
    "check_output_free",
    "ddp_wrap",
    "fit",
    "resolve_device",
    "summary_line",
    "train",
    "train_step",
]

log = logging.getLogger(__name__)


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
    hooks = hooks or TrainHooks()
    dev = resolve_device(cfg, device)
    with _process_group(dev), contextlib.ExitStack() as stack:
        check_run_config(cfg, world_size())
        resume = _resume_source(cfg, hooks)  # a bad checkpoint fails before data preparation and FFCV's JIT
        run = build_run(cfg, dev)
        stack.callback(run.close)
        knn = KnnMonitor(run)  # prepares the labelled splits: before the RNG states are set below
        stack.callback(knn.close)
        state = _start_state(run, resume)
        del resume  # the checkpoint's tensors are not needed any more
        monitor = Monitor(
            run.output,
            enabled=run.rank == 0,
            tensorboard=cfg.log.tensorboard,
            progress=cfg.log.progress,
            total_steps=run.max_steps,
            epochs=cfg.schedule.epochs,
            start_step=state.step,
        )
        stack.callback(monitor.close)
        if run.rank == 0:
            (run.output / "config.toml").write_text(cfg.to_toml())
        signals = SignalStop(monitor.echo)
        # in call order: the kNN result precedes the logger's end-of-run hparams, checkpoints hold what was logged
        callbacks = Callbacks([ImageGrids(), knn, MetricsLogger(), CheckpointCadence(), signals, hooks])
        with stop_on_signals(signals.request):
            fit(Loop(run, state, _wrap(run), monitor, callbacks))
        last = run.checkpoint_dir / "last.pt"
        return TrainResult(
            output=run.output,
            checkpoint=last if run.rank == 0 and last.exists() else None,
            steps=state.step,
            epochs=state.epoch,
            final_loss=state.final_loss,
            metrics=dict(state.metrics),
            interrupted=state.stop_requested,
        )


def fit(loop: Loop) -> None:
    """The epoch and step loop: from where ``loop.state`` stands to the end of the schedule, ``max_steps``, or a
    stop every rank agreed on. Each epoch continues at its next batch (exact mid-epoch resumes)."""
    run, state, callbacks = loop.run, loop.state, loop.callbacks
    callbacks.on_train_start(loop)
    while state.epoch < run.cfg.schedule.epochs and state.step < run.max_steps and not state.stop_requested:
        epoch_start = time.perf_counter()
        epoch_done = True  # the batches ran out, unless the run stops before that
        with contextlib.closing(run.loader.epoch(state.epoch, state.batch)) as batches:
            for views, data_s in _timed(batches, run.threads):
                callbacks.on_batch_start(loop, views)
                step_start = time.perf_counter()
                result = train_step(loop, views)
                result.data_s, result.compute_s = data_s, time.perf_counter() - step_start
                callbacks.on_step_end(loop, result)
                if state.stop_requested or state.step >= run.max_steps:
                    epoch_done = state.batch >= run.steps_per_epoch
                    break
        if epoch_done:
            state.next_epoch()
            callbacks.on_epoch_end(loop, time.perf_counter() - epoch_start)
    callbacks.on_train_end(loop)


def train_step(loop: Loop, views: list[torch.Tensor]) -> StepResult:
    """One optimiser step: schedules -> forward -> check -> backward -> step -> ``on_after_step``."""
    run, state = loop.run, loop.state
    lr, weight_decay, momentum = run.schedules.at(state.step)
    apply_schedules(run.optimizer, lr, weight_decay, run.peak_lr)
    if run.cfg.system.channels_last:
        views = [v.contiguous(memory_format=torch.channels_last) for v in views]
    with torch.autocast(run.device.type, dtype=torch.bfloat16, enabled=run.bf16):
        out = loop.model(views)
    loss = _loss(out, run.cfg.method.name)
    stop = _check(loop, loss)
    run.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = None
    if run.cfg.optim.grad_clip is not None:
        grad_norm = nn.utils.clip_grad_norm_(run.method.parameters(), run.cfg.optim.grad_clip)
    drop_frozen_grads(run.optimizer, state.step)  # after clipping, as DINO's main_dino.py does
    run.optimizer.step()
    run.method.on_after_step(state.step, momentum)
    state.step += 1
    state.batch += 1
    state.stop_requested = state.stop_requested or stop
    return StepResult(out, grad_norm)


def _loss(out: Any, method: str) -> torch.Tensor:
    """The scalar ``out["loss"]``, or a one-line error naming what the method returned instead."""
    loss = out.get("loss") if isinstance(out, dict) else None
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise TrainingError(
            f"method {method!r} must return a dict with a scalar tensor 'loss', got "
            f"{type(out).__name__} with keys {sorted(out) if isinstance(out, dict) else '-'}"
        )
    return loss


def _check(loop: Loop, loss: torch.Tensor) -> bool:
    """Whether to stop after this step, decided by every rank alike: one small all-reduce of ``[loss is not finite,
    stop requested]``, the one host sync of the step.

    Raises:
        TrainingError: a non-finite loss on any rank, before the optimiser touches the weights, so the last
            checkpoint on disk stays the last good state.
    """
    run, state = loop.run, loop.state
    stop_local = loop.callbacks.should_stop()
    flags = torch.stack(
        [(~torch.isfinite(loss.detach().float())).float(), torch.tensor(float(stop_local), device=loss.device)]
    )
    if run.world > 1:
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    bad, stop = flags.tolist()
    if bad > 0:
        raise TrainingError(
            f"non-finite loss at step {state.step} (epoch {state.epoch + 1}, batch {state.batch}); weights were not "
            f"updated and the last good checkpoint is {state.last_checkpoint or '(none written yet)'}; lower "
            f"optim.lr, set optim.grad_clip, or check the data"
        )
    return stop > 0


def _timed(batches: Iterable[Any], threads: int) -> Iterator[tuple[list[torch.Tensor], float]]:
    """Each batch's views with the seconds spent waiting for it. FFCV's epoch iterator changes torch's thread
    count, so it is put back before the views are used (see :func:`~sslrun.core.train.build.pin_threads`)."""
    it = iter(batches)
    while True:
        t0 = time.perf_counter()
        try:
            views, _labels = next(it)
        except StopIteration:
            return
        data_s = time.perf_counter() - t0
        pin_threads(threads)
        yield views, data_s


# ---- set-up --------------------------------------------------------------------------------------------------
def _resume_source(cfg: ExperimentConfig, hooks: TrainHooks) -> tuple[dict[str, Any], Path] | None:
    """The checkpoint to resume from and its file: the hooks' (Ray), else ``last.pt`` with ``cfg.resume``."""
    path = hooks.resume_from()
    if path is None and cfg.resume:
        path = checkpoint_dir(cfg) / "last.pt"
        if not path.exists():
            raise CheckpointError(f"--resume: no checkpoint at {path}; run without --resume to start fresh")
    if path is None:
        return None
    ckpt = load_checkpoint(path)
    check_compatible(ckpt, cfg, path)
    return ckpt, Path(path)


def _start_state(run: Run, resume: tuple[dict[str, Any], Path] | None) -> TrainState:
    """A fresh state with per-rank seeds, or the checkpoint's weights, optimiser, position and RNG states."""
    state = TrainState(global_batch=run.cfg.data.batch_size, world_size=run.world)
    seed = run.cfg.system.seed
    if resume is None:
        seed_all(seed + run.rank)  # the method's own randomness per rank; the loader seeds crops and colour itself
        return state
    ckpt, source = resume
    run.load_state_dict(ckpt, source)
    state.load_state_dict(ckpt, source)
    # written with another world size: the position is in global batches, so the data stream continues exactly;
    # only the method's own randomness (per-rank generators that no longer map onto the ranks) is reseeded
    restore_rank_rng(ckpt.get("rng", {}), run.rank, run.world, reseed=seed + 1000 * state.step + run.rank)
    if run.rank == 0:
        old = ckpt.get("plugins", {})
        changed = [k for k, v in run.cfg.plugin_versions.items() if old.get(k, v) != v]
        if changed:
            log.warning("plugins changed since the checkpoint: %s", ", ".join(changed))
    return state


def _wrap(run: Run) -> nn.Module:
    """The method as trained: in DDP over several ranks, compiled with ``system.compile``."""
    model: nn.Module = run.method
    if run.world > 1:
        model = ddp_wrap(model, run.device)
    if run.cfg.system.compile:
        model = torch.compile(model)  # type: ignore[assignment]
    return model


def ddp_wrap(method: nn.Module, device: torch.device) -> nn.Module:
    """``method`` in :class:`~torch.nn.parallel.DistributedDataParallel` with the trainer's settings.

    Buffers are not re-sent every step: the ones that must agree (MoCo queue, DINO centre, step counters) are kept
    identical by the methods themselves, and re-sending them (MoCo: 32 MiB) buys nothing. BatchNorm running
    statistics stay per rank, each from its own shard; rank 0's are checkpointed and evaluated. DDP's constructor
    still syncs buffers once, so every rank starts identical. torch >= 2.13 renamed the flag.
    """
    from torch.nn.parallel import DistributedDataParallel

    no_sync = (
        {"forward_sync_buffers": False}
        if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
        else {"broadcast_buffers": False}
    )
    cuda = device.type == "cuda"
    return DistributedDataParallel(method, device_ids=[device.index] if cuda else None, **no_sync)


@contextlib.contextmanager
def _process_group(device: torch.device) -> Iterator[None]:
    """Create (and finally destroy) the process group under torchrun; use Ray Train's as it is."""
    created = False
    if not is_dist() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        created = True
    try:
        yield
    finally:
        if created and is_dist():
            dist.destroy_process_group()


# ---- for the CLI and launchers -------------------------------------------------------------------------------
def check_output_free(cfg: ExperimentConfig) -> None:
    """Refuse an output directory the run cannot use, on the driver, before anything is built: one that cannot be
    created or written (it would fail only once the first rank starts writing), or a fresh run over an existing
    one (its checkpoints would be mixed with the new ones). Leaves nothing behind: directories created to try
    are removed again (a refused launch must not leave an empty run directory).

    Raises:
        ConfigError: the output cannot be created or written, or ``OUTPUT/checkpoints/last.pt`` exists and
            ``cfg.resume`` is off.
    """
    out = Path(cfg.output).expanduser()
    created = [d for d in (out, *out.parents) if not d.exists()]  # deepest first
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as exc:
        raise ConfigError(
            f"--output {cfg.output} cannot be written ({exc.strerror or exc}); choose a directory you can create "
            f"and write to"
        ) from None
    finally:
        for d in created:
            with contextlib.suppress(OSError):
                d.rmdir()
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
    if device is None:
        device = parse_device(cfg.system.device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)  # NCCL collectives and all_gather_object use the current device
    return device


def summary_line(result: TrainResult) -> str:
    """The one line printed at the end of ``sslrun train``: where everything is and how to look at it."""
    out = result.output
    ckpt = result.checkpoint or "(none written)"
    return (
        f"checkpoint: {ckpt} | TensorBoard logs: {out / 'tb'} | metrics: {out / 'metrics.jsonl'} | "
        f"view with: tensorboard --logdir {out / 'tb'}"
    )
