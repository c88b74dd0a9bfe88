"""The progress display of a training run, one look for ``sslrun train`` (rank 0's monitor) and ``sslrun launch``
(the driver, fed by rank 0's progress events).

On a terminal it is a rich bar redrawn in place (step, epoch, loss, images/s, world size, last kNN top-1, ETA),
with the run's messages printed above it; anywhere else (a log file, CI, ``nohup``) it is one plain, timestamped
line at most every ``every_s`` seconds (the first and the last always), never colour codes. It also says once,
as one line, when the data loader holds training back.

Rank 0 of a Ray run sends its progress as :data:`EVENT_PREFIX` lines on its stdout: Ray already forwards every
worker's output to the driver, from any node, without the training loop waiting for it (see docs/internals.md,
section 'Live progress from Ray workers').
"""

from __future__ import annotations

import json
import math
import sys
import time
from typing import Any, TextIO

__all__ = ["EVENT_PREFIX", "EVENTS_ENV", "PLAIN_EVERY_S", "ProgressView", "event_line", "format_eta", "parse_event"]

PLAIN_EVERY_S = 10.0  # minimum seconds between two plain progress lines
EVENT_PREFIX = "@sslrun-event "  # a worker's stdout line that carries one JSON progress event for the driver
EVENTS_ENV = "SSLRUN_PROGRESS_EVENTS"  # "1" in a Ray worker: rank 0 prints events instead of its own display
SLOW_DATA_SHARE = 0.5  # data wait above this share of step time ...
SLOW_DATA_WINDOWS = 3  # ... for this many log windows in a row is worth one line


def format_eta(seconds: float) -> str:
    """``H:MM:SS`` (or ``?`` when unknown)."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def event_line(record: dict[str, Any]) -> str:
    """One progress event as a stdout line (plain numbers only)."""
    return EVENT_PREFIX + json.dumps(record, separators=(",", ":"))


def parse_event(line: str) -> dict[str, Any] | None:
    """The event in a line :func:`event_line` wrote, or None for any other line."""
    if not line.startswith(EVENT_PREFIX):
        return None
    try:
        record = json.loads(line[len(EVENT_PREFIX) :])
    except json.JSONDecodeError:
        return None
    return record if isinstance(record, dict) else None


class ProgressView:
    """A progress bar or plain lines, and the run's messages.

    Args:
        mode: ``bar``, ``plain`` or ``off`` (``auto``: bar when ``stream`` is a terminal, else plain).
        total_steps: the step the run ends at (for the bar and the ETA).
        epochs: the run's epochs.
        world_size: processes training together (shown as workers).
        start_step: the step this display starts at (a resumed run: its checkpoint step).
        every_s: minimum seconds between plain lines.
        timestamps: start plain lines with the time of day (``HH:MM:SS``).
        stream: where it all goes (default stdout).
    """

    def __init__(
        self,
        mode: str,
        *,
        total_steps: int,
        epochs: int,
        world_size: int = 1,
        start_step: int = 0,
        every_s: float = PLAIN_EVERY_S,
        timestamps: bool = True,
        stream: TextIO | None = None,
    ) -> None:
        self.stream = stream or sys.stdout
        if mode == "auto":
            mode = "bar" if self.stream.isatty() else "plain"
        self.mode = mode
        self.total_steps = total_steps
        self.epochs = epochs
        self.world_size = world_size
        self.every_s = every_s
        self.timestamps = timestamps
        self.knn_top1: float | None = None
        self._t0 = time.perf_counter()
        self._start_step = start_step
        self._last_plain = -math.inf
        self._slow_windows = 0
        self._slow_said = False
        self._bar: Any = None
        if mode == "bar":
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self._bar = Progress(
                TextColumn("[bold]train"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[info]}"),
                TextColumn("eta"),
                TimeRemainingColumn(),
                console=Console(file=self.stream),
                transient=False,
            )
            self._bar.start()
            self._task = self._bar.add_task("train", total=total_steps, completed=start_step, info="")

    def restart(self, step: int) -> None:
        """Count the ETA from ``step`` on (a run resumed or restarted after a worker failure)."""
        self._t0, self._start_step = time.perf_counter(), step

    def update(
        self,
        step: int,
        epoch: int,
        loss: float,
        images_per_s: float,
        *,
        data_share: float | None = None,
        force: bool = False,
    ) -> None:
        """Show the state at ``step`` (``epoch`` counts from 0); plain lines are throttled unless ``force``."""
        if self.mode == "off":
            return
        done = step - self._start_step
        eta = (time.perf_counter() - self._t0) / done * (self.total_steps - step) if done > 0 else math.inf
        info = f"epoch {epoch + 1}/{self.epochs}  loss {loss:.4f}  {images_per_s:,.0f} img/s"
        extra = f"{self.world_size} worker{'s' if self.world_size != 1 else ''}"
        if self.knn_top1 is not None:
            extra += f"  kNN top-1 {self.knn_top1:.2f}%"
        if self._bar is not None:
            self._bar.update(self._task, completed=step, info=f"{info}  {extra}")
        else:
            now = time.perf_counter()
            if force or now - self._last_plain >= self.every_s:
                self._last_plain = now
                self.echo(f"step {step}/{self.total_steps}  {info}  eta {format_eta(eta)}  {extra}")
        self._check_data(data_share)

    def echo(self, line: str) -> None:
        """A message: above the bar, or a timestamped plain line."""
        if self.mode == "off":
            return
        if self._bar is not None:
            self._bar.console.print(line, markup=False, highlight=False, soft_wrap=True)
        else:
            self.stream.write(f"{time.strftime('%H:%M:%S')} {line}\n" if self.timestamps else f"{line}\n")
            self.stream.flush()

    def close(self) -> None:
        """Stop redrawing the bar (safe to call twice)."""
        if self._bar is not None:
            self._bar.stop()
            self._bar = None

    def _check_data(self, data_share: float | None) -> None:
        """One line, once, when the data loader holds training back for several log windows in a row."""
        if data_share is None or self._slow_said:
            return
        self._slow_windows = self._slow_windows + 1 if data_share > SLOW_DATA_SHARE else 0
        if self._slow_windows >= SLOW_DATA_WINDOWS:
            self._slow_said = True
            self.echo(
                f"slow data loader: {data_share:.0%} of each step waits for data; give each worker more CPUs "
                f"(--cpus-per-worker, data.num_workers) or a faster disk for the .beton"
            )
