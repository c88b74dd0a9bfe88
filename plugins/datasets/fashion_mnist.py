"""Fashion-MNIST (Xiao, Rasul & Vollgraf 2017, arXiv:1708.07747): 70,000 28x28 grayscale images of clothing,
10 classes, 60k train / 10k test, in the IDX format of MNIST.

The raw files are looked for in ``root`` (or, without one, in ``~/.cache/sslrun/raw/fashion-mnist`` and Debian's
``/usr/share/datasets/fashion-mnist`` from the ``dataset-fashion-mnist`` package), either directly or in
torchvision's ``FashionMNIST/raw`` layout; when absent they are downloaded with torchvision.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from sslrun.core.errors import ConfigError, DataError
from sslrun.core.interfaces import Dataset, DatasetInfo
from sslrun.plugins.common.readers import ArraySplit, locate_or_download, read_idx, resolve_file

__all__ = ["FashionMNIST"]

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")

_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


class FashionMNIST(Dataset):
    """Fashion-MNIST, stored as 28x28 grayscale replicated to 3 channels (``grayscale=True`` in the manifest).

    Example:
        >>> ds = FashionMNIST(FashionMNIST.Config(root="/usr/share/datasets/fashion-mnist"))  # doctest: +SKIP
        >>> img, label = ds.open_split("train")[0]  # (28, 28, 3) uint8, 9 ("ankle boot")
    """

    splits: ClassVar[tuple[str, ...]] = ("train", "test")
    eval_splits: ClassVar[tuple[str, str] | None] = ("train", "test")

    @dataclass
    class Config:
        """Args:
        root: directory with the four IDX files (``.gz`` or not); None = the default places.
        download: download with torchvision when the files are absent.
        """

        root: str | None = None
        download: bool = True

    def info(self) -> DatasetInfo:
        """28x28 grayscale, 10 classes."""
        return DatasetInfo(image_size=28, grayscale=True, num_classes=10)

    def open_split(self, split: str) -> ArraySplit:
        """The ``train`` (60k) or ``test`` (10k) split as ``(28x28x3 uint8, label 0..9)``.

        Raises:
            ConfigError: an unknown split.
            DataError: the files are missing (and cannot be downloaded) or corrupt.
        """
        if split not in _FILES:
            raise ConfigError(f"fashion-mnist has no split {split!r}; splits: {', '.join(self.splits)}")
        needed = [n for files in _FILES.values() for n in files]
        directory = locate_or_download(
            "fashion-mnist",
            self.cfg.root,
            self.cfg.download,
            layouts=("", "FashionMNIST/raw"),
            needed=needed,
            tv_class="FashionMNIST",
            extra_dirs=(DEBIAN_DIR,),
        )
        img_file, lbl_file = (resolve_file(directory, n) for n in _FILES[split])
        images, labels = read_idx(img_file), read_idx(lbl_file)
        if images.ndim != 3 or images.shape[1:] != (28, 28) or labels.ndim != 1:
            raise DataError(
                f"{img_file} holds images of shape {images.shape[1:]} (labels {labels.shape}); "
                f"Fashion-MNIST images are 28x28: is it the right file?"
            )
        if len(labels) and (labels.min() < 0 or labels.max() > 9):
            raise DataError(f"{lbl_file} has labels outside 0..9; is it the right file?")
        return ArraySplit(images, labels)
