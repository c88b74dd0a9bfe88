"""Packaging and cross-distribution discovery, for real:

* a normal (wheel) install imports as ``sslrun.core`` / ``sslrun.plugins`` / ``sslrun.cluster`` and puts no bare
  ``core``/``plugins``/``cluster`` into site-packages (the editable install is what the whole suite runs on);
* the example third-party package in docs/examples is pip-installed into this venv, and its plugins show up in
  ``sslrun plugins list``, pass ``sslrun plugins check`` and train a step — then it is uninstalled again.

pip runs offline (--no-index --no-build-isolation): the tests run in a network namespace without a network.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "docs" / "examples" / "sslrun-example-plugin"
BIN = Path(sys.executable).parent
PIP = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
pytestmark = pytest.mark.slow


def run(cmd: list[str], cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_wheel_installs_under_the_sslrun_namespace_only(tmp_path: Path) -> None:
    wheel_dir, site = tmp_path / "wheels", tmp_path / "site"
    # Build from a copy of the tree: building in place would leave build/ and egg-info next to the sources.
    src = tmp_path / "src"
    files = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    for rel in filter(None, files):
        path = REPO / rel.decode()
        if path.is_file():
            (src / rel.decode()).parent.mkdir(parents=True, exist_ok=True)
            (src / rel.decode()).write_bytes(path.read_bytes())
    built = run(
        [*PIP, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(wheel_dir), str(src)], tmp_path
    )
    assert built.returncode == 0, built.stderr
    (wheel,) = wheel_dir.glob("sslrun-*.whl")
    tops = {name.split("/")[0] for name in zipfile.ZipFile(wheel).namelist()}
    assert tops == {"sslrun", f"sslrun-{wheel.name.split('-')[1]}.dist-info"}, tops
    inst = run([*PIP, "install", "--no-deps", "--no-index", "--target", str(site), str(wheel)], tmp_path)
    assert inst.returncode == 0, inst.stderr
    probe = (
        "import importlib.util, sys\n"
        "import sslrun.core.config, sslrun.core.plugins.registry, sslrun.plugins.methods, sslrun.cluster, sslrun.cli\n"
        "assert sslrun.core.config.__file__.startswith(sys.argv[1]), sslrun.core.config.__file__\n"
        "assert all(importlib.util.find_spec(m) is None for m in ('core', 'plugins', 'cluster'))\n"
        "from sslrun.core.plugins.registry import get_registry\n"
        "print(get_registry('method').get('simclr').__module__)\n"
    )
    # PYTHONPATH puts the wheel's files before the editable install; the probe checks that they are what loads.
    env = {**os.environ, "PYTHONPATH": str(site), "PYTHONNOUSERSITE": "1"}
    out = run([sys.executable, "-c", probe, str(site)], tmp_path, env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "sslrun.plugins.methods.simclr"


@pytest.fixture(scope="module")
def example_plugin_installed():
    """pip-install the example third-party package into this venv for the module, then uninstall it."""
    inst = run([*PIP, "install", "--no-deps", "--no-build-isolation", "--no-index", str(EXAMPLE)], REPO)
    assert inst.returncode == 0, inst.stderr
    try:
        yield
    finally:
        run([*PIP, "uninstall", "-y", "sslrun-example-plugin"], REPO)


def test_third_party_plugins_are_discovered_across_distributions(example_plugin_installed, tmp_path: Path) -> None:
    out = run([str(BIN / "sslrun"), "plugins", "list", "--json"], tmp_path)
    assert out.returncode == 0, out.stderr
    rows = {(r["kind"], r["name"]): r for r in json.loads(out.stdout)}
    assert rows[("method", "example_align")]["dist"] == "sslrun-example-plugin==0.1.0"
    assert rows[("encoder", "example_mlp")]["status"] == "ok"
    assert rows[("method", "simclr")]["dist"] == "sslrun==0.1.0"
    check = run([str(BIN / "sslrun"), "plugins", "check"], tmp_path)
    assert check.returncode == 0, check.stdout + check.stderr
    # the third-party method's kwargs are validated against its own Config, like a built-in's
    bad = run(
        [str(BIN / "sslrun"), "config", "show", "--method", "example_align", "--set", "method.kwargs.tt=1"], tmp_path
    )
    assert bad.returncode == 2 and "valid keys" in bad.stderr and "alpha" in bad.stderr


def test_third_party_method_trains_a_step(example_plugin_installed, tmp_path: Path) -> None:
    probe = (
        "import torch\n"
        "from sslrun.core.plugins.build import build_config\n"
        "from sslrun.core.plugins.resolve import build_method, validate_plugins\n"
        "cfg = validate_plugins(build_config(None, {'method.name': 'example_align', 'encoder.name': 'example_mlp'}))\n"
        "m = build_method(cfg, 28)\n"
        "views = [torch.rand(8, 3, s.size, s.size) for s in type(m).view_specs(m.cfg, 28)]\n"
        "out = m(views); out['loss'].backward()\n"
        "assert torch.isfinite(out['loss']) and m.encoder.net[1].weight.grad is not None\n"
        "print(cfg.plugin_versions['method:example_align'])\n"
    )
    out = run([sys.executable, "-c", probe], tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "sslrun-example-plugin==0.1.0"
