"""The ``sslrun`` command line (Typer). Thin: every command parses flags, builds an :class:`ExperimentConfig`
and calls into ``sslrun.core`` (or ``sslrun.cluster`` for ``launch``, imported lazily so that the rest of the CLI
never starts Ray). Every :class:`SslrunError` is printed as one ``error:`` line and exits with status 2.
"""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from sslrun.core.errors import SslrunError

app = typer.Typer(
    name="sslrun",
    help="Distributed self-supervised pretraining for vision: Ray Train + DDP + FFCV, methods as plugins.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
plugins_app = typer.Typer(help="List and check the installed plugins (methods, encoders, pretext tasks, datasets).")
config_app = typer.Typer(help="Show the resolved experiment config.")
data_app = typer.Typer(help="Prepare datasets as FFCV .beton files and inspect them.")
eval_app = typer.Typer(help="Downstream evaluation of a pretrained encoder: knn, linear, finetune.")
app.add_typer(plugins_app, name="plugins")
app.add_typer(config_app, name="config")
app.add_typer(data_app, name="data")
app.add_typer(eval_app, name="eval")

F = TypeVar("F", bound=Callable[..., Any])


def friendly(fn: F) -> F:
    """Turn :class:`SslrunError` into one ``error: ...`` line on stderr and exit status 2 (no traceback)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except SslrunError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from None

    return wrapper  # type: ignore[return-value]


# ---- experiment flags shared by `config show`, `train` and `launch` --------------------------------------------
ConfigFile = Annotated[
    Path | None, typer.Option("--config", "-c", help="TOML or YAML experiment config (flags and --set win over it).")
]
Overrides = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override any config key: --set optim.lr=0.3 --set method.kwargs.temperature=0.2"),
]
MethodOpt = Annotated[str | None, typer.Option(help="SSL method or pretext task (see `sslrun plugins list`).")]
PretextOpt = Annotated[str | None, typer.Option(help="Pretext task to train (same as --method NAME).")]
EncoderOpt = Annotated[str | None, typer.Option(help="Encoder: small_cnn for CPU, resnet18/50 or vit_* on GPUs.")]
DatasetOpt = Annotated[str | None, typer.Option(help="Dataset plugin; prepared to .beton on first use.")]
RootOpt = Annotated[str | None, typer.Option(help="Directory with the dataset's raw files.")]
DataDirOpt = Annotated[str | None, typer.Option(help="Cache of prepared .beton files (default ~/.cache/sslrun).")]
EpochsOpt = Annotated[int | None, typer.Option(min=1, help="Training epochs.")]
MaxStepsOpt = Annotated[int | None, typer.Option(min=1, help="Stop after this many global steps.")]
BatchOpt = Annotated[int | None, typer.Option(min=1, help="GLOBAL batch size (split across workers).")]
LrOpt = Annotated[float | None, typer.Option(help="Base lr per 256 images (scaled linearly with batch size).")]
OutputOpt = Annotated[str | None, typer.Option("--output", "-o", help="Output directory of the run.")]
SeedOpt = Annotated[int | None, typer.Option(help="Random seed.")]
DeviceOpt = Annotated[str | None, typer.Option(help="auto, cpu or cuda.")]
WorkersOpt = Annotated[int | None, typer.Option(min=1, help="FFCV loader threads per process.")]
ResumeOpt = Annotated[bool, typer.Option("--resume", help="Continue from OUTPUT/checkpoints/last.pt.")]


def experiment_from_cli(
    config: Path | None = None,
    overrides: list[str] | None = None,
    *,
    method: str | None = None,
    pretext: str | None = None,
    encoder: str | None = None,
    dataset: str | None = None,
    root: str | None = None,
    data_dir: str | None = None,
    epochs: int | None = None,
    max_steps: int | None = None,
    batch_size: int | None = None,
    lr: float | None = None,
    output: str | None = None,
    seed: int | None = None,
    device: str | None = None,
    num_workers: int | None = None,
    resume: bool = False,
    extra: dict[str, Any] | None = None,
) -> Any:
    """defaults < --config file < flags < --set; plugin names and kwargs are validated here, on the driver."""
    from sslrun.core.config import build_config
    from sslrun.core.errors import ConfigError
    from sslrun.core.resolve import validate_plugins

    if method and pretext and method != pretext:
        raise ConfigError(f"--method {method} and --pretext {pretext} disagree; give one of them")
    flags: dict[str, Any] = {
        "method.name": method or pretext,
        "encoder.name": encoder,
        "data.dataset": dataset,
        "data.root": root,
        "data.data_dir": data_dir,
        "schedule.epochs": epochs,
        "schedule.max_steps": max_steps,
        "data.batch_size": batch_size,
        "optim.lr": lr,
        "output": output,
        "system.seed": seed,
        "system.device": device,
        "data.num_workers": num_workers,
        "resume": True if resume else None,
        **(extra or {}),
    }
    cfg = build_config(config, flags, overrides)
    return validate_plugins(cfg)


# ---- plugins ---------------------------------------------------------------------------------------------------
@plugins_app.command("list")
@friendly
def plugins_list(
    kind: Annotated[str | None, typer.Option(help="method, encoder, pretext or dataset.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Name, kind, distribution==version and status (ok / broken: reason) of every plugin."""
    from sslrun.core.errors import ConfigError
    from sslrun.core.registry import KINDS, get_registry

    if kind is not None and kind not in KINDS:
        raise ConfigError(f"unknown plugin kind {kind!r}; kinds: {', '.join(KINDS)}")
    rows = []
    for k in [kind] if kind else KINDS:
        reg = get_registry(k)
        for name in reg.names():
            info = reg.info(name)
            rows.append(
                {"name": name, "kind": k, "dist": info.dist_version, "target": info.target, "status": reg.check(name)}
            )
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table("name", "kind", "distribution", "status")
    for r in rows:
        table.add_row(r["name"], r["kind"], r["dist"], r["status"])
    Console(width=160).print(table)


@plugins_app.command("check")
@friendly
def plugins_check() -> None:
    """Import and validate every plugin; exit 1 if any is broken."""
    from sslrun.core.registry import KINDS, get_registry

    broken = 0
    for k in KINDS:
        reg = get_registry(k)
        for name in reg.names():
            status = reg.check(name)
            if status != "ok":
                broken += 1
                info = reg.info(name)
                typer.echo(f"{k} {name} ({info.dist_version}): {status}")
    if broken:
        typer.echo(f"{broken} broken plugin(s)", err=True)
        raise typer.Exit(1)
    typer.echo("all plugins ok")


# ---- config ----------------------------------------------------------------------------------------------------
@config_app.command("show")
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


# ---- data (issue 3) -------------------------------------------------------------------------------------------
# ---- train (issue 4) ------------------------------------------------------------------------------------------
# ---- eval / export (issue 8) ----------------------------------------------------------------------------------
# ---- launch (issue 7) -----------------------------------------------------------------------------------------


def main() -> None:
    """Console-script entry point."""
    app(prog_name="sslrun")


if __name__ == "__main__":
    sys.exit(main())
