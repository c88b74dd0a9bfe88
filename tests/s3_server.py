"""S3-compatible servers on 127.0.0.1 for ``tests/test_storage.py`` and ``tests/test_run_storage.py`` (moto, in
process or as a ``moto_server`` that checks credentials), a bucket's objects, and the real CLI's answers. Use them only
inside a loopback-only network namespace (``tests/net.py``): without credentials the AWS SDK looks for an instance
metadata server on the network.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock

from sslrun.tests.net import free_port
from sslrun.tests.ray_head import SSLRUN, wait_for

MOTO_SERVER = str(Path(sys.executable).with_name("moto_server"))
FAKE_KEYS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
# No credential files, no instance metadata lookups: what the process is given is all it has.
NO_LOOKUPS = {
    "AWS_EC2_METADATA_DISABLED": "true",
    "AWS_CONFIG_FILE": "/nonexistent",
    "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent",
}


@contextlib.contextmanager
def moto_s3() -> Iterator[str]:
    """A moto S3 server on 127.0.0.1 that accepts any credentials, with :data:`FAKE_KEYS` and :data:`NO_LOOKUPS`
    in this process's environment (restored on exit): yields its ``host:port``."""
    from moto.server import ThreadedMotoServer

    with mock.patch.dict(os.environ, {**FAKE_KEYS, **NO_LOOKUPS}):
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=free_port(), verbose=False)
        server.start()
        try:
            yield f"127.0.0.1:{server.get_host_and_port()[1]}"
        finally:
            server.stop()


def _listening(port: int) -> bool:
    """True when something accepts connections on 127.0.0.1:``port``."""
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


@contextlib.contextmanager
def moto_s3_with_auth(setup_requests: int) -> Iterator[tuple[str, str]]:
    """A ``moto_server`` process on 127.0.0.1 that checks credentials after its first ``setup_requests`` requests
    (the caller's set-up: buckets, IAM users); yields ``(host:port, http://host:port)``. Not in this process: moto
    reads that count once per process, and :func:`moto_s3`'s server would check credentials too."""
    port = free_port()
    proc = subprocess.Popen(
        [MOTO_SERVER, "-H", "127.0.0.1", "-p", str(port)],
        env={**os.environ, **FAKE_KEYS, "INITIAL_NO_AUTH_ACTION_COUNT": str(setup_requests)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(lambda: _listening(port), 30, f"moto_server on port {port}", every=0.2)
        yield f"127.0.0.1:{port}", f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def s3_client(endpoint: str) -> Any:
    """A boto3 S3 client for the server at ``host:port``, with the credentials of this process's environment."""
    import boto3

    return boto3.client("s3", endpoint_url=f"http://{endpoint}")


def bucket_objects(endpoint: str, bucket: str) -> dict[str, str]:
    """Every object of ``bucket``, key -> ETag (an ETag changes when the object is written again)."""
    listing = s3_client(endpoint).list_objects_v2(Bucket=bucket)
    # keys ending in "/" are the empty folder markers pyarrow leaves after deleting the write probe
    return {o["Key"]: o["ETag"] for o in listing.get("Contents", []) if not o["Key"].endswith("/")}


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 180) -> subprocess.CompletedProcess:
    """``sslrun ARGS`` in a fresh process, this process's environment plus ``env``; output captured as text."""
    return subprocess.run(
        [SSLRUN, *args], capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})}
    )


def assert_one_line_error(args: list[str], env: dict[str, str], expect: str) -> None:
    """``sslrun ARGS`` fails the way bad input must: exit status 2, one ``error: `` line containing ``expect``, in
    under 30 s (no retrying a server that is not there, no waiting on a network that is not there)."""
    t0 = time.monotonic()
    res = run_cli(*args, env=env)
    took = time.monotonic() - t0
    assert res.returncode == 2, res.stdout + res.stderr
    assert res.stderr.startswith("error: ") and res.stderr.count("\n") == 1, res.stderr
    assert expect in res.stderr, res.stderr
    assert took < 30, took
