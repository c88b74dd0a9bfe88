"""Stop on SIGINT/SIGTERM with a checkpoint: the one signal policy of ``sslrun train`` and ``sslrun launch``.

The first signal asks for a clean stop (the trainer finishes its step and writes a checkpoint; the launcher raises
the stop flag every worker polls). A second one aborts at once with ``KeyboardInterrupt``. Spot-instance
reclaims and schedulers send SIGTERM and wait a grace period, so the first signal must not kill the run.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

__all__ = ["stop_on_signals"]


@contextmanager
def stop_on_signals(request: Callable[[str], None]) -> Iterator[None]:
    """Within the block, the first SIGINT/SIGTERM calls ``request(signal_name)``; the next raises
    ``KeyboardInterrupt``. The previous handlers come back when the block ends.

    Python delivers signals to the main thread only, so elsewhere (Ray runs train functions in a thread) this
    installs nothing and the caller's own stop channel applies.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    requested = False

    def handler(signum: int, _frame: Any) -> None:
        nonlocal requested
        if requested:
            raise KeyboardInterrupt
        requested = True
        request(signal.Signals(signum).name)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
