"""The ``sslrun report`` page: one self-contained HTML file (plots as inline PNGs, no script, no external
resource) for one run, or comparing several runs on the same axes.

Sections, each shown only when some run has its data: a summary table, loss and its terms, learning rate, online
kNN top-1, images/s with the share of step time spent waiting for data, evaluation results, the augmented views
and pretext predictions (TensorBoard image grids), and each run's config.
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Callable, Sequence
from typing import Any

from sslrun.cli.report_data import RunData

__all__ = ["render_report"]

_CSS = """
body { font-family: system-ui, sans-serif; margin: 24px auto; max-width: 1240px; color: #222; background: #fff; }
h1 { font-size: 22px; margin-bottom: 4px; } h2 { font-size: 17px; margin-top: 28px; border-bottom: 1px solid #ddd; }
.sub { color: #666; margin-top: 0; } table { border-collapse: collapse; font-size: 14px; }
td, th { border: 1px solid #ddd; padding: 4px 10px; text-align: right; } th { background: #f4f4f4; }
td:first-child, th:first-child { text-align: left; }
.plots { display: grid; grid-template-columns: repeat(2, 1fr); gap: 12px; }
.plots img, .grid img { width: 100%; border: 1px solid #eee; }
.grid img { image-rendering: pixelated; max-width: 900px; }
pre { background: #f7f7f7; padding: 10px; font-size: 12px; overflow-x: auto; }
"""


def render_report(runs: Sequence[RunData]) -> str:
    """The whole HTML page for ``runs`` (one run: its report; several: a comparison)."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display, no GUI toolkit
    title = f"sslrun report: {runs[0].name}" if len(runs) == 1 else f"sslrun report: {len(runs)} runs compared"
    parts = [
        f"<h1>{_e(title)}</h1>",
        f'<p class="sub">{_e(", ".join(str(r.path) for r in runs))}</p>',
        "<h2>Summary</h2>",
        _summary_table(runs),
    ]
    plots = [p for p in (_plot(spec, runs) for spec in _PLOTS) if p]
    if plots:
        parts += ["<h2>Training curves</h2>", '<div class="plots">', *plots, "</div>"]
    parts += _eval_section(runs)
    parts += _image_section(runs)
    for run in runs:
        if run.config_text:
            parts += [f"<h2>Config: {_e(run.name)}</h2>", f"<pre>{_e(run.config_text)}</pre>"]
    body = "\n".join(parts)
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{_e(title)}</title><style>{_CSS}</style></head>\n<body>\n{body}\n</body></html>\n"
    )


# ---- summary ----------------------------------------------------------------------------------------------------
def _summary_table(runs: Sequence[RunData]) -> str:
    head = "<tr><th>run</th><th>steps</th><th>epochs</th><th>final loss</th><th>kNN top-1</th><th>images/s</th>"
    head += "<th>data wait</th><th>wall time</th></tr>"
    rows = []
    for run in runs:
        steps, _ = run.series("train/loss")
        epoch = run.last("epoch")
        times = [float(r["time"]) for r in run.rows if isinstance(r.get("time"), int | float)]
        cells = [
            _e(run.name),
            str(steps[-1]) if steps else "-",
            f"{epoch:.2f}" if epoch is not None else "-",
            _num(run.last("train/loss"), "{:.4f}"),
            _num(run.last("knn/top1"), "{:.2f}%"),
            _num(_median(run.series("perf/images_per_s")[1]), "{:,.0f}"),
            _num(_median(_data_share(run)[1]), "{:.0%}"),
            f"{(max(times) - min(times)) / 60:.1f} min" if len(times) > 1 else "-",
        ]
        rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    return f"<table>{head}{''.join(rows)}</table>"


# ---- plots ------------------------------------------------------------------------------------------------------
Series = Callable[[RunData], list[tuple[str, tuple[list[int], list[float]]]]]


def _loss_terms(run: RunData) -> list[tuple[str, tuple[list[int], list[float]]]]:
    return [(key.removeprefix("train/"), run.series(key)) for key in run.keys("train/")]


def _one(key: str) -> Series:
    return lambda run: [(key, run.series(key))]


def _data_share(run: RunData) -> tuple[list[int], list[float]]:
    """Per log step: the fraction of step time spent waiting for the data loader."""
    steps, data = run.series("perf/data_time_s")
    compute = dict(zip(*run.series("perf/compute_time_s"), strict=True))
    pairs = [(s, d / (d + compute[s])) for s, d in zip(steps, data, strict=True) if d + compute.get(s, 0.0) > 0]
    return [s for s, _ in pairs], [v for _, v in pairs]


# (file-safe id, title, y label, series)
_PLOTS: list[tuple[str, str, str, Series]] = [
    ("loss", "Loss and its terms", "value", _loss_terms),
    ("lr", "Learning rate", "lr", _one("opt/lr")),
    ("knn", "Online kNN top-1", "top-1 (%)", _one("knn/top1")),
    ("throughput", "Images/s (all workers)", "images/s", _one("perf/images_per_s")),
    ("datawait", "Share of step time waiting for data", "share", lambda r: [("data wait", _data_share(r))]),
    ("world", "Workers (elastic runs resize)", "workers", _one("perf/world_size")),
]


def _plot(spec: tuple[str, str, str, Series], runs: Sequence[RunData]) -> str:
    """One figure as an ``<img>`` with the PNG inline, or "" when no run has this data."""
    import matplotlib.pyplot as plt

    plot_id, title, ylabel, series = spec
    lines = []
    for run in runs:
        found = [(label, xy) for label, xy in series(run) if xy[0]]
        for label, xy in found:  # comparing runs: one line each is named by its run alone
            lines.append((label if len(runs) == 1 else run.name if len(found) == 1 else f"{run.name}: {label}", xy))
    if not lines:
        return ""
    fig, ax = plt.subplots(figsize=(6.0, 3.4), dpi=100)
    try:
        for name, (steps, values) in lines:
            marker = "o" if len(steps) < 12 else None  # a few points (kNN once per epoch) need markers to be seen
            ax.plot(steps, values, label=name, marker=marker, linewidth=1.5)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if len(lines) > 1:
            ax.legend(fontsize=8)
        fig.tight_layout()
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png")
    finally:
        plt.close(fig)
    return _img(buffer.getvalue(), f"plot: {title}", f"plot-{plot_id}")


# ---- evaluation, images ----------------------------------------------------------------------------------------
def _protocol(ev: dict) -> str:
    """``linear``, or ``linear (grid2)`` for a probe that read something other than the pooled features."""
    features = ev.get("features", "pooled")
    return str(ev.get("kind")) if features == "pooled" else f"{ev.get('kind')} ({features})"


def _eval_section(runs: Sequence[RunData]) -> list[str]:
    rows = []
    for run in runs:
        for ev in run.evals:
            top5 = ev.get("top5")
            cells = [
                _e(run.name),
                _e(_protocol(ev)),
                _e(str(ev.get("dataset"))),
                f"{float(ev.get('label_fraction', 1)):g}",
                _e(str(ev.get("checkpoint_step"))),
                f"{100 * float(ev['top1']):.2f}%",
                f"{100 * float(top5):.2f}%" if isinstance(top5, int | float) else "-",
            ]
            rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    if not rows:
        return []
    head = "<tr><th>run</th><th>protocol</th><th>dataset</th><th>labels</th><th>step</th><th>top-1</th><th>top-5</th>"
    return ["<h2>Evaluation (sslrun eval)</h2>", f"<table>{head}</tr>{''.join(rows)}</table>"]


def _image_section(runs: Sequence[RunData]) -> list[str]:
    parts: list[str] = []
    for run in runs:
        for tag, png in run.images.items():
            what = "augmented views (one row per view)" if tag == "views/augmented" else f"pretext: {tag}"
            label = what if len(runs) == 1 else f"{run.name}: {what}"
            parts += [f"<h2>{_e(label)}</h2>", f'<div class="grid">{_img(png, label, "grid-" + tag)}</div>']
    return parts


# ---- helpers ----------------------------------------------------------------------------------------------------
def _img(png: bytes, alt: str, css_id: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f'<img id="{_e(css_id)}" alt="{_e(alt)}" src="data:image/png;base64,{data}">'


def _median(values: list[float]) -> float | None:
    """The median: robust to the first log window, which includes start-up (JIT, process group)."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[len(ordered) // 2]


def _num(value: float | None, fmt: str) -> str:
    return fmt.format(value) if value is not None and math.isfinite(value) else "-"


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)
