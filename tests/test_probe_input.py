"""The probe's input: pooled features or the encoder's last feature map average-pooled to a K x K grid."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sslrun.core.errors import ConfigError
from sslrun.core.eval.probe_input import check_features, encode, grid_size
from sslrun.plugins.encoders.resnet import resnet18
from sslrun.plugins.encoders.small_cnn import small_cnn
from sslrun.plugins.encoders.vit import vit_tiny


def test_names() -> None:
    assert grid_size("pooled") is None
    assert grid_size("grid2") == 2 and grid_size("grid14") == 14
    for bad in ("grid0", "grid", "grid-1", "Grid2", "prepool", "grid100"):
        with pytest.raises(ConfigError, match="--features must be"):
            grid_size(bad)


@pytest.mark.parametrize(
    "make, size",
    [
        (lambda: small_cnn(width=4, image_size=28), 28),
        (lambda: resnet18(image_size=32), 32),
        (lambda: vit_tiny(image_size=32), 32),
    ],
)
def test_grid_features_pool_the_map_that_global_pooling_reads(make, size: int) -> None:
    torch.manual_seed(0)
    enc = make().eval()
    x = torch.randn(3, 3, size, size)
    with torch.no_grad():
        fmap = enc.feature_map(x)
        pooled = encode(enc, x, "pooled")
        grid2 = encode(enc, x, "grid2")
    assert fmap.shape[:2] == (3, enc.output_dim) and fmap.dim() == 4
    assert pooled.shape == (3, enc.output_dim)
    assert grid2.shape == (3, enc.output_dim * 4)
    torch.testing.assert_close(grid2, F.adaptive_avg_pool2d(fmap, 2).flatten(1))
    if not hasattr(enc, "global_pool"):  # CNNs: global average pooling of the same map is their output
        with torch.no_grad():
            torch.testing.assert_close(encode(enc, x, "grid1"), pooled, atol=1e-5, rtol=1e-5)


def test_small_cnn_map_at_28_px_is_4x4() -> None:
    assert small_cnn(width=4, image_size=28).feature_map(torch.zeros(1, 3, 28, 28)).shape == (1, 32, 4, 4)


def test_an_encoder_without_a_feature_map_is_refused_in_one_line() -> None:
    plain = nn.Sequential(nn.Flatten(), nn.Linear(12, 4))
    check_features(plain, "pooled", "mlp")  # pooled needs nothing more
    with pytest.raises(ConfigError, match="encoder 'mlp' does not offer.*use --features pooled"):
        check_features(plain, "grid2", "mlp")
