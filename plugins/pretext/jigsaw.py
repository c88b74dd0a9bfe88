"""Jigsaw puzzles (Noroozi & Favaro 2016, "Unsupervised Learning of Visual Representations by Solving Jigsaw
Puzzles", ECCV).

The image is cut into a ``grid x grid`` set of tiles, the tiles are shuffled by one permutation out of a fixed set,
and the network predicts which permutation was used. Each tile is encoded separately by the shared encoder (the
paper's "context-free network"), the features are concatenated in the shuffled order and classified. To stop the
network from solving the puzzle with low-level cues (continuing edges, matching borders), every tile is a random
crop inside its cell, leaving a gap between tiles, and is normalised to zero mean / unit variance on its own
(section 3.2). The permutation set is chosen to have a large Hamming distance between permutations (section 3.3,
Algorithm 1), so that the task is not ambiguous.

On small images (<= 64 px) the default grid is 2x2 (24 permutations, all of them): a 3x3 grid of 32 px CIFAR
images leaves tiles of 8 px. Use it when you want a classic, well-understood pretext baseline; it is slower than
rotation (``grid^2`` encoder passes per image).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sslrun.core.errors import ConfigError
from sslrun.core.pretext import PretextMethod
from sslrun.plugins.common.heads import ClassifierHead
from sslrun.plugins.common.losses import accuracy
from sslrun.plugins.common.patches import assemble_tiles

__all__ = ["Jigsaw", "JigsawConfig", "hamming_permutations"]


@dataclass
class JigsawConfig:
    """Hyperparameters of :class:`Jigsaw`."""

    grid: int | None = None  # tiles per side; None = 2 for images <= 64 px, 3 (the paper's) above
    # size of the permutation set; None = all 24 for a 2x2 grid, 100 for 3x3 (the paper's best is 1000, its
    # ablation shows 100 already close and a much easier task to start on)
    num_permutations: int | None = None
    tile_crop: float = 0.75  # tile side / cell side (the paper: 64 px tiles in 85 px cells); 1.0 = no gap
    tile_norm: bool = True  # normalise each tile's channels to zero mean, unit variance (against shortcuts)
    permutation_seed: int = 0  # the permutation set is a function of (grid, num_permutations, this seed)
    head_hidden_dim: int = 512  # MLP on the concatenated tile features; 0 = linear

    def __post_init__(self) -> None:
        if self.grid is not None and not 2 <= self.grid <= 4:
            raise ConfigError(f"method.kwargs.grid must be 2, 3 or 4, got {self.grid}")
        if self.num_permutations is not None and self.num_permutations < 2:
            raise ConfigError(f"method.kwargs.num_permutations must be >= 2, got {self.num_permutations}")
        if self.grid is not None and self.num_permutations is not None:
            total = math.factorial(self.grid**2)
            if self.num_permutations > total:
                raise ConfigError(
                    f"method.kwargs.num_permutations={self.num_permutations} exceeds the {total} permutations "
                    f"of a {self.grid}x{self.grid} grid"
                )
        if not 0.0 < self.tile_crop <= 1.0:
            raise ConfigError(f"method.kwargs.tile_crop must be in (0, 1], got {self.tile_crop}")
        if self.head_hidden_dim < 0:
            raise ConfigError(f"method.kwargs.head_hidden_dim must be >= 0, got {self.head_hidden_dim}")


def _all_permutations(n: int) -> np.ndarray:
    """All ``n!`` permutations of ``range(n)`` as an ``(n!, n)`` int8 array (built by inserting element ``k`` at
    every position of the permutations of ``range(k)``: vectorised, ~100x faster than ``itertools`` for n = 9)."""
    perms = np.zeros((1, 0), dtype=np.int8)
    for k in range(n):
        grown = np.empty((len(perms) * (k + 1), k + 1), dtype=np.int8)
        for pos in range(k + 1):
            grown[pos :: k + 1] = np.insert(perms, pos, k, axis=1)
        perms = grown
    return perms


@functools.cache
def hamming_permutations(num_tiles: int, count: int, seed: int = 0) -> np.ndarray:
    """``count`` permutations of ``range(num_tiles)`` with a large minimum Hamming distance, ``(count, num_tiles)``.

    Greedy farthest-point selection over all ``num_tiles!`` permutations (Noroozi & Favaro, Algorithm 1, with the
    minimum instead of the average distance to the chosen set as the criterion: that is the quantity that makes
    two permutations hard to tell apart). The first permutation and the tie-breaking order are drawn from
    ``seed``, so the set is reproducible. For 9 tiles (362,880 candidates) and 100 permutations it takes ~0.1 s.
    """
    if num_tiles > 9:
        raise ConfigError(f"jigsaw permutation sets are computed for up to 9 tiles (3x3), got {num_tiles}")
    rng = np.random.default_rng(seed)
    candidates = _all_permutations(num_tiles)
    candidates = candidates[rng.permutation(len(candidates))]  # seeded order = seeded tie-breaking
    if count > len(candidates):
        raise ConfigError(f"{count} permutations requested, only {len(candidates)} exist for {num_tiles} tiles")
    columns = np.ascontiguousarray(candidates.T)  # (T, n!): one row per position, compared row by row (fast)

    def distance_to(perm: np.ndarray) -> np.ndarray:  # Hamming distance of every candidate to ``perm``
        dist = np.zeros(columns.shape[1], dtype=np.int8)
        for pos in range(num_tiles):
            dist += columns[pos] != perm[pos]
        return dist

    chosen = [0]
    min_dist = distance_to(candidates[0])
    for _ in range(count - 1):
        j = int(np.argmax(min_dist))
        chosen.append(j)
        min_dist = np.minimum(min_dist, distance_to(candidates[j]))
    return candidates[chosen].astype(np.int64)


class Jigsaw(PretextMethod):
    """Predict which of a fixed set of permutations shuffled the tiles.

    ``make_inputs``: ``images (N, 3, H, W)`` -> ``tiles (N, T, 3, t, t)`` and labels ``(N,)``, where
    ``tiles[:, i]`` is original tile ``perm[label][i]`` (tiles numbered row-major), so
    ``unshuffled[:, perm[label]] = tiles`` recovers the original order.
    """

    Config = JigsawConfig

    def build_head(self, encoder: nn.Module, image_size: int) -> nn.Module:
        """Choose the grid and the permutation set for ``image_size``; the head classifies the concatenated
        features of all tiles."""
        self.grid = self.cfg.grid or (2 if image_size <= 64 else 3)
        total = math.factorial(self.grid**2)
        count = self.cfg.num_permutations or min(total, 100)
        if count > total:
            raise ConfigError(
                f"method.kwargs.num_permutations={count} exceeds the {total} permutations of a "
                f"{self.grid}x{self.grid} grid"
            )
        self.cell = image_size // self.grid
        self.tile = max(1, round(self.cell * self.cfg.tile_crop))
        if self.tile < 4:
            raise ConfigError(
                f"jigsaw: {image_size} px images cut {self.grid}x{self.grid} give {self.tile} px tiles; "
                f"use a smaller method.kwargs.grid or a larger tile_crop"
            )
        self.permutations = torch.from_numpy(hamming_permutations(self.grid**2, count, self.cfg.permutation_seed))
        return ClassifierHead(encoder.output_dim * self.grid**2, count, self.cfg.head_hidden_dim)

    def make_inputs(
        self, images: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        n = images.shape[0]
        g, cell, t, dev = self.grid, self.cell, self.tile, images.device
        num_tiles = g * g
        # random top-left corner of each tile inside its cell: (N, T, 2)
        offsets = torch.randint(cell - t + 1, (n, num_tiles, 2), generator=generator, device=dev)
        cells = torch.arange(num_tiles, device=dev)
        top = (cells // g * cell).view(1, -1) + offsets[..., 0]  # (N, T)
        left = (cells % g * cell).view(1, -1) + offsets[..., 1]
        ar = torch.arange(t, device=dev)
        rows = (top[..., None] + ar).view(n, num_tiles, t, 1)
        cols = (left[..., None] + ar).view(n, num_tiles, 1, t)
        batch = torch.arange(n, device=dev).view(n, 1, 1, 1)
        tiles = images[batch, :, rows, cols].permute(0, 1, 4, 2, 3)  # (N, T, t, t, 3) -> (N, T, 3, t, t)
        if self.cfg.tile_norm:
            mean = tiles.mean(dim=(3, 4), keepdim=True)
            std = tiles.std(dim=(3, 4), keepdim=True)
            tiles = (tiles - mean) / (std + 1e-5)
        labels = torch.randint(len(self.permutations), (n,), generator=generator, device=dev)
        order = self.permutations.to(dev)[labels]  # (N, T): position i shows tile order[i]
        shuffled = tiles[torch.arange(n, device=dev).view(n, 1), order]
        return shuffled.contiguous(), labels

    def predict(self, inputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode every tile with the shared encoder, concatenate in shuffled order, classify."""
        n = inputs.shape[0]
        feats = self.encoder(inputs.flatten(0, 1))  # (N * T, D)
        return self.head(feats.reshape(n, -1)), targets  # (N, T * D) -> (N, P)

    def loss(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Cross-entropy over the permutation set (in float32)."""
        return F.cross_entropy(pred.float(), target)

    def metrics(self, pred: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"acc": accuracy(pred, target)}

    def unshuffle(self, tiles: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Put shuffled ``tiles (N, T, ...)`` back in row-major order given permutation ``labels (N,)``."""
        order = self.permutations.to(tiles.device)[labels]  # (N, T)
        out = torch.empty_like(tiles)
        out[torch.arange(tiles.shape[0], device=tiles.device).view(-1, 1), order] = tiles
        return out

    def visualize(
        self, images: torch.Tensor, inputs: torch.Tensor, pred: torch.Tensor, targets: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """The shuffled tiles, the tiles put back by the predicted permutation, and by the true one."""

        def show(tiles: torch.Tensor) -> torch.Tensor:
            n, num_tiles = tiles.shape[:2]
            pixels = self.denormalize(tiles.float().flatten(0, 1)).view(n, num_tiles, *tiles.shape[2:])
            return assemble_tiles(pixels, self.grid)

        return {
            "input": show(inputs),
            "prediction": show(self.unshuffle(inputs, pred.argmax(dim=1))),
            "target": show(self.unshuffle(inputs, targets)),
        }
