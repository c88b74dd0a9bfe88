"""The pretraining loader: several augmented views of every image, from ONE FFCV ``Loader``.

:class:`ViewLoader` gives FFCV one pipeline per view, all fed by the ``image`` field (``PipelineSpec``): each image
is decoded once into a shared buffer that every view crops from (images of varying shape, such as whole photos
prepared with imagefolder's ``max_side``, each in a slot of the largest size). The work is split by where it is
cheapest:

* in FFCV (CPU threads, numba): decode, random-resized crop and horizontal flip, seeded by
  ``(seed, epoch, sample index, view)`` (:mod:`sslrun.core.data.ops`; FFCV's own ops cannot be seeded);
* on the training device, batched (:mod:`sslrun.core.data.augment`): colour jitter, grayscale, blur, solarization with
  per-sample parameters from a generator seeded by ``(seed, epoch, batch index, rank, view)``, then
  normalisation with the manifest's mean/std.

The data stream is defined by the **global** batch ``B = batch_size x world_size``, never by the world size:
epoch ``e`` is one permutation of the samples (seeded by ``(seed, e)``) cut into ``len(dataset) // B`` global
batches, and rank ``r`` of ``W`` takes the ``r``-th contiguous ``B / W`` of each. The colour parameters of a global
batch are drawn for all ``B`` samples and sliced the same way; crops and flips are seeded per sample. So which
images form global batch ``k``, and how each of them is augmented, is the same on 1, 2 or 8 workers: a run resumed
at global batch ``k`` (``loader.epoch(e, start_batch=k)``), even on another number of workers, sees every image of
the interrupted epoch exactly once in total, and later epochs exactly as an uninterrupted run does.

FFCV's sharp edges are handled in :mod:`sslrun.core.data.ffcv_compat` (a failing pipeline raises instead of
hanging, an abandoned epoch stops its thread, torch's thread count is kept) and here: returned tensors are fresh,
not views into FFCV's output buffers (which it overwrites a few batches later), and ``num_workers`` is clipped to
the usable cores. The evaluation loader is :class:`sslrun.core.data.eval_loader.EvalLoader`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sslrun.core.data.augment import ColorAugment, Normalize
from sslrun.core.data.ffcv_compat import Epoch, epoch_order, import_ffcv, new_loader
from sslrun.core.data.source import Source, check_batch, usable_workers
from sslrun.core.errors import ConfigError, DataError
from sslrun.core.interfaces import ViewSpec
from sslrun.core.rng import batch_seed
from sslrun.core.system import parse_device, usable_cores

__all__ = ["ViewLoader", "sample_views"]

#: Views larger than this many times the stored image side are refused (an 8x enlargement already shows
#: nothing but interpolation; 28 px Fashion-MNIST -> 224 px is the largest sensible case).
MAX_UPSCALE = 8


class ViewLoader:
    """Multi-view augmented batches from a prepared ``.beton`` for self-supervised pretraining.

    Build it once per process (each build pays FFCV's numba JIT) and call :meth:`epoch` for every epoch.
    Under DDP (``distributed=True``) build it after ``init_process_group``: each rank then reads its own
    contiguous part of every global batch (see the module docstring); every rank has the same number of batches,
    ``len(dataset) // (batch_size x world_size)`` (the last incomplete global batch is dropped, as ``drop_last``;
    with ``drop_last=False`` it is completed with samples from the start of the epoch's order).

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
        check_batch(batch_size, max_samples)
        batch_size = int(batch_size)
        self.device = parse_device(device, flag="device")
        self.num_workers = usable_workers(num_workers)
        source = Source.open(self.path)
        (height, width), mean, std, num_samples = source.image_size, source.mean, source.std, source.num_samples
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

        import_ffcv()  # seconds of numba compilation on first use: only when a loader is built
        from ffcv.fields.basics import IntDecoder
        from ffcv.fields.rgb_image import SimpleRGBImageDecoder
        from ffcv.loader import OrderOption
        from ffcv.pipeline import PipelineSpec
        from ffcv.transforms import ToDevice, ToTensor, ToTorchImage

        from sslrun.core.data import ops

        self._state = ops.AugmentState(self.seed)  # read by the compiled crop/flip code: lives as long as us
        to_device = [ToDevice(self.device, non_blocking=True)] if self.device.type != "cpu" else []
        # Fresh operation instances per view: FFCV maps each instance to one graph node, so a shared one would
        # make the graph ambiguous. Numba ops before ToTensor, torch ops after: a numba op after a torch op makes
        # FFCV 1.0.2's Loader() loop forever in Graph.group_operations. The image field itself is disabled (None):
        # the views are extra outputs decoded from it (PipelineSpec). Each image is decoded ONCE into a shared
        # buffer that each view crops from (a JPEG is decompressed once, not once per view): FFCV's decoder for
        # images of one size, ops.PaddedRGBImageDecoder plus the per-sample size table for varying shapes.
        # Outputs: (label, decoded, view 0, view 1, ...).
        shared = SimpleRGBImageDecoder() if source.uniform else ops.PaddedRGBImageDecoder()
        sizes = None if source.uniform else source.sizes
        pipelines: dict[str, Any] = {"image": None, "label": [IntDecoder(), ToTensor(), *to_device]}
        pipelines["decoded"] = PipelineSpec("image", decoder=shared)
        self._first_view = 2
        for i, v in enumerate(views):
            crop = ops.SeededResizedCrop(self._state, i, (v.size, v.size), v.scale, v.ratio, sizes=sizes)
            flip = ops.SeededHorizontalFlip(self._state, i, v.flip_p)  # in place, on this view's own crop
            tail = [flip, ToTensor(), *([ToDevice(self.device, non_blocking=True)] if to_device else [])]
            pipelines[f"view_{i}"] = PipelineSpec(shared, transforms=[crop, *tail, ToTorchImage()])

        n = num_samples if max_samples is None else min(max_samples, num_samples)
        subset = np.arange(n, dtype=np.uint64)
        if indices is not None:
            subset = np.asarray(indices, dtype=np.int64)
            if subset.size and (subset.min() < 0 or subset.max() >= n):
                raise ConfigError(f"ViewLoader indices must be in [0, {n}), got {subset.min()}..{subset.max()}")
            subset, n = subset.astype(np.uint64), int(subset.size)
        # FFCV is asked for the plain (non-distributed) permutation; the split over ranks is ours (`_rank_order`).
        self._loader = new_loader(
            self.path,
            batch_size=batch_size,
            num_workers=self.num_workers,
            os_cache=os_cache,
            order=OrderOption.RANDOM,
            distributed=False,
            seed=self.seed,
            indices=subset,
            pipelines=pipelines,
            drop_last=drop_last,
        )
        self.batch_size = batch_size
        self.global_batch = batch_size * self.world_size
        self._steps = n // self.global_batch if drop_last else -(-n // self.global_batch)
        self._active: Epoch | None = None
        # On the CPU the colour augmentations of the views can run side by side on the usable cores; on a GPU
        # they are asynchronous kernel launches already.
        cores = usable_cores()
        self._pool = (
            ThreadPoolExecutor(min(len(views), cores), thread_name_prefix="sslrun-views")
            if self.device.type == "cpu" and len(views) > 1 and cores > 1
            else None
        )
        if self._steps == 0:
            raise DataError(
                f"{self.path} has {n} samples, fewer than one batch of {self.global_batch} images over all ranks "
                f"({batch_size} on each of {self.world_size}); use a smaller batch size or more samples"
            )

    def __len__(self) -> int:
        """Batches per epoch on this rank (the same on every rank, and the number of global batches)."""
        return self._steps

    def batch_indices(self, epoch: int, batch: int) -> np.ndarray:
        """The sample indices (positions in the file) of this rank's part of global batch ``batch`` of ``epoch``:
        a record of what a run trained on, for debugging and for checking that a resize loses or repeats nothing."""
        return self._rank_order(epoch)[batch * self.batch_size : (batch + 1) * self.batch_size].copy()

    def _rank_order(self, epoch: int) -> np.ndarray:
        """This rank's samples for ``epoch``, batch after batch: its contiguous part of every global batch."""
        order = epoch_order(self._loader, epoch)
        need = self._steps * self.global_batch
        if order.size < need:  # drop_last=False: complete the last global batch from the start of the order
            order = np.concatenate([order, order[: need - order.size]])
        parts = order[:need].reshape(self._steps, self.world_size, self.batch_size)
        return np.ascontiguousarray(parts[:, self.rank, :]).reshape(-1)

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
        run = Epoch(self._loader, self._rank_order(epoch)[start_batch * self.batch_size :], self.path)
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
        # Drawn for the whole global batch and sliced to this rank's part: the same parameters per image whatever
        # the world size (rank 0 in the seed is the global batch's, not this rank's).
        g = torch.Generator().manual_seed(batch_seed(self.seed, epoch, batch, 0, i))
        part = (self.rank * self.batch_size, self.global_batch)
        # A new float tensor (FFCV's output buffer is overwritten a few batches later), in standard NCHW layout.
        y = self._augment[i].from_uint8(x, g, part=part)
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
    num_samples = Source.open(Path(path)).num_samples
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
