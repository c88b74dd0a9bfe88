"""Where a run stands: :class:`TrainState` (saved in checkpoints) and :class:`StepResult` (what one step produced).

The checkpoint of a run is ``{**run.state_dict(), **state.state_dict(), "rng": ...}``: the built objects (weights,
optimiser, schedules) come from :class:`~sslrun.core.train.build.Run`, the position in the run from here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sslrun.core.errors import CheckpointError

__all__ = ["StepResult", "TrainState"]


@dataclass
class TrainState:
    """The run's counters and last metrics; only the first four fields are saved.

    Attributes:
        step: optimiser steps done (the global step the run continues from).
        epoch: epoch of the next batch to read.
        batch: index of the next *global* batch within that epoch (the position in the data stream; every rank
            reads its part of each global batch, see :mod:`sslrun.core.data.loader`).
        global_batch: images per optimiser step over all ranks (``data.batch_size``).
        world_size: ranks of this process's run (saved for the record: a checkpoint continues on any number).
        metrics: the last value of every logged metric.
        start_step: ``step`` when this process started (after a resume: the checkpoint's step).
        stop_requested: every rank agreed to stop after the current step (signal or ``should_stop``).
        last_checkpoint_step: the step of the newest checkpoint (-1: none yet).
        last_checkpoint: the newest good checkpoint file this process knows of (for error messages).
        resumed_from: the checkpoint this process resumed from, or None for a fresh start.
    """

    step: int = 0
    epoch: int = 0
    batch: int = 0
    global_batch: int = 0
    world_size: int = 1
    metrics: dict[str, float] = field(default_factory=dict)
    start_step: int = 0
    stop_requested: bool = False
    last_checkpoint_step: int = -1
    last_checkpoint: Path | None = None
    resumed_from: Path | None = None

    @property
    def final_loss(self) -> float:
        """Mean loss of the last logging window (NaN before the first log)."""
        return self.metrics.get("train/loss", math.nan)

    def next_epoch(self) -> None:
        """The current epoch is done: the next batch is the first of the next epoch."""
        self.epoch += 1
        self.batch = 0

    def state_dict(self) -> dict[str, Any]:
        """The checkpoint keys of the run's position (builtins only, for ``weights_only`` loading).

        The position is world-size free: global batches and images (``samples_in_epoch``), not per-rank steps.
        """
        return {
            "step": self.step,
            "epoch": self.epoch,
            "batch_in_epoch": self.batch,
            "global_batch": self.global_batch,
            "samples_in_epoch": self.batch * self.global_batch,
            "world_size": self.world_size,
            "metrics": {k: float(v) for k, v in self.metrics.items()},
        }

    def load_state_dict(self, state: dict[str, Any], source: Path | None = None) -> None:
        """Continue from a checkpoint's position (``source``: the file it came from), on any number of ranks.

        Raises:
            CheckpointError: the checkpoint predates world-size-free positions, or its global batch differs.
        """
        where = source or "the checkpoint"
        if "global_batch" not in state:
            raise CheckpointError(
                f"{where} was written by an older sslrun (format sslrun-checkpoint/1), whose data position is per "
                f"rank: it cannot be continued exactly; evaluate or export it as it is, or start a new run "
                f"(another --output)"
            )
        if self.global_batch and int(state["global_batch"]) != self.global_batch:
            raise CheckpointError(
                f"{where} was trained with a global batch of {state['global_batch']} images, this run has "
                f"{self.global_batch}; resume with --batch-size {state['global_batch']} (the global batch, "
                f"whatever the number of workers)"
            )
        self.step = self.start_step = self.last_checkpoint_step = int(state["step"])
        self.epoch = int(state["epoch"])
        self.batch = int(state["batch_in_epoch"])
        self.metrics = {k: float(v) for k, v in state.get("metrics", {}).items()}
        self.last_checkpoint = self.resumed_from = source


@dataclass
class StepResult:
    """What one optimiser step produced, for the callbacks.

    Attributes:
        terms: the method's output: ``"loss"`` and the other terms it reports (tensors stay on the device).
        grad_norm: the total gradient norm before clipping (only with ``optim.grad_clip``).
        data_s: seconds spent waiting for the batch.
        compute_s: seconds spent in the step.
    """

    terms: dict[str, Any]
    grad_norm: torch.Tensor | None = None
    data_s: float = 0.0
    compute_s: float = 0.0
