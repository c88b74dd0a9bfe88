"""Experiment config: layering (defaults < file < flags < --set), strictness, round-trips, plugin kwargs."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from sslrun.core.config import (
    ExperimentConfig,
    apply_overrides,
    coerce_dataclass,
    load_config_file,
)
from sslrun.core.errors import ConfigError, UnknownPluginError
from sslrun.core.plugins.build import build_config
from sslrun.core.plugins.resolve import method_config, validate_plugins


def test_defaults_round_trip_through_plain_data_and_toml() -> None:
    cfg = ExperimentConfig()
    assert ExperimentConfig.from_dict(cfg.to_dict()) == cfg
    again = build_config(None, None, None)
    assert again == cfg
    data = tomllib.loads(cfg.to_toml())
    assert ExperimentConfig.from_dict(data).to_dict() == cfg.to_dict()


def test_layers_take_precedence_in_order(tmp_path: Path) -> None:
    f = tmp_path / "exp.toml"
    f.write_text('output = "from-file"\n[optim]\nlr = 0.5\nname = "lars"\n[data]\nbatch_size = 64\n')
    cfg = build_config(f, {"optim.lr": 0.25, "data.batch_size": None}, ["optim.lr=0.125"])
    assert cfg.optim.lr == 0.125  # --set wins over the flag and the file
    assert cfg.optim.name == "lars"  # file wins over defaults
    assert cfg.data.batch_size == 64  # a flag left at None does not override
    assert cfg.output == "from-file"


def test_method_optim_defaults_sit_under_every_user_layer(tmp_path: Path) -> None:
    """VICReg's paper optimiser replaces sslrun's defaults, but a file, a flag or --set still wins key by key."""
    defaults = ExperimentConfig().optim
    vicreg = build_config(None, {"method.name": "vicreg"})
    assert (vicreg.optim.name, vicreg.optim.lr, vicreg.optim.weight_decay) == ("lars", 0.2, 1e-6)
    assert vicreg.optim.momentum == defaults.momentum  # keys the method does not declare keep sslrun's default
    barlow = build_config(None, {"method.name": "barlow_twins"})
    assert (barlow.optim.name, barlow.optim.lr, barlow.optim.weight_decay) == ("lars", 0.2, 1.5e-6)
    assert build_config(None, {"method.name": "simclr"}).optim == defaults  # methods without any keep them all
    flagged = build_config(None, {"method.name": "vicreg", "optim.lr": 0.1})
    assert (flagged.optim.name, flagged.optim.lr) == ("lars", 0.1)
    f = tmp_path / "exp.toml"
    f.write_text('[method]\nname = "vicreg"\n[optim]\nname = "sgd"\n')
    from_file = build_config(f, None, ["optim.weight_decay=5e-4"])
    assert (from_file.optim.name, from_file.optim.lr, from_file.optim.weight_decay) == ("sgd", 0.2, 5e-4)
    # an unknown method is not this layer's error: validation names it with the list of valid methods
    assert build_config(None, {"method.name": "nope"}).optim == defaults


def test_yaml_config_file(tmp_path: Path) -> None:
    f = tmp_path / "exp.yaml"
    f.write_text("method:\n  name: byol\n  kwargs: {tau_base: 0.99}\nschedule:\n  epochs: 3\n")
    cfg = build_config(f)
    assert (cfg.method.name, cfg.method.kwargs, cfg.schedule.epochs) == ("byol", {"tau_base": 0.99}, 3)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("optim.lrr=1", "unknown config key optim.lrr; valid keys of optim: betas, grad_clip, lars_eta, lr"),
        ("optim.lr=fast", "optim.lr: expected a number, got 'fast'"),
        ("optim.name=adam", "optim.name: 'adam' is not one of 'sgd', 'lars', 'adamw'"),
        ("data.batch_size=1.5", "data.batch_size: expected an integer"),
        ("log.tensorboard=1", "log.tensorboard: expected true or false"),
        ("optim.betas=[0.9]", "optim.betas: expected a list of 2 values"),
        ("nosection.x=1", "nosection is not a section"),
        ("lr", "must look like section.key=value"),
        ("data.batch_size=0", "data.batch_size must be >= 1"),
    ],
)
def test_strict_overrides_name_the_key(override: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        build_config(None, None, [override])
    assert message in str(err.value)


def test_file_errors_are_one_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config_file(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[optim\nlr=")
    with pytest.raises(ConfigError, match="is not valid TOML"):
        load_config_file(bad)
    unknown = tmp_path / "u.toml"
    unknown.write_text("[optimizer]\nlr = 1\n")
    with pytest.raises(ConfigError, match="unknown config key optimizer; valid keys: cluster, data, encoder"):
        build_config(unknown)
    ini = tmp_path / "x.ini"
    ini.write_text("")
    with pytest.raises(ConfigError, match="use .toml, .yaml or .yml"):
        load_config_file(ini)


def test_plugin_kwargs_may_be_new_keys_until_validated() -> None:
    data = apply_overrides(ExperimentConfig().to_dict(), ["method.kwargs.temperature=0.2", "encoder.kwargs.width=8"])
    assert data["method"]["kwargs"] == {"temperature": 0.2}
    assert data["encoder"]["kwargs"] == {"width": 8}


def test_method_kwargs_are_checked_against_the_plugin_config() -> None:
    cfg = build_config(None, {"method.name": "simclr"}, ["method.kwargs.temperature=0.2"])
    assert method_config(cfg).temperature == 0.2
    bad = build_config(None, {"method.name": "simclr"}, ["method.kwargs.temprature=0.2"])
    with pytest.raises(ConfigError, match=r"unknown config key method.kwargs \(simclr\).temprature; valid keys"):
        validate_plugins(bad)
    wrong = build_config(None, {"method.name": "simclr"}, ["method.kwargs.temperature='hot'"])
    with pytest.raises(ConfigError, match="temperature: expected a number"):
        validate_plugins(wrong)


def test_encoder_kwargs_are_checked_against_the_factory_signature() -> None:
    cfg = build_config(None, {"encoder.name": "resnet18"}, ["encoder.kwargs.depth=3"])
    with pytest.raises(ConfigError, match="unknown encoder.kwargs key 'depth' for encoder 'resnet18'; valid:"):
        validate_plugins(cfg)


def test_unknown_plugin_names_list_the_valid_ones() -> None:
    with pytest.raises(
        UnknownPluginError, match="unknown method 'mocov9'; methods: .*simclr.*; pretext tasks: .*rotation"
    ):
        validate_plugins(build_config(None, {"method.name": "mocov9"}))
    with pytest.raises(UnknownPluginError, match="unknown encoder 'vgg'; available: .*small_cnn"):
        validate_plugins(build_config(None, {"encoder.name": "vgg"}))
    with pytest.raises(UnknownPluginError, match="unknown dataset 'imagenet'; available: .*fashion-mnist"):
        validate_plugins(build_config(None, {"data.dataset": "imagenet"}))


def test_validate_records_plugin_versions() -> None:
    cfg = validate_plugins(build_config(None, {"method.name": "simclr"}))
    assert cfg.plugin_versions == {
        "method:simclr": "sslrun==0.1.0",
        "encoder:small_cnn": "sslrun==0.1.0",
        "dataset:fashion-mnist": "sslrun==0.1.0",
    }


def test_coerce_dataclass_converts_losslessly() -> None:
    from dataclasses import dataclass

    @dataclass
    class C:
        x: float = 1.0
        pair: tuple[float, float] = (0.0, 1.0)
        n: int | None = None

    c = coerce_dataclass(C, {"x": 2, "pair": [0, 3], "n": 4.0}, "c")
    assert (c.x, c.pair, c.n) == (2.0, (0.0, 3.0), 4)
    assert isinstance(c.x, float) and isinstance(c.pair, tuple)


def test_construction_errors_surface_on_the_driver() -> None:
    """validate_plugins builds the method on the meta device, so MAE without a ViT fails before any resources."""
    cfg = build_config(None, {"method.name": "mae", "encoder.name": "small_cnn"})
    with pytest.raises(ConfigError, match="mae needs a ViT encoder"):
        validate_plugins(cfg)
    validate_plugins(build_config(None, {"method.name": "mae", "encoder.name": "vit_tiny"}))


def test_view_overrides_set_every_view_and_refuse_bad_keys() -> None:
    """data.view_overrides retunes the paper's augmentations; typos and bad values fail on the driver, in one line."""
    from sslrun.core.plugins.resolve import method_views

    paper = method_views(build_config(None, {"method.name": "byol"}), 28)
    tuned = method_views(build_config(None, {"method.name": "byol"}, ["data.view_overrides.scale=[0.4, 1.0]"]), 28)
    assert [v.scale for v in tuned] == [(0.4, 1.0)] * len(paper)
    # every other field is the method's own (BYOL's asymmetric pair: view 2 solarizes, view 1 does not)
    assert [v.solarize_p for v in tuned] == [v.solarize_p for v in paper] == [0.0, 0.2]
    with pytest.raises(ConfigError, match="unknown data.view_overrides key 'scal'; valid: size, scale"):
        validate_plugins(build_config(None, None, ["data.view_overrides.scal=[0.4, 1.0]"]))
    with pytest.raises(ConfigError, match="0 < lo <= hi <= 1"):
        validate_plugins(build_config(None, None, ["data.view_overrides.scale=[0.9, 0.1]"]))
