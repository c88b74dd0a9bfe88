"""A tiny MLP encoder: the smallest thing that satisfies sslrun's Encoder contract."""

from __future__ import annotations

from torch import nn


class MLPEncoder(nn.Module):
    """Flatten -> Linear -> ReLU -> Linear. ``output_dim`` is what sslrun reads to size heads."""

    def __init__(self, image_size: int, hidden: int, output_dim: int) -> None:
        super().__init__()
        self.output_dim = output_dim
        self.net = nn.Sequential(
            nn.Flatten(), nn.Linear(3 * image_size * image_size, hidden), nn.ReLU(), nn.Linear(hidden, output_dim)
        )

    def forward(self, x):  # (N, 3, H, W) -> (N, output_dim)
        return self.net(x)


def mlp(image_size: int | None = None, hidden: int = 256, output_dim: int = 64) -> nn.Module:
    """Factory registered as ``example_mlp``; sslrun passes ``image_size`` from the prepared data."""
    return MLPEncoder(image_size or 32, hidden, output_dim)
