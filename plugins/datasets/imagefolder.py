"""Your own images: a class-per-folder tree (``root/<class>/*.jpg``, labels from the folder names) or a flat folder
of unlabelled images (labels ``-1``), either whole (``max_side``: aspect ratio kept, the longer side shrunk to at most
``max_side``, as FFCV's ImageNet files) or as ``size`` x ``size`` squares (shorter side to ``size``, then centre
crop; the default, for small images). ``jpeg_quality`` sets the quality of the stored JPEGs under ``format=jpg``.

Whole images matter for pretraining at ImageNet scale: SimCLR/BYOL/DINO draw random-resized crops (down to 8% of
the area) from the whole image at load time, so a centre square cut at preparation time would throw away what lies
outside it for good.

Layouts (``labels="auto"`` picks one from what it finds):

- ``root/<class>/...``: labelled; ``test_fraction`` of each class is held out (chosen by a hash of the file's path,
  so the split is stable) for the kNN monitor and evaluation.
- ``root/train/<class>/...`` + ``root/test/<class>/...`` (or ``val``): the two folders are the splits.
- ``root/*.jpg`` (or any nesting with ``labels="none"``): unlabelled; everything goes to ``train``.

Files that cannot be decoded are skipped, counted and named in a :class:`SkippedImagesWarning` and in the split's
``skipped`` list (which the writer records in the manifest); a folder without a single readable image is a
:class:`~sslrun.core.errors.DataError`. Opening a split checks every file with a cheap decode (JPEGs at 1/8 scale,
which still reads all of the compressed data) so the sample count is final before writing; pixels are decoded for
real, one image at a time, by the writer's processes, so memory does not grow with the number of images.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np

from sslrun.core.errors import ConfigError, DataError
from sslrun.core.interfaces import Dataset, DatasetInfo
from sslrun.core.system import usable_cores

__all__ = ["IMAGE_EXTENSIONS", "ImageFolder", "SkippedImagesWarning", "check_readable", "load_square", "load_whole"]

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"})
_CHECK_BLOCK = 4096  # files checked per batch of thread-pool work


class SkippedImagesWarning(UserWarning):
    """Some files of an image folder could not be decoded and were left out."""


def load_square(path: str | Path, size: int) -> np.ndarray:
    """Decode an image file to ``(size, size, 3)`` uint8 RGB: EXIF rotation applied, shorter side resized to
    ``size`` (bicubic, antialiased), then the centre square cropped.

    Raises:
        OSError / ValueError / SyntaxError: the file is not a decodable image (PIL's errors).
    """
    from PIL import Image, ImageOps

    with Image.open(path) as im:
        # JPEG: decode at a reduced scale (DCT scaling) when the file is much larger than the target; never below it
        im.draft("RGB", (size, size))
        im = ImageOps.exif_transpose(im)
        im = im.convert("RGB")
        im = ImageOps.fit(im, (size, size), method=Image.Resampling.BICUBIC)
        return np.asarray(im, dtype=np.uint8).copy()


def load_whole(path: str | Path, max_side: int) -> np.ndarray:
    """Decode an image file to ``(h, w, 3)`` uint8 RGB with its aspect ratio kept: EXIF rotation applied, then
    shrunk (never enlarged) so that its longer side is at most ``max_side``.

    JPEGs are decoded at a reduced scale first when that still leaves both sides at least ``max_side`` (DCT
    scaling: cheaper than decoding everything and resizing); the final resize is OpenCV's ``INTER_AREA``, which
    antialiases and is what FFCV's own writer uses (3x cheaper than Pillow's bicubic here).

    Raises:
        OSError / ValueError / SyntaxError: the file is not a decodable image (PIL's errors).
    """
    import cv2
    from PIL import Image, ImageOps

    with Image.open(path) as im:
        im.draft("RGB", (max_side, max_side))
        im = ImageOps.exif_transpose(im).convert("RGB")
        img = np.asarray(im, dtype=np.uint8)
    h, w = img.shape[:2]
    r = max_side / max(h, w)
    if r >= 1:
        return np.ascontiguousarray(img)
    size = (max(1, round(w * r)), max(1, round(h * r)))  # OpenCV takes (width, height)
    return cv2.resize(img, size, interpolation=cv2.INTER_AREA)


def check_readable(path: str | Path) -> None:
    """Decode ``path`` as cheaply as possible to find out whether it is a readable image: JPEGs at 1/8 scale
    (all of the compressed data is still read, so a truncated file fails), other formats fully; the EXIF block
    is parsed too (a broken one would fail the real decode later).

    Raises:
        OSError / ValueError / SyntaxError: the file is not a decodable image (PIL's errors).
    """
    from PIL import Image

    with Image.open(path) as im:
        im.draft("RGB", (1, 1))
        im.load()
        im.getexif()


def _list_images(directory: Path, recursive: bool) -> list[Path]:
    out: list[Path] = []
    if recursive:
        for dirpath, dirnames, filenames in os.walk(directory, followlinks=True):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            out.extend(
                Path(dirpath) / f
                for f in sorted(filenames)
                if not f.startswith(".") and Path(f).suffix.lower() in IMAGE_EXTENSIONS
            )
        return out
    return sorted(
        p
        for p in directory.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS
    )


def _has_images(directory: Path) -> bool:
    # stops at the first image: deciding the layout must not walk a whole photo collection
    for _, dirnames, filenames in os.walk(directory, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        if any(not f.startswith(".") and Path(f).suffix.lower() in IMAGE_EXTENSIONS for f in filenames):
            return True
    return False


def _class_dirs(directory: Path) -> list[Path]:
    return sorted(d for d in directory.iterdir() if d.is_dir() and not d.name.startswith(".") and _has_images(d))


class FolderSplit(Sequence[tuple[np.ndarray, int]]):
    """The readable images of a folder split as ``(image, label)``: ``size x size x 3`` uint8 squares, or whole
    images with the longer side at most ``max_side`` when that is set.

    Every file is checked on construction (:func:`check_readable`, in threads): unreadable ones are dropped, named
    in a warning and listed in ``skipped``, so that the sample count is final before the ``.beton`` is written.
    Nothing decoded is kept: ``split[i]`` decodes file ``i`` when the writer asks for it.
    """

    def __init__(
        self,
        files: list[tuple[Path, int]],
        size: int,
        where: Path,
        num_threads: int | None = None,
        max_side: int | None = None,
        jpeg_quality: int | None = None,
    ) -> None:
        self.size, self.max_side = size, max_side
        #: JPEG quality the writer encodes this split with under ``format=jpg`` (None: the writer's default, 90).
        self.jpeg_quality = jpeg_quality
        threads = num_threads or min(8, usable_cores() + 2)

        def check(item: tuple[Path, int]) -> str:
            try:
                check_readable(item[0])
            except Exception as exc:
                return f"{item[0]} ({type(exc).__name__}: {exc})"
            return ""

        results: list[str] = []
        with ThreadPoolExecutor(max_workers=threads) as pool:  # PIL's decoders release the GIL
            for start in range(0, len(files), _CHECK_BLOCK):  # a future per file in flight costs ~1 KB each
                results += pool.map(check, files[start : start + _CHECK_BLOCK])
        bad = [r for r in results if r]
        # paths as str: a Path costs ~4x more memory, which adds up to GBs over ImageNet's 1.28 M files
        self.files = [(str(f), y) for (f, y), r in zip(files, results, strict=True) if not r]
        #: ``"path (error)"`` of every file left out; recorded in the manifest by the writer.
        self.skipped: list[str] = bad
        if bad:
            shown = "; ".join(bad[:10]) + (f"; and {len(bad) - 10} more" if len(bad) > 10 else "")
            warnings.warn(
                f"skipped {len(bad)} unreadable image(s) under {where}: {shown}", SkippedImagesWarning, stacklevel=3
            )
        if not self.files:
            raise DataError(
                f"none of the {len(files)} image file(s) under {where} could be decoded; check the files (see the "
                f"warning above)"
            )

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:  # type: ignore[override]
        path, label = self.files[i]
        try:
            img = load_square(path, self.size) if self.max_side is None else load_whole(path, self.max_side)
            return img, label
        except Exception as exc:
            raise DataError(f"{path} became unreadable while the dataset was written: {exc}") from exc


class ImageFolder(Dataset):
    """A folder of images: class-per-folder (labelled) or flat (unlabelled, label -1), as ``size`` x ``size``
    squares or, with ``max_side``, whole images with their aspect ratio kept.

    Example:
        >>> ds = ImageFolder(ImageFolder.Config(root="~/photos", size=96))  # doctest: +SKIP
        >>> img, label = ds.open_split("train")[0]  # (96, 96, 3) uint8, -1 for a flat folder
        >>> whole = ImageFolder(ImageFolder.Config(root="~/imagenet", max_side=256))  # doctest: +SKIP
        >>> img, label = whole.open_split("train")[0]  # e.g. (192, 256, 3) for a 500x375 photo
    """

    splits: ClassVar[tuple[str, ...]] = ("train", "test")
    eval_splits: ClassVar[tuple[str, str] | None] = ("train", "test")

    @dataclass
    class Config:
        """Args:
        root: the image folder (required).
        size: side of the square images written to the .beton (resize shorter side + centre crop); not used
            when ``max_side`` is set.
        max_side: keep whole images, aspect ratio kept, shrunk so that the longer side is at most this many
            pixels (never enlarged), e.g. 256 or 512 for 224-px training as in FFCV's ImageNet files; views are then
            cropped from the whole image at load time. None (the default): centre squares of ``size``.
        jpeg_quality: JPEG quality (1-100) of the stored images when the split is prepared with ``format=jpg``;
            None (the default) = 90, FFCV's default. Recorded in the manifest, and part of the cached file's
            settings, so a file prepared with another quality is prepared again rather than reused.
        labels: ``auto`` (class folders if the root holds only sub-folders, unlabelled if it holds only images),
            ``folders`` (sub-folder = class; loose files at the top are ignored) or ``none`` (every image under
            root, at any depth, unlabelled).
        test_fraction: share of each class held out as the ``test`` split when there are no train/test folders.
        """

        root: str | None = None
        size: int = 64
        max_side: int | None = None
        labels: Literal["auto", "folders", "none"] = "auto"
        test_fraction: float = 0.1
        jpeg_quality: int | None = None

        def __post_init__(self) -> None:
            if self.size < 8:
                raise ConfigError(f"imagefolder size must be >= 8 pixels, got {self.size}")
            if self.max_side is not None and not 8 <= self.max_side <= 4096:
                raise ConfigError(
                    f"imagefolder max_side must be in 8..4096 pixels, got {self.max_side}; e.g. 256 or 512 for "
                    f"224-px training"
                )
            if self.jpeg_quality is not None and not 1 <= self.jpeg_quality <= 100:
                raise ConfigError(
                    f"imagefolder jpeg_quality must be in 1..100, got {self.jpeg_quality}; e.g. 90 (the default) or 75 "
                    f"for smaller files"
                )
            if not 0.0 <= self.test_fraction < 1.0:
                raise ConfigError(f"imagefolder test_fraction must be in [0, 1), got {self.test_fraction}")

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg)
        # Unlabelled folders (and labelled ones without a hold-out) have nothing to evaluate on: say so per
        # instance, so the trainer turns its kNN monitor off instead of asking for a "test" split that cannot exist.
        try:
            root = self._root()
            dirs = self._split_dirs(root)
            labelled = self._mode(dirs["train"] if dirs else root) == "folders"
            if not labelled or (dirs is None and cfg.test_fraction == 0.0):
                self.eval_splits = None
        except DataError:
            pass  # a missing or empty root is reported when a split is opened

    # ---- layout ---------------------------------------------------------------------------------------------
    def _root(self) -> Path:
        if not self.cfg.root:
            raise DataError("imagefolder needs a folder: pass --root DIR (or data.root / dataset_kwargs.root)")
        root = Path(self.cfg.root).expanduser()
        if not root.is_dir():
            raise DataError(f"imagefolder root {root} is not a directory; pass the folder that holds your images")
        return root

    def _split_dirs(self, root: Path) -> dict[str, Path] | None:
        test = next((root / n for n in ("test", "val") if (root / n).is_dir()), None)
        if (root / "train").is_dir() and test is not None:
            return {"train": root / "train", "test": test}
        return None

    def _mode(self, directory: Path) -> Literal["folders", "none"]:
        if self.cfg.labels != "auto":
            return self.cfg.labels
        loose, classes = _list_images(directory, False), _class_dirs(directory)
        if loose and classes:
            raise DataError(
                f"{directory} holds both images ({loose[0].name}, ...) and image sub-folders ({classes[0].name}, ...); "
                f"set dataset_kwargs.labels to 'folders' (sub-folders are classes) or 'none' (all images, unlabelled)"
            )
        if not loose and not classes:
            raise DataError(
                f"{directory} contains no images (looked for {', '.join(sorted(IMAGE_EXTENSIONS))}); "
                f"put your images (or one sub-folder per class) there"
            )
        return "folders" if classes else "none"

    def _labelled(self, directory: Path, classes: list[str] | None = None) -> list[tuple[Path, int]]:
        found = [d.name for d in _class_dirs(directory)]
        classes = classes or found
        unknown = sorted(set(found) - set(classes))
        if unknown:
            raise DataError(
                f"{directory} has class folder(s) {', '.join(unknown[:5])} that the train folder lacks; "
                f"use the same class folders in train and test"
            )
        index = {c: i for i, c in enumerate(classes)}
        if _list_images(directory, False):
            warnings.warn(
                f"imagefolder: image files directly in {directory} are ignored (labels='folders')",
                SkippedImagesWarning,
                stacklevel=4,
            )
        return [(p, index[c]) for c in found for p in _list_images(directory / c, True)]

    def _classes(self, root: Path) -> list[str] | None:
        dirs = self._split_dirs(root)
        base = dirs["train"] if dirs else root
        if self._mode(base) == "none":
            return None
        return [d.name for d in _class_dirs(base)]

    @staticmethod
    def _held_out(path: Path, root: Path, fraction: float) -> bool:
        # a stable hash of the relative path: the same file lands in the same split on every machine
        digest = hashlib.blake2b(str(path.relative_to(root)).encode(), digest_size=8).digest()
        return int.from_bytes(digest, "little") / 2**64 < fraction

    # ---- interface ------------------------------------------------------------------------------------------
    def info(self) -> DatasetInfo:
        """``size`` (or ``max_side``, the largest side) colour; the number of class folders, or None for
        unlabelled images."""
        classes = self._classes(self._root())
        side = self.cfg.size if self.cfg.max_side is None else self.cfg.max_side
        return DatasetInfo(image_size=side, grayscale=False, num_classes=len(classes) if classes else None)

    def open_split(self, split: str) -> FolderSplit:
        """The readable images of ``split`` (decoded, resized, unreadable files skipped with a warning).

        Raises:
            ConfigError: an unknown split.
            DataError: no root, an empty folder, an ambiguous layout, no readable image, or ``test`` of an
                unlabelled folder.
        """
        if split not in self.splits:
            raise ConfigError(f"imagefolder has no split {split!r}; splits: {', '.join(self.splits)}")
        root = self._root()
        dirs = self._split_dirs(root)
        if dirs is not None:
            directory = dirs[split]
            if self._mode(dirs["train"]) == "none":
                files = [(p, -1) for p in _list_images(directory, True)]
            else:
                classes = [d.name for d in _class_dirs(dirs["train"])]
                files = self._labelled(directory, classes if split == "test" else None)
        elif self._mode(root) == "none":
            if split == "test":
                raise DataError(
                    f"{root} holds unlabelled images, so there is no test split to evaluate on; use class sub-folders "
                    f"(root/<class>/...) for kNN/linear evaluation"
                )
            files = [(p, -1) for p in _list_images(root, True)]
        else:
            labelled = self._labelled(root)
            frac = self.cfg.test_fraction
            if split == "test" and frac == 0.0:
                raise DataError(
                    f"imagefolder test_fraction is 0, so {root} has no test split; set dataset_kwargs.test_fraction "
                    f"(e.g. 0.1) or use root/train + root/test folders"
                )
            files = [(p, y) for p, y in labelled if self._held_out(p, root, frac) == (split == "test")]
        if not files:
            raise DataError(f"imagefolder split {split!r} of {root} is empty; add images or lower test_fraction")
        where = root if dirs is None else dirs[split]
        return FolderSplit(files, self.cfg.size, where, max_side=self.cfg.max_side, jpeg_quality=self.cfg.jpeg_quality)
