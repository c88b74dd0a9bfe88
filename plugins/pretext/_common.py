"""Building blocks shared by the pretext tasks: heads (classifier, convolutional image decoder), patch and tile
reshaping, and the masked mean-squared error.

Dense tasks (colorization, inpainting, autoencoder) only get the encoder's pooled ``(N, D)`` feature vector, so
their head must produce an image from a vector: :class:`ConvDecoder` is the fully-connected bottleneck then
up-convolution decoder of context encoders (Pathak et al. 2016, section 3.1) and of DCGAN's generator. Because the
whole image must pass through the feature vector, these tasks train the *encoder* to summarise the image, which is
what the representation is evaluated on.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "ClassifierHead",
    "ConvDecoder",
    "accuracy",
    "assemble_tiles",
    "masked_mse",
    "patchify",
    "unpatchify",
]


class ClassifierHead(nn.Module):
    """``(N, in_dim) -> (N, num_classes)`` logits: ``Linear-BN-ReLU-Linear``, or one ``Linear`` if
    ``hidden_dim == 0``.

    Args:
        in_dim: feature dimension.
        num_classes: number of classes (4 rotations, number of jigsaw permutations).
        hidden_dim: width of the hidden layer; 0 for a linear classifier.
    """

    def __init__(self, in_dim: int, num_classes: int, hidden_dim: int = 512) -> None:
        super().__init__()
        if hidden_dim > 0:
            self.net: nn.Module = nn.Sequential(
                nn.Linear(in_dim, hidden_dim, bias=False),
                nn.BatchNorm1d(hidden_dim),
                nn.ReLU(inplace=True),
                nn.Linear(hidden_dim, num_classes),
            )
        else:
            self.net = nn.Linear(in_dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _decoder_geometry(out_size: int) -> tuple[int, int]:
    """``(start side, number of 2x upsamplings)``: start between 4 and 8 px and double up to ``out_size`` exactly
    when it is ``s * 2**k`` (28 = 7 * 4, 32 = 4 * 8, 96 = 6 * 16, 224 = 7 * 32); otherwise overshoot slightly and
    resize the last map."""
    if out_size <= 4:
        return out_size, 0
    n_up = int(math.floor(math.log2(out_size / 4)))
    return math.ceil(out_size / 2**n_up), n_up


class ConvDecoder(nn.Module):
    """Feature vector -> image: ``Linear -> (C, s, s) -> [ConvTranspose(4, stride 2) - BN - ReLU] x k -> Conv3x3``.

    Args:
        in_dim: feature dimension.
        out_channels: channels of the output map (3 for RGB, 2 for ab, Q for colour classes).
        out_size: side of the output map.
        channels: channels after the fully-connected layer; halved at every upsampling, down to 32.

    Shape:
        ``(N, in_dim) -> (N, out_channels, out_size, out_size)``; no output activation (targets are
        normalised, i.e. unbounded).
    """

    def __init__(self, in_dim: int, out_channels: int, out_size: int, channels: int = 128) -> None:
        super().__init__()
        start, n_up = _decoder_geometry(out_size)
        self.out_size = out_size
        self.start, self.channels = start, channels
        self.fc = nn.Sequential(nn.Linear(in_dim, channels * start * start), nn.ReLU(inplace=True))
        layers: list[nn.Module] = []
        c = channels
        for _ in range(n_up):
            c_out = max(c // 2, 32)
            layers += [
                nn.ConvTranspose2d(c, c_out, kernel_size=4, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(c_out),
                nn.ReLU(inplace=True),
            ]
            c = c_out
        layers.append(nn.Conv2d(c, out_channels, kernel_size=3, padding=1))
        self.up = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc(x).view(x.shape[0], self.channels, self.start, self.start)  # (N, C, s, s)
        y = self.up(y)  # (N, out, s * 2**k, s * 2**k)
        if y.shape[-1] != self.out_size:
            y = F.interpolate(y, size=(self.out_size, self.out_size), mode="bilinear", align_corners=False)
        return y


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error over the masked pixels only: ``sum(M * (pred - target)^2) / (C * sum(M))``.

    Args:
        pred: ``(N, C, H, W)``.
        target: ``(N, C, H, W)``.
        mask: ``(N, 1, H, W)``, 1 where the loss counts.
    """
    mask = mask.to(pred.dtype)
    sq = (pred - target).pow(2) * mask
    return sq.sum() / (mask.sum() * pred.shape[1]).clamp_min(1.0)


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Top-1 accuracy of ``logits (N, C)`` against ``labels (N,)``, as a float tensor."""
    return (logits.argmax(dim=1) == labels).float().mean()


def patchify(images: torch.Tensor, patch: int) -> torch.Tensor:
    """``(N, C, H, W)`` -> ``(N, L, patch * patch * C)`` in row-major patch order, pixels of a patch in
    ``(row, col, channel)`` order (MAE's ``patchify``)."""
    n, c, h, w = images.shape
    gh, gw = h // patch, w // patch
    x = images[:, :, : gh * patch, : gw * patch].reshape(n, c, gh, patch, gw, patch)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(n, gh * gw, patch * patch * c)


def unpatchify(patches: torch.Tensor, patch: int, grid_h: int, grid_w: int, channels: int = 3) -> torch.Tensor:
    """Inverse of :func:`patchify`: ``(N, L, patch * patch * C)`` -> ``(N, C, grid_h * patch, grid_w * patch)``."""
    n = patches.shape[0]
    x = patches.reshape(n, grid_h, grid_w, patch, patch, channels)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(n, channels, grid_h * patch, grid_w * patch)


def assemble_tiles(tiles: torch.Tensor, grid: int, gap: int = 1, fill: float = 1.0) -> torch.Tensor:
    """``(N, grid * grid, C, t, t)`` tiles in row-major order -> one ``(N, C, H, W)`` image with ``gap`` px of
    ``fill`` between tiles (for image grids)."""
    n, _, c, t, _ = tiles.shape
    side = grid * t + (grid - 1) * gap
    out = tiles.new_full((n, c, side, side), fill)
    for i in range(grid * grid):
        r, col = divmod(i, grid)
        y, x = r * (t + gap), col * (t + gap)
        out[:, :, y : y + t, x : x + t] = tiles[:, i]
    return out
