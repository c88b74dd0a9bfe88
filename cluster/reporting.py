"""The trainer's callbacks for Ray Train (:class:`RayTrainHooks`): checkpoints -> ``ray.train.report``,
throughput -> Ray metrics, stop requests and resumes.

What each callback event does inside a Ray Train worker:

* ``on_log``: throughput goes to the Ray metrics ``sslrun_images_per_second`` (gauge) and ``sslrun_images_total``
  (counter), tagged with the run name and the rank; Ray exports them with a ``ray_`` prefix on each node's metrics
  port (see docs/internals.md, section 'Custom Ray metrics'). The metrics themselves are *not* sent with
  ``ray.train.report`` here: Ray Train V2 keeps only the metrics reported with a checkpoint, and reporting every
  log step throttles a fast run (see docs/internals.md, section 'Ray Train V2 keeps only the metrics of
  checkpoints'); TensorBoard and ``metrics.jsonl`` have every log step.
* ``on_checkpoint``: ``ray.train.report(metrics, checkpoint)`` on every rank (a barrier, so every rank reports at
  the same steps, which the trainer guarantees): rank 0 hard-links (or copies) the trainer's checkpoint file into
  a fresh directory and reports it with ``Checkpoint.from_directory``; Ray persists it under
  ``storage_path/name`` and hands it back after a worker failure or to ``--resume``. Other ranks report the same
  metrics with no checkpoint (see docs/internals.md, section 'Every rank reports to Ray Train alike').
* ``should_stop``: polls the stop flag (:class:`~sslrun.cluster.stop.StopFlag`) in the run's storage (local
  disk, NFS, S3, GCS alike), which the driver raises on SIGTERM / Ctrl-C; the trainer all-reduces the answer,
  writes a checkpoint and returns.
* ``resume_from``: copies the checkpoint file out of ``ray.train.get_checkpoint()`` (its directory is read-only
  and may be remote) to a private scratch directory and returns that path. Rank 0 also prints the attempt as a
  progress event, so the driver's console can say when Ray Train restarted the workers after a failure.

Ray is imported lazily so that this module imports anywhere; it only works inside a Ray Train worker.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from sslrun.cluster.mirror import RunMirror
from sslrun.cluster.stop import StopFlag
from sslrun.core.errors import CheckpointError
from sslrun.core.train.callbacks import TrainHooks
from sslrun.core.train.progress import event_line

__all__ = ["CHECKPOINT_FILE", "CHECKPOINT_INFO_FILE", "RayTrainHooks"]

CHECKPOINT_FILE = "checkpoint.pt"  # the sslrun checkpoint inside each Ray checkpoint directory
CHECKPOINT_INFO_FILE = "sslrun.json"  # {"step", "epoch", "metrics"}: readable without loading the weights
_STOP_POLL_S = 1.0  # the trainer polls every step; the flag may be on S3, so look at most once a second


class RayTrainHooks(TrainHooks):
    """Turns trainer events into Ray Train reports, Ray metrics, stop requests and resumes.

    Args:
        storage_path: the run's ``RunConfig.storage_path`` (absolute path or URI).
        name: the run's ``RunConfig.name``.
        global_batch: images per optimiser step over all ranks (for throughput).
        events: a JSON-lines file the rank-0 hook appends attempt events to (``launch.jsonl`` in the output
            directory), or None.
        output: the run's output directory; with a URI ``storage_path``, rank 0 mirrors it to
            ``<storage_path>/<name>/run/`` at every checkpoint and at the end (:mod:`sslrun.cluster.mirror`).

    Attributes:
        resumed_step: the step of the Ray checkpoint this attempt resumed from, or None for a fresh start.
        first_step: the first step this attempt logged (after a resume: the checkpoint step + log interval).
        images_per_second: global throughput measured between the first and the last log of this attempt.
    """

    def __init__(
        self,
        storage_path: str,
        name: str,
        global_batch: int,
        events: Path | None = None,
        output: Path | None = None,
    ) -> None:
        import ray.train

        ctx = ray.train.get_context()
        self.rank = ctx.get_world_rank()
        self.world_size = ctx.get_world_size()
        self.storage_path = storage_path
        self.name = name
        self.global_batch = global_batch
        self.events = events
        self.resumed_step: int | None = None
        self.first_step: int | None = None
        self.images_per_second: float | None = None
        self._scratch = Path(tempfile.mkdtemp(prefix=f"sslrun-rank{self.rank}-"))
        self._flag = StopFlag(storage_path, name)
        self._last_poll = 0.0
        self._stop = False
        self._first_log: tuple[int, float] | None = None
        self._last_log: tuple[int, float] | None = None
        self._gauge: Any = None
        self._counter: Any = None
        # rank 0 copies the run's products (config, metrics, events, TensorBoard, last.pt) to the run's storage
        self._mirror = RunMirror(output, storage_path, name) if self.rank == 0 and output is not None else None

    # ---- callback events ---------------------------------------------------------------------------------
    def on_log(self, step: int, metrics: dict[str, float]) -> None:
        """Update the throughput metrics (no ``ray.train.report``: see the module docstring)."""
        if self.first_step is None:
            self.first_step = step
            self._event({"event": "first_step", "step": step})
        self._measure(step, time.perf_counter())

    def on_checkpoint(self, step: int, epoch: int, path: Path | None, metrics: dict[str, float]) -> None:
        """Rank 0 reports the checkpoint file as a Ray checkpoint; the other ranks report metrics only."""
        import ray.train
        from ray.train import Checkpoint

        payload = {**_floats(metrics), "step": step, "epoch": epoch}
        if path is None:
            ray.train.report(payload, checkpoint=None)
            return
        staging = Path(tempfile.mkdtemp(prefix="ckpt-", dir=self._scratch))
        try:
            _link_or_copy(Path(path), staging / CHECKPOINT_FILE)
            info = {
                "step": step,
                "epoch": epoch,
                "world_size": self.world_size,
                "metrics": _floats(metrics),
                "source": str(path),
            }
            (staging / CHECKPOINT_INFO_FILE).write_text(json.dumps(info))
            # SYNC upload (the default): when report() returns the files are persisted, so staging can go.
            ray.train.report(payload, checkpoint=Checkpoint.from_directory(str(staging)))
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        if self._mirror is not None:
            self._mirror.sync_in_background()

    def should_stop(self) -> bool:
        """True once the driver has written the stop flag (checked at most once a second)."""
        if self._stop:
            return True
        now = time.monotonic()
        if now - self._last_poll >= _STOP_POLL_S:
            self._last_poll = now
            try:
                self._stop = self._flag.is_raised()
            except OSError:
                self._stop = False  # a storage hiccup must not stop training; the next poll looks again
        return self._stop

    def resume_from(self) -> Path | None:
        """The checkpoint file of Ray's latest committed checkpoint, copied to local scratch; None if none."""
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            self._event({"event": "attempt", "world_size": self.world_size, "resumed_step": None})
            return None
        if self._mirror is not None:  # on a new node: the run's history first, so that it is appended to
            self._mirror.restore()
        local = self._scratch / "resume"
        local.mkdir(exist_ok=True)
        # as_directory() yields the persisted directory itself on local storage: read-only, so copy out of it.
        with checkpoint.as_directory() as d:
            src = Path(d) / CHECKPOINT_FILE
            if not src.is_file():
                raise CheckpointError(
                    f"Ray checkpoint {checkpoint.path} has no {CHECKPOINT_FILE}; it was not written by sslrun: "
                    f"launch with another --name (or --output) to start a new run"
                )
            shutil.copyfile(src, local / CHECKPOINT_FILE)
            info_file = Path(d) / CHECKPOINT_INFO_FILE
            info = json.loads(info_file.read_text()) if info_file.is_file() else {}
        self.resumed_step = info.get("step")
        before = info.get("world_size")
        if before is not None and before != self.world_size:
            # an elastic range (a node left or joined) or a --resume with another layout
            self._event({"event": "resize", "from": before, "to": self.world_size, "step": self.resumed_step})
        self._event(
            {
                "event": "attempt",
                "world_size": self.world_size,
                "previous_world_size": before,
                "resumed_step": self.resumed_step,
                "ray_checkpoint": checkpoint.path,
            }
        )
        return local / CHECKPOINT_FILE

    # ---- housekeeping ------------------------------------------------------------------------------------
    def close(self) -> None:
        """Finish mirroring the run to its storage; remove this worker's scratch directory (resume copy, staging)."""
        if self._mirror is not None:
            self._mirror.close()
        shutil.rmtree(self._scratch, ignore_errors=True)

    def _measure(self, step: int, now: float) -> None:
        """Throughput since the previous log -> Ray metrics; overall throughput of this attempt -> attribute.

        The first log of an attempt only sets the baseline: its interval includes start-up (loader JIT, the
        process group), which is not training throughput.
        """
        per_rank_batch = self.global_batch / self.world_size
        prev = self._last_log
        self._last_log = (step, now)
        if prev is None:
            self._first_log = (step, now)
            self._export(None, max(0, step - (self.resumed_step or 0)) * per_rank_batch)
            return
        (prev_step, prev_t), (first_step, first_t) = prev, self._first_log or prev
        if step <= prev_step or now <= prev_t:
            return
        self.images_per_second = (step - first_step) * self.global_batch / (now - first_t)
        self._export((step - prev_step) * per_rank_batch / (now - prev_t), (step - prev_step) * per_rank_batch)

    def _export(self, images_per_second: float | None, images: float) -> None:
        from ray.util.metrics import Counter, Gauge

        if self._gauge is None:
            # Names must match [a-zA-Z_][a-zA-Z0-9_]*: Ray drops invalid ones with only a warning.
            self._gauge = Gauge(
                "sslrun_images_per_second",
                description="Training images per second on this rank",
                tag_keys=("run", "rank"),
            )
            self._counter = Counter(
                "sslrun_images_total",
                description="Training images processed on this rank",
                tag_keys=("run", "rank"),
            )
        # The run name (the Train run's name, after the output directory) tells runs apart on a shared cluster.
        tags = {"run": self.name, "rank": str(self.rank)}  # tag values must be str
        if images_per_second is not None:
            self._gauge.set(images_per_second, tags=tags)
        if images > 0:
            self._counter.inc(images, tags=tags)

    def _event(self, record: dict[str, Any]) -> None:
        """Rank 0 appends one JSON line to the events file (attempts, resumes, first step) with a timestamp."""
        if self.rank != 0 or self.events is None:
            return
        self.events.parent.mkdir(parents=True, exist_ok=True)
        with open(self.events, "a") as f:
            f.write(json.dumps({"time": time.time(), **record}) + "\n")
        if record["event"] == "attempt":  # the driver's console tells a restart after a worker failure from these
            print(event_line(record), flush=True)


def _floats(metrics: dict[str, Any]) -> dict[str, float]:
    """``ray.train.report`` raises ``ValueError`` on torch tensors in metrics: keep plain numbers only."""
    out: dict[str, float] = {}
    for key, value in metrics.items():
        try:
            out[key] = float(value)
        except (TypeError, ValueError):
            continue
    return out


def _link_or_copy(src: Path, dst: Path) -> None:
    """A hard link costs nothing; across filesystems fall back to a copy."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)
