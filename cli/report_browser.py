"""Render an HTML page in headless Chromium and take a PNG screenshot of it (``sslrun report --screenshot``).

Chromium is driven through the DevTools protocol over ``--remote-debugging-pipe``: commands go in on the child's
file descriptor 3 and answers come out of its descriptor 4, each a JSON message ended by a NUL byte. A pipe opens
no port, and it tells more than ``chromium --screenshot``: the console errors and uncaught exceptions of the page,
and which of its images decoded.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import select
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sslrun.core.errors import ConfigError

__all__ = ["BROWSERS", "PageRender", "find_browser", "render_page"]

BROWSERS = ("chromium", "chromium-browser", "google-chrome")
_TIMEOUT_S = 60.0
# Reports the page's images: alt text and whether the image decoded (a broken data: URL has naturalWidth 0).
_IMAGES_JS = "JSON.stringify(Array.from(document.images).map(i => [i.alt, i.complete && i.naturalWidth > 0]))"


@dataclass
class PageRender:
    """What the browser saw.

    Attributes:
        images: ``(alt text, decoded)`` of every ``<img>`` on the page.
        errors: console errors, failed loads and uncaught exceptions, one line each.
        height: the page's full height in CSS pixels.
    """

    images: list[tuple[str, bool]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    height: int = 0


def find_browser() -> str | None:
    """The path of an installed Chromium (or Chrome), or None."""
    for name in BROWSERS:
        if path := shutil.which(name):
            return path
    return None


def render_page(page: Path, screenshot: Path, *, width: int = 1280, height: int | None = None) -> PageRender:
    """Load ``page`` in headless Chromium and write a PNG of it to ``screenshot``.

    Args:
        page: the HTML file.
        screenshot: the PNG to write.
        width: the viewport width in pixels.
        height: the height to capture; None = the whole page.

    Raises:
        ConfigError: no Chromium is installed, or it did not answer within a minute, in one line.
    """
    browser = find_browser()
    if browser is None:
        raise ConfigError("no Chromium found for --screenshot; install it with: apt-get install -y chromium")
    with tempfile.TemporaryDirectory(prefix="sslrun-chromium-") as profile, _Chromium(browser, profile) as cdp:
        session = cdp.call(
            "Target.attachToTarget",
            targetId=cdp.call("Target.createTarget", url="about:blank")["targetId"],
            flatten=True,
        )["sessionId"]
        for domain in ("Page", "Runtime", "Log"):
            cdp.call(f"{domain}.enable", session=session)
        cdp.call(
            "Emulation.setDeviceMetricsOverride",
            session=session,
            width=width,
            height=900,
            deviceScaleFactor=1,
            mobile=False,
        )
        cdp.call("Page.navigate", session=session, url=page.resolve().as_uri())
        cdp.wait_for("Page.loadEventFired", session)
        result = PageRender()
        result.images = [tuple(x) for x in json.loads(cdp.evaluate(session, _IMAGES_JS))]
        result.height = int(cdp.evaluate(session, "document.documentElement.scrollHeight"))
        clip = {"x": 0, "y": 0, "width": width, "height": height or result.height, "scale": 1}
        shot = cdp.call("Page.captureScreenshot", session=session, format="png", captureBeyondViewport=True, clip=clip)
        screenshot.parent.mkdir(parents=True, exist_ok=True)
        screenshot.write_bytes(base64.b64decode(shot["data"]))
        result.errors = cdp.errors
        return result


class _Chromium:
    """A headless Chromium child speaking the DevTools protocol on a pipe (a context manager that stops it)."""

    def __init__(self, browser: str, profile: str) -> None:
        self.args = [
            browser,
            "--headless=new",
            "--remote-debugging-pipe",
            "--no-sandbox",  # root in containers and CI has no user namespace for the sandbox
            "--disable-gpu",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-extensions",
            f"--user-data-dir={profile}",
            "about:blank",
        ]
        self.errors: list[str] = []
        self._next_id = 0
        self._buffer = b""
        self._events: list[dict[str, Any]] = []

    def __enter__(self) -> _Chromium:
        to_child_r, self._to_child = os.pipe()
        self._from_child, from_child_w = os.pipe()
        # Move the child's ends above 10 first, so that placing them on 3 and 4 cannot overwrite one with the other.
        high_r, high_w = fcntl.fcntl(to_child_r, fcntl.F_DUPFD, 10), fcntl.fcntl(from_child_w, fcntl.F_DUPFD, 10)

        def on_3_and_4() -> None:
            os.dup2(high_r, 3)
            os.dup2(high_w, 4)

        self._proc = subprocess.Popen(
            self.args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,  # Chromium's own chatter (GPU, D-Bus) is not the page's business
            close_fds=False,  # descriptors 3 and 4 must reach the child; Python's own are close-on-exec anyway
            preexec_fn=on_3_and_4,
        )
        for fd in (to_child_r, from_child_w, high_r, high_w):
            os.close(fd)
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self._send("Browser.close", {}, None)
            self._proc.wait(timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            self._proc.kill()
            self._proc.wait(timeout=10)
        finally:
            os.close(self._to_child)
            os.close(self._from_child)

    def call(self, method: str, session: str | None = None, **params: Any) -> dict[str, Any]:
        """Send one command and wait for its answer (events that arrive meanwhile are kept)."""
        msg_id = self._send(method, params, session)
        while True:
            msg = self._read()
            if msg.get("id") == msg_id:
                if "error" in msg:
                    raise ConfigError(f"Chromium refused {method}: {msg['error'].get('message')}")
                return msg.get("result", {})
            self._event(msg)

    def evaluate(self, session: str, expression: str) -> Any:
        """The value of a JavaScript expression in the page."""
        return self.call("Runtime.evaluate", session=session, expression=expression, returnByValue=True)["result"][
            "value"
        ]

    def wait_for(self, event: str, session: str) -> None:
        """Wait for one event of the page (it may already have arrived)."""
        while not any(e.get("method") == event and e.get("sessionId") == session for e in self._events):
            self._event(self._read())

    def _send(self, method: str, params: dict[str, Any], session: str | None) -> int:
        self._next_id += 1
        msg: dict[str, Any] = {"id": self._next_id, "method": method, "params": params}
        if session:
            msg["sessionId"] = session
        os.write(self._to_child, json.dumps(msg).encode() + b"\0")
        return self._next_id

    def _read(self) -> dict[str, Any]:
        deadline = time.monotonic() + _TIMEOUT_S
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            ready, _, _ = select.select([self._from_child], [], [], max(left, 0))
            chunk = os.read(self._from_child, 1 << 20) if ready else b""
            if not chunk:
                why = "exited" if self._proc.poll() is not None else f"did not answer within {_TIMEOUT_S:.0f} s"
                raise ConfigError(f"Chromium ({self.args[0]}) {why}; try running it by hand: {self.args[0]} --version")
            self._buffer += chunk
        raw, _, self._buffer = self._buffer.partition(b"\0")
        return json.loads(raw)

    def _event(self, msg: dict[str, Any]) -> None:
        """Keep an event; note the ones that are errors of the page."""
        self._events.append(msg)
        method, params = msg.get("method"), msg.get("params", {})
        if method == "Runtime.exceptionThrown":
            details = params.get("exceptionDetails", {})
            self.errors.append(f"exception: {details.get('exception', {}).get('description') or details.get('text')}")
        elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            words = [str(a.get("value", a.get("description"))) for a in params.get("args", [])]
            self.errors.append("console: " + " ".join(words))
        elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
            entry = params["entry"]
            self.errors.append(f"{entry.get('source')}: {entry.get('text')} {entry.get('url', '')}".strip())
