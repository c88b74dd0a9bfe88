"""STL-10 (Coates, Ng & Lee 2011, "An Analysis of Single-Layer Networks in Unsupervised Feature Learning"): 96x96
colour images, 10 classes; 5,000 labelled train, 8,000 test and 100,000 unlabelled images for unsupervised learning.

Binary files ``stl10_binary/{train,test,unlabeled}_X.bin`` hold uint8 images in column-major order (each image is
3 x 96 x 96 with the width index varying slowest after the channel: read as ``(N, 3, W, H)``); ``{train,test}_y.bin``
hold labels 1..10. The files are memory-mapped, so preparing the 2.7 GB unlabelled split does not need 2.7 GB of RAM.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np

from sslrun.core.errors import ConfigError, DataError
from sslrun.core.interfaces import Dataset, DatasetInfo
from sslrun.plugins.common.readers import ArraySplit, ConcatSplit, locate_or_download

__all__ = ["STL10"]

_SIDE = 96
_IMAGE_BYTES = 3 * _SIDE * _SIDE
_NEEDED = ("train_X.bin", "train_y.bin", "test_X.bin", "test_y.bin", "unlabeled_X.bin")


def _chw_colmajor_to_hwc(img: np.ndarray) -> np.ndarray:
    # one image read as (3, W, H) -> (H, W, 3)
    return img.transpose(2, 1, 0)


def _read_images(path: Path) -> np.ndarray:
    size = path.stat().st_size
    if size == 0 or size % _IMAGE_BYTES:
        raise DataError(
            f"{path} is {size} bytes, not a multiple of one 96x96x3 image ({_IMAGE_BYTES}); the file is truncated "
            f"or corrupt, download it again"
        )
    return np.memmap(path, dtype=np.uint8, mode="r").reshape(-1, 3, _SIDE, _SIDE)


def _read_labels(path: Path, n: int) -> np.ndarray:
    labels = np.fromfile(path, dtype=np.uint8).astype(np.int64)
    if len(labels) != n:
        raise DataError(f"{path} has {len(labels)} labels for {n} images; the files do not belong together")
    if n and (labels.min() < 1 or labels.max() > 10):
        raise DataError(f"{path} has labels outside 1..10; is it an STL-10 label file?")
    return labels - 1  # STL-10 numbers its classes 1..10


class STL10(Dataset):
    """STL-10 at 96x96: splits ``train+unlabeled`` (105k, for pretraining; unlabelled images have label -1),
    ``train`` (5k), ``test`` (8k) and ``unlabeled`` (100k).

    Example:
        >>> split = STL10(STL10.Config(root="~/data")).open_split("train")  # doctest: +SKIP
        >>> split[0][0].shape, split[0][1]
        ((96, 96, 3), 1)
    """

    # The standard SSL protocol pretrains on train + unlabelled and evaluates on train -> test.
    splits: ClassVar[tuple[str, ...]] = ("train+unlabeled", "train", "test", "unlabeled")
    eval_splits: ClassVar[tuple[str, str] | None] = ("train", "test")

    @dataclass
    class Config:
        """Args:
        root: directory holding ``stl10_binary/`` (or the .bin files themselves); None = the cache.
        download: download with torchvision (2.6 GB) when the files are absent.
        """

        root: str | None = None
        download: bool = True

    def info(self) -> DatasetInfo:
        """96x96 colour, 10 classes."""
        return DatasetInfo(image_size=_SIDE, grayscale=False, num_classes=10)

    def _part(self, directory: Path, name: str) -> ArraySplit:
        images = _read_images(directory / f"{name}_X.bin")
        labels = None if name == "unlabeled" else _read_labels(directory / f"{name}_y.bin", len(images))
        return ArraySplit(images, labels, to_hwc=_chw_colmajor_to_hwc)

    def open_split(self, split: str) -> ArraySplit | ConcatSplit:
        """One split as ``(96x96x3 uint8, label 0..9 or -1)``.

        Raises:
            ConfigError: an unknown split.
            DataError: the binaries are missing (and cannot be downloaded), truncated or mismatched.
        """
        if split not in self.splits:
            raise ConfigError(f"stl10 has no split {split!r}; splits: {', '.join(self.splits)}")
        directory = locate_or_download(
            "stl10",
            self.cfg.root,
            self.cfg.download,
            layouts=("stl10_binary", ""),
            needed=_NEEDED,
            tv_class="STL10",
        )
        if split == "train+unlabeled":
            return ConcatSplit([self._part(directory, "train"), self._part(directory, "unlabeled")])
        return self._part(directory, split)
