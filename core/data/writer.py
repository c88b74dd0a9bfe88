"""Writing a prepared ``.beton``: FFCV's ``DatasetWriter`` driven step by step, with a watchdog over its processes.

Why not plain ``DatasetWriter.from_indexed_dataset``: if one of its worker processes raises, the parent busy-waits
forever (``ffcv/writer.py``, ``_write_common`` loops until every sample is counted) and leaves a partial file at
the final path. Here the first sample is validated and encoded in the parent, ``num_workers=1`` encodes in-process
(errors propagate normally), ``num_workers>1`` forks workers under a watchdog that checks their exit codes, and
the file is written to ``<path>.tmp-<host>-<pid>`` and renamed at the end, together with its manifest
(:mod:`sslrun.core.data.manifest`). The writer's own steps (``prepare``, ``handle_sample``, ``MemoryAllocator``,
``finalize``) are used as they are; only the loop of ``_write_common`` is replaced.

Interrupting is safe: Ctrl-C or SIGTERM stops the workers and deletes the temporary file; after a SIGKILL the
workers notice that their parent is gone and exit, and the next write to the same path deletes the orphaned
temporary file. A temporary file is never taken for a prepared one: only the final rename (after the manifest's
sha256 is computed) makes a file visible, and every process writes its own temporary name, so an orphaned worker
can never write into a newer run's file.

Memory stays bounded whatever the number of samples: each worker holds one FFCV page (2-8 MiB) and the sample it
is encoding; the parent holds the metadata table (about 30 bytes per sample). Samples are read (decoded) inside the
workers, one at a time.

Run it as its own process (``sslrun data prepare``, or the first rank that needs the file), never inside a Ray
worker's training thread: it forks.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import glob
import math
import multiprocessing as mp
import os
import queue
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from sslrun.core.data.ffcv_compat import import_ffcv
from sslrun.core.data.format import remember_verified
from sslrun.core.data.manifest import Manifest, manifest_path
from sslrun.core.data.samples import check_sample, jpeg_quality_for, page_size_for
from sslrun.core.errors import ConfigError, DataError, SslrunError
from sslrun.core.files import atomic_write_text, sha256_file
from sslrun.core.system import usable_cores

__all__ = ["write_beton"]

# Mean/std are estimated from at most this many pixels per image (exact for images up to 32x32).
_STATS_PIXELS = 1024
_MAX_LISTED_SKIPS = 1000  # skipped files named in the manifest (all of them are counted)
_PLAIN_PROGRESS_S = 30.0  # without a terminal (cluster logs): one progress line this often


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


def _rate_eta(done: int, total: int, elapsed: float) -> str:
    """``"412 img/s, ETA 51m 20s"`` (or ``"..."`` before the first sample)."""
    if done <= 0 or elapsed <= 0:
        return "... img/s"
    rate = done / elapsed
    left = int((total - done) / rate)
    eta = f"{left // 3600}h {left % 3600 // 60:02d}m" if left >= 3600 else f"{left // 60}m {left % 60:02d}s"
    return f"{rate:,.0f} img/s, ETA {eta}"


@contextlib.contextmanager
def _progress(total: int, description: str, enabled: bool) -> Iterator[Callable[[int], None]]:
    """Progress on stderr with img/s and ETA: a rich bar on a terminal, otherwise (logs of a cluster job) a plain
    line every 30 s; yields ``advance_to(done)``."""
    if not enabled:
        yield lambda done: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console(stderr=True)
    t0 = time.monotonic()
    if not console.is_terminal:
        last = [t0, -1.0]  # time and count of the last line

        def plain(done: int) -> None:
            # a line every 30 s, and a last one only after those: a preparation of a few seconds stays silent
            now = time.monotonic()
            due = now - last[0] >= _PLAIN_PROGRESS_S or (done >= total and last[1] >= 0)
            if due and done != last[1]:
                last[0], last[1] = now, done
                print(f"{description}: {done:,}/{total:,} ({_rate_eta(done, total, now - t0)})", file=sys.stderr)

        yield plain
        return
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    ) as bar:
        task = bar.add_task(description, total=total, rate="")
        yield lambda done: bar.update(task, completed=done, rate=_rate_eta(done, total, time.monotonic() - t0))


@contextlib.contextmanager
def _sigterm_as_exit() -> Iterator[None]:
    """SIGTERM raises SystemExit in the main thread while the file is written, so the cleanup below runs (workers
    stopped, temporary file and shared memory removed) instead of the process vanishing mid-write."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _tmp_path(output: Path) -> Path:
    """This process's temporary file for ``output``; orphans of dead processes on this host are deleted first."""
    host = socket.gethostname()
    for stale in output.parent.glob(f"{glob.escape(output.name)}.tmp-{glob.escape(host)}-*"):
        pid = stale.name.rsplit("-", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            with contextlib.suppress(OSError):
                stale.unlink()
    return output.with_name(f"{output.name}.tmp-{host}-{os.getpid()}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


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
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # the parent's SIGTERM handler is not ours to run
    parent = os.getppid()
    try:
        metadata = np.frombuffer(shm.buf, dtype=metadata_type)
        stats = _PixelStats()

        def done(k: int) -> None:
            with counter.get_lock():
                counter.value += k
            if os.getppid() != parent:  # the parent was killed: its file is abandoned, stop writing into it
                os._exit(1)

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
    """Fork ``num_workers`` encoders and watch them: a dead worker is a DataError, never a hang."""
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
    jpeg_quality: int | None = None,
    progress: bool = True,
) -> Manifest:
    """Write ``samples`` as an FFCV .beton (fields ``image``, ``label``) plus its manifest, atomically.

    Args:
        samples: indexable of ``(HxWx3 uint8, int)`` (a dataset plugin's ``open_split``).
        output: the ``.beton`` path; its manifest is ``<output>.json``.
        dataset, split, num_classes, grayscale: recorded in the manifest.
        fmt: ``raw`` (exact pixels; best for small images) or ``jpg`` (quality ``jpeg_quality``; smaller files).
            A split may list the raw files it left out (unreadable) as ``samples.skipped`` (strings); they are
            counted and listed in the manifest.
        num_workers: 1 encodes (and reads the samples) in this process; more forks writer processes under a
            watchdog; 0 = one per usable core.
        dataset_config: the dataset plugin's config, recorded so a cache with other settings is re-prepared.
        jpeg_quality: JPEG quality (1-100) for ``fmt="jpg"``; recorded in the manifest. None: the split's own
            ``samples.jpeg_quality`` when it has one (a dataset setting, e.g. imagefolder's), else 90 (FFCV's
            default).
        progress: show progress (images, img/s, ETA) on stderr.

    Returns:
        The :class:`Manifest` written next to the file.

    Raises:
        DataError: no samples, a sample that is not ``(HxWx3 uint8, int)`` (named by index), or a writer failure.
            Nothing is left at ``output`` on failure.
        ConfigError: an unknown ``fmt``, ``num_workers < 0``, a JPEG quality outside 1-100, or a JPEG quality
            asked for with ``fmt="raw"``.
    """
    if fmt not in ("raw", "jpg"):
        raise ConfigError(f"unknown image format {fmt!r}; use 'raw' (exact pixels) or 'jpg' (smaller files)")
    if num_workers < 0:
        raise ConfigError(f"num_workers must be >= 0 (0 = one per usable core), got {num_workers}")
    jpeg_quality = jpeg_quality_for(jpeg_quality, samples, fmt)
    num_workers = num_workers or usable_cores()
    output = Path(output)
    where = f"{dataset}/{split}"
    n = len(samples)
    if n == 0:
        raise DataError(f"{where} has no samples; nothing to write to {output}")
    first_img, _ = check_sample(samples[0], 0, where, num_classes, None)
    page_size = page_size_for(first_img.nbytes, n)

    def check(sample: Any, i: int) -> tuple:
        return check_sample(sample, i, where, num_classes, page_size)

    import_ffcv()
    from ffcv import fields as ffcv_fields
    from ffcv import writer as ffcv_writer

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

    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        tmp = _tmp_path(output)
    except OSError as exc:  # a file in the way, no permission
        raise DataError(f"cannot write {output}: {exc}; free some space or choose another place") from exc
    num_workers = max(1, min(num_workers, n))
    writer = ffcv_writer.DatasetWriter(str(tmp), fields, page_size=page_size, num_workers=num_workers)
    writer.num_samples = n
    with _sigterm_as_exit():  # SIGTERM cleans up like Ctrl-C
        try:
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
            skipped = [str(x) for x in getattr(samples, "skipped", ())]
            values, counts = np.unique(labels, return_counts=True)
            mean, std = _PixelStats.mean_std(stat_parts)
            manifest = Manifest(
                dataset=dataset,
                split=split,
                num_samples=n,
                image_size=[int(img_meta["height"].max()), int(img_meta["width"].max())],
                image_size_min=[int(img_meta["height"].min()), int(img_meta["width"].min())],
                grayscale=bool(grayscale),
                num_classes=num_classes,
                mean=mean,
                std=std,
                bytes=tmp.stat().st_size,
                sha256=sha256_file(tmp),
                label_histogram={int(v): int(c) for v, c in zip(values, counts, strict=True)},
                image_format=fmt,
                jpeg_quality=jpeg_quality if fmt == "jpg" else None,
                skipped=len(skipped),
                skipped_files=skipped[:_MAX_LISTED_SKIPS],
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
            if isinstance(exc, KeyboardInterrupt | SystemExit):
                print(f"interrupted: nothing was written to {output}", file=sys.stderr)
            if isinstance(exc, OSError):  # disk full, no permission, a directory in the way
                raise DataError(f"cannot write {output}: {exc}; free some space or choose another place") from exc
            raise
    remember_verified(output, manifest)
    return manifest
