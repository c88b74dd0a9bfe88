"""Synthetic images with an easy, learnable class structure, for tests and benchmarks (no files, no network).

Each class is a random 5x5 binary glyph (fixed by ``seed`` and the class index). A sample draws the glyph at a random
scale and position, in a random foreground colour on a random, darker background, plus gaussian pixel noise. The class
is carried by the *shape*, not the colour, so it survives the colour jitter and grayscale augmentations of SSL
methods, while crops, colours and noise make every image different. Sample ``i`` of a split depends only on
``(seed, split, i)``: the data is identical on every machine and every call.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from sslrun.core.errors import ConfigError
from sslrun.core.interfaces import Dataset, DatasetInfo

__all__ = ["Synthetic", "SyntheticSplit", "class_glyphs"]

_GLYPH = 5


def class_glyphs(num_classes: int, seed: int) -> np.ndarray:
    """``(num_classes, 5, 5)`` bool glyphs, pairwise different in at least 4 cells and never (nearly) empty."""
    rng = np.random.default_rng([seed, 0x5EED])
    glyphs: list[np.ndarray] = []
    while len(glyphs) < num_classes:
        g = rng.random((_GLYPH, _GLYPH)) < 0.5
        if not 8 <= g.sum() <= 17:
            continue
        if all((g != h).sum() >= 4 for h in glyphs):
            glyphs.append(g)
    return np.stack(glyphs)


class SyntheticSplit(Sequence[tuple[np.ndarray, int]]):
    """Lazily generated ``(size x size x 3 uint8, label)`` samples; label ``i % num_classes`` (balanced)."""

    def __init__(self, n: int, size: int, glyphs: np.ndarray, noise: float, seed: int, split_id: int) -> None:
        self.n, self.size, self.glyphs, self.noise = n, size, glyphs, noise
        self.seed, self.split_id = seed, split_id

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:  # type: ignore[override]
        if i < 0:
            i += self.n
        if not 0 <= i < self.n:
            raise IndexError(i)
        label = i % len(self.glyphs)
        rng = np.random.default_rng([self.seed, self.split_id, i])
        s = self.size
        # glyph side 55-85% of the image, anywhere inside it
        side = int(round(s * rng.uniform(0.55, 0.85)))
        y0, x0 = rng.integers(0, s - side + 1, size=2)
        cells = (np.arange(side) * _GLYPH) // side  # nearest-neighbour upscaling of the 5x5 glyph
        mask = self.glyphs[label][cells[:, None], cells[None, :]]
        # a bright foreground on a darker background: the shape stays visible in grayscale
        fg = rng.uniform(0.55, 1.0, size=3)
        bg = rng.uniform(0.0, 0.35, size=3)
        img = np.empty((s, s, 3), dtype=np.float32)
        img[:] = bg
        img[y0 : y0 + side, x0 : x0 + side][mask] = fg
        img += rng.normal(0.0, self.noise, size=img.shape).astype(np.float32)
        return (np.clip(img, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8), label


class Synthetic(Dataset):
    """Deterministic synthetic images: class = glyph shape, plus random scale, position, colours and noise.

    Example:
        >>> ds = Synthetic(Synthetic.Config(num_samples=1000, size=32))
        >>> img, label = ds.open_split("train")[3]
        >>> img.shape, label
        ((32, 32, 3), 3)
    """

    splits: ClassVar[tuple[str, ...]] = ("train", "test")
    eval_splits: ClassVar[tuple[str, str] | None] = ("train", "test")

    @dataclass
    class Config:
        """Args:
        root: unused (nothing is read); kept for the common dataset interface.
        num_samples: size of the ``train`` split.
        test_samples: size of the ``test`` split.
        size: image side in pixels.
        num_classes: number of glyph classes.
        noise: std of the gaussian pixel noise, in [0, 1] units.
        seed: selects the glyphs and every sample.
        """

        root: str | None = None
        num_samples: int = 5000
        test_samples: int = 1000
        size: int = 32
        num_classes: int = 10
        noise: float = 0.08
        seed: int = 0

        def __post_init__(self) -> None:
            if self.num_samples < 1 or self.test_samples < 1:
                raise ConfigError("synthetic num_samples and test_samples must be >= 1")
            if self.size < 8:
                raise ConfigError(f"synthetic size must be >= 8 pixels, got {self.size}")
            if not 2 <= self.num_classes <= 1000:
                raise ConfigError(f"synthetic num_classes must be in 2..1000, got {self.num_classes}")
            if self.noise < 0:
                raise ConfigError(f"synthetic noise must be >= 0, got {self.noise}")

    def info(self) -> DatasetInfo:
        """``size`` x ``size`` colour, ``num_classes`` classes."""
        return DatasetInfo(image_size=self.cfg.size, grayscale=False, num_classes=self.cfg.num_classes)

    def open_split(self, split: str) -> SyntheticSplit:
        """``train`` (``num_samples``) or ``test`` (``test_samples``), generated on access.

        Raises:
            ConfigError: an unknown split.
        """
        if split not in self.splits:
            raise ConfigError(f"synthetic has no split {split!r}; splits: {', '.join(self.splits)}")
        c = self.cfg
        n = c.num_samples if split == "train" else c.test_samples
        glyphs = class_glyphs(c.num_classes, c.seed)
        return SyntheticSplit(n, c.size, glyphs, c.noise, c.seed, self.splits.index(split))
