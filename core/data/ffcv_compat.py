"""Everything in sslrun that depends on FFCV 1.0.2's internals, in one place.

The rest of :mod:`sslrun.core.data` uses FFCV's public API (``Loader``, ``PipelineSpec``, fields, decoders,
transforms, ``Operation``) and reaches FFCV through three functions here: :func:`import_ffcv` imports it,
:func:`new_loader` builds a ``Loader``, :func:`start_epoch` iterates one epoch of it. What each works around:

* importing FFCV sets torch's thread count to 1, and every ``Loader()`` and ``iter(loader)`` sets it to
  ``num_workers``: :func:`import_ffcv` and :func:`new_loader` put it back, and the epoch thread here sets numba's
  count only (see docs/internals.md, section 'FFCV changes torch's thread count');
* an exception in FFCV's pipeline thread hangs the consumer, and an abandoned epoch keeps its thread and buffers:
  :class:`Epoch` raises a :class:`DataError` and stops its thread (see docs/internals.md, section 'A failing
  FFCV pipeline hangs its consumer');
* ``Loader.__iter__`` always starts at the loader's next epoch and at its first sample: :func:`start_epoch` takes
  the epoch and the number of samples to skip (mid-epoch resume without decoding the skipped batches);
* ``OSCacheManager`` corrupts numba's type cache on every ``Loader()``: :func:`_fix_os_cache_reader_types`.

These copy or replace FFCV 1.0.2 code, so on any other FFCV version :func:`import_ffcv` refuses with one line
instead of applying them (see docs/internals.md, section 'The FFCV version check').
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import queue
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from sslrun.core.errors import ConfigError, DataError, SslrunError

__all__ = [
    "FFCV_VERSION",
    "STALL_TIMEOUT_S",
    "Epoch",
    "epoch_order",
    "import_ffcv",
    "keep_torch_threads",
    "new_loader",
    "start_epoch",
]

#: The one FFCV release these workarounds are written against (``pyproject.toml`` pins it).
FFCV_VERSION = "1.0.2"
#: A pipeline thread that is alive but has produced nothing for this long is treated as hung. Generous: the
#: first batch includes numba compilation (3-15 s per loader, more on a loaded machine).
STALL_TIMEOUT_S = 900.0
_POLL_S = 0.2

_ready = False
_guarded: type | None = None


@contextlib.contextmanager
def keep_torch_threads() -> Iterator[None]:
    """Put torch's intra-op thread count back to what it was when the block started (FFCV changes it)."""
    import torch

    threads = torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def import_ffcv() -> ModuleType:
    """Import FFCV once per process, keeping torch's thread count, and apply the 1.0.2 patches of this module.

    Call it before any ``from ffcv... import``; later calls return at once.

    Raises:
        SslrunError: the installed FFCV is not 1.0.2 (or its version cannot be read).
    """
    global _ready
    if not _ready:
        try:
            version: str | None = importlib.metadata.version("ffcv")  # ffcv.__version__ says 0.0.3rc1 in 1.0.2
        except importlib.metadata.PackageNotFoundError:
            version = None
        if version != FFCV_VERSION:
            found = f"ffcv {version} is installed" if version else "ffcv is not installed"
            raise SslrunError(
                f"{found}, but sslrun's data loading patches internals of ffcv {FFCV_VERSION} that other versions "
                f"change; install it with `pip install ffcv=={FFCV_VERSION}`"
            )
        with keep_torch_threads():
            import ffcv.loader  # noqa: F401 - `import ffcv.loader` runs Compiler.set_num_threads(1)
        _fix_os_cache_reader_types()
        _ready = True
    return sys.modules["ffcv"]


def new_loader(path: Path, **kwargs: Any) -> Any:
    """``ffcv.loader.Loader(str(path), **kwargs)`` without its side effect on torch's thread count."""
    import_ffcv()
    from ffcv.loader import Loader

    with keep_torch_threads():
        return Loader(str(path), **kwargs)


def _fix_os_cache_reader_types() -> None:
    """Work around an ffcv 1.0.2 bug that corrupts numba's type cache.

    ``OSCacheManager.state_type`` does ``t1 = nb.uint8[::1]; t1.mutable = False``: it mutates numba's *interned*
    ``Array(uint8, 1, 'C')`` type in place, on every Loader construction, which changes that object's hash. Every
    dict already keyed by it (numba dispatchers' ``overloads``) is then corrupted. Seen here: a JPEG decoder
    dispatcher shared by two loaders failed to compile in the second one with ``KeyError: (Array(uint8, 1, 'C',
    True, aligned=True), ...)``; with FFCV's own per-decoder dispatchers, garbage collection printed the same
    KeyError from numba's dispatcher finalizers. This builds the same read-only type properly
    (``types.Array(..., readonly=True)``) and compiles the reader with it; the compiled reader is identical.
    """
    from ffcv.memory_managers.os_cache import OSCacheManager
    from ffcv.pipeline.compiler import Compiler
    from numba import types

    readonly_u8 = types.Array(types.uint8, 1, "C", readonly=True)
    u64 = types.Array(types.uint64, 1, "C")
    state_type = types.Tuple([readonly_u8, u64, u64])

    def compile_reader(self: Any) -> Any:
        def read(address, mem_state):
            size = mem_state[2][np.searchsorted(mem_state[1], address)]
            return mem_state[0][address : address + size]

        return Compiler.compile(read, readonly_u8(types.uint64, state_type))

    OSCacheManager.state_type = property(lambda self: state_type)
    OSCacheManager.compile_reader = compile_reader


def _guarded_iterator_class() -> type:
    """A subclass of FFCV 1.0.2's ``EpochIterator`` whose thread keeps its exception for the consumer and stops
    promptly when asked. Its ``run`` mirrors FFCV's, with three changes:

    * an exception is stored in ``error`` (FFCV prints it, and the consumer waits forever on the queue);
    * the terminate flag is checked after every batch, and every ``put`` (also the end-of-epoch marker) polls
      it (FFCV checks it only when the queue is full, and blocks forever putting the end marker into a full
      queue nobody reads);
    * it sets numba's (thread-local) thread count directly, not through ``Compiler.set_num_threads``, which
      would also change torch's process-wide thread count behind the training loop's back.
    """
    global _guarded
    if _guarded is not None:
        return _guarded
    import numba
    import torch
    from ffcv.loader.epoch_iterator import IS_CUDA, EpochIterator

    class GuardedEpochIterator(EpochIterator):
        error: BaseException | None = None

        def _put(self, item: Any) -> bool:
            while not self.terminate_event.is_set():
                try:
                    self.output_queue.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    pass
            return False

        def run(self) -> None:
            try:
                numba.set_num_threads(self.loader.num_workers)
                slots = self.loader.batches_ahead + 2
                events: list[Any] = [None] * slots
                for b_ix, ixes in enumerate(self.iter_ixes):
                    if self.terminate_event.is_set():
                        return
                    slot = self.current_batch_slot
                    self.current_batch_slot = (slot + 1) % slots
                    result = self.run_pipeline(b_ix, ixes, slot, events[slot])
                    if not self._put((slot, result)):
                        return
                    if IS_CUDA:
                        # The consumer has entered the step of batch (slot - batches_ahead - 1): once the work
                        # queued so far on its stream is done, that slot's buffers may be overwritten (FFCV's logic).
                        done_slot = (slot - self.loader.batches_ahead - 1) % slots
                        event = torch.cuda.Event()
                        event.record(self.current_stream)
                        events[done_slot] = event
                self._put(None)
            except BaseException as exc:  # handed to the consumer thread
                self.error = exc

    _guarded = GuardedEpochIterator
    return _guarded


class Epoch:
    """One pass of an FFCV loader over ``order``: a guarded replacement for ``iter(loader)``.

    The consumer polls the queue with a timeout together with the thread's liveness, so a failure in the
    pipeline thread is raised here as a :class:`DataError` instead of hanging. :meth:`close` stops the thread
    and releases its buffers; call it when the epoch ends or is abandoned (FFCV allocates fresh buffers and a
    thread for every epoch, and never frees those of an abandoned one).
    """

    def __init__(self, loader: Any, order: np.ndarray, path: Path) -> None:
        from ffcv.loader.epoch_iterator import IS_CUDA

        self.path = path
        self.closed = False
        self.finished = False
        self._is_cuda = IS_CUDA
        self._it = _guarded_iterator_class()(loader, order)  # starts the thread

    def __iter__(self) -> Iterator[tuple[Any, ...]]:
        return self

    def __next__(self) -> tuple[Any, ...]:
        if self.finished:
            raise StopIteration
        if self.closed:
            raise ConfigError(f"this epoch over {self.path} was closed (another epoch was started on the loader)")
        it = self._it
        last = time.monotonic()
        while True:
            try:
                item = it.output_queue.get(timeout=_POLL_S)
                break
            except queue.Empty:
                if not it.is_alive():
                    try:  # it may have queued its last item just before ending
                        item = it.output_queue.get_nowait()
                        break
                    except queue.Empty:
                        raise self._failure() from it.error
                if time.monotonic() - last > STALL_TIMEOUT_S:
                    raise DataError(
                        f"the FFCV pipeline reading {self.path} produced nothing for {STALL_TIMEOUT_S:.0f} s; "
                        f"it looks hung (an oversubscribed machine? try fewer num_workers)"
                    ) from None
        if item is None:
            self.finished = True
            raise StopIteration
        slot, result = item
        if self._is_cuda:  # the batch was produced on a side stream: order our stream after it (as FFCV does)
            it.current_stream.wait_stream(it.cuda_streams[slot])
        return result

    def _failure(self) -> DataError:
        exc = self._it.error
        if exc is None:
            what = "its thread ended without a result"
        else:
            first = (str(exc).strip().splitlines() or [""])[0][:300]
            what = f"{type(exc).__name__}: {first}"
        return DataError(
            f"reading {self.path} failed inside the FFCV pipeline ({what}); if the file is damaged, prepare it "
            f"again with `sslrun data prepare`"
        )

    def close(self) -> None:
        """Stop the thread and wait for it to finish its current batch (its buffers are then released)."""
        if self.closed:
            return
        self.closed = True
        it = self._it
        it.terminate_event.set()
        it.join(timeout=120.0)  # at most one batch (its first one may still be compiling)
        it.close()
        it.closed = True  # FFCV's close() never sets it, and __del__ would exit the memory context again


def epoch_order(loader: Any, epoch: int) -> np.ndarray:
    """The sample order FFCV draws for ``epoch`` (any epoch, not only the loader's next one)."""
    loader.next_epoch = epoch  # the order of an epoch is drawn from `next_epoch`: set it to resume
    order = loader.next_traversal_order()
    loader.next_epoch = epoch + 1
    return order


def start_epoch(loader: Any, epoch: int, skip_samples: int, path: Path) -> Epoch:
    """``iter(loader)`` for a given epoch, with the first ``skip_samples`` of its order left out (mid-epoch
    resume without decoding the skipped batches). Mirrors ``Loader.__iter__`` of ffcv 1.0.2."""
    order = epoch_order(loader, epoch)[: len(loader) * loader.batch_size][skip_samples:]
    return Epoch(loader, order, path)
