"""What :func:`sslrun.core.data.writer.write_beton` accepts: a sample checked for what FFCV's image and label
fields need, the page size a file is written with, and the JPEG quality a split is encoded with. Every refusal is
one line naming the sample or setting and what to do."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from sslrun.core.errors import ConfigError, DataError

__all__ = ["check_sample", "jpeg_quality_for", "page_size_for"]

_MIN_PAGE = 1 << 21  # FFCV's smallest page size (2 MiB); pages must be powers of two


def check_sample(sample: Any, i: int, where: str, num_classes: int | None, page_size: int | None) -> tuple:
    """``(image, label)`` checked for what RGBImageField/IntField need; a DataError naming the sample otherwise."""
    try:
        img, label = sample
    except (TypeError, ValueError):
        raise DataError(f"{where}: sample {i} is {type(sample).__name__}, expected an (image, label) pair") from None
    if not isinstance(img, np.ndarray) or img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
        desc = f"{img.dtype} array of shape {img.shape}" if isinstance(img, np.ndarray) else type(img).__name__
        raise DataError(
            f"{where}: sample {i} image is a {desc}; expected an HxWx3 uint8 array (grayscale: replicate it to "
            f"3 channels with np.repeat(img[..., None], 3, 2))"
        )
    if min(img.shape[:2]) < 1 or max(img.shape[:2]) > 65535:
        raise DataError(f"{where}: sample {i} image has shape {img.shape}; sides must be in 1..65535")
    if page_size is not None and img.nbytes > page_size:
        raise DataError(
            f"{where}: sample {i} image {img.shape} ({img.nbytes} bytes) does not fit the file's {page_size}-byte "
            f"pages, sized from the first image; shrink the images (e.g. imagefolder's max_side or size)"
        )
    if isinstance(label, bool) or not isinstance(label, int | np.integer):
        raise DataError(f"{where}: sample {i} label is {label!r}; expected an int (-1 for unlabelled)")
    label = int(label)
    if label < -1 or (num_classes is not None and label >= num_classes):
        raise DataError(f"{where}: sample {i} label {label} is outside -1..{(num_classes or 0) - 1}")
    return np.ascontiguousarray(img), label


def page_size_for(first_nbytes: int, n: int) -> int:
    """FFCV page size (a power of two, in bytes) for ``n`` images, the first of ``first_nbytes`` bytes."""
    # small sets: FFCV's smallest page (2 MiB) keeps files small (about a page of slack per writer); big sets:
    # FFCV's 8 MiB default. Always room for a sample twice as large as the first one.
    base = _MIN_PAGE if first_nbytes * n < (1 << 30) else 4 * _MIN_PAGE
    return max(base, 1 << math.ceil(math.log2(max(2 * first_nbytes, 1))))


def jpeg_quality_for(asked: int | None, samples: Any, fmt: str) -> int:
    """The JPEG quality to encode with: ``asked``, else the split's ``jpeg_quality`` attribute, else 90.

    A quality set for a ``raw`` file would be recorded in the dataset settings without changing a pixel (and make
    the cache prepare the file again for nothing when it changes), so it is refused rather than ignored."""
    quality = asked if asked is not None else getattr(samples, "jpeg_quality", None)
    if quality is None:
        return 90
    if isinstance(quality, bool) or not isinstance(quality, int) or not 1 <= quality <= 100:
        raise ConfigError(f"jpeg_quality must be an integer in 1..100 (90 is FFCV's default), got {quality!r}")
    if fmt != "jpg":
        raise ConfigError(
            f"jpeg_quality={quality} applies only to JPEG files; add --format jpg (data.format = 'jpg') or drop the "
            f"jpeg_quality setting"
        )
    return quality
