"""The ``sslrun`` command line (Typer). Thin: every command parses flags, builds its config and calls into
``sslrun.core`` (or ``sslrun.cluster`` for ``launch``, imported lazily so that the rest of the CLI never starts
Ray). Every :class:`~sslrun.core.errors.SslrunError` is printed as one ``error:`` line and exits with status 2.

One module per command group: :mod:`~sslrun.cli.plugins`, :mod:`~sslrun.cli.config`, :mod:`~sslrun.cli.data`,
:mod:`~sslrun.cli.train` (``train``, ``launch``), :mod:`~sslrun.cli.eval` (``eval ...``, ``export``) and
:mod:`~sslrun.cli.report` (``report``); the
options several commands share are declared once in :mod:`~sslrun.cli.options`.
"""

from __future__ import annotations

import typer

from sslrun.cli import config, data, plugins, report, train
from sslrun.cli import eval as evaluation

__all__ = ["app", "main"]

app = typer.Typer(
    name="sslrun",
    help="Distributed self-supervised pretraining for vision: Ray Train + DDP + FFCV, methods as plugins.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.add_typer(plugins.app, name="plugins")
app.add_typer(config.app, name="config")
app.add_typer(data.app, name="data")
app.command("train")(train.train)
app.add_typer(evaluation.app, name="eval")
app.command("export")(evaluation.export)
app.command("launch")(train.launch)
app.command("report")(report.report)


def main() -> None:
    """Console-script entry point."""
    app(prog_name="sslrun")
