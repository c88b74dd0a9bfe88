"""Helpers shared by the benchmark scripts: result tables, the ``--json`` last line, machine facts, the benchmarks'
own package environment (lightly, matplotlib), step timing of ``sslrun.core.train.trainer.train`` and torchvision views.

The scripts in ``benchmarks/`` are run as ``python benchmarks/<name>.py`` (this folder is then on ``sys.path``);
they are not part of the installed package.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sslrun.core.interfaces import ViewSpec
from sslrun.core.system import usable_cores
from sslrun.core.train.callbacks import TrainHooks

__all__ = [
    "BENCH_ENV",
    "BENCH_PACKAGES",
    "LoadSampler",
    "StepTimer",
    "ensure_bench_env",
    "machine_info",
    "print_json",
    "print_table",
    "steady_rate",
    "tv_view_transform",
    "usable_cores",
]

#: The benchmarks' own packages live here (``pip install --target``), never in the project's virtualenv.
BENCH_ENV = Path(__file__).resolve().parent / ".bench-env"
#: What goes into :data:`BENCH_ENV`, installed with ``--no-deps`` so that torch/torchvision/numpy/pillow are never
#: reinstalled: lightly 1.6 needs only ``lightning-utilities`` beyond what sslrun already has for the modules the
#: throughput benchmark imports (transforms, losses, heads); matplotlib needs the five packages after it.
BENCH_PACKAGES: tuple[str, ...] = (
    "lightly==1.6.*",
    "lightning-utilities",
    "matplotlib",
    "contourpy",
    "cycler",
    "fonttools",
    "kiwisolver",
    "pyparsing",
)
#: Imports that prove the environment is complete.
_PROBE = "import lightly.loss, lightly.transforms, lightly.models.modules, matplotlib"


# ---- output -----------------------------------------------------------------------------------------------------
def print_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], notes: Sequence[str] = ()) -> None:
    """Print an aligned plain-text table (first column left-aligned, the others right-aligned) and notes under it.

    Numbers are printed as given: format them before (``f"{x:,.0f}"``) so the table shows what was measured.
    """
    cells = [[str(c) for c in columns]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]

    def line(r: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))

    print(f"\n{title}")
    print(line(cells[0]))
    print("  ".join("-" * w for w in widths))
    for r in cells[1:]:
        print(line(r))
    for n in notes:
        print(n)


def print_json(obj: dict[str, Any]) -> None:
    """Print ``obj`` as one JSON line; the scripts call it last, so ``stdout.splitlines()[-1]`` parses."""
    sys.stdout.flush()
    print(json.dumps(obj, default=_jsonable), flush=True)


def write_result(path: str | Path, obj: dict[str, Any]) -> Path:
    """Write ``obj`` as an indented JSON result file (for ``docs/results/``), with the command that made it, the
    date and the machine (a published figure is only as good as what it says about where it was measured)."""
    record = {"command": "python " + " ".join(sys.argv), "machine": machine_info(), **obj}
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2, default=_jsonable) + "\n")
    print(f"result written to {out}", flush=True)
    return out


def _jsonable(x: Any) -> Any:
    if isinstance(x, Path):
        return str(x)
    if isinstance(x, float | int):
        return x
    if hasattr(x, "item"):
        return x.item()
    return str(x)


def machine_info() -> dict[str, Any]:
    """Date, host facts and the 1-minute load average: every published figure carries them."""
    info: dict[str, Any] = {
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "usable_cores": usable_cores(),
        "load_avg_1min": round(os.getloadavg()[0], 2),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


class LoadSampler:
    """Samples the machine's load while a measurement runs (a daemon thread, every ``interval`` seconds).

    On a shared machine the load before and after a run says little about what happened during it, so every
    timed section records its own: the 1-minute load average and the number of runnable tasks (the 4th field of
    ``/proc/loadavg``, an instantaneous count). Use as a context manager, then read :meth:`summary`.
    """

    def __init__(self, interval: float = 2.0) -> None:
        self.interval = interval
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="load-sampler")

    def _run(self) -> None:
        while True:
            self.samples.append(_load_now())
            if self._stop.wait(self.interval):
                return

    def __enter__(self) -> LoadSampler:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.samples.append(_load_now())

    def summary(self) -> dict[str, float]:
        """``{"load_mean", "load_max", "runnable_mean"}`` over the samples (1-minute load average; runnable
        tasks including this benchmark's own)."""
        loads = [x for x, _ in self.samples] or [os.getloadavg()[0]]
        runnable = [r for _, r in self.samples] or [0]
        return {
            "load_mean": round(sum(loads) / len(loads), 2),
            "load_max": round(max(loads), 2),
            "runnable_mean": round(sum(runnable) / len(runnable), 1),
        }


def _load_now() -> tuple[float, int]:
    try:
        fields = Path("/proc/loadavg").read_text().split()
        return float(fields[0]), int(fields[3].split("/")[0])
    except (OSError, IndexError, ValueError):
        return os.getloadavg()[0], 0


# ---- the benchmarks' own environment -------------------------------------------------------------------------
def ensure_bench_env(quiet: bool = False) -> Path:
    """Return :data:`BENCH_ENV`, creating it on first use with pip (PyPI access needed once, ~80 MB).

    The project's virtualenv is never touched: packages go to a ``--target`` folder that is put on ``PYTHONPATH``
    only for the processes that need it (the lightly side of the throughput benchmark, the plotting code).

    Raises:
        RuntimeError: pip failed (the message says what to run by hand).
    """
    if _env_ok():
        return BENCH_ENV
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--target", str(BENCH_ENV), "--no-deps"]
    cmd += ["--upgrade", *BENCH_PACKAGES]
    if not quiet:
        print(
            f"benchmark environment missing or incomplete: installing {', '.join(BENCH_PACKAGES)} into {BENCH_ENV}\n"
            f"(once, about 80 MB; the project's virtualenv is not changed)",
            file=sys.stderr,
        )
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0 or not _env_ok():
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        raise RuntimeError(
            f"could not create the benchmark environment {BENCH_ENV} ({' / '.join(tail) or 'imports still fail'}); "
            f"run by hand: {' '.join(cmd)}"
        )
    return BENCH_ENV


def _env_ok() -> bool:
    if not BENCH_ENV.is_dir():
        return False
    env = dict(os.environ, PYTHONPATH=str(BENCH_ENV))
    probe = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True)
    return probe.returncode == 0


def use_bench_env() -> None:
    """Make the benchmark environment importable in this process (plots); creates it if needed."""
    path = str(ensure_bench_env())
    if path not in sys.path:
        sys.path.append(path)  # appended: the project's own packages (torch, numpy) keep precedence


# ---- step timing ------------------------------------------------------------------------------------------------
@dataclass
class StepTimer(TrainHooks):
    """Trainer hooks that timestamp every step and can stop a run at a wall-clock deadline.

    ``should_stop`` is polled once per step, after the forward pass, so consecutive timestamps are one full step
    apart (data wait, forward, backward, optimiser) whatever the step's phase: their differences are the step
    times. Time spent in the online kNN monitor (reported through ``on_log`` as ``knn/time_s``) is recorded, so
    that a time budget can exclude it.

    Attributes:
        budget_s: stop once this much training time (since the first step, monitor time excluded) has passed.
        times: ``perf_counter()`` at each step.
        logs: ``(training seconds, step, metrics)`` for every ``on_log`` call.
        monitor_s: seconds spent in the online kNN monitor so far.
        hit_budget: whether the deadline stopped the run.
        start_unix: ``time.time()`` at the first step (to line up with the ``time`` of metrics.jsonl rows).
    """

    budget_s: float | None = None
    start_unix: float | None = None
    times: list[float] = field(default_factory=list)
    logs: list[tuple[float, int, dict[str, float]]] = field(default_factory=list)
    monitor_s: float = 0.0
    hit_budget: bool = False

    def should_stop(self) -> bool:
        """Record the step's timestamp; True once the budget is spent."""
        if not self.times:
            self.start_unix = time.time()
        self.times.append(time.perf_counter())
        if self.budget_s is not None and self.training_s() >= self.budget_s:
            self.hit_budget = True
            return True
        return False

    def on_log(self, step: int, metrics: dict[str, float]) -> None:
        """Keep the metrics with the training time they were logged at."""
        if "knn/time_s" in metrics:
            self.monitor_s += float(metrics["knn/time_s"])
        self.logs.append((self.training_s(), step, dict(metrics)))

    def training_s(self) -> float:
        """Seconds since the first step, less the online kNN monitor's time."""
        if not self.times:
            return 0.0
        return time.perf_counter() - self.times[0] - self.monitor_s


def steady_rate(times: Sequence[float], warmup: int, images_per_step: int) -> dict[str, float]:
    """Images/s over the steps after the first ``warmup`` ones.

    ``times[k]`` is when step ``k`` reached its forward pass. The rate over steps ``warmup .. len-1`` is
    ``(len - 1 - warmup) * images_per_step / (times[-1] - times[warmup])``: whole steps between two timestamps,
    so the first steps (FFCV's JIT, allocator warm-up, worker start-up) are never in the window. The rate at the
    median step time is returned too.

    Raises:
        ValueError: fewer than ``warmup + 2`` timestamps.
    """
    if len(times) < warmup + 2:
        raise ValueError(f"need at least {warmup + 2} timed steps for warm-up {warmup}, got {len(times)}")
    steps = len(times) - 1 - warmup
    seconds = times[-1] - times[warmup]
    diffs = sorted(b - a for a, b in zip(times[warmup:-1], times[warmup + 1 :], strict=True))
    median = diffs[len(diffs) // 2]
    return {
        "images_per_s": steps * images_per_step / seconds,
        "steps": steps,
        "seconds": seconds,
        "median_step_s": median,
        # robust to a few steps slowed down by other processes on a shared machine (not the headline figure)
        "images_per_s_median_step": images_per_step / median,
    }


# ---- torchvision views --------------------------------------------------------------------------------------------
def tv_view_transform(spec: ViewSpec, mean: Sequence[float], std: Sequence[float], normalize: bool = True) -> Any:
    """A torchvision ``transforms.v2`` pipeline (PIL image in, normalised float tensor out) for one sslrun view:
    random-resized crop, flip, colour jitter, grayscale, blur, solarize, as ``spec`` says.

    With ``normalize=False`` it stops at the ``uint8`` tensor: the caller converts and normalises on its device
    (4x less data through the DataLoader's shared memory and the host-to-device copy)."""
    from torchvision.transforms import v2

    from sslrun.core.data.augment import blur_kernel_size

    t: list[Any] = [
        v2.RandomResizedCrop(spec.size, scale=spec.scale, ratio=spec.ratio, antialias=True),
        v2.RandomHorizontalFlip(spec.flip_p),
    ]
    if spec.jitter_p > 0:
        t.append(v2.RandomApply([v2.ColorJitter(*spec.jitter)], p=spec.jitter_p))
    if spec.grayscale_p > 0:
        t.append(v2.RandomGrayscale(spec.grayscale_p))
    if spec.blur_p > 0:
        t.append(v2.RandomApply([v2.GaussianBlur(blur_kernel_size(spec.size), spec.blur_sigma)], p=spec.blur_p))
    if spec.solarize_p > 0:
        t.append(v2.RandomSolarize(128, p=spec.solarize_p))
    t.append(v2.PILToTensor())
    if normalize:
        t += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]
    return v2.Compose(t)
