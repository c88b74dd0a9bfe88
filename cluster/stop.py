"""Stopping a Ray Train run with a checkpoint: the stop flag in the run's storage and the driver's signal handling.

Ray Train runs the train function in a non-main thread of each worker, where no signal handler can be installed,
so the driver turns SIGINT/SIGTERM into a flag file under ``storage_path/name`` and every rank polls it; see
docs/internals.md, section 'Stopping a Ray Train run with a checkpoint'. The signal policy itself (first signal:
stop cleanly; second: abort) is :func:`sslrun.core.train.stop.stop_on_signals`, shared with ``sslrun train``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from sslrun.core.train.stop import stop_on_signals

__all__ = ["STOP_FLAG_FILE", "StopFlag", "stop_workers_on_signals"]

STOP_FLAG_FILE = ".sslrun-stop"  # under storage_path/name; written by the driver on SIGTERM / Ctrl-C


class StopFlag:
    """The stop request the driver raises and every worker polls: ``storage_path/name/.sslrun-stop``.

    The driver (to raise it) and every worker (to poll it) build the same object, so both sides agree on the
    place, through pyarrow, for local paths and ``s3://`` / ``gs://`` URIs alike.

    Args:
        storage_path: the run's ``RunConfig.storage_path`` (absolute path or URI).
        name: the run's ``RunConfig.name``.

    Attributes:
        requested: True once this process has raised the flag.
    """

    def __init__(self, storage_path: str, name: str) -> None:
        import pyarrow.fs

        self.fs, root = pyarrow.fs.FileSystem.from_uri(storage_path)
        self.path = f"{root.rstrip('/')}/{name}/{STOP_FLAG_FILE}"
        self.requested = False

    def clear(self) -> None:
        """Remove a flag left by an earlier, stopped attempt (otherwise ``--resume`` would stop at once)."""
        if self.is_raised():
            self.fs.delete_file(self.path)

    def request(self) -> None:
        """Raise the flag: every rank sees it at its next poll, writes a checkpoint and returns."""
        self.requested = True
        self.fs.create_dir(self.path.rpartition("/")[0], recursive=True)
        with self.fs.open_output_stream(self.path) as f:
            f.write(f"stop requested at {time.time():.0f}\n".encode())

    def is_raised(self) -> bool:
        """Whether the flag file exists (one metadata request; on S3/GCS, a network round trip)."""
        import pyarrow.fs

        return self.fs.get_file_info(self.path).type != pyarrow.fs.FileType.NotFound


@contextmanager
def stop_workers_on_signals(flag: StopFlag, echo: Callable[[str], None]) -> Iterator[None]:
    """Within the block, the first SIGINT/SIGTERM raises ``flag``; the second raises ``KeyboardInterrupt``.

    Enter it after ``ray.init`` (which replaces the driver's SIGTERM handler with ``sys.exit``) and in the main
    thread, with ``fit()`` running in another thread: Ray's own SIGINT handler, which aborts without a checkpoint,
    is then never installed.
    """

    def request(signal_name: str) -> None:
        echo(f"{signal_name}: asking the workers to write a checkpoint and stop (again to abort without one)")
        flag.request()

    with stop_on_signals(request):
        yield
