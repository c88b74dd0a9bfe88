"""Building the experiment config from its layers: defaults < the method's ``optim_defaults`` < config file <
CLI flags < ``--set``.

This lives with the plugins, not in :mod:`sslrun.core.config`, because one layer (the method's optimiser
defaults) is only known once the method plugin is resolved; the config schema itself stays plugin-free.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import tomli_w

from sslrun.core.config import ExperimentConfig, apply_overrides, deep_merge, load_config_file
from sslrun.core.errors import SslrunError
from sslrun.core.plugins.resolve import method_class

__all__ = ["build_config"]


def build_config(
    config_file: str | Path | None = None,
    flags: dict[str, Any] | None = None,
    overrides: list[str] | None = None,
) -> ExperimentConfig:
    """defaults < the method's ``optim_defaults`` < config file < CLI flags (``{"data.batch_size": 128, ...}``,
    None = not given) < ``--set``."""
    file_data = load_config_file(config_file) if config_file is not None else None
    flag_items = [f"{k}={_toml_literal(v)}" for k, v in (flags or {}).items() if v is not None]

    def layered(base: dict[str, Any]) -> dict[str, Any]:
        data = base
        if file_data is not None:
            data = deep_merge(data, file_data)
            # validate the file's keys on their own so the error names the file's mistake
            ExperimentConfig.from_dict(data)
        data = apply_overrides(data, flag_items)
        return apply_overrides(data, list(overrides or []))

    defaults = ExperimentConfig().to_dict()
    data = layered(defaults)
    # The method is only known once every layer is read; its optimiser defaults then go under all of them.
    method_optim = _method_optim_defaults(data["method"]["name"])
    if method_optim:
        data = layered(deep_merge(defaults, {"optim": method_optim}))
    return ExperimentConfig.from_dict(data)


def _method_optim_defaults(name: Any) -> dict[str, Any]:
    """``optim_defaults`` of method ``name``; empty for an unknown name (validation reports it later, in one line)."""
    try:
        return dict(method_class(str(name)).optim_defaults)
    except SslrunError:
        return {}


def _toml_literal(value: Any) -> str:
    return tomli_w.dumps({"v": value})[4:].strip()
