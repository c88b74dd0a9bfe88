"""``sslrun report RUN [RUN...]``: one self-contained HTML page about a run, or comparing runs (see
:mod:`sslrun.cli.report_html` for what it shows, :mod:`sslrun.cli.report_data` for what it reads)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from sslrun.cli.common import friendly
from sslrun.core.errors import ConfigError
from sslrun.core.files import atomic_write_text

__all__ = ["REPORT_FILE", "report", "write_report"]

REPORT_FILE = "report.html"  # in the run directory when one run is reported


def write_report(runs: list[Path], out: Path | None = None) -> Path:
    """Write the report of ``runs`` and return its path.

    Args:
        runs: run directories (``OUTPUT`` of ``sslrun train`` / ``sslrun launch``).
        out: the HTML file; default ``RUN/report.html`` for one run, ``compare.html`` in the runs' common parent
            directory for several.

    Raises:
        ConfigError: a path is not a run directory, or two runs have the same name, in one line.
    """
    from sslrun.cli.report_data import read_run
    from sslrun.cli.report_html import render_report

    data = [read_run(run) for run in runs]
    names = [d.name for d in data]
    if len(set(names)) != len(names):
        raise ConfigError(f"runs with the same directory name cannot be told apart in the plots: {names}")
    if out is None:
        parents = [p.resolve() for p in runs]
        out = parents[0] / REPORT_FILE if len(runs) == 1 else _common_parent(parents) / "compare.html"
    atomic_write_text(out, render_report(data))  # a browser open on the old page never sees half a file
    return out


@friendly
def report(
    runs: Annotated[list[Path], typer.Argument(help="Run directories (the --output of train/launch).")],
    out: Annotated[
        Path | None,
        typer.Option("--out", "-o", help="The HTML file (default RUN/report.html; several runs: compare.html)."),
    ] = None,
    screenshot: Annotated[
        Path | None, typer.Option(help="Also render the page in headless Chromium to this PNG.")
    ] = None,
    screenshot_height: Annotated[
        int | None, typer.Option(min=100, help="Pixels of the page to capture (default: the whole page).")
    ] = None,
) -> None:
    """Write an HTML report (loss, lr, kNN, throughput, views, config, eval results) of one run or compare runs."""
    path = write_report(runs, out)
    typer.echo(f"report: {path}")
    if screenshot is None:
        return
    from sslrun.cli.report_browser import render_page

    seen = render_page(path, screenshot, height=screenshot_height)
    broken = [alt for alt, ok in seen.images if not ok]
    if seen.errors or broken:
        problems = seen.errors + [f"image did not load: {alt}" for alt in broken]
        raise ConfigError(f"the browser found problems in {path}: {'; '.join(problems)}")
    typer.echo(f"screenshot: {screenshot} ({len(seen.images)} images, page {seen.height} px high)")


def _common_parent(paths: list[Path]) -> Path:
    common = paths[0].parent
    while not all(common in p.parents for p in paths):
        common = common.parent
    return common
