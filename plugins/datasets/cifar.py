"""CIFAR-10 and CIFAR-100 (Krizhevsky 2009, "Learning Multiple Layers of Features from Tiny Images"): 60,000 32x32
colour images, 50k train / 10k test, from the "python version" pickled batches.

CIFAR-10: ``cifar-10-batches-py/data_batch_1..5`` and ``test_batch``, each a dict with ``data`` (N x 3072 uint8,
row = 1024 red, 1024 green, 1024 blue values in row-major order) and ``labels``. CIFAR-100: ``cifar-100-python/train``
and ``test`` with ``fine_labels`` (100 classes) and ``coarse_labels`` (20 superclasses).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

import numpy as np

from sslrun.core.errors import ConfigError, DataError
from sslrun.core.interfaces import Dataset, DatasetInfo
from sslrun.plugins.common.readers import ArraySplit, locate_or_download, restricted_pickle_load

__all__ = ["CIFAR10", "CIFAR100"]


def _read_batches(files: list[Path], label_key: str) -> ArraySplit:
    images, labels = [], []
    for f in files:
        batch = restricted_pickle_load(f)
        if "data" not in batch or label_key not in batch:
            raise DataError(f"{f} has no {'data' if 'data' not in batch else label_key!r} entry; is it a CIFAR batch?")
        data = np.asarray(batch["data"], dtype=np.uint8)
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            raise DataError(f"{f}: 'data' has shape {data.shape}, expected (N, 3072); is it a CIFAR batch?")
        lbl = np.asarray(batch[label_key], dtype=np.int64)
        if lbl.shape != (len(data),):
            raise DataError(f"{f}: {len(data)} images but {lbl.size} labels; the file is corrupt")
        # (N, 3072) planar RGB -> (N, 3, 32, 32) -> (N, 32, 32, 3)
        images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        labels.append(lbl)
    return ArraySplit(np.ascontiguousarray(np.concatenate(images)), np.concatenate(labels))


class CIFAR10(Dataset):
    """CIFAR-10: 32x32 RGB, 10 classes.

    Example:
        >>> split = CIFAR10(CIFAR10.Config(root="~/data")).open_split("test")  # doctest: +SKIP
        >>> len(split), split[0][0].shape
        (10000, (32, 32, 3))
    """

    splits: ClassVar[tuple[str, ...]] = ("train", "test")
    eval_splits: ClassVar[tuple[str, str] | None] = ("train", "test")
    _folder: ClassVar[str] = "cifar-10-batches-py"
    _files: ClassVar[dict[str, tuple[str, ...]]] = {
        "train": tuple(f"data_batch_{i}" for i in range(1, 6)),
        "test": ("test_batch",),
    }
    _tv_class: ClassVar[str] = "CIFAR10"

    @dataclass
    class Config:
        """Args:
        root: directory holding ``cifar-10-batches-py/`` (or the batch files themselves); None = the cache.
        download: download with torchvision when the files are absent.
        """

        root: str | None = None
        download: bool = True

    def info(self) -> DatasetInfo:
        """32x32 colour, 10 classes."""
        return DatasetInfo(image_size=32, grayscale=False, num_classes=10)

    def _label_key(self) -> str:
        return "labels"

    def open_split(self, split: str) -> ArraySplit:
        """``train`` (50k) or ``test`` (10k) as ``(32x32x3 uint8, label)``.

        Raises:
            ConfigError: an unknown split.
            DataError: the batches are missing (and cannot be downloaded) or corrupt.
        """
        if split not in self._files:
            raise ConfigError(f"{self.name} has no split {split!r}; splits: {', '.join(self.splits)}")
        directory = locate_or_download(
            self.name,
            self.cfg.root,
            self.cfg.download,
            layouts=(self._folder, ""),
            needed=[n for names in self._files.values() for n in names],
            tv_class=self._tv_class,
        )
        return _read_batches([directory / n for n in self._files[split]], self._label_key())


class CIFAR100(CIFAR10):
    """CIFAR-100: 32x32 RGB, 100 fine classes (or 20 coarse superclasses with ``label_type="coarse"``)."""

    _folder: ClassVar[str] = "cifar-100-python"
    _files: ClassVar[dict[str, tuple[str, ...]]] = {"train": ("train",), "test": ("test",)}
    _tv_class: ClassVar[str] = "CIFAR100"

    @dataclass
    class Config:
        """Args:
        root: directory holding ``cifar-100-python/`` (or ``train`` and ``test`` themselves); None = the cache.
        download: download with torchvision when the files are absent.
        label_type: ``fine`` (100 classes) or ``coarse`` (20 superclasses).
        """

        root: str | None = None
        download: bool = True
        label_type: Literal["fine", "coarse"] = "fine"

    def info(self) -> DatasetInfo:
        """32x32 colour, 100 (fine) or 20 (coarse) classes."""
        return DatasetInfo(image_size=32, grayscale=False, num_classes=100 if self.cfg.label_type == "fine" else 20)

    def _label_key(self) -> str:
        return f"{self.cfg.label_type}_labels"
