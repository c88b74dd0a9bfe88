"""What ``sslrun report`` reads from a run directory, and nothing else: the run's files as written by training and
evaluation, so a report can be made of any finished, stopped or running run without loading a model.

* ``config.toml``: the experiment, shown as it is;
* ``metrics.jsonl``: one JSON object per log step (``step``, ``epoch``, ``time``, ``train/*``, ``opt/*``,
  ``perf/*``) and the online kNN rows (``knn/top1``, ``knn/top5``);
* ``tb/``: the TensorBoard image grids (``views/augmented``, ``visuals/<name>`` for pretext predictions), the
  last of each tag, read with TensorBoard's own event reader;
* ``eval_*.json``: the results ``sslrun eval`` wrote (into ``checkpoints/`` by default, or the run directory).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sslrun.core.errors import ConfigError

__all__ = ["RunData", "read_run"]


@dataclass
class RunData:
    """One run's files, parsed.

    Attributes:
        name: the run directory's name (the legend label when runs are compared).
        path: the run directory.
        config_text: ``config.toml`` as written, or "" when absent.
        rows: the ``metrics.jsonl`` rows, in file order (a resumed run appends after its checkpoint step).
        images: TensorBoard image tag -> PNG bytes of its last image.
        evals: the ``sslrun eval`` result files, parsed.
    """

    name: str
    path: Path
    config_text: str
    rows: list[dict[str, Any]]
    images: dict[str, bytes] = field(default_factory=dict)
    evals: list[dict[str, Any]] = field(default_factory=list)

    def series(self, key: str) -> tuple[list[int], list[float]]:
        """``(steps, values)`` of one metric; a resumed run's re-logged steps keep their latest value."""
        by_step: dict[int, float] = {}
        for row in self.rows:
            value = row.get(key)
            if isinstance(value, int | float) and math.isfinite(value):
                by_step[int(row["step"])] = float(value)
        steps = sorted(by_step)
        return steps, [by_step[s] for s in steps]

    def keys(self, prefix: str) -> list[str]:
        """Metric names that start with ``prefix``, sorted."""
        return sorted({k for row in self.rows for k in row if k.startswith(prefix)})

    def last(self, key: str) -> float | None:
        """The last logged value of ``key``, or None."""
        _, values = self.series(key)
        return values[-1] if values else None


def read_run(path: Path) -> RunData:
    """Read the run directory ``path`` (an ``OUTPUT`` of ``sslrun train`` / ``sslrun launch``).

    Raises:
        ConfigError: ``path`` is not a run directory (no ``metrics.jsonl``), or that file is not JSON lines.
    """
    path = Path(path)
    metrics = path / "metrics.jsonl"
    if not metrics.is_file():
        raise ConfigError(
            f"{path} is not a run directory (no metrics.jsonl); pass the --output of `sslrun train` or `sslrun launch`"
        )
    rows: list[dict[str, Any]] = []
    lines = metrics.read_text().splitlines()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):
                break  # a run that is still writing may leave its last line half-written
            raise ConfigError(f"{metrics}:{number} is not JSON; is this file from sslrun?") from None
        if isinstance(row, dict) and "step" in row:
            rows.append(row)
    config = path / "config.toml"
    return RunData(
        name=path.resolve().name,
        path=path,
        config_text=config.read_text() if config.is_file() else "",
        rows=rows,
        images=_last_images(path / "tb"),
        evals=_evals(path),
    )


def _last_images(tb: Path) -> dict[str, bytes]:
    """The last image of every TensorBoard image tag under ``tb`` (PNG bytes, as SummaryWriter encoded them)."""
    if not any(tb.glob("events.out.tfevents.*")):
        return {}
    from tensorboard.backend.event_processing.event_accumulator import IMAGES, EventAccumulator

    acc = EventAccumulator(str(tb), size_guidance={IMAGES: 1})  # keep one image per tag: the last
    acc.Reload()
    return {tag: acc.Images(tag)[-1].encoded_image_string for tag in sorted(acc.Tags().get(IMAGES, []))}


def _evals(path: Path) -> list[dict[str, Any]]:
    """``sslrun eval`` results stored with the run, sorted by protocol, label fraction and seed."""
    found = []
    for file in sorted({*path.glob("eval_*.json"), *path.glob("checkpoints/eval_*.json")}):
        try:
            data = json.loads(file.read_text())
        except (OSError, json.JSONDecodeError):
            continue  # a result being written right now; the next report shows it
        if isinstance(data, dict) and "top1" in data:
            found.append(data)
    return sorted(found, key=lambda d: (str(d.get("kind")), float(d.get("label_fraction", 1)), int(d.get("seed", 0))))
