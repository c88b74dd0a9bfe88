"""A small VGG-style convolutional encoder that trains in minutes on a CPU (Fashion-MNIST, CIFAR at 28-32 px).

Four conv-BN-ReLU blocks of widths ``w, 2w, 4w, 8w`` with 2x2 max-pooling between them, then global average
pooling: the classic "Conv-4" backbone of few-shot and SSL tutorials. It is the default encoder because it makes
``sslrun train`` usable on a laptop; use ``resnet18`` or a ViT on GPUs.
"""

from __future__ import annotations

import torch
from torch import nn

from sslrun.core.errors import ConfigError

__all__ = ["SmallCNN", "small_cnn"]


def _block(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel_size=3, stride=stride, padding=1, bias=False),  # bias is redundant before BN
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class SmallCNN(nn.Module):
    """Conv-4 encoder: ``(N, 3, H, W) -> (N, 8 * width)``.

    Args:
        width: channels of the first block; the blocks have ``width * (1, 2, 4, 8)`` channels.
        image_size: side of the input images. Above 64 px the first conv has stride 2, so that 96-224 px inputs
            do not run three full-resolution blocks (cost grows with the pixel count, not with what is learned).

    Attributes:
        output_dim: feature dimension, ``8 * width``.
    """

    def __init__(self, width: int = 32, image_size: int | None = None) -> None:
        super().__init__()
        if width < 1:
            raise ConfigError(f"encoder.kwargs.width must be >= 1 for small_cnn, got {width}")
        widths = [width, 2 * width, 4 * width, 8 * width]
        first_stride = 2 if image_size is not None and image_size > 64 else 1
        self.features = nn.Sequential(
            _block(3, widths[0], stride=first_stride),
            nn.MaxPool2d(2),  # 32 -> 16
            _block(widths[0], widths[1]),
            nn.MaxPool2d(2),  # 16 -> 8
            _block(widths[1], widths[2]),
            nn.MaxPool2d(2, ceil_mode=True),  # 8 -> 4 (ceil: 28 px inputs keep a 4x4 map instead of 3x3)
            _block(widths[2], widths[3]),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.output_dim = widths[-1]
        self.image_size = image_size
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """``x (N, 3, H, W)`` -> the last block's map ``(N, output_dim, h, w)``, before global pooling (4 x 4 at
        28-32 px); what ``sslrun eval --features gridK`` reads."""
        return self.features(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x (N, 3, H, W)`` -> features ``(N, output_dim)``."""
        return self.pool(self.feature_map(x)).flatten(1)


def small_cnn(width: int = 32, image_size: int | None = None) -> SmallCNN:
    """The ``small_cnn`` encoder plugin (see :class:`SmallCNN`).

    Args:
        width: channels of the first block (output_dim = 8 * width). 32 gives 256-d features and ~0.39 M parameters.
        image_size: passed by the trainer (the data's image side).

    Example:
        >>> small_cnn(width=16)(torch.zeros(2, 3, 28, 28)).shape
        torch.Size([2, 128])
    """
    return SmallCNN(width=width, image_size=image_size)
