"""Readers for dataset plugins: IDX files, restricted pickles, lazy array splits, raw-file lookup and the
torchvision download fallback.

Nothing here imports FFCV: dataset plugins only turn raw files into ``(HxWx3 uint8, int)`` samples; core writes
the ``.beton`` (:mod:`sslrun.core.data.cache`).

Example:
    >>> split = ArraySplit(np.zeros((10, 28, 28), dtype=np.uint8), np.arange(10))  # e.g. arrays from read_idx()
    >>> img, label = split[3]  # grayscale replicated to RGB
    >>> img.shape, label
    ((28, 28, 3), 3)
"""

from __future__ import annotations

import gzip
import pickle
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from sslrun.core.config import default_data_dir
from sslrun.core.errors import DataError

__all__ = [
    "ArraySplit",
    "ConcatSplit",
    "find_dir_with",
    "gray_to_rgb",
    "locate_or_download",
    "raw_cache_dir",
    "read_idx",
    "resolve_file",
    "restricted_pickle_load",
    "torchvision_download",
]

# IDX type codes (LeCun's MNIST format, http://yann.lecun.com/exdb/mnist/): 3rd byte of the magic number.
_IDX_DTYPES: dict[int, np.dtype[Any]] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def raw_cache_dir(name: str) -> Path:
    """Default place for a dataset's raw files: ``<sslrun cache>/raw/<name>`` (``~/.cache/sslrun/raw/<name>``)."""
    return Path(default_data_dir()) / "raw" / name


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (plain or ``.gz``) into an array of its declared dtype and shape.

    Args:
        path: the file, e.g. ``train-images-idx3-ubyte.gz``.

    Raises:
        DataError: the file is missing, not IDX, or shorter/longer than its header says.
    """
    p = Path(path)
    try:
        opener = gzip.open if p.suffix == ".gz" else open
        with opener(p, "rb") as f:
            data = f.read()
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise DataError(f"cannot read IDX file {p}: {exc}; replace it with an intact copy") from exc
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise DataError(f"{p} is not an IDX file (bad magic number); replace it with an intact copy")
    dtype, ndim = _IDX_DTYPES[data[2]], data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{p} is truncated (incomplete IDX header); replace it with an intact copy")
    shape = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) - header != expected:
        raise DataError(
            f"{p} has {len(data) - header} data bytes but its header {shape} says {expected}; "
            f"the file is truncated or corrupt, replace it with an intact copy"
        )
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler that only rebuilds numpy arrays and plain Python containers.

    CIFAR's "python version" batches are pickles; refusing every other global means a doctored file cannot run
    code when it is prepared.
    """

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._ALLOWED:
            if name == "encode":
                import codecs

                return codecs.encode
            if name in ("ndarray", "dtype"):
                return getattr(np, name)
            from numpy._core import multiarray

            return getattr(multiarray, name)
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a dataset pickle")


def restricted_pickle_load(path: str | Path) -> dict[str, Any]:
    """Load a dataset pickle (numpy arrays, lists, dicts only) with ``bytes`` keys turned into ``str``.

    Raises:
        DataError: unreadable, not a pickle, or not a dict.
    """
    p = Path(path)
    try:
        with open(p, "rb") as f:
            obj = _NumpyOnlyUnpickler(f, encoding="bytes").load()
    except (OSError, EOFError, pickle.UnpicklingError, ValueError, TypeError, AttributeError, IndexError) as exc:
        raise DataError(f"cannot read pickle {p}: {exc}; replace it with an intact copy") from exc
    if not isinstance(obj, dict):
        raise DataError(f"{p} does not hold a dict of arrays; is it the right file?")
    return {(k.decode("latin1") if isinstance(k, bytes) else str(k)): v for k, v in obj.items()}


def gray_to_rgb(img: np.ndarray) -> np.ndarray:
    """``(H, W)`` -> ``(H, W, 3)`` by replicating the channel (FFCV's RGBImageField needs 3 channels)."""
    return np.repeat(img[..., None], 3, axis=2)


class ArraySplit(Sequence[tuple[np.ndarray, int]]):
    """An indexable of ``(HxWx3 uint8, int)`` over in-memory (or memory-mapped) arrays.

    Args:
        images: ``(N, H, W)`` grayscale or ``(N, H, W, 3)`` uint8 arrays; or any array plus ``to_hwc`` which turns
            one element into ``HxWx3`` (e.g. STL-10's column-major layout).
        labels: ``(N,)`` integer labels, or None for an unlabelled split (every label is ``-1``).
        to_hwc: per-sample conversion applied on access (keeps memory-mapped files lazy).
    """

    def __init__(
        self,
        images: np.ndarray,
        labels: np.ndarray | None,
        to_hwc: Callable[[np.ndarray], np.ndarray] | None = None,
    ) -> None:
        if labels is not None and len(labels) != len(images):
            raise DataError(f"{len(images)} images but {len(labels)} labels; the raw files do not belong together")
        self.images = images
        self.labels = None if labels is None else np.asarray(labels, dtype=np.int64)
        if to_hwc is None:
            to_hwc = gray_to_rgb if images.ndim == 3 else (lambda x: x)
        self._to_hwc = to_hwc

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:  # type: ignore[override]
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        img = np.ascontiguousarray(self._to_hwc(np.asarray(self.images[i])), dtype=np.uint8)
        return img, (-1 if self.labels is None else int(self.labels[i]))


class ConcatSplit(Sequence[tuple[np.ndarray, int]]):
    """Several splits one after the other (STL-10's ``train+unlabeled``)."""

    def __init__(self, parts: Iterable[Sequence[tuple[np.ndarray, int]]]) -> None:
        self.parts = list(parts)
        self._ends = np.cumsum([len(p) for p in self.parts])

    def __len__(self) -> int:
        return int(self._ends[-1]) if len(self._ends) else 0

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:  # type: ignore[override]
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        k = int(np.searchsorted(self._ends, i, side="right"))
        start = 0 if k == 0 else int(self._ends[k - 1])
        return self.parts[k][i - start]


def find_dir_with(candidates: Iterable[Path], names: Sequence[str]) -> Path | None:
    """The first directory among ``candidates`` that holds every file in ``names`` (or its ``.gz`` twin)."""
    for d in candidates:
        if all((d / n).is_file() or (d / f"{n}.gz").is_file() or (d / n.removesuffix(".gz")).is_file() for n in names):
            return d
    return None


def resolve_file(directory: Path, name: str) -> Path:
    """``directory/name``, or its ``.gz`` / un-gzipped twin, whichever exists."""
    for cand in (name, f"{name}.gz", name.removesuffix(".gz")):
        if (directory / cand).is_file():
            return directory / cand
    return directory / name


def torchvision_download(dataset_class: str, root: Path, **kwargs: Any) -> None:
    """Download a dataset with ``torchvision.datasets.<dataset_class>(root, download=True)``.

    Kept as one function so that tests (and offline machines) can replace it.

    Raises:
        OSError / URLError / RuntimeError: whatever torchvision raises when the network is unreachable.
    """
    import socket

    import torchvision.datasets

    root.mkdir(parents=True, exist_ok=True)
    # urllib waits forever by default; behind a firewall that drops packets, "offline" must still end
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(60.0)
    try:
        getattr(torchvision.datasets, dataset_class)(root=str(root), download=True, **kwargs)
    finally:
        socket.setdefaulttimeout(previous)


def locate_or_download(
    dataset: str,
    root: str | None,
    download: bool,
    layouts: Sequence[str],
    needed: Sequence[str],
    tv_class: str,
    extra_dirs: Sequence[Path] = (),
    tv_kwargs: dict[str, Any] | None = None,
) -> Path:
    """Find the directory with a dataset's raw files, downloading them with torchvision when absent.

    Args:
        dataset: the plugin name (for messages and the default cache ``raw/<name>``).
        root: the user's ``root`` (None = the default cache dir and ``extra_dirs``).
        download: whether a download may be tried.
        layouts: sub-directories of a root that may hold the files (``""`` = the root itself; torchvision's
            layouts such as ``"FashionMNIST/raw"`` or ``"cifar-10-batches-py"``).
        needed: file names that must all be there.
        tv_class: the ``torchvision.datasets`` class that downloads them.
        extra_dirs: further roots searched when ``root`` is None (e.g. Debian's /usr/share/datasets/...).
        tv_kwargs: extra arguments for the torchvision class.

    Raises:
        DataError: the files are absent and cannot be downloaded; says which files to put where.
    """
    base = Path(root).expanduser() if root else raw_cache_dir(dataset)
    roots = [base] if root else [base, *extra_dirs]
    cands = [r / lay if lay else r for r in roots for lay in layouts]
    found = find_dir_with(cands, needed)
    if found is not None:
        return found
    if download:
        try:
            torchvision_download(tv_class, base, **(tv_kwargs or {}))
        except Exception as exc:
            reason = f"download failed ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
        else:
            found = find_dir_with([base / lay if lay else base for lay in layouts], needed)
            if found is not None:
                return found
            reason = "download finished but the files are still missing"
    else:
        reason = "download is disabled"
    where = base / layouts[0] if layouts[0] else base
    hint = " (or pass --root DIR / data.root)" if not root else ""
    raise DataError(
        f"{dataset}: raw files not found under {base} and {reason}; put {', '.join(needed)} in {where}{hint}"
    )
