"""What a run shows while it trains: TensorBoard events, ``metrics.jsonl`` and a progress display (rank 0 only).

One :class:`Monitor` per process; on ranks other than 0 every method is a no-op, so the trainer calls it
unconditionally. Scalars go to both TensorBoard (``OUTPUT/tb``) and ``OUTPUT/metrics.jsonl`` (one JSON object per
log step: ``{"step", "epoch", "time", <tag>: value, ...}``, where ``epoch`` is fractional progress, steps divided by
steps per epoch), so a run can be inspected without TensorBoard.

The progress display is :class:`~sslrun.core.train.progress.ProgressView`: a rich bar when stdout is a terminal and
plain periodic lines otherwise. In a Ray worker (``SSLRUN_PROGRESS_EVENTS=1``, set by ``sslrun launch``) rank 0
prints each log step's scalars as one event line instead, and the driver shows them in the same view.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

import torch

from sslrun.core.distributed import world_size
from sslrun.core.train.progress import EVENTS_ENV, PLAIN_EVERY_S, ProgressView, event_line, format_eta

__all__ = ["PLAIN_EVERY_S", "Monitor", "flatten_hparams", "format_eta"]


def flatten_hparams(data: dict[str, Any], prefix: str = "") -> dict[str, bool | int | float | str]:
    """Nested config dict -> ``{"optim.lr": 0.3, ...}`` with values TensorBoard's hparams plugin accepts."""
    out: dict[str, bool | int | float | str] = {}
    for k, v in data.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten_hparams(v, f"{key}."))
        elif isinstance(v, bool | int | float | str):
            out[key] = v
        else:
            out[key] = str(v)  # None, lists
    return out


class Monitor:
    """TensorBoard + metrics.jsonl + progress output of one run.

    Args:
        output: the run's output directory.
        enabled: True on rank 0; False makes every call a no-op.
        tensorboard: write TensorBoard events under ``OUTPUT/tb``.
        progress: ``auto`` (bar on a terminal, plain lines otherwise), ``bar``, ``plain`` or ``off``.
        total_steps: steps this run will reach (for the ETA).
        epochs: number of epochs (for the display).
        start_step: the first step of this process (resume: TensorBoard events after it are purged,
            metrics.jsonl is appended to instead of truncated).
    """

    def __init__(
        self,
        output: Path,
        *,
        enabled: bool,
        tensorboard: bool = True,
        progress: str = "auto",
        total_steps: int,
        epochs: int,
        start_step: int = 0,
    ) -> None:
        self.enabled = enabled
        self.output = output
        self.total_steps = total_steps
        self.epochs = epochs
        self.start_step = start_step
        self.writer: Any = None
        self._metrics_file: Any = None
        self._view: ProgressView | None = None
        self.mode = "off"
        if not enabled:
            return
        output.mkdir(parents=True, exist_ok=True)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step drops events a crashed attempt logged after the checkpoint we resume from
            self.writer = SummaryWriter(str(output / "tb"), purge_step=start_step if start_step > 0 else None)
        self._metrics_file = open(output / "metrics.jsonl", "a" if start_step > 0 else "w")  # noqa: SIM115
        if os.environ.get(EVENTS_ENV) == "1" and progress != "off":
            self.mode = "events"  # the launch driver draws the display from these (and from the echoed lines)
            return
        # Untimestamped here: `sslrun train` keeps its plain lines as they were; the launch driver adds the time.
        self._view = ProgressView(
            progress,
            total_steps=total_steps,
            epochs=epochs,
            world_size=world_size(),
            start_step=start_step,
            timestamps=False,
        )
        self.mode = self._view.mode

    # ---- scalars ----------------------------------------------------------------------------------------
    def scalars(self, step: int, epoch: float, values: dict[str, float]) -> None:
        """Log scalars at ``step`` to TensorBoard and one line of metrics.jsonl."""
        if not self.enabled:
            return
        if self.writer is not None:
            for tag, v in values.items():
                self.writer.add_scalar(tag, v, step)
        row = {"step": step, "epoch": epoch, "time": round(time.time(), 3), **values}
        self._metrics_file.write(json.dumps(row) + "\n")
        self._metrics_file.flush()
        if self.mode == "events":  # a few hundred bytes per log step into a file Ray tails: training never waits
            print(event_line({**row, "total": self.total_steps, "epochs": self.epochs}), flush=True)
        elif self._view is not None and "knn/top1" in values:
            self._view.knn_top1 = float(values["knn/top1"])

    def text(self, tag: str, text: str, step: int) -> None:
        """A note in TensorBoard's text tab (and on the console)."""
        if not self.enabled:
            return
        if self.writer is not None:
            self.writer.add_text(tag, text, step)
        self.echo(text)

    # ---- images -----------------------------------------------------------------------------------------
    def image_grid(self, tag: str, images: list[torch.Tensor] | torch.Tensor, step: int, nrow: int = 8) -> None:
        """A grid of ``(N, 3, H, W)`` images in [0, 1]; a list is one row per tensor, resized to the largest."""
        if not self.enabled or self.writer is None:
            return
        from torchvision.utils import make_grid

        if isinstance(images, list):
            side = max(max(t.shape[-2:]) for t in images)
            rows = []
            for t in images:
                t = t[:nrow].detach().float().cpu()
                if max(t.shape[-2:]) != side:  # DINO's local crops are smaller: scale them up to share the grid
                    t = torch.nn.functional.interpolate(t, size=(side, side), mode="nearest")
                rows.append(t)
            batch = torch.cat(rows)
        else:
            batch = images.detach().float().cpu()
        grid = make_grid(batch.clamp(0, 1), nrow=nrow, padding=2)
        self.writer.add_image(tag, grid, step)

    # ---- hparams ----------------------------------------------------------------------------------------
    def hparams(self, config: dict[str, Any], metrics: dict[str, float]) -> None:
        """The run's config and final metrics in TensorBoard's HPARAMS tab (into the run's own event file)."""
        if not self.enabled or self.writer is None:
            return
        from torch.utils.tensorboard.summary import hparams

        hp = flatten_hparams(config)
        final = {f"hparam/{k}": float(v) for k, v in metrics.items() if math.isfinite(float(v))}
        exp, ssi, sei = hparams(hp, final)
        fw = self.writer._get_file_writer()
        for summary in (exp, ssi, sei):
            fw.add_summary(summary)
        for k, v in final.items():
            self.writer.add_scalar(k, v)

    # ---- progress ---------------------------------------------------------------------------------------
    def progress(
        self,
        step: int,
        epoch: int,
        loss: float,
        images_per_s: float,
        *,
        data_share: float | None = None,
        force: bool = False,
    ) -> None:
        """Update the bar, or print a plain line (throttled unless ``force``); ``data_share`` is the share of step
        time spent waiting for data (a slow loader is said once)."""
        if self.enabled and self._view is not None:
            self._view.update(step, epoch, loss, images_per_s, data_share=data_share, force=force)

    def echo(self, line: str) -> None:
        """A line on the console (above the bar when there is one)."""
        if not self.enabled or self.mode == "off":
            return
        if self._view is not None:
            self._view.echo(line)
        else:
            print(line, flush=True)  # events mode: the driver shows it

    def close(self) -> None:
        """Flush and close everything (safe to call twice)."""
        if self._view is not None:
            self._view.close()
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
            self.writer = None
        if self._metrics_file is not None:
            self._metrics_file.close()
            self._metrics_file = None
