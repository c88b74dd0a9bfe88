"""The evaluation loader: plain, ordered images of a whole split (kNN, linear probe, feature export)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from sslrun.core.data.augment import Normalize
from sslrun.core.data.ffcv_compat import import_ffcv, new_loader, start_epoch
from sslrun.core.data.source import Source, check_batch, usable_workers
from sslrun.core.errors import ConfigError
from sslrun.core.system import parse_device

__all__ = ["EvalLoader"]


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
        DataError / ConfigError: as :class:`~sslrun.core.data.loader.ViewLoader`.

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
        check_batch(batch_size, max_samples)
        batch_size = int(batch_size)
        self.device = parse_device(device, flag="device")
        self.num_workers = usable_workers(num_workers)
        source = Source.open(self.path)
        self.mean, self.std = source.mean, source.std
        self._normalize = Normalize(source.mean, source.std, self.device)

        import_ffcv()  # seconds of numba compilation on first use: only when a loader is built
        from ffcv.fields.basics import IntDecoder
        from ffcv.fields.rgb_image import CenterCropRGBImageDecoder, SimpleRGBImageDecoder
        from ffcv.loader import OrderOption
        from ffcv.transforms import ToDevice, ToTensor, ToTorchImage

        side = min(source.image_size)  # mixed sizes: each image's centre square, resized to one common square
        decoder = SimpleRGBImageDecoder() if source.uniform else CenterCropRGBImageDecoder((side, side), ratio=1.0)
        to_device = [ToDevice(self.device, non_blocking=True)] if self.device.type != "cpu" else []
        pipelines = {
            "image": [decoder, ToTensor(), *to_device, ToTorchImage()],
            "label": [IntDecoder(), ToTensor(), *([ToDevice(self.device, non_blocking=True)] if to_device else [])],
        }
        n = source.num_samples if max_samples is None else min(max_samples, source.num_samples)
        self._loader = new_loader(
            self.path,
            batch_size=batch_size,
            num_workers=self.num_workers,
            order=OrderOption.SEQUENTIAL,
            indices=np.arange(n, dtype=np.uint64),
            pipelines=pipelines,
            drop_last=False,
        )
        self.num_samples = n

    def __len__(self) -> int:
        return len(self._loader)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield ``(images (N, 3, H, W) float32 normalised, labels (N,) int64)`` in file order (fresh tensors)."""
        if self._loader is None:
            raise ConfigError(f"this EvalLoader over {self.path} was closed; build a new one")
        run = start_epoch(self._loader, 0, 0, self.path)
        try:
            for images, labels in run:
                yield self._normalize.from_uint8(images), labels.view(-1).clone()  # fresh: FFCV reuses its buffers
        finally:
            run.close()

    def close(self) -> None:
        """Release the loader (iterators close themselves when exhausted or abandoned)."""
        self._loader = None
