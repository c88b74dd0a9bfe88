"""What every command needs: one-line errors, the experiment config built from flags, ``--set KEY=VALUE`` dataset
settings, and tables."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

import typer

from sslrun.core.config import ExperimentConfig, parse_scalar
from sslrun.core.errors import ConfigError, SslrunError

__all__ = ["dataset_settings", "experiment_from_cli", "friendly", "print_table"]

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
) -> ExperimentConfig:
    """defaults < --config file < flags < --set; plugin names and kwargs are validated here, on the driver."""
    from sslrun.core.plugins.build import build_config
    from sslrun.core.plugins.resolve import validate_plugins

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


def dataset_settings(items: list[str] | None) -> dict[str, Any]:
    """``--set size=96`` (or ``--set data.dataset_kwargs.size=96``) -> ``{"size": 96}``."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        key = key.strip().removeprefix("data.dataset_kwargs.")
        if not sep or not key or "." in key:
            raise ConfigError(f"--set {item!r} must look like KEY=VALUE with a dataset setting (e.g. --set size=96)")
        out[key] = parse_scalar(raw.strip())
    return out


def print_table(columns: Iterable[str], rows: Iterable[Iterable[str]], **table_options: Any) -> None:
    """Print ``rows`` as a rich table, 160 columns wide whatever the terminal (output stays greppable)."""
    from rich.console import Console
    from rich.table import Table

    table = Table(*columns, **table_options)
    for row in rows:
        table.add_row(*row)
    Console(width=160).print(table)
