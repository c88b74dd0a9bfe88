"""What the training loop calls besides the step: the callback protocol, the :class:`Loop` callbacks see, and the
built-in callbacks for checkpoint cadence, image grids and stop signals.

:class:`TrainHooks` is the protocol: every event is a no-op there, so a callback overrides only what it needs.
The loop (:func:`sslrun.core.train.trainer.fit`) calls the events in this order::

    on_train_start
    per batch:  on_batch_start -> train_step (polls should_stop) -> on_step_end
    per epoch:  on_epoch_end
    on_train_end

``on_log`` and ``on_checkpoint`` follow :meth:`Loop.emit` and :meth:`Loop.checkpoint`, which callbacks call.
Every event runs on every rank at the same step (collectives inside callbacks rely on it); only rank 0 writes
files. Launchers (Ray Train: ``sslrun.cluster.reporting.RayTrainHooks``) and tests subclass :class:`TrainHooks`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from sslrun.core.train.build import Run
from sslrun.core.train.checkpoint import gather_rng, write_step_checkpoint
from sslrun.core.train.monitor import Monitor
from sslrun.core.train.state import StepResult, TrainState

__all__ = ["GRID_IMAGES", "Callbacks", "CheckpointCadence", "ImageGrids", "Loop", "SignalStop", "TrainHooks"]

#: Images per view shown in the start-of-run grid of augmented views.
GRID_IMAGES = 8


class TrainHooks:
    """The callback protocol of the training loop (all no-ops here). Subclass to integrate with a launcher
    (Ray Train), a benchmark or a test."""

    def on_train_start(self, loop: Loop) -> None:
        """Before the first batch of this process (also after a resume)."""

    def on_batch_start(self, loop: Loop, views: list[torch.Tensor]) -> None:
        """A batch arrived; ``views`` are about to be trained on at step ``loop.state.step``."""

    def on_step_end(self, loop: Loop, result: StepResult) -> None:
        """After the optimiser step; ``loop.state.step`` counts it already."""

    def on_epoch_end(self, loop: Loop, seconds: float) -> None:
        """After the last batch of an epoch (``loop.state.epoch`` is the next one); ``seconds``: its wall time."""

    def on_train_end(self, loop: Loop) -> None:
        """After the last step, whether the schedule ended, ``max_steps`` was reached or a stop was agreed."""

    def on_log(self, step: int, metrics: dict[str, float]) -> None:
        """Called on every rank at the same steps with the same (all-reduced) metrics."""

    def on_checkpoint(self, step: int, epoch: int, path: Path | None, metrics: dict[str, float]) -> None:
        """Called on every rank after every checkpoint; rank 0 gets the file just written, the others None.

        ``step`` is the number of optimiser steps done and ``epoch`` the epoch the run continues in.
        """

    def should_stop(self) -> bool:
        """Polled once every step, after the forward pass; if any rank says True, all ranks finish the step,
        checkpoint and return."""
        return False

    def resume_from(self) -> Path | None:
        """A checkpoint file to resume from (wins over ``cfg.resume``), e.g. Ray's ``get_checkpoint()``."""
        return None


class Callbacks(TrainHooks):
    """Several callbacks as one, called in list order (``resume_from`` is asked of the launcher's hooks alone)."""

    def __init__(self, callbacks: Sequence[TrainHooks]) -> None:
        self.callbacks = list(callbacks)

    def on_train_start(self, loop: Loop) -> None:
        for cb in self.callbacks:
            cb.on_train_start(loop)

    def on_batch_start(self, loop: Loop, views: list[torch.Tensor]) -> None:
        for cb in self.callbacks:
            cb.on_batch_start(loop, views)

    def on_step_end(self, loop: Loop, result: StepResult) -> None:
        for cb in self.callbacks:
            cb.on_step_end(loop, result)

    def on_epoch_end(self, loop: Loop, seconds: float) -> None:
        for cb in self.callbacks:
            cb.on_epoch_end(loop, seconds)

    def on_train_end(self, loop: Loop) -> None:
        for cb in self.callbacks:
            cb.on_train_end(loop)

    def on_log(self, step: int, metrics: dict[str, float]) -> None:
        for cb in self.callbacks:
            cb.on_log(step, dict(metrics))

    def on_checkpoint(self, step: int, epoch: int, path: Path | None, metrics: dict[str, float]) -> None:
        for cb in self.callbacks:
            cb.on_checkpoint(step, epoch, path, dict(metrics))

    def should_stop(self) -> bool:
        return any([cb.should_stop() for cb in self.callbacks])  # a list, not a generator: every one is polled


@dataclass
class Loop:
    """A training run as its callbacks see it, and the two things they may ask of it.

    Attributes:
        run: what was built (method, loader, optimiser, schedules).
        state: where the run stands.
        model: the method as trained: DDP-wrapped under several ranks, compiled with ``system.compile``.
        monitor: TensorBoard, metrics.jsonl and the console (no-ops off rank 0).
        callbacks: every callback of the run, the launcher's included.
    """

    run: Run
    state: TrainState
    model: nn.Module
    monitor: Monitor
    callbacks: Callbacks

    def emit(self, metrics: dict[str, float]) -> None:
        """Record metrics at the current step: TensorBoard + metrics.jsonl on rank 0, ``on_log`` on every rank.

        Call it on every rank at the same step with the same values.
        """
        state = self.state
        state.metrics.update(metrics)
        epoch = state.step / self.run.steps_per_epoch  # fractional progress: 1.5 = half-way through the 2nd epoch
        self.monitor.scalars(state.step, round(epoch, 4), {k: v for k, v in metrics.items() if k != "epoch"})
        self.callbacks.on_log(state.step, metrics)

    def checkpoint(self) -> None:
        """Write ``step_<step>.pt`` and ``last.pt`` (rank 0), then ``on_checkpoint`` on every rank.

        Call it on every rank at the same step: the RNG states of all ranks are gathered into the file.
        """
        run, state = self.run, self.state
        rng = gather_rng(run.world)
        path = None
        if run.rank == 0:
            path = write_step_checkpoint(
                {**run.state_dict(), **state.state_dict(), "rng": rng}, run.checkpoint_dir, state.step
            )
            state.last_checkpoint = run.checkpoint_dir / "last.pt"
        if run.world > 1:
            dist.barrier()  # the file exists before any rank reports it
        state.last_checkpoint_step = state.step
        self.callbacks.on_checkpoint(state.step, state.epoch, path, state.metrics)


class CheckpointCadence(TrainHooks):
    """A checkpoint every ``log.checkpoint_every`` steps, after an agreed stop, at every epoch end and at the end
    of the run; never two at the same step."""

    def on_step_end(self, loop: Loop, result: StepResult) -> None:
        if loop.state.step % loop.run.cfg.log.checkpoint_every == 0 or loop.state.stop_requested:
            loop.checkpoint()

    def on_epoch_end(self, loop: Loop, seconds: float) -> None:
        self._unless_done(loop)

    def on_train_end(self, loop: Loop) -> None:
        self._unless_done(loop)

    @staticmethod
    def _unless_done(loop: Loop) -> None:
        if loop.state.last_checkpoint_step != loop.state.step:
            loop.checkpoint()


class ImageGrids(TrainHooks):
    """Rank 0's image grids in TensorBoard: the augmented views of the first batch (``views/augmented``, to check
    the augmentations) and ``method.visuals()`` every ``log.visuals_every`` steps (``visuals/<name>``)."""

    def __init__(self) -> None:
        self._first = True

    def on_batch_start(self, loop: Loop, views: list[torch.Tensor]) -> None:
        if not self._first:
            return
        self._first = False
        if loop.run.rank != 0:
            return
        mean, std = loop.run.loader.mean, loop.run.loader.std
        rows = [_unnormalize(v[:GRID_IMAGES].detach(), mean, std).cpu() for v in views]  # copies: FFCV reuses buffers
        loop.monitor.image_grid("views/augmented", rows, loop.state.step, nrow=GRID_IMAGES)

    def on_step_end(self, loop: Loop, result: StepResult) -> None:
        every = loop.run.cfg.log.visuals_every
        if every <= 0 or loop.state.step % every or loop.run.rank != 0:
            return
        for name, images in (loop.run.method.visuals() or {}).items():
            loop.monitor.image_grid(f"visuals/{name}", images, loop.state.step, nrow=GRID_IMAGES)


class SignalStop(TrainHooks):
    """Turns a stop signal into ``should_stop``: pass :meth:`request` to
    :func:`sslrun.core.train.stop.stop_on_signals` around the loop.

    Args:
        echo: prints a line on the console (rank 0's monitor).
    """

    def __init__(self, echo: Callable[[str], None]) -> None:
        self.echo = echo
        self.requested = False

    def request(self, signal_name: str) -> None:
        """Ask for a stop after the current step (called from the signal handler)."""
        self.requested = True
        self.echo(
            f"{signal_name}: stopping after this step and writing a checkpoint (Ctrl-C again to abort without one)"
        )

    def should_stop(self) -> bool:
        return self.requested


def _unnormalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    m = torch.tensor(list(mean), device=x.device, dtype=torch.float32).view(1, 3, 1, 1)
    s = torch.tensor(list(std), device=x.device, dtype=torch.float32).view(1, 3, 1, 1)
    return (x.float() * s + m).clamp(0, 1)
