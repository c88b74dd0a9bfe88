"""The driver's console for ``sslrun launch``: one live progress view, quiet by default, with nothing lost.

* **Everything is kept.** Every line any Ray process prints (training workers, the Train controller, Ray's own
  actors, on every node) reaches the driver through Ray's log forwarding; :class:`LaunchConsole` writes each
  process's lines whole to ``OUTPUT/logs/<actor>-<pid>.log``, and everything written to the driver's own stderr
  (Ray's start-up notices, C++ warnings) to ``OUTPUT/logs/driver.log``.
* **The console shows what is the person's business**: the trainer's messages from the workers, errors, one line
  when a worker failed and Ray Train restarted the group, one line when the data loader is slow, and the progress
  view (:class:`~sslrun.core.train.progress.ProgressView`) drawn from rank 0's progress events. Warnings that
  say nothing to the person (Ray's and torch's INFO/WARNING logs, Python warnings, tracebacks of Ray's internal
  actors) stay in the logs. ``--verbose`` shows everything as Ray would.

Ray's log forwarding is replaced through ``ray._private.worker.global_worker_stdstream_dispatcher`` (Ray 2.60):
``ray.init`` registers its printer there as ``ray_print_logs``, and every batch of worker lines passes through it
(see docs/internals.md, section 'Live progress from Ray workers').
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

from sslrun.core.train.progress import ProgressView, parse_event

__all__ = ["LOGS_DIR", "LaunchConsole", "is_noise"]

LOGS_DIR = "logs"
_RAY_HANDLER = "ray_print_logs"
_OUR_HANDLER = "sslrun_console"
_NOISE = re.compile(
    r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+\s+(DEBUG|INFO|WARNING)\s"  # Ray's Python logging (token notice, ...)
    r"|^\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ [IW] \d+ \d+\]"  # Ray's C++ logs, INFO/WARNING (8.8.8.8:53 probe)
    r"|^\[[IW]\d{4} \d\d:\d\d:\d\d"  # torch's C++ warnings ([c10d] hostname of the client socket)
    r"|^\S+:\d+: \w*Warning: "  # Python warnings (RayDeprecationWarning, UserWarning, ...)
)
_CONTINUATION = re.compile(r"^\s{2}\S")  # the source line Python prints under a warning


def is_noise(line: str) -> bool:
    """True for a log line that says nothing to the person running sslrun (it still goes to the logs)."""
    return bool(_NOISE.match(line))


class LaunchConsole:
    """The live view and the log files of one launch (a context manager: use ``with``).

    Args:
        output: the run's output directory; logs go to ``output/logs``.
        verbose: show every line on the console (the logs are written either way).
        progress: ``auto`` (bar on a terminal, plain lines otherwise), ``bar``, ``plain`` or ``off``.
        world_size: training workers (shown in the view).
        stream: the console (default stdout).
    """

    def __init__(
        self, output: Path, *, verbose: bool, progress: str, world_size: int, stream: TextIO | None = None
    ) -> None:
        self.logs = Path(output) / LOGS_DIR
        self.verbose = verbose
        self.view = ProgressView(progress, total_steps=0, epochs=1, world_size=world_size, stream=stream)
        self.restarts = 0
        self.resizes = 0  # worker-group size changes (elastic range, or a --resume with another layout)
        self._files: dict[str, TextIO] = {}
        self._lock = threading.Lock()
        self._attempts = 0
        self._ray_printer: Callable[[dict[str, Any]], None] | None = None
        self._tee: _StderrTee | None = None

    # ---- lifecycle ---------------------------------------------------------------------------------------
    def __enter__(self) -> LaunchConsole:
        self.logs.mkdir(parents=True, exist_ok=True)
        self._tee = _StderrTee(self.logs / "driver.log", self.verbose)
        self._tee.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.detach_ray()
        self.view.close()
        if self._tee is not None:
            self._tee.stop()
        with self._lock:
            for f in self._files.values():
                f.close()
            self._files.clear()

    def attach_ray(self) -> None:
        """Take over Ray's printing of worker output (after ``ray.init``; a no-op where Ray prints no worker
        output to this driver, as with Ray Client)."""
        from ray._private.worker import global_worker_stdstream_dispatcher as dispatcher

        with dispatcher._lock:
            printers = [handler for name, handler in dispatcher.handlers if name == _RAY_HANDLER]
        if not printers:
            return
        self._ray_printer = printers[0]
        dispatcher.remove_handler(_RAY_HANDLER)
        dispatcher.add_handler(_OUR_HANDLER, self._on_batch)

    def detach_ray(self) -> None:
        """Give Ray its printer back (before ``ray.shutdown``, so late lines are not lost)."""
        if self._ray_printer is None:
            return
        from ray._private.worker import global_worker_stdstream_dispatcher as dispatcher

        dispatcher.remove_handler(_OUR_HANDLER)
        dispatcher.add_handler(_RAY_HANDLER, self._ray_printer)
        self._ray_printer = None

    def echo(self, line: str) -> None:
        """A line of the driver's own (above the bar when there is one)."""
        if self.view.mode == "off":
            print(line, flush=True)
        else:
            self.view.echo(line)

    # ---- worker output -----------------------------------------------------------------------------------
    def _on_batch(self, data: dict[str, Any]) -> None:
        """One batch of lines from one Ray process: to its log file, the events to the view, the rest filtered."""
        try:
            lines: list[str] = list(data.get("lines") or [])
            process = str(data.get("actor_name") or data.get("task_name") or "ray")
            self._write_log(f"{process}-{data.get('pid')}", lines)
            shown = []
            hide_continuation = False
            for line in lines:
                event = parse_event(line)
                if event is not None:
                    self._on_event(event)
                    continue
                noise = is_noise(line) or (hide_continuation and bool(_CONTINUATION.match(line)))
                hide_continuation = noise
                if self.verbose or (not noise and process == "RayTrainWorker" and not data.get("is_err")):
                    shown.append(line)
            if shown and self.verbose and self._ray_printer is not None:
                self._ray_printer({**data, "lines": shown})  # Ray's own look: prefixes, colours, deduplication
            else:
                for line in shown:
                    self.view.echo(line)
        except Exception as exc:  # Ray's log thread must survive anything here, or later output would be lost
            self._write_log("driver", [f"sslrun console: {type(exc).__name__}: {exc}"])

    def _on_event(self, event: dict[str, Any]) -> None:
        if event.get("event") == "attempt":
            self._attempts += 1
            step = int(event.get("resumed_step") or 0)
            self.view.restart(step)
            world, before = event.get("world_size"), event.get("previous_world_size")
            if world:
                self.view.world_size = int(world)
            if before is not None and world is not None and before != world:
                self.resizes += 1
                self.view.echo(
                    f"resize: {before} -> {world} workers, continuing from the checkpoint at step {step} "
                    f"(the same global batch and data order)"
                )
            elif self._attempts > 1:
                self.restarts += 1
                self.view.echo(
                    f"a worker failed: Ray Train restarted {world} workers from the checkpoint at "
                    f"step {step} (restart {self.restarts}; details in {self.logs})"
                )
            return
        if "step" not in event:
            return
        self.view.total_steps = int(event.get("total") or self.view.total_steps)
        self.view.epochs = int(event.get("epochs") or self.view.epochs)
        if "knn/top1" in event:
            self.view.knn_top1 = float(event["knn/top1"])
        if "train/loss" not in event:
            return
        data_s, compute_s = float(event.get("perf/data_time_s", 0)), float(event.get("perf/compute_time_s", 0))
        fraction = float(event.get("epoch", 0))
        self.view.update(
            int(event["step"]),
            max(0, -int(-fraction // 1) - 1),  # the epoch in progress; its last step still belongs to it
            float(event["train/loss"]),
            float(event.get("perf/images_per_s", 0)),
            data_share=data_s / (data_s + compute_s) if data_s + compute_s > 0 else None,
            force=int(event["step"]) >= self.view.total_steps,
        )

    def _write_log(self, name: str, lines: list[str]) -> None:
        with self._lock:
            f = self._files.get(name)
            if f is None:
                f = self._files[name] = open(self.logs / f"{name}.log", "a")  # noqa: SIM115 (closed in __exit__)
            f.writelines(line + "\n" for line in lines)
            f.flush()


class _StderrTee:
    """Send the driver's file descriptor 2 through a pipe: every line to ``path``, the lines that are not noise
    (all of them when ``verbose``) on to the real stderr. At file-descriptor level, because Ray's C++ core writes
    its warnings straight to descriptor 2, past Python's ``sys.stderr``."""

    def __init__(self, path: Path, verbose: bool) -> None:
        self.path = path
        self.verbose = verbose
        self._saved = -1
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        sys.stderr.flush()
        read_end, write_end = os.pipe()
        self._saved = os.dup(2)
        os.dup2(write_end, 2)
        os.close(write_end)
        self._thread = threading.Thread(target=self._pump, args=(read_end,), name="sslrun-stderr", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Put the real stderr back; the pump ends when the last writer of the pipe is gone."""
        if self._saved < 0:
            return
        sys.stderr.flush()
        os.dup2(self._saved, 2)  # closes our write end of the pipe: the pump sees end-of-file
        os.close(self._saved)
        self._saved = -1
        if self._thread is not None:
            # Processes Ray started may still hold the pipe; they were stopped by ray.shutdown, but do not hang on it.
            self._thread.join(timeout=2)

    def _pump(self, read_end: int) -> None:
        real = os.dup(self._saved)
        hide_continuation = False
        with open(read_end, "rb", buffering=0) as pipe, open(self.path, "ab") as log, open(real, "wb") as out:
            for raw in pipe:
                log.write(raw)
                log.flush()
                line = raw.decode(errors="replace").rstrip("\n")
                noise = is_noise(line) or (hide_continuation and bool(_CONTINUATION.match(line)))
                hide_continuation = noise
                if self.verbose or not noise:
                    with contextlib.suppress(OSError):
                        out.write(raw)
                        out.flush()
