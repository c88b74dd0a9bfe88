"""Prepared data: FFCV ``.beton`` files with a JSON manifest, written atomically, verified before use, cached.

A prepared split is ``<data_dir>/<dataset>/<split>.beton`` with two fields, ``image`` (``RGBImageField``, raw by
default, HxWx3 uint8; grayscale replicated to 3 channels) and ``label`` (``IntField``, -1 where there is none),
plus ``<file>.beton.json``::

    {"format": "sslrun-beton/1", "dataset", "split", "num_samples", "image_size": [H, W] (max), "grayscale",
     "num_classes", "mean": [r, g, b] (0..1), "std", "bytes", "sha256", "label_histogram": {label: count},
     "image_format": "raw"|"jpg", "fields": [[name, type], ...], "dataset_config": {...}, "created"}

Why a manifest: FFCV 1.0.2 checks only the header version, so a tail-truncated or bit-flipped file iterates with no
error (STACK-NOTES A3n) and a foreign file fails deep inside numba. :func:`verify_beton` checks the layout, the size
(always) and the sha256 (files under 2 GiB) and turns every problem into one :class:`DataError` line; a verified
``(path, mtime, size)`` is remembered in-process so repeated calls cost a ``stat``.

Why not plain ``DatasetWriter.from_indexed_dataset``: if one of its worker processes raises, the parent busy-waits
forever and leaves a partial file at the final path (STACK-NOTES A3m). Here the first sample is validated and encoded
in the parent, ``num_workers=1`` encodes in-process (errors propagate normally), ``num_workers>1`` forks workers
under a watchdog that checks their exit codes, and the file is written to ``<path>.tmp`` and renamed at the end.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import fcntl
import json
import math
import multiprocessing as mp
import os
import queue
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sslrun.core.config import DataCfg, coerce_dataclass
from sslrun.core.errors import ConfigError, DataError, SslrunError
from sslrun.core.files import atomic_write_text
from sslrun.core.files import sha256_file as _sha256_file

__all__ = [
    "FIELDS",
    "FORMAT",
    "BetonReader",
    "Manifest",
    "cached_path",
    "dataset_from_cfg",
    "ensure_prepared",
    "manifest_path",
    "prepare_dataset",
    "prepare_split",
    "verify_beton",
    "write_beton",
]

FORMAT = "sslrun-beton/1"
#: The fields every sslrun .beton has, in file order: (name, FFCV field type).
FIELDS: tuple[tuple[str, str], ...] = (("image", "RGBImageField"), ("label", "IntField"))
#: Files up to this size get a full sha256 check in verify_beton; larger ones only the size check.
SHA256_LIMIT = 2 << 30
# Mean/std are estimated from at most this many pixels per image (exact for images up to 32x32).
_STATS_PIXELS = 1024
_MIN_PAGE = 1 << 21

# ---- the .beton binary layout (ffcv/types.py, format version 2) ------------------------------------------------
# Spelled out here so that verifying and inspecting a file does not import ffcv: `import ffcv` costs seconds
# (numba) and sets torch's thread count to 1 (STACK-NOTES A0). tests/test_beton.py checks they equal ffcv's.
_BETON_VERSION = 2
_HEADER = np.dtype(
    [
        ("version", "<u2"),
        ("num_fields", "<u2"),
        ("page_size", "<u4"),
        ("num_samples", "<u8"),
        ("alloc_table_ptr", "<u8"),
    ],
    align=True,
)
_FIELD_DESC = np.dtype([("type_id", "<u1"), ("name", ("<u1", 16)), ("arguments", ("<u1", (1024,)))], align=True)
_ALLOC = np.dtype([("sample_id", "<u8"), ("ptr", "<u8"), ("size", "<u8")])
_TYPE_NAMES = {
    0: "FloatField",
    1: "IntField",
    2: "RGBImageField",
    3: "BytesField",
    4: "NDArrayField",
    5: "JSONField",
    6: "TorchTensorField",
    255: "custom",
}
_IMAGE_META = np.dtype([("mode", "<u1"), ("width", "<u2"), ("height", "<u2"), ("data_ptr", "<u8")])
_SAMPLE_META = np.dtype([("image", _IMAGE_META), ("label", "<i8")], align=True)
_MODE_JPG, _MODE_RAW = 0, 1


# ---- manifest ---------------------------------------------------------------------------------------------------
@dataclass
class Manifest:
    """What was prepared, and how to recognise the exact file (``bytes``, ``sha256``).

    Attributes:
        dataset: dataset plugin name; split: its split.
        num_samples: number of (image, label) records.
        image_size: ``[H, W]``, the largest image height and width.
        grayscale: images are grayscale replicated to 3 channels (models may use ``x[:, :1]``).
        num_classes: classes of the dataset, None when unknown/unlabelled.
        mean, std: per-channel statistics of the pixels in [0, 1] (for normalisation).
        bytes, sha256: size and checksum of the .beton.
        label_histogram: ``{label: count}`` (-1 = unlabelled).
        image_format: ``raw`` or ``jpg``.
        fields: ``[[name, FFCV field type], ...]`` in file order.
        dataset_config: the dataset plugin's Config used (minus ``download``); a cache with other settings is
            prepared again.
    """

    dataset: str
    split: str
    num_samples: int
    image_size: list[int]
    grayscale: bool
    num_classes: int | None
    mean: list[float]
    std: list[float]
    bytes: int
    sha256: str
    label_histogram: dict[int, int]
    image_format: str = "raw"
    fields: list[list[str]] = field(default_factory=lambda: [list(f) for f in FIELDS])
    dataset_config: dict[str, Any] | None = None
    created: str = ""
    format: str = FORMAT

    def to_json(self) -> str:
        """The manifest as JSON (histogram keys become strings)."""
        data = dataclasses.asdict(self)
        data["label_histogram"] = {str(k): v for k, v in sorted(self.label_histogram.items())}
        return json.dumps(data, indent=1)

    @classmethod
    def from_json(cls, text: str, where: Path) -> Manifest:
        """Parse and check a manifest; :class:`DataError` naming ``where`` if it is not one."""
        try:
            data = json.loads(text)
            if not isinstance(data, dict):
                raise ValueError("not a JSON object")
            if data.get("format") != FORMAT:
                raise ValueError(f"format is {data.get('format')!r}, expected {FORMAT!r}")
            data["label_histogram"] = {int(k): int(v) for k, v in data["label_histogram"].items()}
            names = {f.name for f in dataclasses.fields(cls)}
            m = cls(**{k: v for k, v in data.items() if k in names})
            if len(m.image_size) != 2 or len(m.mean) != 3 or len(m.std) != 3 or m.num_samples < 0:
                raise ValueError("image_size/mean/std have the wrong length")
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise DataError(f"manifest {where} is not a valid sslrun manifest ({exc}); prepare the data again") from exc
        return m


def manifest_path(path: str | Path) -> Path:
    """The manifest sidecar of a .beton: ``<file>.beton.json``."""
    p = Path(path)
    return p.with_name(p.name + ".json")


# ---- writing ----------------------------------------------------------------------------------------------------
class _PixelStats:
    """Running per-channel sums for mean/std, on at most ``_STATS_PIXELS`` pixels per image."""

    def __init__(self) -> None:
        self.s = np.zeros(3, np.int64)
        self.q = np.zeros(3, np.int64)
        self.n = 0

    def add(self, img: np.ndarray) -> None:
        px = img.reshape(-1, 3)
        step = max(1, math.ceil(len(px) / _STATS_PIXELS))
        a = px[::step].astype(np.int64)
        self.s += a.sum(0)
        self.q += np.einsum("ij,ij->j", a, a)
        self.n += len(a)

    def as_array(self) -> np.ndarray:
        return np.array([*self.s, *self.q, self.n], dtype=np.int64)

    @staticmethod
    def mean_std(parts: np.ndarray) -> tuple[list[float], list[float]]:
        tot = parts.reshape(-1, 7).sum(0).astype(np.float64)
        n = max(tot[6], 1.0)
        mean = tot[:3] / n
        var = np.maximum(tot[3:6] / n - mean**2, 0.0)
        return [round(float(x), 6) for x in mean / 255.0], [round(float(x), 6) for x in np.sqrt(var) / 255.0]


def _check_sample(sample: Any, i: int, where: str, num_classes: int | None, page_size: int | None) -> tuple:
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
    if page_size is not None and img.nbytes > page_size // 2:
        raise DataError(
            f"{where}: sample {i} image {img.shape} is much larger than the first one; resize the images to a "
            f"common size (e.g. imagefolder's size) before preparing"
        )
    if isinstance(label, bool) or not isinstance(label, int | np.integer):
        raise DataError(f"{where}: sample {i} label is {label!r}; expected an int (-1 for unlabelled)")
    label = int(label)
    if label < -1 or (num_classes is not None and label >= num_classes):
        raise DataError(f"{where}: sample {i} label {label} is outside -1..{(num_classes or 0) - 1}")
    return np.ascontiguousarray(img), label


def _import_ffcv() -> Any:
    """Import ffcv's writer parts without letting it change torch's thread count (STACK-NOTES A0)."""
    torch = sys.modules.get("torch")
    threads = torch.get_num_threads() if torch is not None else None
    from ffcv import fields, writer

    if threads is not None:
        sys.modules["torch"].set_num_threads(threads)
    return fields, writer


def _page_size(first_nbytes: int, n: int) -> int:
    # small sets: FFCV's smallest page (2 MiB) keeps files small (about a page of slack per writer); big sets:
    # FFCV's 8 MiB default. Always room for a sample twice as large as the first one.
    base = _MIN_PAGE if first_nbytes * n < (1 << 30) else 4 * _MIN_PAGE
    return max(base, 1 << math.ceil(math.log2(max(2 * first_nbytes, 1))))


@contextlib.contextmanager
def _progress(total: int, description: str, enabled: bool) -> Iterator[Callable[[int], None]]:
    """A rich progress bar on stderr; yields ``advance_to(done)``."""
    if not enabled:
        yield lambda done: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        transient=False,
    ) as bar:
        task = bar.add_task(description, total=total)
        yield lambda done: bar.update(task, completed=done)


def _encode_range(
    samples: Sequence[Any],
    chunks: Sequence[tuple[int, int]],
    metadata: np.ndarray,
    allocator: Any,
    fields: dict[str, Any],
    stats: _PixelStats,
    check: Callable[[Any, int], tuple],
    done: Callable[[int], None],
) -> None:
    from ffcv.writer import handle_sample

    names = metadata.dtype.names
    with allocator:  # flushes the last page on exit
        for start, stop in chunks:
            for i in range(start, stop):
                try:
                    sample = samples[i]
                except SslrunError:
                    raise
                except Exception as exc:  # a reader bug or I/O error: one line naming the sample
                    raise DataError(f"reading sample {i} failed ({type(exc).__name__}: {exc})") from exc
                img, label = check(sample, i)
                stats.add(img)
                try:
                    handle_sample((img, label), i, names, metadata, allocator, fields)
                except OSError:
                    raise  # the disk, not the sample: reported by write_beton
                except Exception as exc:
                    raise DataError(f"encoding sample {i} failed ({type(exc).__name__}: {exc})") from exc
            done(stop - start)


def _worker(
    w: int,
    samples: Sequence[Any],
    chunks: list[tuple[int, int]],
    shm: Any,
    metadata_type: np.dtype,
    allocator: Any,
    fields: dict[str, Any],
    check: Callable[[Any, int], tuple],
    counter: Any,
    stats_out: Any,
    results: Any,
    errors: Any,
) -> None:
    """Body of a forked writer process: encode its chunks, then report allocations and pixel sums."""
    try:
        metadata = np.frombuffer(shm.buf, dtype=metadata_type)
        stats = _PixelStats()

        def done(k: int) -> None:
            with counter.get_lock():
                counter.value += k

        _encode_range(samples, chunks, metadata, allocator, fields, stats, check, done)
        stats_out[w * 7 : (w + 1) * 7] = stats.as_array().tolist()
        del metadata
        results.put((w, allocator.allocations))
    except BaseException as exc:
        errors.put(str(exc) if isinstance(exc, SslrunError) else f"{type(exc).__name__}: {exc}")
        sys.exit(1)


def _encode_in_workers(
    samples: Sequence[Any],
    writer: Any,
    allocator: Any,
    fields: dict[str, Any],
    check: Callable[[Any, int], tuple],
    num_workers: int,
    advance: Callable[[int], None],
    where: str,
) -> tuple[list[Any], np.ndarray]:
    """Fork ``num_workers`` encoders and watch them: a dead worker is a DataError, never a hang (A3m)."""
    ctx = mp.get_context("fork")  # samples (often big arrays or lazy readers) are inherited, not pickled
    n = len(samples)
    chunk = max(1, min(1000, math.ceil(n / (num_workers * 8))))
    all_chunks = [(s, min(s + chunk, n)) for s in range(0, n, chunk)]
    counter = ctx.Value("Q", 0)
    stats_out = ctx.Array("q", 7 * num_workers, lock=False)
    results, errors = ctx.Queue(), ctx.Queue()
    procs = [
        ctx.Process(
            target=_worker,
            args=(w, samples, all_chunks[w::num_workers], writer.metadata_sm, writer.metadata_type, allocator,
                  fields, check, counter, stats_out, results, errors),
            daemon=True,
        )
        for w in range(num_workers)
    ]  # fmt: skip
    for p in procs:
        p.start()
    allocations: dict[int, list[Any]] = {}
    try:
        while len(allocations) < num_workers:
            try:
                w, allocs = results.get(timeout=0.1)
                allocations[w] = allocs
            except queue.Empty:
                pass
            advance(counter.value)
            failed = [p for p in procs if p.exitcode not in (None, 0)]
            ended = all(p.exitcode is not None for p in procs)
            if failed or (ended and results.empty() and len(allocations) < num_workers):
                try:
                    msg = errors.get(timeout=2.0)
                except queue.Empty:
                    code = failed[0].exitcode if failed else 0
                    msg = f"a writer process died (exit code {code}) without a message"
                raise DataError(f"{where}: {msg}" if not msg.startswith(where) else msg)
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
        for p in procs:
            p.join(5)
            if p.is_alive():
                p.kill()
                p.join()
    return [a for w in sorted(allocations) for a in allocations[w]], np.frombuffer(stats_out, dtype=np.int64).copy()


def write_beton(
    samples: Sequence[tuple[np.ndarray, int]],
    output: str | Path,
    *,
    dataset: str,
    split: str,
    num_classes: int | None,
    grayscale: bool,
    fmt: str = "raw",
    num_workers: int = 1,
    dataset_config: dict[str, Any] | None = None,
    jpeg_quality: int = 90,
    progress: bool = True,
) -> Manifest:
    """Write ``samples`` as an FFCV .beton (fields ``image``, ``label``) plus its manifest, atomically.

    Args:
        samples: indexable of ``(HxWx3 uint8, int)`` (a dataset plugin's ``open_split``).
        output: the ``.beton`` path; its manifest is ``<output>.json``.
        dataset, split, num_classes, grayscale: recorded in the manifest.
        fmt: ``raw`` (exact pixels; best for small images) or ``jpg`` (quality ``jpeg_quality``; smaller files).
        num_workers: 1 encodes in this process; more forks writer processes under a watchdog.
        dataset_config: the dataset plugin's config, recorded so a cache with other settings is re-prepared.
        progress: show a rich progress bar on stderr.

    Returns:
        The :class:`Manifest` written next to the file.

    Raises:
        DataError: no samples, a sample that is not ``(HxWx3 uint8, int)`` (named by index), or a writer failure.
            Nothing is left at ``output`` on failure.
        ConfigError: an unknown ``fmt`` or ``num_workers < 1``.
    """
    if fmt not in ("raw", "jpg"):
        raise ConfigError(f"unknown image format {fmt!r}; use 'raw' (exact pixels) or 'jpg' (smaller files)")
    if num_workers < 1:
        raise ConfigError(f"num_workers must be >= 1, got {num_workers}")
    output = Path(output)
    where = f"{dataset}/{split}"
    n = len(samples)
    if n == 0:
        raise DataError(f"{where} has no samples; nothing to write to {output}")
    first_img, _ = _check_sample(samples[0], 0, where, num_classes, None)
    page_size = _page_size(first_img.nbytes, n)

    def check(sample: Any, i: int) -> tuple:
        return _check_sample(sample, i, where, num_classes, page_size)

    ffcv_fields, ffcv_writer = _import_ffcv()
    fields = {
        "image": ffcv_fields.RGBImageField(write_mode=fmt, jpeg_quality=jpeg_quality),
        "label": ffcv_fields.IntField(),
    }
    # Encode the first sample in the parent: an encoder error surfaces here, not inside a writer process.
    scratch = np.zeros(1, dtype=ffcv_writer.get_metadata_type(list(fields.values())))
    try:
        for f, value, col in zip(fields.values(), check(samples[0], 0), scratch.dtype.names, strict=True):
            f.encode(scratch[col][0:1], value, lambda size: (0, np.zeros(size, np.uint8)))
    except Exception as exc:
        raise DataError(f"{where}: FFCV cannot encode sample 0 ({type(exc).__name__}: {exc})") from exc

    tmp = output.with_name(output.name + ".tmp")
    num_workers = max(1, min(num_workers, n))
    writer = ffcv_writer.DatasetWriter(str(tmp), fields, page_size=page_size, num_workers=num_workers)
    writer.num_samples = n
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        writer.prepare()  # header + field descriptors; shared-memory metadata table
        try:
            allocator = ffcv_writer.MemoryAllocator(str(tmp), writer.data_region_start, page_size)
            with _progress(n, f"preparing {where}", progress) as advance:
                if num_workers == 1:
                    # A private table, copied into the shared block at the end: a numpy view of the shared
                    # memory caught in an exception's traceback would keep it from being closed.
                    meta = np.zeros(n, dtype=writer.metadata_type)
                    stats = _PixelStats()
                    count = [0]

                    def done(k: int) -> None:
                        count[0] += k
                        advance(count[0])

                    step = max(1, min(1000, n // 100 or 1))
                    chunks = [(s, min(s + step, n)) for s in range(0, n, step)]
                    try:
                        _encode_range(samples, chunks, meta, allocator, fields, stats, check, done)
                    except DataError as exc:
                        raise DataError(str(exc) if str(exc).startswith(where) else f"{where}: {exc}") from None
                    writer.metadata_sm.buf[: meta.nbytes] = meta.tobytes()
                    allocations, stat_parts = allocator.allocations, stats.as_array()
                else:
                    allocations, stat_parts = _encode_in_workers(
                        samples, writer, allocator, fields, check, num_workers, advance, where
                    )
                    meta = np.frombuffer(bytes(writer.metadata_sm.buf[: n * writer.metadata_type.itemsize]),
                                         dtype=writer.metadata_type)  # fmt: skip
                advance(n)
            writer.finalize(allocations)
        finally:
            writer.metadata_sm.close()
            writer.metadata_sm.unlink()
        labels = meta[meta.dtype.names[1]]
        img_meta = meta[meta.dtype.names[0]]
        values, counts = np.unique(labels, return_counts=True)
        mean, std = _PixelStats.mean_std(stat_parts)
        manifest = Manifest(
            dataset=dataset,
            split=split,
            num_samples=n,
            image_size=[int(img_meta["height"].max()), int(img_meta["width"].max())],
            grayscale=bool(grayscale),
            num_classes=num_classes,
            mean=mean,
            std=std,
            bytes=tmp.stat().st_size,
            sha256=_sha256_file(tmp),
            label_histogram={int(v): int(c) for v, c in zip(values, counts, strict=True)},
            image_format=fmt,
            dataset_config=dataset_config,
            created=_dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        )
        mpath = manifest_path(output)
        mpath.unlink(missing_ok=True)  # an old manifest must never describe the new file
        os.replace(tmp, output)
        atomic_write_text(mpath, manifest.to_json())
    except BaseException as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(exc, OSError):  # disk full, no permission, a directory in the way
            raise DataError(f"cannot write {output}: {exc}; free some space or choose another place") from exc
        raise
    _remember(output, manifest)
    return manifest


# ---- verification -----------------------------------------------------------------------------------------------
_VERIFIED: dict[tuple[str, int, int, int, int], Manifest] = {}


def _verify_key(path: Path) -> tuple[str, int, int, int, int] | None:
    try:
        st, ms = path.stat(), manifest_path(path).stat()
    except OSError:
        return None
    return (str(path.resolve()), st.st_mtime_ns, st.st_size, ms.st_mtime_ns, ms.st_size)


def _remember(path: Path, manifest: Manifest) -> None:
    key = _verify_key(path)
    if key is not None:
        _VERIFIED[key] = manifest


def _read_layout(path: Path, size: int) -> tuple[np.void, list[tuple[str, str]]]:
    """Header and ``[(field name, field type)]`` of a .beton; ValueError if it is not one."""
    with open(path, "rb") as f:
        raw = f.read(_HEADER.itemsize)
        if len(raw) < _HEADER.itemsize:
            raise ValueError(f"only {size} bytes, too short for a .beton header")
        header = np.frombuffer(raw, dtype=_HEADER)[0]
        if int(header["version"]) != _BETON_VERSION:
            raise ValueError(f"header version {int(header['version'])}, expected {_BETON_VERSION}")
        nf = int(header["num_fields"])
        if not 1 <= nf <= 64:
            raise ValueError(f"{nf} fields in the header")
        raw = f.read(_FIELD_DESC.itemsize * nf)
        if len(raw) < _FIELD_DESC.itemsize * nf:
            raise ValueError("the field descriptors are cut off")
    descs = np.frombuffer(raw, dtype=_FIELD_DESC)
    fields = []
    for d in descs:
        name = bytes(d["name"]).split(b"\0", 1)[0].decode("ascii", "replace")
        fields.append((name, _TYPE_NAMES.get(int(d["type_id"]), f"unknown type {int(d['type_id'])}")))
    return header, fields


def verify_beton(path: str | Path) -> Manifest:
    """Check that ``path`` is an intact sslrun .beton and return its manifest.

    Checks, in order: the file exists; it has a .beton header with fields ``image`` (RGBImageField) and ``label``
    (IntField); its manifest exists and is valid; sample count, size and (under 2 GiB) sha256 match the manifest.
    A verified ``(path, mtime, size)`` is cached in-process.

    Raises:
        DataError: one line naming the file, what is wrong and how to prepare it again.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise DataError(
            f"{p} does not exist{' (it is a directory)' if p.is_dir() else ''}; pass a prepared .beton or create "
            f"one with `sslrun data prepare NAME --output {p}`"
        )
    key = _verify_key(p)
    if key is not None and key in _VERIFIED:
        return _VERIFIED[key]
    size = p.stat().st_size
    generic = f"prepare it again with `sslrun data prepare NAME --output {p}`"
    try:
        header, fields = _read_layout(p, size)
    except (OSError, ValueError) as exc:
        raise DataError(f"{p} is not an FFCV .beton ({exc}); {generic}") from exc
    if [tuple(f) for f in fields] != list(FIELDS):
        got = ", ".join(f"{n} ({t})" for n, t in fields)
        raise DataError(
            f"{p} has fields {got}; sslrun needs image (RGBImageField) and label (IntField): it was not written by "
            f"`sslrun data prepare`; {generic}"
        )
    mpath = manifest_path(p)
    if not mpath.is_file():
        raise DataError(f"{p} has no manifest {mpath.name} (an interrupted or foreign write); {generic}")
    try:
        manifest = Manifest.from_json(mpath.read_text(), mpath)
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read manifest {mpath} ({exc}); {generic}") from exc
    again = f"prepare it again with `sslrun data prepare {manifest.dataset} --split {manifest.split} --output {p}`"
    if int(header["num_samples"]) != manifest.num_samples:
        raise DataError(
            f"{p} holds {int(header['num_samples'])} samples but its manifest says {manifest.num_samples}; {again}"
        )
    if size != manifest.bytes:
        what = "truncated" if size < manifest.bytes else "longer than written"
        raise DataError(f"{p} is {size} bytes but its manifest says {manifest.bytes} ({what}); {again}")
    if not int(header["alloc_table_ptr"]) <= size:
        raise DataError(f"{p} points past its own end (corrupt header); {again}")
    if size < SHA256_LIMIT and _sha256_file(p) != manifest.sha256:
        raise DataError(f"{p} does not match its manifest's sha256 (corrupt or modified); {again}")
    if key is not None:
        _VERIFIED[key] = manifest
    return manifest


# ---- reading without the FFCV loader (inspect, tests) ------------------------------------------------------------
class BetonReader:
    """Random access to the samples of a verified .beton with numpy (raw) or OpenCV (jpg), no numba JIT.

    For inspection and image grids; training reads through the FFCV loaders of :mod:`sslrun.core.data.loader`.

    Example:
        >>> r = BetonReader("train.beton")  # doctest: +SKIP
        >>> img, label = r[0]  # (H, W, 3) uint8, int
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.manifest = verify_beton(self.path)
        header, _ = _read_layout(self.path, self.path.stat().st_size)
        offset = _HEADER.itemsize + _FIELD_DESC.itemsize * len(FIELDS)
        self.meta = np.fromfile(self.path, dtype=_SAMPLE_META, count=int(header["num_samples"]), offset=offset)
        self._data = np.memmap(self.path, dtype=np.uint8, mode="r")
        table = np.frombuffer(self._data[int(header["alloc_table_ptr"]) :].tobytes(), dtype=_ALLOC)
        order = np.argsort(table["ptr"])
        self._ptrs, self._sizes = table["ptr"][order], table["size"][order]

    def __len__(self) -> int:
        return len(self.meta)

    @property
    def labels(self) -> np.ndarray:
        """All labels, ``(N,)`` int64."""
        return self.meta["label"].astype(np.int64)

    @property
    def sizes(self) -> np.ndarray:
        """``(N, 2)`` image heights and widths."""
        return np.stack([self.meta["image"]["height"], self.meta["image"]["width"]], 1).astype(np.int64)

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        m = self.meta[i]
        img_m = m["image"]
        h, w, ptr = int(img_m["height"]), int(img_m["width"]), int(img_m["data_ptr"])
        if int(img_m["mode"]) == _MODE_RAW:
            img = np.array(self._data[ptr : ptr + h * w * 3]).reshape(h, w, 3)
        else:
            import cv2

            k = int(np.searchsorted(self._ptrs, ptr))
            buf = np.asarray(self._data[ptr : ptr + int(self._sizes[k])])
            bgr = cv2.imdecode(buf, cv2.IMREAD_COLOR)
            if bgr is None or bgr.shape[:2] != (h, w):
                raise DataError(f"{self.path}: sample {i} is not a decodable JPEG; prepare the data again")
            img = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
        return img, int(m["label"])


# ---- the cache ----------------------------------------------------------------------------------------------------
def dataset_from_cfg(data_cfg: DataCfg) -> tuple[Any, dict[str, Any]]:
    """The dataset plugin instance for ``data_cfg`` and its config as plain data (for the manifest).

    ``data.root`` fills the plugin's ``root`` unless ``dataset_kwargs`` sets it.
    """
    from sslrun.core.plugins.registry import get_registry

    cls = get_registry("dataset").get(data_cfg.dataset)
    kwargs = dict(data_cfg.dataset_kwargs)
    names = {f.name for f in dataclasses.fields(cls.Config)}
    if data_cfg.root is not None and "root" in names:
        kwargs.setdefault("root", data_cfg.root)
    cfg = coerce_dataclass(cls.Config, kwargs, f"data.dataset_kwargs ({data_cfg.dataset})")
    plain = json.loads(json.dumps(dataclasses.asdict(cfg), default=str))
    plain.pop("download", None)  # how the raw files were obtained does not change the data
    return cls(cfg), plain


def cached_path(data_cfg: DataCfg, split: str) -> Path:
    """``<data_dir>/<dataset>/<split>.beton``."""
    safe = data_cfg.dataset.replace(os.sep, "_")
    return Path(data_cfg.data_dir).expanduser() / safe / f"{split.replace(os.sep, '_')}.beton"


def _resolve_split(ds: Any, split: str | None, name: str) -> str:
    if split is None:
        return ds.splits[0]
    if split not in ds.splits:
        raise ConfigError(f"dataset {name!r} has no split {split!r}; splits: {', '.join(ds.splits)}")
    return split


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Exclusive lock so that ranks preparing the same split at once wait for one writer."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = path.with_name(path.name + ".lock")
    with open(lock, "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"waiting for another process preparing {path} ...", file=sys.stderr)
            t0 = time.monotonic()
            fcntl.flock(fh, fcntl.LOCK_EX)
            print(f"... done after {time.monotonic() - t0:.0f} s", file=sys.stderr)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _cache_mismatch(m: Manifest, name: str, split: str, fmt: str, config: dict[str, Any]) -> str | None:
    if (m.dataset, m.split) != (name, split):
        return f"it holds {m.dataset}/{m.split}"
    if m.image_format != fmt:
        return f"it stores {m.image_format} images, {fmt} was asked for"
    if m.dataset_config != config:
        changed = sorted(
            k for k in set(config) | set(m.dataset_config or {}) if config.get(k) != (m.dataset_config or {}).get(k)
        )
        return f"the dataset settings changed ({', '.join(changed)})"
    return None


def prepare_split(
    data_cfg: DataCfg,
    split: str | None = None,
    *,
    output: str | Path | None = None,
    force: bool = False,
    num_workers: int = 1,
    progress: bool = True,
) -> tuple[Path, Manifest, bool]:
    """Prepare one split (or reuse the cached file). Returns ``(path, manifest, written)``.

    Args:
        data_cfg: dataset name, kwargs, root, cache dir and image format.
        split: a split of the dataset; None = its first split (the pretraining split).
        output: write here instead of the cache (always written).
        force: write even if a valid cached file with the same settings exists.
        num_workers: writer processes (1 = in this process).
        progress: show a progress bar.

    Raises:
        DataError / ConfigError / PluginError: one line saying what is wrong.
    """
    ds, config = dataset_from_cfg(data_cfg)
    split = _resolve_split(ds, split, data_cfg.dataset)
    path = Path(output).expanduser() if output is not None else cached_path(data_cfg, split)
    fmt = data_cfg.format
    # the lock is for the shared cache (ranks preparing at once); an explicit --output is the user's own file
    with _file_lock(path) if output is None else contextlib.nullcontext():
        if output is None and not force and path.exists():
            try:
                m = verify_beton(path)
            except DataError as exc:
                warnings.warn(f"cached {path} is unusable ({exc}); preparing it again", stacklevel=2)
            else:
                why = _cache_mismatch(m, data_cfg.dataset, split, fmt, config)
                if why is None:
                    return path, m, False
                print(f"re-preparing {path}: {why}", file=sys.stderr)
        info = ds.info()
        samples = ds.open_split(split)
        manifest = write_beton(
            samples,
            path,
            dataset=data_cfg.dataset,
            split=split,
            num_classes=info.num_classes,
            grayscale=info.grayscale,
            fmt=fmt,
            num_workers=num_workers,
            dataset_config=config,
            progress=progress,
        )
    return path, manifest, True


def prepare_dataset(
    data_cfg: DataCfg,
    split: str | None = None,
    *,
    output: str | Path | None = None,
    force: bool = False,
    num_workers: int = 1,
    progress: bool = True,
) -> list[tuple[str, Path, Manifest, bool]]:
    """What ``sslrun data prepare`` does: one split, or (``split=None``, no ``output``) the pretraining split and,
    for labelled data, the evaluation splits. Returns ``[(split, path, manifest, written)]``.

    Raises:
        ConfigError: ``output`` without a single split for a dataset whose splits would all need one.
        DataError / PluginError: as :func:`prepare_split`.
    """
    ds, _ = dataset_from_cfg(data_cfg)
    if split is not None or output is not None:
        splits = [_resolve_split(ds, split, data_cfg.dataset)]
    else:
        splits = [ds.splits[0]]
        if ds.eval_splits and ds.info().num_classes is not None:
            splits += [s for s in ds.eval_splits if s not in splits]
    out = []
    for s in splits:
        path, manifest, written = prepare_split(
            data_cfg, s, output=output, force=force, num_workers=num_workers, progress=progress
        )
        out.append((s, path, manifest, written))
    return out


def ensure_prepared(
    data_cfg: DataCfg, split: str | None = None, *, num_workers: int = 1, progress: bool = True
) -> Path:
    """The cached ``<data_dir>/<dataset>/<split>.beton``, prepared on first use and reused (verified) afterwards.

    Re-prepared when the cached file fails verification, or was prepared with other dataset settings or image
    format. Safe to call from several processes at once (a file lock lets one of them write).

    Args:
        data_cfg: the experiment's data section.
        split: a split name; None = the dataset's first split.

    Raises:
        DataError / ConfigError / PluginError: one line saying what is wrong.
    """
    path, _, _ = prepare_split(data_cfg, split, num_workers=num_workers, progress=progress)
    return path
