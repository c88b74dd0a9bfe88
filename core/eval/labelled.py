"""A labelled subset held in memory, for the many short trainings of tuning: seeded batches with the standard
supervised augmentation (pad + random crop + flip), and plain scoring.

A fine-tuning trial on 1% of Fashion-MNIST is a few seconds of compute, but building an FFCV loader compiles its
pipeline (5-30 s on a busy 2-core machine). :class:`SubsetImages` reads the subset's images once through one
:class:`~sslrun.core.data.loader.ViewLoader` (unaugmented, normalised) and serves every trial from memory, so the
cost of tuning is the training itself. It is meant for labelled subsets (hundreds to tens of thousands of images);
:data:`MAX_BYTES` bounds it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sslrun.core.errors import ConfigError, DataError
from sslrun.core.interfaces import ViewSpec
from sslrun.core.rng import batch_seed, seed_from

__all__ = ["MAX_BYTES", "SubsetImages", "black_fill", "pad_crop_flip", "whole_view"]

#: Largest subset :class:`SubsetImages` holds (float32 images): 4 GiB, e.g. 1% of ImageNet at 224 px is ~7.7 GB.
MAX_BYTES = 4 << 30


def whole_view(size: int) -> ViewSpec:
    """The whole image at ``size`` px, unaugmented (the loader's view for data augmented later, or not at all)."""
    return ViewSpec(
        size=size,
        scale=(1.0, 1.0),
        ratio=(1.0, 1.0),
        flip_p=0.0,
        jitter_p=0.0,
        grayscale_p=0.0,
        blur_p=0.0,
        solarize_p=0.0,
    )


def black_fill(mean: Sequence[float], std: Sequence[float], device: torch.device | str = "cpu") -> torch.Tensor:
    """``(1, C, 1, 1)``: a black pixel once normalised, ``-mean / std`` (torchvision pads before normalising)."""
    m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    return (-m / s).to(device)


def pad_crop_flip(
    x: torch.Tensor, pad: int, flip_p: float, generator: torch.Generator, fill: torch.Tensor | None = None
) -> torch.Tensor:
    """Pad every image of ``x`` ``(N, C, H, W)`` by ``pad`` pixels of ``fill``, cut a random ``H x W`` window out
    of it and flip it horizontally with probability ``flip_p``: torchvision's ``RandomCrop(H, padding=pad)`` +
    ``RandomHorizontalFlip`` for a whole batch. Offsets and flips are drawn from ``generator`` (a CPU generator,
    so the draw is the same on every device). Returns a new tensor.

    Args:
        fill: ``(1, C, 1, 1)`` value of the padding (for normalised images: :func:`black_fill`); None pads with 0.
    """
    n, c, h, w = x.shape
    offsets = torch.randint(0, 2 * pad + 1, (2, n), generator=generator)
    flips = torch.rand(n, generator=generator) < flip_p
    if pad > 0:
        padded = F.pad(x if fill is None else x - fill, (pad, pad, pad, pad))
        rows = (offsets[0][:, None] + torch.arange(h)[None, :]).to(x.device)  # (N, H)
        cols = (offsets[1][:, None] + torch.arange(w)[None, :]).to(x.device)  # (N, W)
        idx = torch.arange(n, device=x.device)[:, None, None, None]
        chans = torch.arange(c, device=x.device)[None, :, None, None]
        x = padded[idx, chans, rows[:, None, :, None], cols[:, None, None, :]]
        x = x if fill is None else x + fill
    return torch.where(flips.to(x.device)[:, None, None, None], x.flip(-1), x)


@dataclass
class SubsetImages:
    """Normalised, unaugmented images of a labelled subset and their labels, in memory.

    Attributes:
        images: ``(N, C, H, W)`` float32, normalised with the split's mean/std.
        labels: ``(N,)`` int64.
        indices: ``(N,)`` the images' positions in their split.
        fill: :func:`black_fill` of the split (the padding of :func:`pad_crop_flip`).
    """

    images: torch.Tensor
    labels: torch.Tensor
    indices: np.ndarray
    fill: torch.Tensor

    @classmethod
    def load(
        cls, path: Path, indices: np.ndarray, *, image_size: int, device: torch.device, num_workers: int = 1
    ) -> SubsetImages:
        """Read samples ``indices`` of the prepared split ``path`` once, unaugmented, in the order of ``indices``.

        Raises:
            ConfigError: the subset would take more than :data:`MAX_BYTES`.
            DataError: the file is missing or damaged.
        """
        from sslrun.core.data.loader import ViewLoader

        indices = np.asarray(indices, dtype=np.int64)
        n = int(indices.size)
        if n < 1:
            raise DataError(f"no samples of {path} to load; the labelled subset is empty")
        need = n * 3 * image_size * image_size * 4
        if need > MAX_BYTES:
            raise ConfigError(
                f"tuning holds the labelled subset in memory: {n} images of {image_size} px need {need / 2**30:.1f} "
                f"GiB, over {MAX_BYTES / 2**30:.0f} GiB; lower --label-fraction or fine-tune without --tune"
            )
        whole = whole_view(image_size)
        batch = min(256, n)
        loader = ViewLoader(
            path, [whole], batch, device=device, num_workers=num_workers, indices=indices, drop_last=False
        )
        images, labels, order = [], [], []
        try:
            for b, (views, y) in enumerate(loader.epoch(0)):
                images.append(views[0])
                labels.append(y)
                order.append(loader.batch_indices(0, b))
            fill = black_fill(loader.mean, loader.std, device)
        finally:
            loader.close()
        got = np.concatenate(order)[:n]  # a completed last batch repeats samples from the start: keep the first n
        rows = {int(i): r for r, i in enumerate(got)}
        if len(rows) != n or set(rows) != set(indices.tolist()):
            raise DataError(f"{path}: the loader returned other samples than the {n} requested")
        take = torch.tensor([rows[int(i)] for i in indices])
        return cls(torch.cat(images)[take], torch.cat(labels)[take].long(), indices, fill)

    def __len__(self) -> int:
        return int(self.labels.numel())

    def take(self, positions: np.ndarray) -> SubsetImages:
        """The images at ``positions`` (rows of this subset), e.g. the fit and held-out parts."""
        pos = torch.as_tensor(np.asarray(positions, dtype=np.int64))
        return SubsetImages(self.images[pos], self.labels[pos], self.indices[pos.numpy()], self.fill)

    def steps_per_epoch(self, batch_size: int) -> int:
        """Batches in an epoch: every image once, the last batch completed from the start of the epoch's order."""
        return -(-len(self) // batch_size)

    def batches(
        self, epoch: int, batch_size: int, seed: int, *, pad: int, flip_p: float
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """One training epoch: a seeded permutation cut into full batches of ``batch_size`` (the last completed
        from the start of the order, so BatchNorm never sees a batch of one), each augmented with
        :func:`pad_crop_flip` seeded by ``(seed, epoch, batch)``."""
        n = len(self)
        g = torch.Generator().manual_seed(seed_from(seed, epoch))
        order = torch.randperm(n, generator=g)
        steps = self.steps_per_epoch(batch_size)
        order = torch.cat([order, order[: steps * batch_size - n]])
        for b in range(steps):
            rows = order[b * batch_size : (b + 1) * batch_size]
            gb = torch.Generator().manual_seed(batch_seed(seed, epoch, b, 0, 1))
            yield pad_crop_flip(self.images[rows], pad, flip_p, gb, self.fill), self.labels[rows]

    @torch.no_grad()
    def top1(self, model: nn.Module, batch_size: int = 512) -> float:
        """Top-1 of ``model`` (eval mode, no augmentation) on these images."""
        if len(self) == 0:
            raise DataError("no images to score; the held-out part of the labelled subset is empty")
        model.eval()
        device = self.images.device
        correct = 0
        for start in range(0, len(self), batch_size):
            x = self.images[start : start + batch_size].contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                pred = model(x).float().argmax(dim=1)
            correct += int((pred == self.labels[start : start + batch_size].to(device)).sum())
        return correct / len(self)
