"""A copy of the run's output directory in the run's storage, so that losing rank 0's node loses nothing.

With ``--storage-path s3://bucket/runs`` (or ``gs://``, or any ``pyarrow.fs`` URI) Ray Train keeps its checkpoints
in ``<storage_path>/<name>/checkpoint_*``, but the rest of the run lives in the output directory on rank 0's node.
:class:`RunMirror` copies that rest to ``<storage_path>/<name>/run/``, laid out as the output directory is:

* ``config.toml``, ``metrics.jsonl``, ``launch.jsonl``;
* ``tb/`` (TensorBoard event files);
* ``checkpoints/last.pt`` (the newest trainer checkpoint).

Rank 0 calls :meth:`RunMirror.sync_in_background` at every checkpoint (the checkpoint cadence is the only trigger,
and the copy runs in a helper thread so the training step never waits for the network) and :meth:`RunMirror.close`
once at the end of training (a last, waited-for copy). Only files whose size or modification time changed since
they were last copied are sent. A file appears in the store whole or not at all: S3 and GCS uploads become visible
only when complete; on other stores (``file://``, HDFS) it is written to a temporary name and renamed.

A resume on another node calls :meth:`RunMirror.restore` first: the mirrored files the new output directory lacks
(``metrics.jsonl``, ``launch.jsonl``, ``tb/``) are copied back, so the run's history goes on instead of being
replaced by a shorter one.

A storage failure is one warning line on stderr and never stops training: the next checkpoint tries again. With a
local storage path (the default ``OUTPUT/ray``) the mirror does nothing: the output directory is already local.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

from sslrun.core.data.remote import Store, is_uri, open_store
from sslrun.core.eval.checkpoint_uri import MIRROR_DIR, RUN_CHECKPOINT
from sslrun.core.files import atomic_path

__all__ = ["MIRROR_DIR", "MIRROR_STATE", "RunMirror"]

#: Sizes and mtimes of the copied files, written last by every sync that copied something: a mirror started
#: again over the same output directory (a restarted worker) sends only what changed since.
MIRROR_STATE = ".sslrun-mirror.json"
#: What is copied: files relative to the output directory, and directories copied whole.
_FILES = ("config.toml", "metrics.jsonl", "launch.jsonl", RUN_CHECKPOINT)
_DIRS = ("tb",)
_CLOSE_WAIT_S = 600.0  # the final copy of a large checkpoint over a slow link; then give up with a warning
_CHUNK = 8 << 20

Stat = tuple[int, int]  # (size, mtime_ns)


class RunMirror:
    """Copies a run's products from its output directory to ``<storage_path>/<name>/run/``.

    Args:
        output: the run's local output directory.
        storage_path: the run's storage (``RunConfig.storage_path``); a local path disables the mirror.
        name: the run's name (``RunConfig.name``).
        warn: where the one-line warnings go (default: stderr).

    Attributes:
        enabled: False for a local storage path (nothing to do).
        url: where the copy goes, for messages (the URI's query left out).
        uploaded: paths (relative to ``output``) copied by the latest sync.
    """

    def __init__(self, output: Path, storage_path: str, name: str, warn: Callable[[str], None] | None = None) -> None:
        self.output = Path(output)
        self.storage_path = storage_path
        self.name = name
        self.enabled = is_uri(storage_path)
        self.url = f"{storage_path.split('?', 1)[0].rstrip('/')}/{name}/{MIRROR_DIR}"
        self.uploaded: list[str] = []
        self._warn = warn or _stderr
        self._store: Store | None = None
        self._copied: dict[str, Stat] | None = None  # None until the store's state file has been read
        self._lock = threading.Lock()  # one sync at a time
        self._thread: threading.Thread | None = None
        self._again = threading.Event()  # a checkpoint arrived while a copy was running: copy once more after it

    # ---- the API the Ray hooks call ------------------------------------------------------------------------
    def sync(self) -> list[str]:
        """Copy every changed product now and wait for it; returns what was copied (relative paths).

        Never raises for a storage failure: it becomes one warning line and the files stay marked as not
        copied, so the next sync sends them.
        """
        if not self.enabled:
            return []
        with self._lock:
            try:
                self.uploaded = self._sync()
            except Exception as exc:  # any failure of the store: never stop training for it
                self.uploaded = []
                self._warn(f"warning: copying the run to {self.url} failed ({_first_line(exc)}); training goes on")
            return list(self.uploaded)

    def sync_in_background(self) -> None:
        """Start a copy in a helper thread and return at once; if one is running, it copies once more after."""
        if not self.enabled:
            return
        if self._thread is not None and self._thread.is_alive():
            self._again.set()
            return
        self._thread = threading.Thread(target=self._background, name="sslrun-run-mirror", daemon=True)
        self._thread.start()

    def close(self, timeout: float = _CLOSE_WAIT_S) -> None:
        """Wait for a running copy, then copy once more (the end of training): the store ends up complete."""
        if not self.enabled:
            return
        self._again.clear()
        final = threading.Thread(target=self._after_running, name="sslrun-run-mirror-final", daemon=True)
        final.start()
        final.join(timeout)
        if final.is_alive():
            self._warn(f"warning: copying the run to {self.url} did not finish within {timeout:.0f} s; giving up")

    def restore(self) -> list[str]:
        """Copy the mirrored files the output directory lacks back into it; returns what was copied.

        For a resume on a node that never held the output directory (rank 0's old node is gone): called before
        the trainer opens ``metrics.jsonl`` and ``launch.jsonl`` for appending, it makes them continue their
        history instead of starting a shorter one that the next sync would upload over the full copy. Files that
        exist locally are left alone, and so are checkpoints (the trainer resumes from Ray Train's). A storage
        failure is one warning line, as for :meth:`sync`.
        """
        if not self.enabled:
            return []
        with self._lock:
            try:
                return self._restore()
            except Exception as exc:  # any failure of the store: the run resumes with what it has
                self._warn(f"warning: restoring the run from {self.url} failed ({_first_line(exc)}); training goes on")
                return []

    # ---- internals ---------------------------------------------------------------------------------------
    def _restore(self) -> list[str]:
        import pyarrow.fs

        store = self._open()
        root = store.path(self.name, MIRROR_DIR)
        selector = pyarrow.fs.FileSelector(root, recursive=True, allow_not_found=True)
        listing = store.call(lambda: store.fs.get_file_info(selector), "listing the mirrored run")
        copied: list[str] = []
        for info in listing:
            rel = info.path[len(root) :].lstrip("/")
            if info.type != pyarrow.fs.FileType.File or rel == MIRROR_STATE or rel.startswith("checkpoints/"):
                continue
            local = self.output / rel
            if local.exists():
                continue
            with atomic_path(local) as tmp, store.fs.open_input_stream(info.path) as src, open(tmp, "wb") as out:
                while block := src.read(_CHUNK):
                    out.write(block)
            copied.append(rel)
        return sorted(copied)

    def _background(self) -> None:
        self.sync()
        while self._again.is_set():
            self._again.clear()
            self.sync()

    def _after_running(self) -> None:
        if self._thread is not None:
            self._thread.join()
        self.sync()

    def _sync(self) -> list[str]:
        store = self._open()
        copied = self._state(store)
        sent: list[str] = []
        for rel, stat in self._products():
            if copied.get(rel) == stat:
                continue
            # the stat is taken before reading: a file that grows while it is copied differs next time
            self._put(store, self.output / rel, rel)
            copied[rel] = stat
            sent.append(rel)
        if sent:
            body = json.dumps({"files": {k: list(v) for k, v in sorted(copied.items())}}).encode()
            self._put_bytes(store, body, MIRROR_STATE)
        return sent

    def _open(self) -> Store:
        if self._store is None:
            self._store = open_store(self.storage_path)
        return self._store

    def _state(self, store: Store) -> dict[str, Stat]:
        """What was copied already: this object's memory, else the state file a previous mirror left."""
        if self._copied is None:
            parts = (self.name, MIRROR_DIR, MIRROR_STATE)
            self._copied = {}
            if store.size(*parts) is not None:

                def read() -> bytes:
                    with store.fs.open_input_stream(store.path(*parts)) as f:
                        return f.read()

                try:
                    files = json.loads(store.call(read, f"reading {MIRROR_STATE}"))["files"]
                    self._copied = {str(k): (int(v[0]), int(v[1])) for k, v in files.items()}
                except (ValueError, KeyError, TypeError, IndexError):
                    self._copied = {}  # unreadable: copy everything once
        return self._copied

    def _products(self) -> Iterator[tuple[str, Stat]]:
        """``(relative path, (size, mtime_ns))`` of every product present now."""
        candidates = [self.output / f for f in _FILES]
        for d in _DIRS:
            if (self.output / d).is_dir():
                candidates += sorted(p for p in (self.output / d).rglob("*") if p.is_file())
        for path in candidates:
            try:
                st = path.stat()
            except FileNotFoundError:
                continue  # not written yet (launch.jsonl in a plain run), or replaced right now
            yield path.relative_to(self.output).as_posix(), (st.st_size, st.st_mtime_ns)

    def _put(self, store: Store, local: Path, rel: str) -> None:
        """Copy one file (the open file keeps its bytes even if the trainer renames a new one into place)."""
        with open(local, "rb") as src:
            self._write(store, rel, src.read)

    def _put_bytes(self, store: Store, data: bytes, rel: str) -> None:
        chunks = iter([data])
        self._write(store, rel, lambda _n: next(chunks, b""))

    def _write(self, store: Store, rel: str, read: Callable[[int], bytes]) -> None:
        """Stream ``read`` into ``run/<rel>``: straight to the object on S3/GCS (an upload becomes visible only
        once complete), through a temporary name and a rename elsewhere.

        Not bounded by a timeout: an abandoned upload would go on and race the next one for the same object. The
        first contact of every sync is bounded (:meth:`_state`), and :meth:`close` bounds the wait at the end.
        """
        final = store.path(self.name, MIRROR_DIR, *rel.split("/"))
        atomic_put = _atomic_puts(store)
        dest = final if atomic_put else f"{final}.tmp{os.getpid()}"
        if atomic_put:
            with store.fs.open_output_stream(dest) as out:
                while block := read(_CHUNK):
                    out.write(block)
            return
        store.fs.create_dir(dest.rpartition("/")[0], recursive=True)
        try:
            with store.fs.open_output_stream(dest) as out:
                while block := read(_CHUNK):
                    out.write(block)
            store.fs.move(dest, final)
        except BaseException:
            with contextlib.suppress(OSError):
                store.fs.delete_file(dest)  # no temporary file left behind
            raise


def _atomic_puts(store: Store) -> bool:
    """Whether a written object becomes visible only once complete (S3 and GCS uploads)."""
    import pyarrow.fs

    atomic = [pyarrow.fs.S3FileSystem]
    if hasattr(pyarrow.fs, "GcsFileSystem"):
        atomic.append(pyarrow.fs.GcsFileSystem)
    return isinstance(store.fs, tuple(atomic))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)
