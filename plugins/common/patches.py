"""Cutting images into patches and tiles and putting them back: MAE's patch layout and the image grids of tiled
tasks (jigsaw).

Example:
    >>> x = torch.rand(2, 3, 32, 32)
    >>> patchify(x, 4).shape  # 8 x 8 patches of 4 * 4 * 3 values
    torch.Size([2, 64, 48])
    >>> torch.equal(unpatchify(patchify(x, 4), 4, 8, 8), x)
    True
"""

from __future__ import annotations

import torch

__all__ = ["assemble_tiles", "patchify", "unpatchify"]


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
