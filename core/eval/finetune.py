"""Fine-tuning with few labels: the whole encoder plus a linear head, trained on a labelled subset.

The semi-supervised protocol of SimCLR (Chen et al. 2020, sec. 4.3 and appendix B.5: fine-tune all layers with
Nesterov-momentum SGD at lr ``0.05 * batch / 256``, random crop + flip only) on 1%/10%/100% of the labels, run the
same way from random initialisation for the from-scratch baseline (the gap between the two is what pretraining
adds).

Recipe (defaults in :class:`FinetuneOptions`): SGD with Nesterov momentum 0.9, peak lr ``0.05 * batch / 256``
with a cosine decay to 0 (the per-step arrays of :mod:`sslrun.core.train.schedules`), cross-entropy, light augmentation
(random resized crop of 50-100% of the image and horizontal flip, no colour changes) through the project's
:class:`~sslrun.core.data.loader.ViewLoader`. Two departures from SimCLR, both for small datasets and short schedules:
weight decay 5e-4 on conv/linear weights (SimCLR uses none; on a few hundred CIFAR images the network overfits
without it) and a one-epoch linear warm-up (the new head starts random; its first gradients would otherwise
disturb the pretrained features most). The test split is scored once, at the end (never used for selection).

``augment="pad_crop"`` replaces the resized crop with the standard supervised augmentation (pad 4 px, random crop
of the original size, horizontal flip), applied to training batches only; :mod:`sslrun.core.eval.tune` uses it,
with every labelled image in every epoch (``drop_last=False``), to choose lr, weight decay and length on a held-out
part of the labelled subset.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sslrun.core.errors import ConfigError, DataError, TrainingError
from sslrun.core.interfaces import ViewSpec
from sslrun.core.rng import batch_seed
from sslrun.core.train.schedules import scaled_lr, warmup_cosine

__all__ = [
    "AUGMENTATIONS",
    "Classifier",
    "FinetuneOptions",
    "FinetuneOutcome",
    "TrainedClassifier",
    "finetune",
    "fit_classifier",
    "light_view",
    "new_classifier",
    "read_labels",
    "score_split",
    "train_classifier",
]

#: The training augmentations of :class:`FinetuneOptions` (``augment``).
AUGMENTATIONS = ("resized_crop", "pad_crop")


@dataclass
class FinetuneOptions:
    """The fine-tuning recipe.

    Attributes:
        epochs: passes over the labelled subset.
        batch_size: images per step (capped at the subset size).
        lr: base learning rate per 256 images (linear scaling rule, Goyal et al. 2017); 0.05 is SimCLR's
            fine-tuning lr per 256 (0.8 at batch 4096 in appendix B.5).
        weight_decay: L2 on conv/linear weights (not on BN parameters or biases).
        momentum: Nesterov momentum.
        warmup_epochs: linear lr warm-up length.
        crop_scale: area range of the random resized crop (light: the object stays in view).
        flip_p: horizontal flip probability.
        num_workers: FFCV loader threads.
        augment: ``resized_crop`` (the crop of ``crop_scale``, SimCLR's fine-tuning augmentation) or ``pad_crop``
            (pad ``pad`` pixels of black, take a random crop of the original size, flip: the standard supervised
            recipe of torchvision's CIFAR / Fashion-MNIST examples).
        pad: padding of the ``pad_crop`` augmentation, in pixels.
        drop_last: drop each epoch's last incomplete batch. False keeps every labelled image in every epoch
            (the loader completes the last batch with images from the start of the epoch's order).
    """

    epochs: int = 30
    batch_size: int = 256
    lr: float = 0.05
    weight_decay: float = 5e-4
    momentum: float = 0.9
    warmup_epochs: float = 1.0
    crop_scale: tuple[float, float] = (0.5, 1.0)
    flip_p: float = 0.5
    num_workers: int = 1
    augment: str = "resized_crop"
    pad: int = 4
    drop_last: bool = True

    def __post_init__(self) -> None:
        if self.augment not in AUGMENTATIONS:
            raise ConfigError(f"fine-tuning augment must be one of {', '.join(AUGMENTATIONS)}, got {self.augment!r}")
        if self.pad < 0:
            raise ConfigError(f"fine-tuning pad must be >= 0 pixels, got {self.pad}")
        if self.epochs < 1 or self.batch_size < 1:
            raise ConfigError(
                f"fine-tuning needs epochs >= 1 and batch_size >= 1, got {self.epochs}, {self.batch_size}"
            )


@dataclass
class FinetuneOutcome:
    """Test accuracy after fine-tuning, and how training went."""

    top1: float
    top5: float
    num_test: int
    steps: int
    final_loss: float
    epoch_loss: list[float] = field(default_factory=list)


class Classifier(nn.Module):
    """Encoder + linear head: ``(N, 3, H, W) -> (N, num_classes)`` logits.

    The head starts at small random weights (std 0.01) and zero bias, so the first steps do not push large
    gradients into pretrained features.
    """

    def __init__(self, encoder: nn.Module, num_classes: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(int(encoder.output_dim), num_classes)  # type: ignore[arg-type]
        nn.init.normal_(self.head.weight, std=0.01)
        nn.init.zeros_(self.head.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))


def light_view(image_size: int, opts: FinetuneOptions) -> ViewSpec:
    """The view the loader makes for fine-tuning, never with colour jitter, grayscale, blur or solarize: for
    ``resized_crop``, a random resized crop + flip; for ``pad_crop``, the whole image unchanged
    (:func:`sslrun.core.eval.labelled.pad_crop_flip` then runs on the training batch)."""
    if opts.augment == "pad_crop":
        from sslrun.core.eval.labelled import whole_view

        return whole_view(image_size)
    return ViewSpec(
        size=image_size,
        scale=opts.crop_scale,
        flip_p=opts.flip_p,
        jitter_p=0.0,
        grayscale_p=0.0,
        blur_p=0.0,
        solarize_p=0.0,
    )


def read_labels(path: Path, max_samples: int | None = None) -> torch.Tensor:
    """The labels of a prepared split, in file order, from the .beton's metadata table (no image is decoded and
    no FFCV loader compiled). ``max_samples`` keeps the first N, as the loaders do.

    Raises:
        DataError: the file is missing, damaged or does not match its manifest.
    """
    from sslrun.core.data.format import BetonReader

    labels = BetonReader(path).labels
    if max_samples is not None:
        labels = labels[:max_samples]
    return torch.from_numpy(np.ascontiguousarray(labels, dtype=np.int64))


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, object]]:
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim > 1 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _logits(model: nn.Module, images: torch.Tensor, image_size: int, device: torch.device) -> torch.Tensor:
    """Eval-mode logits of normalised ``images`` (resized to ``image_size`` when the split stores other sizes)."""
    if images.shape[-1] != image_size:
        images = F.interpolate(images, size=(image_size, image_size), mode="bilinear", antialias=True)
    images = images.contiguous(memory_format=torch.channels_last)  # faster convolutions, CPU too
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        return model(images).float()


@torch.no_grad()
def score_split(
    model: nn.Module,
    test_path: Path,
    *,
    batch_size: int,
    image_size: int,
    device: torch.device,
    num_workers: int,
    max_samples: int | None,
) -> tuple[float, float, int]:
    """Top-1 / top-5 of ``model`` on a whole labelled split (unlabelled samples skipped)."""
    from sslrun.core.data.eval_loader import EvalLoader

    model.eval()
    loader = EvalLoader(test_path, batch_size, device=device, num_workers=num_workers, max_samples=max_samples)
    correct1 = correct5 = total = 0
    try:
        for images, y in loader:
            y = y.to(device).long()
            keep = y >= 0
            if not bool(keep.any()):
                continue
            logits = _logits(model, images[keep], image_size, device)
            y = y[keep]
            top = logits.topk(min(5, logits.shape[1]), dim=1).indices
            correct1 += int((top[:, 0] == y).sum())
            correct5 += int((top == y[:, None]).any(dim=1).sum())
            total += int(y.numel())
    finally:
        loader.close()
    if total == 0:
        raise DataError(f"{test_path} has no labelled samples to score")
    return correct1 / total, correct5 / total, total


@dataclass
class TrainedClassifier:
    """A fine-tuned encoder + head, and how its training went."""

    model: Classifier
    steps: int
    epoch_loss: list[float]


def new_classifier(encoder: nn.Module, num_classes: int, device: torch.device, seed: int) -> Classifier:
    """A copy of ``encoder`` plus a seeded head, channels_last, on ``device`` (``encoder`` is never modified)."""
    with torch.random.fork_rng(devices=[]):  # seeded head, without touching the caller's global RNG state
        torch.manual_seed(seed)
        model = Classifier(copy.deepcopy(encoder), num_classes).to(device)
    return model.to(memory_format=torch.channels_last)  # faster convolutions on CPU (oneDNN) and CUDA


def fit_classifier(
    model: nn.Module,
    batches: Callable[[int], Iterable[tuple[torch.Tensor, torch.Tensor]]],
    *,
    steps_per_epoch: int,
    batch_size: int,
    device: torch.device,
    opts: FinetuneOptions,
) -> tuple[int, list[float]]:
    """The training loop: ``opts.epochs`` epochs of ``batches(epoch)`` (augmented, normalised images and labels),
    SGD + Nesterov with warm-up and cosine per step. Returns ``(steps, mean loss of each epoch)``.

    Raises:
        TrainingError: the loss became non-finite (lower ``--lr``).
    """
    cuda = device.type == "cuda"
    total = opts.epochs * steps_per_epoch
    warmup = min(round(opts.warmup_epochs * steps_per_epoch), total)
    lrs = warmup_cosine(scaled_lr(opts.lr, batch_size), 0.0, total, warmup)
    optimizer = torch.optim.SGD(
        _param_groups(model, opts.weight_decay), lr=float(lrs[0]), momentum=opts.momentum, nesterov=True
    )
    step = 0
    epoch_loss: list[float] = []
    model.train()
    for epoch in range(opts.epochs):
        running, count = 0.0, 0
        for x, y in batches(epoch):
            for group in optimizer.param_groups:
                group["lr"] = float(lrs[min(step, total - 1)])
            x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
                logits = model(x)
            loss = F.cross_entropy(logits.float(), y.to(device).long())
            if not torch.isfinite(loss):
                raise TrainingError(f"fine-tuning loss became {loss.item()} at step {step}; lower --lr (now {opts.lr})")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            running += loss.item()
            count += 1
            step += 1
        epoch_loss.append(running / max(count, 1))
    return step, epoch_loss


def train_classifier(
    encoder: nn.Module,
    *,
    num_classes: int,
    train_path: Path,
    indices: np.ndarray,
    image_size: int,
    device: torch.device,
    opts: FinetuneOptions,
    seed: int = 0,
) -> TrainedClassifier:
    """Train a copy of ``encoder`` plus a linear head on samples ``indices`` of ``train_path``, read through the
    FFCV :class:`~sslrun.core.data.loader.ViewLoader` (no scoring).

    Raises:
        DataError: fewer than 2 labelled samples.
        TrainingError: the loss became non-finite (lower ``--lr``).
    """
    from sslrun.core.data.loader import ViewLoader
    from sslrun.core.eval.labelled import black_fill, pad_crop_flip

    n = int(indices.size)
    if n < 2:
        raise DataError(f"fine-tuning needs at least 2 labelled samples, the subset has {n}; raise --label-fraction")
    model = new_classifier(encoder, num_classes, device, seed)
    batch = min(opts.batch_size, n)
    loader = ViewLoader(
        train_path,
        [light_view(image_size, opts)],
        batch,
        device=device,
        num_workers=opts.num_workers,
        seed=seed,
        indices=np.asarray(indices, dtype=np.int64),
        drop_last=opts.drop_last,
    )
    fill = black_fill(loader.mean, loader.std, device)

    def batches(epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for b, (views, y) in enumerate(loader.epoch(epoch)):
            x = views[0]
            if opts.augment == "pad_crop":  # training batches only: scoring always sees the unchanged images
                g = torch.Generator().manual_seed(batch_seed(seed, epoch, b, 0, 1))
                x = pad_crop_flip(x, opts.pad, opts.flip_p, g, fill)
            yield x, y

    try:
        steps, epoch_loss = fit_classifier(
            model, batches, steps_per_epoch=len(loader), batch_size=batch, device=device, opts=opts
        )
    finally:
        loader.close()
    return TrainedClassifier(model, steps, epoch_loss)


def finetune(
    encoder: nn.Module,
    *,
    num_classes: int,
    train_path: Path,
    indices: np.ndarray,
    test_path: Path,
    image_size: int,
    device: torch.device,
    opts: FinetuneOptions | None = None,
    seed: int = 0,
    max_test_samples: int | None = None,
) -> FinetuneOutcome:
    """Fine-tune a copy of ``encoder`` plus a linear head on samples ``indices`` of ``train_path``, then score it
    once on ``test_path``.

    Args:
        encoder: the starting point (pretrained, or random for the from-scratch baseline); it is copied, never
            modified.
        num_classes: classes of the head.
        train_path: the prepared train split.
        indices: the labelled subset (positions in ``train_path``, e.g. from
            :func:`sslrun.core.eval.subsets.balanced_subset`).
        test_path: the prepared test split, scored once at the end.
        image_size: side of the training crops (the encoder's input size).
        device: where to train (channels_last everywhere; CUDA: bf16 autocast).
        opts: the recipe.
        seed: seeds the head's initialisation and the loader's crops and order.
        max_test_samples: score only the first N test samples.

    Raises:
        DataError: fewer than 2 labelled samples.
        TrainingError: the loss became non-finite (lower ``--lr``).
    """
    opts = opts or FinetuneOptions()
    trained = train_classifier(
        encoder,
        num_classes=num_classes,
        train_path=train_path,
        indices=indices,
        image_size=image_size,
        device=device,
        opts=opts,
        seed=seed,
    )
    top1, top5, num_test = score_split(
        trained.model,
        test_path,
        batch_size=opts.batch_size,
        image_size=image_size,
        device=device,
        num_workers=opts.num_workers,
        max_samples=max_test_samples,
    )
    final = trained.epoch_loss[-1] if trained.epoch_loss else math.nan
    return FinetuneOutcome(top1, top5, num_test, trained.steps, final, trained.epoch_loss)
