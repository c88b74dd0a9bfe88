"""A driver's local data, sent to the nodes that cannot see it: ``sslrun launch --nodes N`` with no shared storage.

Without a store URI or a shared path as ``--data-dir``, the driver prepares each split in its own cache, and the
worker nodes have no way to read it. Before any training worker starts, :func:`ship_to_nodes` sends every split's
``.beton`` through Ray's object store to each node that lacks a verified copy:

- one :class:`Receiver` actor per such node (pinned there, no CPU reserved) first looks for a copy it already has:
  the driver's path itself (the data dir is shared, or the driver is on this node), then its own shipped copy
  (:func:`sslrun.core.data.staging.shipped_path`, under the node's stage root); either one whose size and sha256
  match the driver's manifest means nothing is sent;
- otherwise it takes the per-file lock (two launches on one node copy once), and the driver streams the file in
  :data:`CHUNK_BYTES` chunks (``$SSLRUN_SHIP_CHUNK_MB`` sets another size) of a memory-mapped read, at most
  :data:`WINDOW` chunks in flight, so neither the driver's memory nor the object store ever holds the whole file;
- the receiver hashes as it writes to a temporary name, compares size and sha256 with the manifest, then renames
  atomically and writes the manifest beside it; the workers' :func:`sslrun.core.data.cache.locate` finds it there.

A node whose copy fails is sent the file again, :data:`ATTEMPTS` times in all, then the launch stops with one line
naming the node; a node that prepared the split itself, at the driver's path but with other bytes, is one line at
once (ranks must all read the same file). Nodes that join later (an elastic run growing) get nothing from here:
their workers refuse to start with a line saying to pass ``--data-dir s3://...`` for clusters whose nodes change.
"""

from __future__ import annotations

import contextlib
import hashlib
import mmap
import os
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sslrun.core.config import DataCfg
from sslrun.core.data.manifest import Manifest, manifest_path
from sslrun.core.errors import ConfigError, DataError

__all__ = ["ATTEMPTS", "CHUNK_BYTES", "WINDOW", "Receiver", "chunk_bytes_from_env", "ship_to_nodes"]

Echo = Callable[[str], None]
CHUNK_BYTES = 64 << 20  # one object-store object; big enough that per-call overhead is small
WINDOW = 4  # chunks sent but not yet written on every node: bounds the object store's share of the file
ATTEMPTS = 3  # copies of one file to one node before the launch gives up
_PROGRESS_EVERY_S = 5.0
# A chunk written nowhere after this long means a stalled node (64 MiB at 0.1 MB/s): a failed attempt, not a hang.
_CHUNK_TIMEOUT_S = 600.0


class Receiver:
    """One node's end of the copies (a Ray actor pinned to that node): :meth:`begin` a file, :meth:`write` its
    chunks in order, :meth:`finish`. Plain Python, so that it is testable without Ray."""

    def __init__(self) -> None:
        self._lock: contextlib.ExitStack | None = None
        self._out: Any = None
        self._tmp: Path | None = None
        self._dest: Path | None = None
        self._manifest: Manifest | None = None
        self._hash: Any = None
        self._size = 0

    def begin(self, driver_path: str, data_dir: str, manifest_json: str) -> str | None:
        """Get ready to receive the file the driver has at ``driver_path``; returns the path of a verified copy
        this node already holds (nothing to send), or None (send it: the file's lock is held until
        :meth:`finish` or :meth:`abort`)."""
        from sslrun.core.data.staging import file_lock, is_current, shipped_path

        self.abort()
        manifest = Manifest.from_json(manifest_json, Path(driver_path))
        seen = Path(driver_path)
        if seen.exists():
            if is_current(seen, manifest):  # a shared data dir, or the driver's own node
                return str(seen)
            # This node prepared the split itself (same path, other bytes: another order of writing, say). Its
            # workers would read that file first, and ranks must all read the same one.
            raise ConfigError(
                f"{seen} on this node is not the driver's copy (its size or sha256 differ); remove it there so that "
                f"the driver's is used, or pass --data-dir s3://bucket/prefix (or a path every node shares)"
            )
        dest = shipped_path(data_dir, seen.parent.name, seen.name)
        lock = contextlib.ExitStack()
        lock.enter_context(file_lock(dest, "receiving"))
        if is_current(dest, manifest):  # shipped before, or by a launch that held the lock first
            lock.close()
            return str(dest)
        for stale in dest.parent.glob(f".{dest.name}.ship*"):  # left by a receiver that died; we hold the lock
            stale.unlink(missing_ok=True)
        self._lock, self._dest, self._manifest = lock, dest, manifest
        self._tmp = dest.with_name(f".{dest.name}.ship{os.getpid()}")
        self._out = open(self._tmp, "wb")  # noqa: SIM115 - closed by finish() or abort(), across calls
        self._hash, self._size = hashlib.sha256(), 0
        return None

    def write(self, chunk: Any) -> int:
        """Append the next chunk (any buffer: the object store's zero-copy array); returns the bytes so far."""
        if self._out is None:
            raise DataError("receiver: write() before begin(); the driver must begin a file first")
        self._out.write(chunk)
        self._hash.update(chunk)
        self._size += len(chunk)
        return self._size

    def finish(self) -> str:
        """Check size and sha256 against the manifest, then put the copy (and its manifest) in place; returns its
        path.

        Raises:
            DataError: the copy is not the driver's file (the temporary file is removed, nothing is put in place).
        """
        from sslrun.core.data.format import remember_verified
        from sslrun.core.files import atomic_write_text

        if self._out is None or self._tmp is None or self._dest is None or self._manifest is None:
            raise DataError("receiver: finish() before begin(); the driver must begin a file first")
        try:
            self._out.flush()
            os.fsync(self._out.fileno())
            self._out.close()
            m, size, sha = self._manifest, self._size, self._hash.hexdigest()
            if size != m.bytes:
                raise DataError(f"the copy is {size} bytes, the manifest says {m.bytes}")
            if sha != m.sha256:
                raise DataError("the copy does not match the manifest's sha256")
            os.replace(self._tmp, self._dest)
            atomic_write_text(manifest_path(self._dest), m.to_json())
            remember_verified(self._dest, m)
            return str(self._dest)
        finally:
            self.abort()

    def abort(self) -> None:
        """Drop a file being received (its temporary copy removed) and release its lock; harmless when idle."""
        if self._out is not None:
            self._out.close()
        if self._tmp is not None:
            self._tmp.unlink(missing_ok=True)
        if self._lock is not None:
            self._lock.close()
        self._lock = self._out = self._tmp = self._dest = self._manifest = None


def _driver_files(data_cfg: DataCfg, splits: list[str | None]) -> dict[Path, Manifest]:
    """The driver's verified local file and manifest of every split (None and the first split's name are one
    file)."""
    from sslrun.core.data.cache import locate
    from sslrun.core.data.format import verify_beton

    files: dict[Path, Manifest] = {}
    for split in splits:
        path = locate(data_cfg, split)
        files.setdefault(path, verify_beton(path))  # verified moments ago by the preflight: cached in-process
    return files


def _reason(exc: BaseException) -> str:
    """A failed receiver call in a few words: the receiver's own error, else the Ray error's last line."""
    cause = getattr(exc, "cause", None)
    text = str(cause if isinstance(cause, DataError | ConfigError | OSError) else exc).strip()
    return (text.splitlines()[-1] if text else type(exc).__name__)[:300]


def _refused(exc: BaseException) -> bool:
    """True when the receiver refused the copy for a reason another attempt cannot change."""
    return isinstance(getattr(exc, "cause", None), ConfigError)


def chunk_bytes_from_env() -> int:
    """Bytes per object-store chunk: ``$SSLRUN_SHIP_CHUNK_MB`` (MiB, may be fractional; smaller for a small
    object store), else :data:`CHUNK_BYTES`.

    Raises:
        ConfigError: the variable is not a positive number.
    """
    raw = os.environ.get("SSLRUN_SHIP_CHUNK_MB")
    if raw is None:
        return CHUNK_BYTES
    try:
        size = int(float(raw) * 2**20)
    except ValueError:
        size = 0
    if size <= 0:
        raise ConfigError(
            f"SSLRUN_SHIP_CHUNK_MB={raw!r} is not a positive number of MiB; unset it (default "
            f"{CHUNK_BYTES >> 20}) or give one such as 16"
        )
    return size


class _Sender:
    """Streams one file to a set of receivers (node id -> actor handle), dropping a node at its first failure."""

    def __init__(self, path: Path, manifest: Manifest, chunk_bytes: int, echo: Echo) -> None:
        self.path, self.manifest, self.chunk_bytes, self.echo = path, manifest, chunk_bytes, echo
        self.failed: dict[str, str] = {}

    def send(self, receivers: dict[str, Any]) -> dict[str, str]:
        """Send the file to every receiver; returns ``{node: path of its copy}`` of those that got it whole."""
        import numpy as np
        import ray

        live = dict(receivers)
        inflight: deque[list[tuple[str, Any]]] = deque()
        total = self.manifest.bytes
        t0 = shown = time.monotonic()
        with open(self.path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            for offset in range(0, total, self.chunk_bytes):
                if not live:
                    break
                count = min(self.chunk_bytes, total - offset)
                # numpy over the mapping: ray.put copies it straight into the object store, once
                chunk = ray.put(np.frombuffer(mm, dtype=np.uint8, count=count, offset=offset))
                inflight.append([(node, actor.write.remote(chunk)) for node, actor in live.items()])
                del chunk  # freed once every receiver has written it
                while len(inflight) > WINDOW:
                    self._settle(inflight.popleft(), live)
                now = time.monotonic()
                if now - shown >= _PROGRESS_EVERY_S:
                    self._progress(offset + count, total, now - t0, len(live))
                    shown = now
            while inflight:
                self._settle(inflight.popleft(), live)
        done = {node: actor.finish.remote() for node, actor in live.items()}
        copies = {}
        for node, ref in done.items():
            try:
                copies[node] = ray.get(ref, timeout=_CHUNK_TIMEOUT_S)
            except ray.exceptions.RayError as exc:
                self.failed[node] = _reason(exc)
        return copies

    def _settle(self, batch: list[tuple[str, Any]], live: dict[str, Any]) -> None:
        """Wait for one chunk's writes; a node whose write failed gets no more chunks."""
        import ray

        for node, ref in batch:
            try:
                ray.get(ref, timeout=_CHUNK_TIMEOUT_S)
            except ray.exceptions.RayError as exc:
                if node in live:
                    self.failed[node] = _reason(exc)
                    del live[node]

    def _progress(self, done: int, total: int, secs: float, nodes: int) -> None:
        rate = done / max(secs, 1e-9)
        eta = (total - done) / rate if rate > 0 else float("inf")
        self.echo(
            f"shipping {self.path} to {nodes} node(s): {done / 2**20:.0f}/{total / 2**20:.0f} MB, "
            f"{rate / 2**20:.1f} MB/s, ETA {eta:.0f} s"
        )


def _receiver(node: str) -> Any:
    """A :class:`Receiver` actor on ``node``, no CPU reserved (the workers need every core)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    cls = ray.remote(num_cpus=0, max_restarts=0)(Receiver)
    return cls.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote()


def _ship_file(
    path: Path, manifest: Manifest, data_dir: str, nodes: list[str], echo: Echo, *, chunk_bytes: int, attempts: int
) -> None:
    """Give every node in ``nodes`` a verified copy of ``path``, retrying a failed node, then one line naming it."""
    import ray

    pending, problems = list(nodes), {}
    for attempt in range(1, attempts + 1):
        actors = {node: _receiver(node) for node in pending}
        try:
            begun = {
                node: actor.begin.remote(str(path), data_dir, manifest.to_json()) for node, actor in actors.items()
            }
            sender = _Sender(path, manifest, chunk_bytes, echo)
            receivers = {}
            for node, ref in begun.items():
                try:
                    have = ray.get(ref)
                except ray.exceptions.RayError as exc:
                    if _refused(exc):
                        raise ConfigError(f"node {node[:12]}: {_reason(exc)}") from exc
                    sender.failed[node] = _reason(exc)
                    continue
                if have is None:
                    receivers[node] = actors[node]
            t0 = time.monotonic()
            copies = sender.send(receivers) if receivers else {}
            secs = max(time.monotonic() - t0, 1e-9)
            for node, copy in copies.items():
                mb = manifest.bytes / 2**20
                echo(f"data on node {node[:12]}: shipped {copy} ({mb:.1f} MB in {secs:.1f} s, {mb / secs:.1f} MB/s)")
        finally:
            for actor in actors.values():  # its exit releases any lock it still holds
                ray.kill(actor)
        problems = sender.failed
        for node, why in problems.items():
            echo(f"shipping {path} to node {node[:12]}: attempt {attempt}/{attempts} failed: {why}")
        pending = list(problems)
        if not pending:
            return
    node, why = next(iter(problems.items()))
    raise DataError(
        f"node {node[:12]}: cannot copy {path} there: {why} (after {attempts} attempts); check that node's disk "
        f"space and its stage directory ($SSLRUN_STAGE_DIR), or pass --data-dir s3://bucket/prefix"
    )


def ship_to_nodes(
    data_cfg: DataCfg,
    splits: list[str | None],
    nodes: list[str],
    echo: Echo,
    *,
    chunk_bytes: int | None = None,
    attempts: int = ATTEMPTS,
) -> None:
    """Give every node in ``nodes`` a verified copy of every split the driver prepared in its local data dir,
    sending only to nodes that have none. The caller is connected to Ray.

    Args:
        data_cfg: the run's data section; ``data_dir`` is a local path (a store URI is staged, not shipped).
        splits: the splits the workers read (None = the dataset's first split).
        nodes: Ray node ids that may host a worker.
        echo: where the driver's progress and one line per shipped copy go.
        chunk_bytes: bytes per object-store chunk; None = :func:`chunk_bytes_from_env`.
        attempts: copies of a file to one node before giving up.

    Raises:
        DataError: a node could not get a verified copy, in one line naming the node.
        ConfigError: a node holds another file at the driver's path, or ``$SSLRUN_SHIP_CHUNK_MB`` is invalid.
    """
    chunk_bytes = chunk_bytes_from_env() if chunk_bytes is None else chunk_bytes
    if chunk_bytes <= 0 or attempts <= 0:
        raise ValueError(f"chunk_bytes and attempts must be positive (got {chunk_bytes}, {attempts})")
    for path, manifest in _driver_files(data_cfg, splits).items():
        _ship_file(path, manifest, data_cfg.data_dir, nodes, echo, chunk_bytes=chunk_bytes, attempts=attempts)
