"""Start the embedded local Ray, or connect to an existing Ray cluster, with sslrun's privacy defaults.

Two rules hold whichever way Ray is reached:

* **No usage statistics unless the user opts in.** Ray posts usage data to usage-stats.ray.io about a minute
  after start-up by default; sslrun sets ``RAY_USAGE_STATS_ENABLED=0`` before Ray is imported or started,
  unless the user has already set that variable (an explicit ``1`` is respected).
* **The embedded default is a fresh, private Ray.** ``ray.init()`` with no address attaches to any live cluster
  recorded in ``/tmp/ray/ray_current_cluster`` (another user's ``ray start``, a left-over test cluster), so the
  embedded default calls ``ray.init(address="local")`` and keeps the dashboard on ``127.0.0.1``.
* **The token stays private.** Ray 2.60 turns token authentication on for a new local Ray and writes the token to
  ``~/.ray/auth_token`` with the default umask (world-readable); the embedded default creates that file itself,
  mode 0600, before Ray starts (and tightens an existing one), and the launch prints where it is: the dashboard
  asks for it, and its API answers "Unauthorized: Missing authentication token" without it.

Nothing here imports Ray at module import time: :func:`prepare_ray_environment` must run first.
"""

from __future__ import annotations

import os
import secrets
import socket
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sslrun.core.errors import ConfigError

__all__ = [
    "DASHBOARD_HOST",
    "DASHBOARD_PORT",
    "RaySession",
    "connect_or_start",
    "parse_address",
    "prepare_ray_environment",
    "private_token_file",
]

DASHBOARD_HOST = "127.0.0.1"  # never 0.0.0.0: the dashboard can submit jobs, so it stays on loopback
DASHBOARD_PORT = 8265  # Ray's usual port, so `ray job submit --address http://127.0.0.1:8265` works as documented
_CONNECT_TIMEOUT_S = 5.0


def prepare_ray_environment(*, embedded: bool) -> None:
    """Set the environment sslrun wants *before* Ray is imported or started.

    Args:
        embedded: True when sslrun starts Ray itself on this machine. Then gloo is also told to use the loopback
            interface (all workers are local; without it gloo binds to the address ``gethostname()`` resolves
            to, which its peers may not reach: "connectFullMesh ... Connection refused", ray-project/ray#37461).
    """
    # setdefault: a user who exported RAY_USAGE_STATS_ENABLED=1 has opted in; anything else means off.
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # The Ray dashboard's Train tab lists V2 runs only when this is set in the driver before fit() (Ray's default: 0).
    os.environ.setdefault("RAY_TRAIN_ENABLE_STATE_TRACKING", "1")
    # Ray Train V2 re-routes print() in workers through a logger, and echoes it as well when stdout is wrapped,
    # so every progress line of the trainer appeared twice. Plain prints are forwarded to the driver anyway.
    # (Propagated from the driver to the workers by Ray Train.)
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    if embedded:
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")


@dataclass
class RaySession:
    """The Ray connection a launch runs on.

    Attributes:
        address: the cluster's GCS address (``HOST:PORT``), or the ``ray://`` address for Ray Client.
        dashboard_url: ``http://HOST:PORT`` of the dashboard, or None when it is not running.
        started_here: True when this process started the embedded Ray (and must shut it down).
        reused: True when Ray was already initialised in this process (tests, notebooks): it is left running.
        token_file: the token the dashboard asks for, when this process started Ray with token authentication.
    """

    address: str
    dashboard_url: str | None
    started_here: bool
    reused: bool
    token_file: Path | None = None

    def dashboard_hint(self) -> str:
        """The dashboard's URL and what a person needs to open it, in one line."""
        if not self.dashboard_url:
            return "dashboard (not running)"
        if self.token_file is None:
            return f"dashboard {self.dashboard_url}"
        return (
            f"dashboard {self.dashboard_url} (it asks for the token in {self.token_file}; `ray get-auth-token` "
            f"prints it)"
        )

    def shutdown(self) -> None:
        """Stop Ray if this process started it; a cluster we only connected to keeps running."""
        import ray

        # Started here: this stops the embedded Ray. Connected: this only disconnects the driver; the cluster's
        # nodes keep running. Reused (Ray initialised by the caller): the caller owns it.
        if not self.reused and ray.is_initialized():
            ray.shutdown()


def connect_or_start(
    address: str | None,
    *,
    num_cpus: int | None = None,
    num_gpus: int | None = None,
    include_dashboard: bool = True,
) -> RaySession:
    """Connect to the Ray cluster at ``address``, or start the embedded local Ray when it is None.

    Args:
        address: None = start a private local Ray in this process; ``"auto"`` = the cluster running on this
            machine (e.g. inside ``ray job submit``); ``"HOST:PORT"`` = a head node's GCS;
            ``"ray://HOST:10001"`` = Ray Client.
        num_cpus: CPUs for the embedded Ray (None = all the machine has). Ignored when connecting.
        num_gpus: GPUs for the embedded Ray (None = all the machine has). Ignored when connecting.
        include_dashboard: start the dashboard (on 127.0.0.1:8265) with the embedded Ray.

    Returns:
        The session. If Ray is already initialised in this process it is reused as it is.

    Raises:
        ConfigError: the address is malformed or nothing answers there, in one line.
    """
    prepare_ray_environment(embedded=address is None)
    import ray

    if ray.is_initialized():
        return RaySession(_gcs_address(), _dashboard_url(), started_here=False, reused=True)
    if address is None:
        token_file = private_token_file(Path.home())
        ctx = ray.init(
            address="local",  # a fresh Ray: ray.init() without an address would attach to a recorded cluster
            num_cpus=num_cpus,
            num_gpus=num_gpus,
            include_dashboard=include_dashboard,
            dashboard_host=DASHBOARD_HOST,
            dashboard_port=DASHBOARD_PORT,
            configure_logging=True,
            logging_level="warning",  # Ray's INFO start-up banner repeats what sslrun prints itself
        )
        return RaySession(
            ctx.address_info["gcs_address"], _dashboard_url(ctx), started_here=True, reused=False, token_file=token_file
        )
    _check_reachable(address)
    try:
        ctx = ray.init(address=address, logging_level="warning")
    except (ConnectionError, RuntimeError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        auth = os.environ.get("RAY_AUTH_MODE", "").lower() == "token"
        hint = (
            "check `ray status` on the head node and that this machine runs the same Ray and Python versions"
            if auth
            else "clusters started with `ray start` use token authentication by default: export RAY_AUTH_MODE=token "
            "and the head's token (RAY_AUTH_TOKEN=..., from `ray get-auth-token` on the head)"
        )
        raise ConfigError(f"could not connect to the Ray cluster at {address!r}: {first}; {hint}") from exc
    gcs = getattr(ctx, "address_info", {}).get("gcs_address") or address
    return RaySession(gcs, _dashboard_url(ctx), started_here=False, reused=False)


def private_token_file(home: Path) -> Path | None:
    """The token file the embedded Ray will use, created or tightened to mode 0600; None when token authentication
    is off (``RAY_AUTH_MODE=disabled``) or the token comes from the environment (``RAY_AUTH_TOKEN``,
    ``RAY_AUTH_TOKEN_PATH``).

    Ray would create ``home/.ray/auth_token`` itself with the default umask, readable by every user of the
    machine; the same format (256 random bits, hex) is written here first, private from the start.
    """
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled" or os.environ.get("RAY_AUTH_TOKEN"):
        return None
    if os.environ.get("RAY_AUTH_TOKEN_PATH"):
        path = Path(os.environ["RAY_AUTH_TOKEN_PATH"]).expanduser()
    else:
        path = home / ".ray" / "auth_token"
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass
        else:
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(32))
    if path.is_file() and stat.S_IMODE(path.stat().st_mode) & 0o077 and path.stat().st_uid == os.getuid():
        path.chmod(0o600)  # a token left world-readable by an earlier Ray
    return path


def parse_address(address: str) -> tuple[str, int] | None:
    """``(host, port)`` of a ``HOST:PORT`` or ``ray://HOST:PORT`` address, None for ``auto``.

    Raises:
        ConfigError: anything else, in one line with examples.
    """
    if address == "auto":
        return None
    host, sep, port_text = address.removeprefix("ray://").rpartition(":")
    if not sep or not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ConfigError(
            f"--address {address!r} is not auto, HOST:PORT or ray://HOST:PORT (e.g. 10.0.0.5:6379 or ray://head:10001)"
        )
    return host.strip("[]"), int(port_text)


def _check_reachable(address: str) -> None:
    """Fail in seconds, with one line, when nothing listens at ``HOST:PORT`` (``ray.init`` would wait much
    longer and then print a page of retries)."""
    target = parse_address(address)
    if target is None:
        return
    try:
        with socket.create_connection(target, timeout=_CONNECT_TIMEOUT_S):
            pass
    except OSError as exc:
        raise ConfigError(
            f"nothing answers at {target[0]}:{target[1]} ({exc.strerror or exc}); start the head with "
            f"`ray start --head --port {target[1]}` or pass the address `ray status` prints"
        ) from exc


def _gcs_address() -> str:
    import ray

    try:
        return ray.get_runtime_context().gcs_address
    except Exception:  # Ray Client sessions have no GCS address on the driver
        return "ray-client"


def _dashboard_url(ctx: Any | None = None) -> str | None:
    url = getattr(ctx, "dashboard_url", None) if ctx is not None else None
    if not url:
        try:
            from ray._private.worker import get_dashboard_url

            url = get_dashboard_url()
        except Exception:
            url = None
    if not url:
        return None
    return url if url.startswith("http") else f"http://{url}"
