"""Which frozen features the kNN and linear evaluations read from an encoder.

* ``pooled`` (the default) — the encoder's output, ``(N, output_dim)`` after global pooling: the standard input of
  linear evaluation.
* ``gridK`` (``grid2``, ``grid4``, ...) — the encoder's last spatial feature map average-pooled to ``K x K`` and
  flattened, ``(N, C * K * K)``. This is the linear-evaluation input of the benchmark suites that probe
  convolutional layers (Zhang et al. 2017, "Split-Brain Autoencoders", sec. 4.1; Goyal et al. 2019, "Scaling and
  Benchmarking Self-Supervised Visual Representation Learning", appendix: conv features average-pooled to a fixed
  size before the linear classifier). It keeps where in the image a feature fired, which global pooling throws
  away; on small images with a small encoder that is the difference between features a linear classifier can and
  cannot separate.

An encoder offers ``gridK`` by defining ``feature_map(x) -> (N, C, h, w)``: the map its global pooling reads
(the built-in CNNs' last stage, a ViT's patch tokens laid out on their grid). ``grid1`` of a CNN equals ``pooled``.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

from sslrun.core.errors import ConfigError

__all__ = ["POOLED", "check_features", "encode", "grid_size"]

POOLED = "pooled"
_GRID = re.compile(r"grid([1-9][0-9]?)")


def grid_size(features: str) -> int | None:
    """``gridK`` -> K; ``pooled`` -> None.

    Raises:
        ConfigError: any other name.
    """
    if features == POOLED:
        return None
    m = _GRID.fullmatch(features)
    if m is None:
        raise ConfigError(f"--features must be 'pooled' or 'gridK' with K in 1..99 (e.g. grid2), got {features!r}")
    return int(m.group(1))


def check_features(encoder: nn.Module, features: str, encoder_name: str) -> None:
    """Refuse ``gridK`` for an encoder without a spatial feature map, before any data is read.

    Raises:
        ConfigError: unknown name, or ``gridK`` on an encoder that has no ``feature_map``.
    """
    if grid_size(features) is not None and not callable(getattr(encoder, "feature_map", None)):
        raise ConfigError(
            f"--features {features} needs a spatial feature map, which encoder {encoder_name!r} does not offer "
            "(it has no feature_map method); use --features pooled"
        )


def encode(encoder: nn.Module, images: torch.Tensor, features: str) -> torch.Tensor:
    """``images (N, 3, H, W)`` -> ``(N, D)`` features of the chosen kind."""
    k = grid_size(features)
    if k is None:
        return encoder(images)
    fmap = encoder.feature_map(images)
    return F.adaptive_avg_pool2d(fmap, k).flatten(1)
