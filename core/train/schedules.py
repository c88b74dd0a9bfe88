"""Per-iteration schedules for the learning rate, weight decay and EMA momentum, indexed by the global step.

Like DINO's ``utils.cosine_scheduler``, every value is a function of the global optimiser step, never of the epoch,
so a run resumed mid-epoch continues on exactly the same curve. The arrays are built once for the whole run
(``epochs * steps_per_epoch`` values: 8 bytes each, 40 MB for five million steps). ``schedule.max_steps`` does not
reshape them: it only cuts the run short, so a run stopped by ``max_steps`` can be resumed with a larger one and
end exactly where an uninterrupted run would.

The closed forms (``s`` = global step, ``T`` = total steps, ``W`` = warm-up steps):

* lr:        ``base * (s + 1) / W`` for ``s < W`` (linear warm-up, Goyal et al. 2017; ``W`` is
             ``schedule.warmup_epochs``, by default the smaller of 10 epochs and a tenth of the run), then
             ``final + (base - final) * (1 + cos(pi * (s - W) / (T - W))) / 2`` (SGDR, Loshchilov & Hutter 2017).
* weight decay: the same cosine from ``weight_decay`` to ``weight_decay_end`` with no warm-up (DINO); constant
  when ``weight_decay_end`` is None.
* EMA momentum: ``1 - (1 - base) * (1 + cos(pi * s / T)) / 2`` (BYOL, Grill et al. 2020, section 3.2): ``base`` at
  the start, ``final`` (1.0 in BYOL) at the end; written as the same cosine from ``base`` to ``final``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from sslrun.core.config import ExperimentConfig

__all__ = ["Schedules", "build_schedules", "cosine_value", "scaled_lr", "warmup_cosine", "warmup_cosine_value"]


def scaled_lr(base_lr: float, global_batch_size: int) -> float:
    """The linear scaling rule (Goyal et al. 2017): ``base_lr`` is per 256 images, so the peak lr is
    ``base_lr * global_batch_size / 256``."""
    return base_lr * global_batch_size / 256


def cosine_value(step: int, base: float, final: float, total: int) -> float:
    """Half-cosine from ``base`` (step 0) to ``final`` (step ``total``)."""
    if total <= 0:
        return final
    return final + (base - final) * 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))


def warmup_cosine_value(step: int, base: float, final: float, total: int, warmup: int) -> float:
    """Linear warm-up to ``base`` over ``warmup`` steps, then half-cosine to ``final`` at ``total``."""
    if step < warmup:
        return base * (step + 1) / warmup
    return cosine_value(step - warmup, base, final, total - warmup)


def warmup_cosine(base: float, final: float, total: int, warmup: int = 0) -> np.ndarray:
    """The whole curve of :func:`warmup_cosine_value` as a float64 array of ``total`` values (vectorised)."""
    warmup = min(warmup, total)
    steps = np.arange(total, dtype=np.float64)
    ramp = base * (steps[:warmup] + 1) / max(warmup, 1)
    decay_len = total - warmup
    if decay_len <= 0:
        return ramp
    k = steps[warmup:] - warmup
    decay = final + (base - final) * 0.5 * (1.0 + np.cos(np.pi * k / decay_len))
    return np.concatenate([ramp, decay])


@dataclass(frozen=True)
class Schedules:
    """Values for every global step of a run.

    Attributes:
        lr: peak-scaled learning rate per step.
        weight_decay: weight decay per step (for the parameter groups that decay).
        momentum: EMA momentum per step, or None for methods without a teacher.
        total_steps: ``epochs * steps_per_epoch``.
        warmup_steps: linear warm-up length.
        steps_per_epoch: batches per epoch for one rank (all ranks have the same).
    """

    lr: np.ndarray
    weight_decay: np.ndarray
    momentum: np.ndarray | None
    total_steps: int
    warmup_steps: int
    steps_per_epoch: int

    def at(self, step: int) -> tuple[float, float, float | None]:
        """``(lr, weight_decay, momentum)`` for a global step; steps past the end keep the last value."""
        i = min(step, self.total_steps - 1)
        mom = None if self.momentum is None else float(self.momentum[i])
        return float(self.lr[i]), float(self.weight_decay[i]), mom

    def position(self) -> dict[str, int]:
        """What a checkpoint records about the schedules (the step itself is stored beside it)."""
        return {
            "total_steps": self.total_steps,
            "warmup_steps": self.warmup_steps,
            "steps_per_epoch": self.steps_per_epoch,
        }


def build_schedules(
    cfg: ExperimentConfig, steps_per_epoch: int, momentum: tuple[float, float] | None = None
) -> Schedules:
    """The lr / weight-decay / momentum schedules of ``cfg`` for ``steps_per_epoch`` batches per epoch.

    Args:
        cfg: the experiment (``optim``, ``schedule``, ``data.batch_size`` are read).
        steps_per_epoch: ``len(loader)`` on one rank.
        momentum: ``method.momentum_schedule()`` (``(base, final)``) or None.
    """
    total = cfg.schedule.epochs * steps_per_epoch
    warmup = min(round(cfg.schedule.warmup * steps_per_epoch), total)
    peak = scaled_lr(cfg.optim.lr, cfg.data.batch_size)
    lr = warmup_cosine(peak, peak * cfg.schedule.min_lr_ratio, total, warmup)
    wd_end = cfg.optim.weight_decay if cfg.optim.weight_decay_end is None else cfg.optim.weight_decay_end
    wd = warmup_cosine(cfg.optim.weight_decay, wd_end, total, 0)
    mom = None if momentum is None else warmup_cosine(float(momentum[0]), float(momentum[1]), total, 0)
    return Schedules(lr, wd, mom, total, warmup, steps_per_epoch)
