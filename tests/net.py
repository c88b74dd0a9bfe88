"""Loopback-only networking for the tests that start Ray, DDP or a storage server."""

from __future__ import annotations

import socket

import pytest


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def require_loopback_namespace(test_file: str) -> None:
    """Fail with the command to use unless this process sees only the loopback interface: Ray does not stay on
    loopback by itself, and these tests must never send traffic anywhere else."""
    others = [name for _, name in socket.if_nameindex() if name != "lo"]
    if others:
        pytest.fail(
            f"{test_file} must run in a loopback-only network namespace (found interfaces {others}); run: "
            "unshare -n sh -c 'ip link set lo up; export GLOO_SOCKET_IFNAME=lo RAY_USAGE_STATS_ENABLED=0; "
            f".venv/bin/pytest {test_file}'"
        )
