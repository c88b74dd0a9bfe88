"""``sslrun plugins list|check``: the installed methods, encoders, pretext tasks and datasets, and their health."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from sslrun.cli.common import friendly, print_table
from sslrun.cli.options import JsonOpt

app = typer.Typer(help="List and check the installed plugins (methods, encoders, pretext tasks, datasets).")


@app.command("list")
@friendly
def plugins_list(
    kind: Annotated[str | None, typer.Option(help="method, encoder, pretext or dataset.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Name, kind, distribution==version and status (ok / broken: reason) of every plugin."""
    from sslrun.core.errors import ConfigError
    from sslrun.core.plugins.registry import KINDS, get_registry

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
    print_table(
        ("name", "kind", "distribution", "status"), ((r["name"], r["kind"], r["dist"], r["status"]) for r in rows)
    )


@app.command("check")
@friendly
def plugins_check() -> None:
    """Import and validate every plugin; exit 1 if any is broken."""
    from sslrun.core.plugins.registry import KINDS, get_registry

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
