"""The foundation's CLI commands through typer's CliRunner: --help, plugins list/check, config show, errors."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

from typer.testing import CliRunner

from sslrun.cli import app

runner = CliRunner()


def test_help_lists_the_command_groups() -> None:
    res = runner.invoke(app, ["--help"])
    assert res.exit_code == 0
    for cmd in ("plugins", "config", "data", "train", "launch", "eval", "export"):
        assert cmd in res.output


def test_plugins_list_json_has_every_kind() -> None:
    res = runner.invoke(app, ["plugins", "list", "--json"])
    assert res.exit_code == 0, res.output
    rows = json.loads(res.output)
    assert {r["kind"] for r in rows} == {"method", "encoder", "pretext", "dataset"}
    simclr = next(r for r in rows if r["name"] == "simclr")
    assert simclr == {
        "name": "simclr",
        "kind": "method",
        "dist": "sslrun==0.1.0",
        "target": "sslrun.plugins.methods.simclr:SimCLR",
        "status": "ok",
    }


def test_plugins_list_filters_by_kind_and_rejects_unknown_kinds() -> None:
    res = runner.invoke(app, ["plugins", "list", "--kind", "encoder", "--json"])
    assert res.exit_code == 0 and {r["kind"] for r in json.loads(res.output)} == {"encoder"}
    bad = runner.invoke(app, ["plugins", "list", "--kind", "optimizer"])
    assert bad.exit_code == 2 and "kinds: method, encoder, pretext, dataset" in bad.output


def test_plugins_check_passes_for_the_builtins() -> None:
    res = runner.invoke(app, ["plugins", "check"])
    assert res.exit_code == 0, res.output
    assert "all plugins ok" in res.output


def test_config_show_prints_resolved_toml(tmp_path: Path) -> None:
    f = tmp_path / "c.toml"
    f.write_text("[schedule]\nepochs = 7\n")
    res = runner.invoke(
        app, ["config", "show", "-c", str(f), "--method", "byol", "--batch-size", "64", "--set", "optim.name=lars"]
    )
    assert res.exit_code == 0, res.output
    data = tomllib.loads(res.output)
    assert data["method"]["name"] == "byol" and data["data"]["batch_size"] == 64
    assert data["optim"]["name"] == "lars" and data["schedule"]["epochs"] == 7
    assert data["plugin_versions"]["method:byol"] == "sslrun==0.1.0"


def test_unknown_plugin_name_exits_nonzero_with_valid_names() -> None:
    res = runner.invoke(app, ["config", "show", "--method", "mocov9"])
    assert res.exit_code == 2
    assert res.output.startswith("error: unknown method 'mocov9'; methods: ")
    assert "simclr" in res.output and "rotation" in res.output
    assert "Traceback" not in res.output


def test_bad_override_is_one_line() -> None:
    res = runner.invoke(app, ["config", "show", "--set", "optim.lr=fast"])
    assert res.exit_code == 2
    assert res.output.strip() == "error: optim.lr: expected a number, got 'fast'"
