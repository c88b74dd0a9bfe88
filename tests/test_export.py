"""`sslrun export`: the encoder's weights alone, loadable without sslrun into a module built independently.

The ResNet test runs the very snippet of docs/evaluation.md in a fresh interpreter where importing sslrun fails,
and compares its features with the sslrun encoder's on the same images.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from sslrun.cli import app
from sslrun.core.config import DataCfg, ExperimentConfig, PluginRef
from sslrun.core.errors import CheckpointError
from sslrun.core.eval.export import EXPORT_FORMAT, export_encoder, strip_prefixes
from sslrun.core.plugins.resolve import build_method
from sslrun.core.train.checkpoint import save_checkpoint

DOCS = Path(__file__).resolve().parents[1] / "docs" / "evaluation.md"


def _checkpoint(path: Path, encoder: str, kwargs: dict, image_size: int) -> tuple[Path, torch.nn.Module]:
    """A trainer-format checkpoint of a SimCLR method whose encoder has non-trivial weights and BN statistics."""
    torch.manual_seed(0)
    data = DataCfg(dataset="synthetic", dataset_kwargs={"size": image_size, "num_classes": 4})
    cfg = ExperimentConfig(method=PluginRef("simclr"), encoder=PluginRef(encoder, kwargs), data=data)
    method = build_method(cfg, image_size)
    with torch.no_grad():
        for m in method.modules():
            if isinstance(m, torch.nn.BatchNorm2d):  # eval-mode outputs must depend on the exported buffers
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
    save_checkpoint({"config": cfg.to_dict(), "model": method.state_dict(), "step": 42}, path)
    return path, method.encoder.eval()


def _doc_snippet() -> str:
    text = DOCS.read_text()
    match = re.search(r"<!-- export-snippet -->\s*```python\n(.*?)```", text, re.S)
    assert match, "docs/evaluation.md lost its export snippet marker"
    return match.group(1)


@pytest.mark.slow  # a fresh interpreter importing torch + torchvision, and a ResNet-18
def test_exported_resnet18_loads_into_plain_torchvision_without_sslrun(tmp_path: Path) -> None:
    ckpt, encoder = _checkpoint(tmp_path / "last.pt", "resnet18", {}, 32)
    out = tmp_path / "export" / "encoder.pt"
    result = CliRunner().invoke(app, ["export", "--checkpoint", str(ckpt), "--output", str(out), "--json"])
    assert result.exit_code == 0, result.output
    meta = json.loads(result.stdout)
    assert meta["encoder"] == "resnet18" and meta["output_dim"] == 512 and meta["kwargs"] == {"image_size": 32}
    assert meta["small_stem"] is True and meta["step"] == 42 and meta["sslrun_version"]

    blob = torch.load(out, weights_only=True, map_location="cpu")  # plain torch, no allow-listed globals
    assert blob["format"] == EXPORT_FORMAT and blob["meta"] == {k: v for k, v in meta.items() if k != "output"}
    assert not any(k.startswith(("encoder.", "module.", "projector")) for k in blob["state_dict"])

    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    torch.save(images, tmp_path / "images.pt")
    # The snippet runs where `import sslrun` fails, so it cannot lean on sslrun in any way.
    program = (
        "import sys\nsys.modules['sslrun'] = None\n"
        f"import torch\nimages = torch.load({str(tmp_path / 'images.pt')!r})\n"
        + _doc_snippet()
        + f"\ntorch.save(features, {str(tmp_path / 'features.pt')!r})\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", program], cwd=out.parent, capture_output=True, text=True, timeout=120, check=False
    )
    assert run.returncode == 0, run.stderr[-2000:]
    features = torch.load(tmp_path / "features.pt", weights_only=True)
    with torch.no_grad():
        expected = encoder(images)
    assert features.shape == (3, 512)
    torch.testing.assert_close(features, expected, rtol=1e-4, atol=1e-5)


def test_exported_small_cnn_loads_into_the_plugin_module(tmp_path: Path) -> None:
    from sslrun.plugins.encoders.small_cnn import small_cnn

    ckpt, encoder = _checkpoint(tmp_path / "last.pt", "small_cnn", {"width": 4}, 16)
    meta = export_encoder(ckpt, tmp_path / "enc.pt")
    blob = torch.load(tmp_path / "enc.pt", weights_only=True)
    module = small_cnn(**meta["kwargs"]).eval()  # built from the metadata alone
    module.load_state_dict(blob["state_dict"])  # strict: same key names, nothing missing or extra
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(module(x), encoder(x))
    assert meta["kwargs"] == {"width": 4, "image_size": 16} and meta["output_dim"] == 32


def test_strip_prefixes() -> None:
    w = torch.zeros(1)
    state = {"module.encoder.conv1.weight": w, "encoder._orig_mod.bn1.bias": w, "projector.0.weight": w}
    assert list(strip_prefixes(state, "encoder.")) == ["conv1.weight", "bn1.bias"]
    assert list(strip_prefixes({"_orig_mod.module.fc.weight": w})) == ["fc.weight"]


def test_export_errors(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        export_encoder(tmp_path / "missing.pt", tmp_path / "enc.pt")
    ckpt, _ = _checkpoint(tmp_path / "last.pt", "small_cnn", {"width": 4}, 16)
    with pytest.raises(CheckpointError, match="is a directory"):
        export_encoder(ckpt, tmp_path)
    result = CliRunner().invoke(app, ["export", "--checkpoint", str(tmp_path / "nope.pt"), "-o", "x.pt"])
    assert result.exit_code == 2 and result.stderr.startswith("error: checkpoint")
