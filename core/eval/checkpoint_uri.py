"""Checkpoints named by URI: ``--checkpoint s3://bucket/runs/name/...`` for ``sslrun eval`` and ``sslrun export``.

A URI may name (``s3://``, ``gs://`` or any ``pyarrow.fs`` URI; an S3-compatible store through its query,
``?endpoint_override=host:port&scheme=http``):

* a checkpoint file (``<prefix>/checkpoint.pt``, ``<prefix>/last.pt``);
* a Ray Train checkpoint directory (``<storage_path>/<name>/checkpoint_<time>/``, holding ``checkpoint.pt``);
* a mirrored run directory (``<storage_path>/<name>/run/``, holding ``checkpoints/last.pt``);
* a run's storage directory (``<storage_path>/<name>``): its newest Ray Train checkpoint, else its mirrored
  ``run/checkpoints/last.pt``.

The file is downloaded once into a local cache, ``$SSLRUN_CHECKPOINT_CACHE`` (default
``~/.cache/sslrun/checkpoints``), as ``<key>/checkpoint.pt``, where the key is the sha256 of the object's location,
size and modification time: a checkpoint replaced under the same name is downloaded again, an unchanged one never.
The download goes to a temporary name and is renamed into place once its size is checked, so the cache never holds
a partial file under the final name. Store failures are one :class:`ConfigError` line within the bounded time of
:mod:`sslrun.core.data.remote`.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from sslrun.core.data.remote import Store, is_uri, open_store
from sslrun.core.errors import CheckpointError
from sslrun.core.files import atomic_path, atomic_write_text

__all__ = [
    "MIRROR_DIR",
    "RAY_CHECKPOINT_FILE",
    "RUN_CHECKPOINT",
    "checkpoint_cache",
    "fetch_checkpoint",
    "local_checkpoint",
]

#: Where :class:`sslrun.cluster.mirror.RunMirror` copies a run's output directory: ``<storage_path>/<name>/run``.
MIRROR_DIR = "run"
#: The sslrun checkpoint inside each Ray Train checkpoint directory.
RAY_CHECKPOINT_FILE = "checkpoint.pt"
#: The newest trainer checkpoint, relative to a run's output directory (and to its mirror).
RUN_CHECKPOINT = "checkpoints/last.pt"
_CACHED_NAME = "checkpoint.pt"
_CHUNK = 8 << 20


def checkpoint_cache() -> Path:
    """The local cache of downloaded checkpoints: ``$SSLRUN_CHECKPOINT_CACHE``, else
    ``$XDG_CACHE_HOME/sslrun/checkpoints`` (``~/.cache/sslrun/checkpoints``)."""
    if env := os.environ.get("SSLRUN_CHECKPOINT_CACHE"):
        return Path(env).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "sslrun" / "checkpoints"


def local_checkpoint(checkpoint: str | Path, *, echo: bool = True) -> str | Path:
    """``checkpoint`` itself when it is a local path; for a URI, the local copy of the checkpoint it names
    (see :func:`fetch_checkpoint`)."""
    if not is_uri(checkpoint):
        return checkpoint
    return fetch_checkpoint(str(checkpoint), echo=echo)[0]


def fetch_checkpoint(uri: str, *, echo: bool = True) -> tuple[Path, str]:
    """The local copy of the checkpoint a URI names, downloaded now unless the cache holds this version of it.

    Args:
        uri: a URI as the module docstring lists.
        echo: print one line on stderr saying where the file came from and whether it was downloaded now.

    Returns:
        ``(local file, the checkpoint file's URI without the query)``.

    Raises:
        ConfigError: the store cannot be reached, or refuses the credentials (one line, bounded time).
        CheckpointError: nothing at the URI, or no sslrun checkpoint under it.
    """
    store = open_store(uri)
    path, size, mtime_ns = _find_checkpoint(store)
    target = checkpoint_cache() / _cache_key(store, path, size, mtime_ns) / _CACHED_NAME
    shown = _display(store, path)
    if target.is_file() and target.stat().st_size == size:
        if echo:
            print(f"checkpoint {shown} -> {target} (cached)", file=sys.stderr, flush=True)
        return target, shown
    started = time.monotonic()
    _download(store, path, size, target)
    atomic_write_text(target.parent / "source.json", json.dumps({"uri": shown, "bytes": size}))
    if echo:
        secs = max(time.monotonic() - started, 1e-6)
        print(
            f"checkpoint {shown} -> {target} (downloaded, {size / 1e6:.1f} MB in {secs:.1f} s)",
            file=sys.stderr,
            flush=True,
        )
    return target, shown


def _display(store: Store, path: str) -> str:
    """``scheme://path`` of a store path, without the URI's query (it may hold credentials)."""
    return f"{urlsplit(store.uri).scheme}://{path}"


def _cache_key(store: Store, path: str, size: int, mtime_ns: int) -> str:
    """Where the object lives (scheme, endpoint, path) and which version of it (size, mtime): no credentials."""
    endpoint = parse_qs(urlsplit(store.uri).query).get("endpoint_override", [""])[0]
    what = f"{urlsplit(store.uri).scheme}|{endpoint}|{path}|{size}|{mtime_ns}"
    return hashlib.sha256(what.encode()).hexdigest()[:32]


def _find_checkpoint(store: Store) -> tuple[str, int, int]:
    """``(store path, size, mtime ns)`` of the checkpoint file the URI names (see the module docstring).

    Raises:
        CheckpointError: nothing at the URI, or no checkpoint file under it.
    """
    import pyarrow.fs

    info = store.call(lambda: store.fs.get_file_info(store.root), "looking up the checkpoint")
    if info.type == pyarrow.fs.FileType.File:
        return info.path, int(info.size or 0), _mtime_ns(info)
    if info.type == pyarrow.fs.FileType.NotFound:
        store.check(write=False)  # a missing bucket is said as such
        raise CheckpointError(
            f"{store.url()} does not exist; check the URI (a checkpoint file, a Ray checkpoint_* directory, or "
            f"<storage-path>/<name> of a run)"
        )
    selector = pyarrow.fs.FileSelector(store.root, recursive=True)
    listing = store.call(lambda: store.fs.get_file_info(selector), "listing the checkpoint directory")
    files = {f.path[len(store.root) :].lstrip("/"): f for f in listing if f.type == pyarrow.fs.FileType.File}
    chosen = _choose(files)
    if chosen is None:
        raise CheckpointError(
            f"{store.url()} holds no sslrun checkpoint ({RAY_CHECKPOINT_FILE}, {RUN_CHECKPOINT}, or "
            f"checkpoint_*/{RAY_CHECKPOINT_FILE}); point --checkpoint at a checkpoint file or a run's "
            f"<storage-path>/<name>"
        )
    found = files[chosen]
    return found.path, int(found.size or 0), _mtime_ns(found)


def _choose(files: dict[str, Any]) -> str | None:
    """The checkpoint among ``files`` (paths relative to the URI): the directory's own file first, else the newest
    Ray Train checkpoint (their names are start times, so name order is age order), else the mirrored one."""
    for direct in (RAY_CHECKPOINT_FILE, RUN_CHECKPOINT):
        if direct in files:
            return direct
    ray = sorted(
        p for p in files if p.startswith("checkpoint_") and p.count("/") == 1 and p.endswith(f"/{RAY_CHECKPOINT_FILE}")
    )
    if ray:
        return ray[-1]
    mirrored = f"{MIRROR_DIR}/{RUN_CHECKPOINT}"
    return mirrored if mirrored in files else None


def _mtime_ns(info: Any) -> int:
    """A file's modification time in ns (0 where the store reports none)."""
    return int(getattr(info, "mtime_ns", None) or 0)


def _download(store: Store, path: str, size: int, target: Path) -> None:
    """Copy ``path`` to ``target`` through a temporary name; the size is checked before the rename.

    Each request (the open, then every 8 MiB read) is bounded like any other store call, so a stalled transfer
    fails in bounded time while a slow but moving one goes on.

    Raises:
        ConfigError: the store failed mid-way (one line).
        CheckpointError: the copy has another size than the store listed (the object changed while reading).
    """
    with atomic_path(target) as tmp:
        src = store.call(lambda: store.fs.open_input_stream(path), f"opening {_display(store, path)}")
        written = 0
        try:
            with open(tmp, "wb") as out:
                while block := store.call(lambda: src.read(_CHUNK), f"downloading {_display(store, path)}"):
                    out.write(block)
                    written += len(block)
        finally:
            src.close()
        if written != size:
            raise CheckpointError(
                f"{_display(store, path)}: downloaded {written} bytes but the store lists {size}; it changed while "
                f"being read: run the command again"
            )
