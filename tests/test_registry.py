"""Plugin registry: discovery without imports, and every error path, over fake distributions on disk
(``*.dist-info/entry_points.txt`` in a temporary directory, the way pip lays them out)."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest

from sslrun.core.errors import (
    DuplicatePluginError,
    PluginLoadError,
    PluginValidationError,
    UnknownPluginError,
)
from sslrun.core.plugins.registry import KINDS, Registry, get_registry


def make_dist(root: Path, dist: str, version: str, entry_points: dict[str, dict[str, str]]) -> None:
    """Write ``<dist>-<version>.dist-info/entry_points.txt`` under ``root``."""
    info = root / f"{dist}-{version}.dist-info"
    info.mkdir(parents=True)
    lines = []
    for group, eps in entry_points.items():
        lines.append(f"[{group}]")
        lines += [f"{name} = {target}" for name, target in eps.items()]
    (info / "entry_points.txt").write_text("\n".join(lines) + "\n")
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")


def make_module(root: Path, name: str, source: str) -> None:
    (root / f"{name}.py").write_text(textwrap.dedent(source))


GOOD_METHOD = """
    from dataclasses import dataclass
    import torch
    from sslrun.core.interfaces import Method, ViewSpec

    @dataclass
    class Cfg:
        temperature: float = 0.1

    class Good(Method):
        name = "good"
        Config = Cfg

        @classmethod
        def view_specs(cls, cfg, image_size):
            return [ViewSpec(size=image_size)] * 2

        def forward(self, views):
            return {"loss": self.encoder(views[0]).mean()}

    class NoConfig(Good):
        Config = object

    class Abstract(Method):
        Config = Cfg

    NOT_A_CLASS = 42
"""


@pytest.fixture
def plugin_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.syspath_prepend(str(tmp_path))
    make_module(tmp_path, "fake_good", GOOD_METHOD)
    make_module(tmp_path, "fake_broken", "raise RuntimeError('boom at import')\n")
    yield tmp_path
    for mod in ("fake_good", "fake_broken"):
        sys.modules.pop(mod, None)


def test_names_are_listed_without_importing(plugin_dir: Path) -> None:
    make_dist(plugin_dir, "pkg_a", "1.0", {"sslrun.methods": {"good": "fake_good:Good", "broken": "fake_broken:X"}})
    reg = Registry("method", path=[str(plugin_dir)])
    assert reg.names() == ["broken", "good"]
    assert "fake_broken" not in sys.modules and "fake_good" not in sys.modules
    info = reg.info("good")
    assert (info.dist, info.version, info.target) == ("pkg-a", "1.0", "fake_good:Good")


def test_good_plugin_loads_and_validates(plugin_dir: Path) -> None:
    make_dist(plugin_dir, "pkg_a", "1.0", {"sslrun.methods": {"good": "fake_good:Good"}})
    reg = Registry("method", path=[str(plugin_dir)])
    cls = reg.get("good")
    assert cls.__name__ == "Good" and reg.check("good") == "ok"


def test_import_failure_names_plugin_kind_dist_and_cause(plugin_dir: Path) -> None:
    make_dist(plugin_dir, "pkg_b", "2.3", {"sslrun.methods": {"broken": "fake_broken:X"}})
    reg = Registry("method", path=[str(plugin_dir)])
    with pytest.raises(PluginLoadError) as err:
        reg.get("broken")
    msg = str(err.value)
    assert "method plugin 'broken'" in msg and "pkg-b==2.3" in msg and "boom at import" in msg
    assert isinstance(err.value.__cause__, RuntimeError)
    assert reg.check("broken") == "broken: RuntimeError: boom at import"


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("fake_good:NOT_A_CLASS", "expected a subclass of sslrun.core.interfaces.Method"),
        ("fake_good:NoConfig", "Config must be a dataclass"),
        ("fake_good:Abstract", "does not implement forward, view_specs"),
    ],
)
def test_interface_mismatch_is_a_clear_error(plugin_dir: Path, target: str, expected: str) -> None:
    make_dist(plugin_dir, "pkg_c", "0.1", {"sslrun.methods": {"bad": target}})
    reg = Registry("method", path=[str(plugin_dir)])
    with pytest.raises(PluginValidationError, match=expected) as err:
        reg.get("bad")
    assert "pkg-c==0.1" in str(err.value)
    assert reg.check("bad").startswith("broken: ")


def test_encoder_must_be_callable(plugin_dir: Path) -> None:
    make_dist(plugin_dir, "pkg_e", "1.0", {"sslrun.encoders": {"num": "fake_good:NOT_A_CLASS"}})
    with pytest.raises(PluginValidationError, match="callable factory"):
        Registry("encoder", path=[str(plugin_dir)]).get("num")


def test_duplicate_name_across_distributions_names_both(plugin_dir: Path) -> None:
    make_dist(plugin_dir, "pkg_a", "1.0", {"sslrun.methods": {"good": "fake_good:Good"}})
    make_dist(plugin_dir, "pkg_z", "9.9", {"sslrun.methods": {"good": "fake_good:Good"}})
    with pytest.raises(DuplicatePluginError) as err:
        Registry("method", path=[str(plugin_dir)]).names()
    assert "pkg-a==1.0" in str(err.value) and "pkg-z==9.9" in str(err.value)


def test_unknown_name_lists_valid_names(plugin_dir: Path) -> None:
    make_dist(plugin_dir, "pkg_a", "1.0", {"sslrun.methods": {"good": "fake_good:Good", "other": "fake_good:Good"}})
    with pytest.raises(UnknownPluginError, match="unknown method 'nope'; available: good, other"):
        Registry("method", path=[str(plugin_dir)]).get("nope")


def test_unknown_kind_is_rejected() -> None:
    with pytest.raises(ValueError, match="kinds: method, encoder, pretext, dataset"):
        Registry("optimizer")


def test_builtins_are_registered_through_our_own_entry_points() -> None:
    """Our built-ins come from the installed `sslrun` distribution's metadata, like any third-party package."""
    expected = {
        "method": {"simclr", "mocov2", "byol", "barlow_twins", "simsiam", "vicreg", "dino"},
        "encoder": {"small_cnn", "resnet18", "resnet34", "resnet50", "vit_tiny", "vit_small"},
        "pretext": {"rotation", "colorization", "inpainting", "jigsaw", "mae", "autoencoder"},
        "dataset": {"fashion-mnist", "cifar10", "cifar100", "stl10", "imagefolder", "synthetic"},
    }
    for kind in KINDS:
        reg = get_registry(kind)
        assert expected[kind] <= set(reg.names())
        for name in expected[kind]:
            assert reg.info(name).dist == "sslrun"
            assert reg.check(name) == "ok", f"{kind} {name}: {reg.check(name)}"


def test_the_entry_point_names_the_class(plugin_dir: Path) -> None:
    """The entry-point name is the plugin's name: the registry sets ``cls.name``; a class naming itself otherwise is
    refused."""
    make_module(
        plugin_dir,
        "fake_named",
        """
        from fake_good import Good

        class Unnamed(Good):  # states no name of its own
            pass

        class Misnamed(Good):
            name = "something_else"
        """,
    )
    eps = {"mine": "fake_named:Unnamed", "x": "fake_named:Misnamed"}
    make_dist(plugin_dir, "pkg_n", "1.0", {"sslrun.methods": eps})
    reg = Registry("method", path=[str(plugin_dir)])
    try:
        assert reg.get("mine").name == "mine"
        with pytest.raises(PluginValidationError, match="the class is named 'something_else'"):
            reg.get("x")
    finally:
        sys.modules.pop("fake_named", None)
