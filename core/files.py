"""Files that are either whole or absent: atomic writes and content hashes.

A crash, a full disk or a killed worker mid-write must never leave a truncated file under the final name that a
later run would trust (a checkpoint, a ``.beton`` manifest, a feature cache). Every writer therefore writes to a
temporary name in the same directory and renames it into place with ``os.replace``, which is atomic on POSIX
filesystems.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["atomic_path", "atomic_write_text", "sha256_file"]


@contextmanager
def atomic_path(path: str | Path, *, fsync: bool = False) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; when the block ends normally, move it to ``path`` in one step.

    On an exception the temporary file is removed and ``path`` is left as it was. ``fsync=True`` flushes the bytes
    to the device before the rename (checkpoints: a power loss after the rename must not leave an empty file).

    Example:
        >>> with atomic_path(out) as tmp:
        ...     torch.save(state, tmp)
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        yield tmp
        if fsync:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (readers see the old content or the new, never a part)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file's bytes, read in 4 MiB chunks (a multi-GB ``.beton`` never sits in memory)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
