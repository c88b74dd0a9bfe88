"""Node-local copies of ``.beton`` files kept in object storage: each node copies a file once, verified.

FFCV memory-maps its file, so a dataset in a store (:mod:`sslrun.core.data.remote`) is read from a copy on the
node's own disk: ``<stage root>/<hash of the store URI>/<dataset>/<split>.beton`` with its manifest. The stage
root is ``$SSLRUN_STAGE_DIR``, else ``staged/`` under the default data cache: one per machine, shared by every
worker on it.

Copies that ``sslrun launch`` sends from a driver's local data dir to nodes that cannot see it are kept in the
same root, under ``shipped/`` (:func:`shipped_path`).

A copy is made under a lock per file (one copy per node, however many workers ask at once), downloaded to a
temporary name while its sha256 is computed, compared with the manifest's size and sha256, and only then renamed
into place: a partial or corrupt copy is never taken for a complete one. A bad copy is retried
:data:`ATTEMPTS` times, then one :class:`DataError` line. Progress (MB/s, ETA) goes to stderr.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from sslrun.core.config import default_data_dir
from sslrun.core.data.format import remember_verified, verify_beton
from sslrun.core.data.manifest import Manifest, manifest_path
from sslrun.core.data.remote import Store
from sslrun.core.errors import DataError
from sslrun.core.files import atomic_write_text

__all__ = ["ATTEMPTS", "file_lock", "is_current", "shipped_path", "stage", "stage_root"]

ATTEMPTS = 3  # downloads of one file before staging gives up
_CHUNK = 8 << 20
_PROGRESS_EVERY_S = 5.0


def stage_root() -> Path:
    """Where this node keeps its copies: ``$SSLRUN_STAGE_DIR``, else ``<default data dir>/staged`` (a local
    default: ``$SSLRUN_DATA_DIR`` may itself be a URI)."""
    if env := os.environ.get("SSLRUN_STAGE_DIR"):
        return Path(env).expanduser()
    base = default_data_dir()
    if "://" in base:
        base = str(Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "sslrun")
    return Path(base).expanduser() / "staged"


@contextlib.contextmanager
def file_lock(path: Path, doing: str = "preparing") -> Iterator[None]:
    """Exclusive lock on ``<path>.lock``: processes working on the same file at once wait for one of them."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = path.with_name(path.name + ".lock")
    with open(lock, "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"waiting for another process {doing} {path} ...", file=sys.stderr)
            t0 = time.monotonic()
            fcntl.flock(fh, fcntl.LOCK_EX)
            print(f"... done after {time.monotonic() - t0:.0f} s", file=sys.stderr)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def shipped_path(data_dir: str, folder: str, name: str) -> Path:
    """Where this node keeps a copy of ``<data_dir>/<folder>/<name>`` that ``sslrun launch`` sent it from a driver
    whose local data dir the node cannot see: ``<stage root>/shipped/<hash of data_dir>/<folder>/<name>``."""
    key = hashlib.sha256(str(data_dir).encode()).hexdigest()[:16]
    return stage_root() / "shipped" / key / folder / name


def is_current(local: Path, manifest: Manifest) -> bool:
    """True when ``local`` is an intact copy of the file ``manifest`` describes."""
    try:
        have = verify_beton(local)
    except DataError:
        return False
    return (have.sha256, have.bytes) == (manifest.sha256, manifest.bytes)


def _download(store: Store, parts: tuple[str, ...], tmp: Path, total: int) -> tuple[int, str]:
    """Copy ``parts`` to ``tmp``; returns ``(bytes, sha256)`` of what arrived. Prints progress."""
    h = hashlib.sha256()
    done, t0, shown = 0, time.monotonic(), time.monotonic()
    with store.fs.open_input_stream(store.path(*parts)) as src, open(tmp, "wb") as out:
        while block := src.read(_CHUNK):
            out.write(block)
            h.update(block)
            done += len(block)
            now = time.monotonic()
            if now - shown >= _PROGRESS_EVERY_S:
                rate = done / max(now - t0, 1e-9)
                eta = (total - done) / rate if rate > 0 else float("inf")
                print(
                    f"staging {store.url(*parts)}: {done / 2**20:.0f}/{total / 2**20:.0f} MB, "
                    f"{rate / 2**20:.1f} MB/s, ETA {eta:.0f} s",
                    file=sys.stderr,
                    flush=True,
                )
                shown = now
        out.flush()
        os.fsync(out.fileno())
    return done, h.hexdigest()


def stage(store: Store, dataset: str, split_file: str, manifest: Manifest, *, attempts: int = ATTEMPTS) -> Path:
    """The node-local copy of ``<store>/<dataset>/<split_file>``, copied now unless an intact one is there.

    Args:
        store: the data directory's store.
        dataset, split_file: where the file is in the store (``<dataset>/<split>.beton``).
        manifest: the store's manifest of that file (size and sha256 to check the copy against).
        attempts: downloads before giving up.

    Raises:
        DataError: every attempt gave a copy of the wrong size or sha256, or the store failed, in one line.
    """
    key = hashlib.sha256(store.url().encode()).hexdigest()[:16]
    local = stage_root() / key / dataset / split_file
    parts = (dataset, split_file)
    with file_lock(local, "staging"):
        if is_current(local, manifest):
            return local
        tmp = local.with_name(f".{local.name}.part{os.getpid()}")
        problem = ""
        try:
            for attempt in range(1, attempts + 1):
                t0 = time.monotonic()
                try:
                    size, sha = _download(store, parts, tmp, manifest.bytes)
                except OSError as exc:  # a dropped connection: try again
                    problem = f"download failed ({str(exc).splitlines()[0][:200]})"
                else:
                    if (size, sha) == (manifest.bytes, manifest.sha256):
                        os.replace(tmp, local)
                        atomic_write_text(manifest_path(local), manifest.to_json())
                        remember_verified(local, manifest)
                        secs = max(time.monotonic() - t0, 1e-9)
                        print(
                            f"staged {store.url(*parts)} -> {local}: {size / 2**20:.1f} MB in {secs:.1f} s "
                            f"({size / 2**20 / secs:.1f} MB/s)",
                            file=sys.stderr,
                            flush=True,
                        )
                        return local
                    what = "truncated" if size < manifest.bytes else "a different size"
                    problem = (
                        f"the copy is {size} bytes ({what}; manifest: {manifest.bytes})"
                        if size != manifest.bytes
                        else "the copy does not match the manifest's sha256"
                    )
                print(f"staging {store.url(*parts)}: attempt {attempt}/{attempts}: {problem}", file=sys.stderr)
        finally:
            tmp.unlink(missing_ok=True)
    raise DataError(
        f"cannot stage {store.url(*parts)} to {local}: {problem} after {attempts} attempts; prepare it again with "
        f"`sslrun data prepare {manifest.dataset} --split {manifest.split} --data-dir URI --force`"
    )
