"""FFCV loaders: several augmented views per image for pretraining, plain images for evaluation.

:class:`ViewLoader` builds ONE ``ffcv.loader.Loader`` with one pipeline per view, all fed by the ``image`` field
(``PipelineSpec``, STACK-NOTES A1): when the file's images have one size they are decoded once into a shared
buffer that every view crops from, otherwise each view decodes on its own. The work is split by where it is
cheapest:

* in FFCV (CPU threads, numba): decode, random-resized crop and horizontal flip, seeded by
  ``(seed, epoch, sample index, view)`` (:mod:`sslrun.core.data.ops`; FFCV's own ops cannot be seeded);
* on the training device, batched (:mod:`sslrun.core.data.augment`): colour jitter, grayscale, blur, solarization with
  per-sample parameters from a generator seeded by ``(seed, epoch, batch index, rank, view)``, then
  normalisation with the manifest's mean/std.

So, for a given file, batch size and world size, every batch is a pure function of ``(seed, epoch, batch index,
rank)``: a run resumed mid-epoch with ``loader.epoch(e, start_batch=k)`` sees exactly the batches ``k, k+1, ...``
of an uninterrupted run.

Guarding FFCV's sharp edges (STACK-NOTES A3): an exception in the pipeline thread becomes a :class:`DataError`
here instead of a hang (A3f); each epoch's iterator is closed and its thread joined when the epoch ends or is
abandoned (A3d); returned tensors are fresh (not views into FFCV's ring buffer, A3e); ``num_workers`` is clipped
to the usable cores (A3b); torch's thread count is restored after FFCV changes it (A0).
"""

from __future__ import annotations

import queue
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sslrun.core.data.augment import IMAGENET_MEAN, IMAGENET_STD, ColorAugment, Normalize, batch_seed
from sslrun.core.errors import ConfigError, DataError
from sslrun.core.interfaces import ViewSpec
from sslrun.core.system import parse_device, usable_cores

__all__ = ["STALL_TIMEOUT_S", "EvalLoader", "ViewLoader", "sample_views", "usable_workers"]

#: A pipeline thread that is alive but has produced nothing for this long is treated as hung. Generous: the
#: first batch includes numba compilation (3-15 s per loader, more on a loaded machine).
STALL_TIMEOUT_S = 900.0
#: Views larger than this many times the stored image side are refused (an 8x enlargement already shows
#: nothing but interpolation; 28 px Fashion-MNIST -> 224 px is the largest sensible case).
MAX_UPSCALE = 8
_POLL_S = 0.2


def usable_workers(requested: int) -> int:
    """``min(requested, usable cores)``: FFCV raises on more threads than cores (STACK-NOTES A3b)."""
    if requested < 1:
        raise ConfigError(f"num_workers must be >= 1, got {requested}")
    return min(requested, usable_cores())


def _ffcv() -> Any:
    """Import FFCV (through :mod:`sslrun.core.data.ops`, which keeps torch's thread count) on first use, so that
    importing this module stays cheap: ``import ffcv`` compiles numba code for seconds."""
    from sslrun.core.data import ops as ffcv_ops

    return ffcv_ops


def _manifest_stats(path: Path) -> tuple[tuple[int, int], tuple[float, ...], tuple[float, ...], int]:
    """``((H, W), mean, std, num_samples)`` of a verified .beton (:func:`sslrun.core.data.beton.verify_beton`)."""
    from sslrun.core.data.beton import verify_beton

    if not path.exists():
        raise DataError(f"{path} does not exist; prepare the data first with `sslrun data prepare`")
    m = verify_beton(path)
    mean = tuple(float(v) for v in m.mean)
    std = tuple(float(v) for v in m.std)
    if min(std) <= 0:  # a constant dataset (all pixels equal): normalising would divide by zero
        mean, std = IMAGENET_MEAN, IMAGENET_STD
    return (int(m.image_size[0]), int(m.image_size[1])), mean, std, int(m.num_samples)


def _image_sizes(path: Path) -> np.ndarray:
    """``(N, 2)`` heights and widths of the images of a verified .beton (from its metadata, no decoding)."""
    from sslrun.core.data.beton import BetonReader

    sizes = BetonReader(path).sizes
    return sizes if len(sizes) else np.zeros((1, 2), dtype=np.int64)


def _check_batch(batch_size: int, max_samples: int | None) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int | np.integer) or batch_size < 1:
        raise ConfigError(f"batch_size must be a positive int, got {batch_size!r}")
    if max_samples is not None and max_samples < 1:
        raise ConfigError(f"max_samples must be >= 1 or None, got {max_samples}")


_GUARDED: type | None = None


def _guarded_iterator_class() -> type:
    """A subclass of FFCV's ``EpochIterator`` (ffcv 1.0.2) whose thread keeps its exception for the consumer
    and stops promptly when asked. Its ``run`` mirrors FFCV's, with three changes:

    * an exception is stored in ``error`` (FFCV prints it and the consumer waits forever, A3f);
    * the terminate flag is checked after every batch, and every ``put`` (also the end-of-epoch marker) polls
      it (FFCV checks it only when the queue is full, and blocks forever putting the end marker into a full
      queue nobody reads);
    * it sets numba's (thread-local) thread count directly, not through ``Compiler.set_num_threads``, which
      would also change torch's process-wide thread count behind the training loop's back (A0).
    """
    global _GUARDED
    if _GUARDED is not None:
        return _GUARDED
    import numba
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

    _GUARDED = GuardedEpochIterator
    return _GUARDED


class _Epoch:
    """One pass of an FFCV loader over ``order``: a guarded replacement for ``iter(loader)``.

    The consumer polls the queue with a timeout together with the thread's liveness, so a failure in the
    pipeline thread is raised here as a :class:`DataError` instead of hanging (STACK-NOTES A3f).
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


def _start_epoch(loader: Any, epoch: int, skip_samples: int, path: Path) -> _Epoch:
    """``iter(loader)`` for a given epoch, with the first ``skip_samples`` of its order left out (mid-epoch
    resume without decoding the skipped batches). Mirrors ``Loader.__iter__`` of ffcv 1.0.2."""
    loader.next_epoch = epoch  # FFCV's order depends on it (STACK-NOTES A2: set it to resume)
    order = loader.next_traversal_order()
    loader.next_epoch = epoch + 1
    order = order[: len(loader) * loader.batch_size][skip_samples:]
    return _Epoch(loader, order, path)


class ViewLoader:
    """Multi-view augmented batches from a prepared ``.beton`` for self-supervised pretraining.

    Build it once per process (each build pays FFCV's numba JIT) and call :meth:`epoch` for every epoch.
    Under DDP (``distributed=True``) build it after ``init_process_group``: each rank then reads a disjoint
    strided shard of a per-epoch permutation (torch's ``DistributedSampler``, through FFCV). When the dataset
    size is not a multiple of the world size the sampler pads with a few repeated samples, as
    ``DistributedSampler`` does.

    Small images: crops smaller than the output are enlarged bilinearly inside the decoder (torchvision's
    convention), larger ones shrunk with OpenCV's ``INTER_AREA``; see :mod:`sslrun.core.data.ops`.

    Args:
        path: a prepared ``.beton`` (verified against its manifest first).
        views: one :class:`~sslrun.core.interfaces.ViewSpec` per view; e.g. DINO's multi-crop is 2 global views
            plus N local views of another size.
        batch_size: images per batch on this rank.
        device: where the views are returned (and the colour augmentations run).
        num_workers: FFCV threads (clipped to the usable cores).
        distributed: shard by the default process group's rank and world size.
        seed: seeds the order, the crops, the flips and the colour augmentations.
        os_cache: memory-map the file (the page cache is shared by the ranks of a node) instead of a
            per-process cache.
        max_samples: use only the first N samples.
        indices: use only these samples (positions in the file; e.g. a labelled subset for fine-tuning).
        drop_last: drop the last incomplete batch (needed under DDP: gloo aborts on uneven collectives).
        normalize: normalise with the manifest's mean/std (False: views in [0, 1], for image grids).
        random_order: colour-jitter operations in a random order per sample (torchvision); False = fixed.

    Raises:
        DataError: the file is missing, unverified, or too small for one batch.
        ConfigError: bad views, batch size, device or worker count; ``distributed=True`` without a process group.

    Example:
        >>> loader = ViewLoader(path, [ViewSpec(size=28)] * 2, 256, device="cpu")  # doctest: +SKIP
        >>> for (v1, v2), labels in loader.epoch(0):  # doctest: +SKIP
        ...     loss = method([v1, v2])["loss"]
    """

    def __init__(
        self,
        path: str | Path,
        views: Sequence[ViewSpec],
        batch_size: int,
        *,
        device: torch.device | str,
        num_workers: int = 1,
        distributed: bool = False,
        seed: int = 0,
        os_cache: bool = True,
        max_samples: int | None = None,
        indices: Sequence[int] | np.ndarray | None = None,
        drop_last: bool = True,
        normalize: bool = True,
        random_order: bool = True,
    ) -> None:
        self.path = Path(path)
        views = list(views) if isinstance(views, list | tuple) else views
        if not isinstance(views, list) or not views:
            raise ConfigError("ViewLoader needs a non-empty list of ViewSpec (one per view)")
        bad = [type(v).__name__ for v in views if not isinstance(v, ViewSpec)]
        if bad:
            raise ConfigError(f"ViewLoader views must be ViewSpec instances, got {', '.join(sorted(set(bad)))}")
        _check_batch(batch_size, max_samples)
        batch_size = int(batch_size)
        self.device = parse_device(device, flag="device")
        self.num_workers = usable_workers(num_workers)
        (height, width), mean, std, num_samples = _manifest_stats(self.path)
        for i, v in enumerate(views):
            if v.size > MAX_UPSCALE * max(height, width):
                raise ConfigError(
                    f"view {i} asks for {v.size}px crops of {height}x{width} images (more than {MAX_UPSCALE}x "
                    f"enlargement); use a view size of at most {MAX_UPSCALE * max(height, width)}"
                )
        self.views = views
        self.seed = int(seed)
        self.mean, self.std = mean, std
        if distributed:
            if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
                raise ConfigError(
                    "ViewLoader(distributed=True) needs an initialised process group: build it after "
                    "torch.distributed.init_process_group (Ray Train does that before the train function)"
                )
            self.rank, self.world_size = torch.distributed.get_rank(), torch.distributed.get_world_size()
        else:
            self.rank, self.world_size = 0, 1
        self._augment = [ColorAugment(v, random_order=random_order) for v in views]
        self._normalize = Normalize(mean, std, self.device) if normalize else None

        ops = _ffcv()
        from ffcv.fields.basics import IntDecoder
        from ffcv.fields.rgb_image import SimpleRGBImageDecoder
        from ffcv.loader import Loader, OrderOption
        from ffcv.pipeline import PipelineSpec
        from ffcv.transforms import ToDevice, ToTensor, ToTorchImage

        self._state = ops.AugmentState(self.seed)  # read by the compiled crop/flip code: lives as long as us
        to_device = [ToDevice(self.device, non_blocking=True)] if self.device.type != "cpu" else []
        # Fresh operation instances per view (FFCV maps each instance to one graph node, A1); numba ops
        # before ToTensor, torch ops after (A3g). The image field itself is disabled (None): the views are extra
        # outputs decoded from it. Images of one size (every sslrun-prepared split) are decoded ONCE into a
        # shared buffer that each view crops from (a JPEG is decompressed once, not once per view); mixed sizes
        # need a decoder per view. Outputs: (label, [decoded,] view 0, view 1, ...); the crops are identical
        # either way.
        sizes = _image_sizes(self.path)
        shared = SimpleRGBImageDecoder() if bool((sizes == sizes[0]).all()) else None
        pipelines: dict[str, Any] = {"image": None, "label": [IntDecoder(), ToTensor(), *to_device]}
        if shared is not None:
            pipelines["decoded"] = PipelineSpec("image", decoder=shared)
        self._first_view = 2 if shared is not None else 1
        for i, v in enumerate(views):
            flip = ops.SeededHorizontalFlip(self._state, i, v.flip_p)  # in place, on this view's own crop
            tail = [flip, ToTensor(), *([ToDevice(self.device, non_blocking=True)] if to_device else [])]
            tail.append(ToTorchImage())
            if shared is not None:
                crop = ops.SeededResizedCrop(self._state, i, (v.size, v.size), v.scale, v.ratio)
                pipelines[f"view_{i}"] = PipelineSpec(shared, transforms=[crop, *tail])
            else:
                decoder = ops.SeededRandomResizedCrop(self._state, i, (v.size, v.size), v.scale, v.ratio)
                pipelines[f"view_{i}"] = PipelineSpec("image", decoder=decoder, transforms=tail)

        n = num_samples if max_samples is None else min(max_samples, num_samples)
        subset = np.arange(n, dtype=np.uint64)
        if indices is not None:
            subset = np.asarray(indices, dtype=np.int64)
            if subset.size and (subset.min() < 0 or subset.max() >= n):
                raise ConfigError(f"ViewLoader indices must be in [0, {n}), got {subset.min()}..{subset.max()}")
            subset, n = subset.astype(np.uint64), int(subset.size)
        threads = torch.get_num_threads()
        try:
            self._loader = Loader(
                str(self.path),
                batch_size=batch_size,
                num_workers=self.num_workers,
                os_cache=os_cache,
                order=OrderOption.RANDOM,
                distributed=distributed,
                seed=self.seed,
                indices=subset,
                pipelines=pipelines,
                drop_last=drop_last,
            )
        finally:
            torch.set_num_threads(threads)  # FFCV set it to num_workers (A0)
        self.batch_size = batch_size
        self._active: _Epoch | None = None
        # On the CPU the colour augmentations of the views can run side by side on the usable cores; on a GPU
        # they are asynchronous kernel launches already.
        cores = usable_cores()
        self._pool = (
            ThreadPoolExecutor(min(len(views), cores), thread_name_prefix="sslrun-views")
            if self.device.type == "cpu" and len(views) > 1 and cores > 1
            else None
        )
        if len(self._loader) == 0:
            raise DataError(
                f"{self.path} has {n} samples ({n // self.world_size} per rank), fewer than one batch of "
                f"{batch_size}; use a smaller batch size or more samples"
            )

    def __len__(self) -> int:
        """Batches per epoch on this rank."""
        return len(self._loader)

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[tuple[list[torch.Tensor], torch.Tensor]]:
        """Yield ``(views, labels)`` for every batch of ``epoch`` on this rank, from batch ``start_batch`` on.

        ``views[i]`` is ``(N, 3, size_i, size_i)`` float32 on the device, normalised; ``labels`` is ``(N,)``
        int64. Both are fresh tensors (safe to keep). The skipped batches are neither decoded nor augmented, and
        the batches that follow are identical to those of an uninterrupted epoch.

        Raises:
            DataError: the FFCV pipeline failed (e.g. a damaged file).
        """
        if epoch < 0 or start_batch < 0:
            raise ConfigError(f"epoch and start_batch must be >= 0, got epoch={epoch}, start_batch={start_batch}")
        if self._loader is None:
            raise ConfigError(f"this ViewLoader over {self.path} was closed; build a new one")
        self.close_epoch()  # one epoch at a time: the crop/flip ops read the current epoch from shared state
        if start_batch >= len(self):
            return
        self._state.set_epoch(epoch)
        run = _start_epoch(self._loader, epoch, start_batch * self.batch_size, self.path)
        self._active = run
        try:
            for b, batch in enumerate(run, start=start_batch):
                labels, raw = batch[0], batch[self._first_view :]
                if self._pool is not None and torch.get_num_threads() == 1:
                    # CPU: one thread per view (torch ops release the GIL; each view has its own generator,
                    # so the result is the same as in sequence). Not with multi-threaded torch: that oversubscribes.
                    views = list(self._pool.map(self._views, range(len(raw)), raw, [epoch] * len(raw), [b] * len(raw)))
                else:
                    views = [self._views(i, x, epoch, b) for i, x in enumerate(raw)]
                yield views, labels.view(-1).clone()
        finally:
            run.close()
            if self._active is run:
                self._active = None

    def _views(self, i: int, x: torch.Tensor, epoch: int, batch: int) -> torch.Tensor:
        """uint8 ``(N, 3, H, W)`` from FFCV -> augmented (and normalised) float32, a new tensor."""
        if self._augment[i].is_identity and self._normalize is not None:  # crop + flip only: convert and normalise
            return self._normalize.from_uint8(x)
        g = torch.Generator().manual_seed(batch_seed(self.seed, epoch, batch, self.rank, i))
        # A new float tensor (FFCV's buffer is reused a few batches later, A3e), in standard NCHW layout.
        y = self._augment[i].from_uint8(x, g)
        if self._normalize is not None:
            y = self._normalize(y)
        return y.contiguous()  # a no-op unless an operation changed the layout

    def close_epoch(self) -> None:
        """Stop the epoch in progress, if any (done automatically when an epoch ends or a new one starts)."""
        if self._active is not None:
            self._active.close()
            self._active = None

    def close(self) -> None:
        """Release the iterator thread and its buffers. The loader cannot be used afterwards."""
        self.close_epoch()
        self._loader = None
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def __enter__(self) -> ViewLoader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class EvalLoader:
    """Plain, ordered images of a whole split for evaluation (kNN, linear probe, feature export).

    No augmentation, sequential order, every sample exactly once (no ``drop_last``), one process. Images of one
    size are returned as stored; in a split with mixed sizes, each image's centre square is resized to
    ``min(manifest image_size)`` pixels a side.

    Args:
        path: a prepared ``.beton``.
        batch_size: images per batch (the last batch may be smaller).
        device: where the images are returned.
        num_workers: FFCV threads (clipped to the usable cores).
        max_samples: use only the first N samples.

    Raises:
        DataError / ConfigError: as :class:`ViewLoader`.

    Example:
        >>> for images, labels in EvalLoader(path, 512, device="cpu"):  # doctest: +SKIP
        ...     feats.append(encoder(images))
    """

    def __init__(
        self,
        path: str | Path,
        batch_size: int,
        *,
        device: torch.device | str,
        num_workers: int = 1,
        max_samples: int | None = None,
    ) -> None:
        self.path = Path(path)
        _check_batch(batch_size, max_samples)
        batch_size = int(batch_size)
        self.device = parse_device(device, flag="device")
        self.num_workers = usable_workers(num_workers)
        (height, width), mean, std, num_samples = _manifest_stats(self.path)
        self.mean, self.std = mean, std
        self._normalize = Normalize(mean, std, self.device)

        _ffcv()
        from ffcv.fields.basics import IntDecoder
        from ffcv.fields.rgb_image import CenterCropRGBImageDecoder, SimpleRGBImageDecoder
        from ffcv.loader import Loader, OrderOption
        from ffcv.transforms import ToDevice, ToTensor, ToTorchImage

        sizes = _image_sizes(self.path)
        uniform = bool((sizes == sizes[0]).all())
        side = min(height, width)  # mixed sizes: each image's centre square, resized to one common square
        decoder = SimpleRGBImageDecoder() if uniform else CenterCropRGBImageDecoder((side, side), ratio=1.0)
        to_device = [ToDevice(self.device, non_blocking=True)] if self.device.type != "cpu" else []
        pipelines = {
            "image": [decoder, ToTensor(), *to_device, ToTorchImage()],
            "label": [IntDecoder(), ToTensor(), *([ToDevice(self.device, non_blocking=True)] if to_device else [])],
        }
        n = num_samples if max_samples is None else min(max_samples, num_samples)
        threads = torch.get_num_threads()
        try:
            self._loader = Loader(
                str(self.path),
                batch_size=batch_size,
                num_workers=self.num_workers,
                order=OrderOption.SEQUENTIAL,
                indices=np.arange(n, dtype=np.uint64),
                pipelines=pipelines,
                drop_last=False,
            )
        finally:
            torch.set_num_threads(threads)
        self.num_samples = n

    def __len__(self) -> int:
        return len(self._loader)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield ``(images (N, 3, H, W) float32 normalised, labels (N,) int64)`` in file order (fresh tensors)."""
        if self._loader is None:
            raise ConfigError(f"this EvalLoader over {self.path} was closed; build a new one")
        run = _start_epoch(self._loader, 0, 0, self.path)
        try:
            for images, labels in run:
                yield self._normalize.from_uint8(images), labels.view(-1).clone()  # new tensors (A3e)
        finally:
            run.close()

    def close(self) -> None:
        """Release the loader (iterators close themselves when exhausted or abandoned)."""
        self._loader = None


def sample_views(
    path: str | Path, views: Sequence[ViewSpec], n: int, *, seed: int = 0, epoch: int = 0
) -> list[torch.Tensor]:
    """``n`` samples of each view, un-normalised in [0, 1], for image grids (TensorBoard, docs).

    Builds a one-off loader (pays the JIT): use it for pictures, not in a training loop.

    Returns:
        One ``(n, 3, size_i, size_i)`` CPU tensor per view (fewer rows if the split is smaller than ``n``).
    """
    if n < 1:
        raise ConfigError(f"sample_views needs n >= 1, got {n}")
    _, _, _, num_samples = _manifest_stats(Path(path))
    loader = ViewLoader(
        path,
        views,
        min(n, max(num_samples, 1)),
        device="cpu",
        num_workers=1,
        seed=seed,
        normalize=False,
        drop_last=False,
    )
    try:
        batches = loader.epoch(epoch)
        try:
            out, _ = next(batches)
        finally:
            batches.close()
        return [v.clamp_(0.0, 1.0) for v in out]
    finally:
        loader.close()
