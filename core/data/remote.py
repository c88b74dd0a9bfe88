"""Object storage as a data directory: ``--data-dir s3://bucket/prefix`` (or ``gs://``, or an S3-compatible store
through the URI's query, ``s3://bucket/data?endpoint_override=host:port&scheme=http``), reached through
``pyarrow.fs``.

A prepared split in a store is ``<uri>/<dataset>/<split>.beton`` plus its manifest ``<split>.beton.json``. The
manifest is uploaded last, so a store that lists a manifest holds the whole ``.beton`` it describes; readers still
check the size (here) and the sha256 (when staging, :mod:`sslrun.core.data.staging`).

Every failure of the store (unknown scheme, missing bucket, rejected credentials, unreachable endpoint, no write
permission) becomes one :class:`ConfigError` line naming the URI and what to do, within :data:`PROBE_TIMEOUT_S`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

from sslrun.core.data.manifest import Manifest
from sslrun.core.errors import ConfigError, DataError

__all__ = ["PROBE_TIMEOUT_S", "Store", "check_manifest_matches", "is_uri", "open_store"]

T = TypeVar("T")
#: How long a first contact with a store may take before it counts as unreachable.
PROBE_TIMEOUT_S = 25.0
_SCHEMES = ("s3", "gs", "gcs", "hdfs", "viewfs", "file")
_CHUNK = 8 << 20


def is_uri(path: str | Path) -> bool:
    """True for ``scheme://...`` (a store), False for a local path."""
    return "://" in str(path)


def _bounded(fn: Callable[[], T], what: str, timeout: float = PROBE_TIMEOUT_S) -> T:
    """``fn()`` in a daemon thread, abandoned after ``timeout`` s: pyarrow retries an unreachable endpoint (GCS
    asks a metadata server first) for longer than a user should wait for a typo."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:  # handed to the caller below
            box["error"] = exc

    thread = threading.Thread(target=run, name="sslrun-store-probe", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise ConfigError(f"{what}: no answer after {timeout:.0f} s (unreachable endpoint?); check the URI's host")
    if "error" in box:
        raise box["error"]
    return box["value"]


def _explain(uri: str, exc: BaseException) -> str:
    """What a pyarrow store error means, in words a user can act on."""
    text = str(exc)
    low = text.lower()
    if "no_such_bucket" in low or "bucket does not exist" in low or "nosuchbucket" in low:
        return "the bucket does not exist; create it or fix the bucket name"
    if any(k in low for k in ("invalidaccesskeyid", "signaturedoesnotmatch", "invalid_access_key", "credentials")):
        return "the credentials were rejected or are missing; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
    if "access_denied" in low or "accessdenied" in low or "403" in low:
        return (
            "access denied: the credentials are wrong, missing or lack permission for this bucket; check "
            "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
        )
    if "network_connection" in low or "could not connect" in low or "curlcode" in low:
        return "cannot connect to the endpoint; check endpoint_override / the network"
    return text.splitlines()[0][:300] if text else type(exc).__name__


@dataclass
class Store:
    """A ``pyarrow.fs`` filesystem and the root path the URI names in it."""

    uri: str
    fs: Any
    root: str

    def path(self, *parts: str) -> str:
        """The store path of ``root/parts...``."""
        return "/".join([self.root.rstrip("/"), *parts])

    def url(self, *parts: str) -> str:
        """``parts`` under the URI, for messages (the query, credentials included, left out)."""
        base = self.uri.split("?", 1)[0].rstrip("/")
        return "/".join([base, *parts])

    def call(self, fn: Callable[[], T], what: str) -> T:
        """Run one store operation; any failure is one :class:`ConfigError` line naming the URI."""
        try:
            return _bounded(fn, f"{self.url()}: {what}")
        except ConfigError:
            raise
        except Exception as exc:
            raise ConfigError(f"{self.url()}: {what} failed: {_explain(self.uri, exc)}") from exc

    def check(self, *, write: bool) -> None:
        """Fail fast, in one line, on a missing bucket, bad credentials, an unreachable endpoint and (``write``)
        no write permission; writes and deletes one small probe object."""
        import pyarrow.fs

        bucket = self.root.split("/", 1)[0]
        info = self.call(lambda: self.fs.get_file_info(bucket), "reaching the bucket")
        if info.type == pyarrow.fs.FileType.NotFound and not isinstance(self.fs, pyarrow.fs.LocalFileSystem):
            raise ConfigError(f"{self.url()}: bucket {bucket!r} does not exist; create it or fix the bucket name")
        if write:
            probe = self.path(".sslrun-write-probe")

            def write_probe() -> None:
                self._mkdir(self.root)
                with self.fs.open_output_stream(probe) as out:
                    out.write(b"ok")
                self.fs.delete_file(probe)

            self.call(write_probe, "writing a probe object (write permission)")

    def _mkdir(self, path: str) -> None:
        """Create a folder where folders exist (a local or mounted store); object stores need none, and pyarrow
        would leave an empty ``folder/`` marker object there."""
        import pyarrow.fs

        if isinstance(self.fs, pyarrow.fs.LocalFileSystem):
            self.fs.create_dir(path, recursive=True)

    def size(self, *parts: str) -> int | None:
        """Size in bytes of ``parts`` in the store, None if absent."""
        import pyarrow.fs

        info = self.call(lambda: self.fs.get_file_info(self.path(*parts)), f"looking up {'/'.join(parts)}")
        return None if info.type == pyarrow.fs.FileType.NotFound else int(info.size or 0)

    def read_manifest(self, *parts: str) -> Manifest | None:
        """The manifest at ``parts`` (``<dataset>/<split>.beton.json``), None if there is none."""
        if self.size(*parts) is None:
            return None

        def read() -> bytes:
            with self.fs.open_input_stream(self.path(*parts)) as f:
                return f.read()

        data = self.call(read, f"reading {'/'.join(parts)}")
        return Manifest.from_json(data.decode("utf-8", "replace"), Path(self.url(*parts)))

    def upload(self, local: Path, *parts: str) -> None:
        """Copy a local file to ``parts`` (an S3 object appears whole or not at all; see :meth:`publish`)."""

        def put() -> None:
            self._mkdir(self.path(*parts[:-1]))
            with open(local, "rb") as src, self.fs.open_output_stream(self.path(*parts)) as out:
                while block := src.read(_CHUNK):
                    out.write(block)

        try:
            put()
        except Exception as exc:
            raise ConfigError(f"{self.url(*parts)}: upload failed: {_explain(self.uri, exc)}") from exc

    def publish(self, beton: Path, manifest_file: Path, dataset: str, split_file: str) -> None:
        """Upload a prepared ``.beton`` and then its manifest: a reader that sees the manifest sees the whole file."""
        self.upload(beton, dataset, split_file)
        self.upload(manifest_file, dataset, split_file + ".json")


def open_store(uri: str) -> Store:
    """The store a URI names; one line for an unknown scheme or a malformed URI.

    Raises:
        ConfigError: the scheme is not one ``pyarrow.fs`` reads, or the URI does not parse.
    """
    scheme = urlsplit(uri).scheme.lower()
    if scheme not in _SCHEMES:
        raise ConfigError(
            f"{uri.split('?', 1)[0]}: unknown URI scheme {scheme + '://'!r}; use a local path, s3://, gs:// "
            f"(S3-compatible stores: s3://bucket/prefix?endpoint_override=host:port&scheme=http)"
        )
    import pyarrow.fs

    try:
        fs, root = _bounded(lambda: pyarrow.fs.FileSystem.from_uri(uri), f"{uri.split('?', 1)[0]}: connecting")
    except ConfigError:
        raise
    except Exception as exc:
        raise ConfigError(f"{uri.split('?', 1)[0]}: not a usable storage URI ({_explain(uri, exc)})") from exc
    if not root.strip("/"):
        raise ConfigError(f"{uri}: name a bucket, e.g. s3://bucket/sslrun-data")
    return Store(uri=uri, fs=fs, root=root.rstrip("/"))


def check_manifest_matches(m: Manifest, size: int | None, where: str) -> None:
    """Refuse a store whose ``.beton`` is missing or of another size than its manifest says.

    Raises:
        DataError: one line naming the file and how to prepare it again.
    """
    if size != m.bytes:
        found = "is missing" if size is None else f"is {size} bytes"
        raise DataError(
            f"{where} {found} but its manifest says {m.bytes} bytes; prepare it again with "
            f"`sslrun data prepare {m.dataset} --split {m.split} --data-dir URI --force`"
        )
