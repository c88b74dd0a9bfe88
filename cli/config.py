"""``sslrun config show``: the experiment config a set of flags resolves to."""

from __future__ import annotations

import typer

from sslrun.cli.common import experiment_from_cli, friendly
from sslrun.cli.options import (
    BatchOpt,
    ConfigFile,
    DatasetOpt,
    EncoderOpt,
    EpochsOpt,
    LrOpt,
    MethodOpt,
    OutputOpt,
    Overrides,
    PretextOpt,
)

app = typer.Typer(help="Show the resolved experiment config.")


@app.command("show")
@friendly
def config_show(
    config: ConfigFile = None,
    overrides: Overrides = None,
    method: MethodOpt = None,
    pretext: PretextOpt = None,
    encoder: EncoderOpt = None,
    dataset: DatasetOpt = None,
    epochs: EpochsOpt = None,
    batch_size: BatchOpt = None,
    lr: LrOpt = None,
    output: OutputOpt = None,
) -> None:
    """Print the resolved config as TOML (defaults < --config < flags < --set)."""
    cfg = experiment_from_cli(
        config,
        overrides,
        method=method,
        pretext=pretext,
        encoder=encoder,
        dataset=dataset,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        output=output,
    )
    typer.echo(cfg.to_toml())
