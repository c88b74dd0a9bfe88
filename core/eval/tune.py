"""Fine-tuning with its learning rate, weight decay and length chosen on held-out labels, never on the test split.

The fixed fine-tuning recipe (:class:`~sslrun.core.eval.finetune.FinetuneOptions`) is a fair comparison only if it
suits both starting points. With 1% of Fashion-MNIST (600 images) at batch 256 and ``drop_last`` it is 2 steps an
epoch, 60 steps in all: too few for random weights to converge, so the from-scratch baseline looks worse than it
is. :func:`tune_finetune` gives every starting point (pretrained or random) the same care:

1. **Held-out split of the labelled subset**: ``holdout`` (20%) of it, class-balanced and seeded
   (:func:`sslrun.core.eval.subsets.holdout_split`), is set aside; the rest is the fit part.
2. **Recipe for small subsets**: a batch with at least ~10 steps an epoch (:func:`tuned_batch`), every image in
   every epoch (``drop_last=False``), and the standard supervised augmentation, pad 4 px + random crop + flip, on
   training batches only (``augment="pad_crop"``).
3. **Grid, in two stages**: every ``(lr, weight_decay)`` pair of the grid is trained on the fit part for the
   middle length of ``steps`` and scored on the held-out part; then the best pair is trained for the other
   lengths. The best held-out top-1 wins; ties go to the shorter run, then to the earlier grid entry. Lengths are
   given in optimiser steps and turned into whole epochs of the fit part, so one grid suits 600 or 6,000 labels.
4. **Final run**: the chosen setting, for the same number of epochs, on the whole labelled subset; the test split
   is scored once, at the very end.

Every trial's held-out and train accuracy (train: the fit images, unaugmented) is returned, so a reader can see
whether the chosen length converged.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from sslrun.core.errors import ConfigError, DataError
from sslrun.core.eval.finetune import (
    FinetuneOptions,
    FinetuneOutcome,
    fit_classifier,
    new_classifier,
    read_labels,
    score_split,
)
from sslrun.core.eval.labelled import SubsetImages
from sslrun.core.eval.subsets import holdout_split

__all__ = ["TuneGrid", "TunedFinetune", "Trial", "tune_finetune", "tuned_batch", "tuned_recipe"]


@dataclass(frozen=True)
class TuneGrid:
    """What :func:`tune_finetune` tries.

    Attributes:
        lrs: base learning rates per 256 images (scaled linearly with the batch), SGD + Nesterov, cosine to 0.
        weight_decays: L2 on conv/linear weights.
        steps: run lengths in optimiser steps on the fit part (rounded up to whole epochs); the middle one (the lower
            middle of an even number) is the length of the first stage.
        holdout: share of the labelled subset held out for scoring the trials.
    """

    lrs: tuple[float, ...] = (0.05, 0.2, 0.8, 3.2)
    weight_decays: tuple[float, ...] = (5e-4, 5e-3)
    steps: tuple[int, ...] = (300, 600, 1200, 2400)
    holdout: float = 0.2

    def __post_init__(self) -> None:
        if not self.lrs or not self.weight_decays or not self.steps:
            raise ConfigError("the tuning grid needs at least one lr, one weight decay and one length in steps")
        if min(self.lrs) <= 0 or min(self.weight_decays) < 0 or min(self.steps) < 1:
            raise ConfigError(f"tuning grid values must be positive: lrs {self.lrs}, steps {self.steps}")
        if not 0.0 < self.holdout < 1.0:
            raise ConfigError(f"the tuning hold-out share must be in (0, 1), got {self.holdout}; e.g. 0.2")


@dataclass
class Trial:
    """One setting tried on the fit part, scored on the held-out part."""

    lr: float
    weight_decay: float
    epochs: int
    steps: int
    heldout_top1: float
    train_top1: float
    final_loss: float
    seconds: float
    stage: int


@dataclass
class TunedFinetune:
    """The test score of the chosen setting retrained on the whole labelled subset, and how it was chosen."""

    outcome: FinetuneOutcome
    recipe: FinetuneOptions
    chosen: Trial
    trials: list[Trial] = field(default_factory=list)
    train_top1: float = math.nan
    num_fit: int = 0
    num_heldout: int = 0

    def details(self) -> dict[str, Any]:
        """Plain JSON-able data for an evaluation result's ``details``."""
        return {
            "recipe": asdict(self.recipe),
            "steps": self.outcome.steps,
            "final_loss": self.outcome.final_loss,
            "epoch_loss": self.outcome.epoch_loss,
            "train_top1": self.train_top1,
            "tuning": {
                "num_fit": self.num_fit,
                "num_heldout": self.num_heldout,
                "chosen": asdict(self.chosen),
                "trials": [asdict(t) for t in self.trials],
            },
        }


def tuned_batch(num_labelled: int, cap: int) -> int:
    """The batch of the tuned recipe: the power of two nearest below ``num_labelled / 10`` (so an epoch is ~10
    steps or more), between 16 and ``cap``; never more than ``num_labelled``."""
    target = max(1.0, num_labelled / 10)
    return max(1, min(num_labelled, cap, max(16, 2 ** int(math.log2(target)))))


def tuned_recipe(base: FinetuneOptions, num_labelled: int) -> FinetuneOptions:
    """``base`` with the small-subset settings: :func:`tuned_batch`, no dropped images, pad + crop + flip."""
    return replace(base, batch_size=tuned_batch(num_labelled, base.batch_size), drop_last=False, augment="pad_crop")


def _epochs_for(steps: int, num_fit: int, batch: int) -> int:
    """Whole epochs of ``num_fit`` images at ``batch`` that reach at least ``steps`` steps."""
    return max(1, math.ceil(steps / math.ceil(num_fit / batch)))


def tune_finetune(
    encoder: nn.Module,
    *,
    num_classes: int,
    train_path: Path,
    indices: np.ndarray,
    test_path: Path,
    image_size: int,
    device: torch.device,
    base: FinetuneOptions | None = None,
    grid: TuneGrid | None = None,
    seed: int = 0,
    max_test_samples: int | None = None,
    log: Callable[[str], None] | None = None,
) -> TunedFinetune:
    """Choose lr, weight decay and length on a held-out part of ``indices``, retrain on all of them, score the
    test split once (see the module docstring).

    Args:
        encoder: the starting point (pretrained or random); copied for every trial, never modified.
        num_classes, train_path, image_size, device, seed, max_test_samples: as
            :func:`sslrun.core.eval.finetune.finetune`.
        indices: the labelled subset (positions in ``train_path``).
        test_path: the test split; read only by the final score, after the setting is chosen.
        base: the recipe whose lr, weight decay and epochs are tuned (``batch_size`` is the batch cap).
        grid: what to try (default :class:`TuneGrid`).
        log: called with one line per trial (progress).

    Raises:
        DataError: a class of the subset has a single image (nothing to hold out), or fewer than 2 images.
    """
    base, grid = base or FinetuneOptions(), grid or TuneGrid()
    indices = np.asarray(indices, dtype=np.int64)
    labels = read_labels(train_path).numpy()[indices]
    fit_pos, held_pos = holdout_split(labels, grid.holdout, seed)
    if held_pos.size == 0 or fit_pos.size < 2:
        raise DataError(
            f"the labelled subset ({indices.size} images) is too small to hold out {grid.holdout:.0%} for tuning; "
            "raise --label-fraction"
        )
    whole = SubsetImages.load(train_path, indices, image_size=image_size, device=device, num_workers=base.num_workers)
    fit, held = whole.take(fit_pos), whole.take(held_pos)
    recipe = tuned_recipe(base, len(whole))
    trials: list[Trial] = []

    def trial(lr: float, wd: float, steps: int, stage: int) -> Trial:
        started = time.perf_counter()
        opts = replace(recipe, lr=lr, weight_decay=wd, epochs=_epochs_for(steps, len(fit), recipe.batch_size))
        model, done, losses = _train(encoder, num_classes, fit, device, opts, seed)
        t = Trial(
            lr=lr,
            weight_decay=wd,
            epochs=opts.epochs,
            steps=done,
            heldout_top1=held.top1(model),
            train_top1=fit.top1(model),
            final_loss=losses[-1],
            seconds=round(time.perf_counter() - started, 2),
            stage=stage,
        )
        trials.append(t)
        if log is not None:
            log(
                f"tune: lr {lr:g} wd {wd:g} {t.epochs} epochs ({t.steps} steps): held-out {t.heldout_top1:.4f}, "
                f"train {t.train_top1:.4f}, {t.seconds:.0f} s"
            )
        return t

    lengths = sorted(set(grid.steps))
    middle = lengths[(len(lengths) - 1) // 2]
    first = [trial(lr, wd, middle, 1) for lr in grid.lrs for wd in grid.weight_decays]
    best = max(first, key=lambda t: t.heldout_top1)  # max keeps the first of equals: the earlier grid entry
    second = [best] + [trial(best.lr, best.weight_decay, s, 2) for s in lengths if s != middle]
    chosen = max(sorted(second, key=lambda t: t.steps), key=lambda t: t.heldout_top1)  # ties: the shorter run

    # the chosen setting on the whole labelled subset, for the same number of epochs; then the test split, once
    final = replace(recipe, lr=chosen.lr, weight_decay=chosen.weight_decay, epochs=chosen.epochs)
    model, steps, losses = _train(encoder, num_classes, whole, device, final, seed)
    train_top1 = whole.top1(model)
    top1, top5, num_test = score_split(
        model,
        test_path,
        batch_size=256,
        image_size=image_size,
        device=device,
        num_workers=base.num_workers,
        max_samples=max_test_samples,
    )
    outcome = FinetuneOutcome(top1, top5, num_test, steps, losses[-1], losses)
    return TunedFinetune(outcome, final, chosen, trials, train_top1, len(fit), len(held))


def _train(
    encoder: nn.Module,
    num_classes: int,
    images: SubsetImages,
    device: torch.device,
    opts: FinetuneOptions,
    seed: int,
) -> tuple[nn.Module, int, list[float]]:
    """A copy of ``encoder`` + a head trained with ``opts`` on ``images`` (pad + crop + flip on each batch)."""
    model = new_classifier(encoder, num_classes, device, seed)

    def batches(epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return images.batches(epoch, opts.batch_size, seed, pad=opts.pad, flip_p=opts.flip_p)

    steps, losses = fit_classifier(
        model,
        batches,
        steps_per_epoch=images.steps_per_epoch(opts.batch_size),
        batch_size=opts.batch_size,
        device=device,
        opts=opts,
    )
    return model, steps, losses
