"""What the loaders need to know about a prepared ``.beton`` before building an FFCV pipeline, and the argument
checks they share: the file is verified against its manifest first, so a damaged file is one clear error here
instead of a silent misread or a failure deep inside numba."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sslrun.core.data.augment import IMAGENET_MEAN, IMAGENET_STD
from sslrun.core.data.format import BetonReader, verify_beton
from sslrun.core.errors import ConfigError, DataError
from sslrun.core.system import usable_cores

__all__ = ["Source", "check_batch", "usable_workers"]


@dataclass(frozen=True)
class Source:
    """A verified ``.beton`` as a loader sees it.

    Attributes:
        path: the file.
        image_size: ``(H, W)``, the largest image height and width.
        mean, std: per-channel pixel statistics in [0, 1] for normalisation (ImageNet's for a constant dataset,
            whose std is 0).
        num_samples: samples in the file.
        uniform: every image has the same size (true of every split ``sslrun data prepare`` writes from a
            dataset of fixed-size images; false for whole images kept with imagefolder's ``max_side``).
        sizes: ``(N, 2)`` int64 image heights and widths by sample index (from the file's metadata).
    """

    path: Path
    image_size: tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    num_samples: int
    uniform: bool
    sizes: np.ndarray = field(repr=False, compare=False)

    @classmethod
    def open(cls, path: Path) -> Source:
        """Verify ``path`` and read its manifest and image sizes (from the metadata, no decoding).

        Raises:
            DataError: the file is missing or fails verification.
        """
        if not path.exists():
            raise DataError(f"{path} does not exist; prepare the data first with `sslrun data prepare`")
        m = verify_beton(path)
        mean = tuple(float(v) for v in m.mean)
        std = tuple(float(v) for v in m.std)
        if min(std) <= 0:  # a constant dataset (all pixels equal): normalising would divide by zero
            mean, std = IMAGENET_MEAN, IMAGENET_STD
        sizes = BetonReader(path).sizes
        uniform = bool((sizes == sizes[0]).all()) if len(sizes) else True
        size = (int(m.image_size[0]), int(m.image_size[1]))
        return cls(path, size, mean, std, int(m.num_samples), uniform, sizes)


def usable_workers(requested: int) -> int:
    """``min(requested, usable cores)``: FFCV raises ``ValueError: The number of threads must be between 1 and N``
    for more threads than cores (libffcv/ffcv#357)."""
    if requested < 1:
        raise ConfigError(f"num_workers must be >= 1, got {requested}")
    return min(requested, usable_cores())


def check_batch(batch_size: int, max_samples: int | None) -> None:
    """A positive int batch size, and ``max_samples`` None or positive; ConfigError otherwise."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int | np.integer) or batch_size < 1:
        raise ConfigError(f"batch_size must be a positive int, got {batch_size!r}")
    if max_samples is not None and max_samples < 1:
        raise ConfigError(f"max_samples must be >= 1 or None, got {max_samples}")
