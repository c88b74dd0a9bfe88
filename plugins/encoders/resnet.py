"""ResNet-18/34/50 encoders (He et al. 2016, "Deep Residual Learning for Image Recognition") from torchvision,
without the classifier, with the small-image stem used by every CIFAR SSL result.

On 32 px images the ImageNet stem (7x7 stride-2 conv + max-pool) shrinks the input 4x before the first residual
block; SimCLR (Chen et al. 2020, appendix B.9) and every SSL CIFAR benchmark replace it with a 3x3 stride-1 conv and
no max-pool. Forgetting it costs ~12 kNN points on CIFAR-10 (lightly-ai/lightly#1419), so it is chosen
automatically from the data's image size.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torchvision
from torch import nn

__all__ = ["ResNetEncoder", "resnet18", "resnet34", "resnet50"]

#: inputs at most this many pixels wide get the small stem when ``small_stem`` is left to ``None``
SMALL_STEM_MAX_SIZE = 64


class ResNetEncoder(nn.Module):
    """A torchvision ResNet trunk: ``(N, 3, H, W) -> (N, output_dim)`` after global average pooling.

    Args:
        arch: torchvision constructor (``torchvision.models.resnet18`` ...), built with random weights.
        small_stem: 3x3 stride-1 first conv and no max-pool (CIFAR-style). ``None`` = automatic: on for
            ``image_size <= 64``, off otherwise (and off when the image size is unknown).
        image_size: side of the input images (passed by the trainer).
        zero_init_residual: start every residual branch's last BN at zero (Goyal et al. 2017); the block is then
            the identity at init, which helps large-batch training.

    Attributes:
        output_dim: 512 for ResNet-18/34, 2048 for ResNet-50.
        small_stem: the stem actually used.
    """

    def __init__(
        self,
        arch: Callable[..., torchvision.models.ResNet],
        small_stem: bool | None = None,
        image_size: int | None = None,
        zero_init_residual: bool = False,
    ) -> None:
        super().__init__()
        if small_stem is None:
            small_stem = image_size is not None and image_size <= SMALL_STEM_MAX_SIZE
        net = arch(weights=None, zero_init_residual=zero_init_residual)
        if small_stem:
            net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
            nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")
            net.maxpool = nn.Identity()
        self.output_dim: int = net.fc.in_features
        # Keep the trunk only: no classifier parameters exist in the encoder at all (not merely an unused fc).
        # Attribute names are torchvision's, so the state_dict loads into torchvision.models.resnet* (strict=False).
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.small_stem = small_stem
        self.image_size = image_size

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """``x (N, 3, H, W)`` -> ``layer4``'s map ``(N, output_dim, h, w)``, before global pooling; what
        ``sslrun eval --features gridK`` reads."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x (N, 3, H, W)`` -> ``(N, output_dim)``."""
        return self.avgpool(self.feature_map(x)).flatten(1)


def resnet18(
    small_stem: bool | None = None, image_size: int | None = None, zero_init_residual: bool = False
) -> ResNetEncoder:
    """ResNet-18 encoder (512-d features). See :class:`ResNetEncoder` for the arguments.

    Example:
        >>> resnet18(image_size=32)(torch.zeros(2, 3, 32, 32)).shape
        torch.Size([2, 512])
    """
    return ResNetEncoder(torchvision.models.resnet18, small_stem, image_size, zero_init_residual)


def resnet34(
    small_stem: bool | None = None, image_size: int | None = None, zero_init_residual: bool = False
) -> ResNetEncoder:
    """ResNet-34 encoder (512-d features). See :class:`ResNetEncoder` for the arguments."""
    return ResNetEncoder(torchvision.models.resnet34, small_stem, image_size, zero_init_residual)


def resnet50(
    small_stem: bool | None = None, image_size: int | None = None, zero_init_residual: bool = False
) -> ResNetEncoder:
    """ResNet-50 encoder (2048-d features). See :class:`ResNetEncoder` for the arguments."""
    return ResNetEncoder(torchvision.models.resnet50, small_stem, image_size, zero_init_residual)
