"""The plugin interfaces: Method, Encoder, Dataset (see docs/plugins.md).

Pretext tasks are Methods too: they subclass :class:`sslrun.core.pretext.PretextMethod`. A plugin is found through
an entry point (``sslrun.methods``, ``sslrun.encoders``, ``sslrun.pretexts``, ``sslrun.datasets``), whose name is
the plugin's only name, and validated against the interface of its kind right after it is imported
(:mod:`sslrun.core.plugins.registry`). Hyperparameters live in a per-plugin ``Config`` dataclass whose defaults are the
paper's; the experiment config carries them as plain ``kwargs`` and they are checked against that dataclass
on the driver, before anything runs.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol, runtime_checkable

import numpy as np
import torch
from torch import nn

__all__ = [
    "Dataset",
    "DatasetInfo",
    "Encoder",
    "EncoderFactory",
    "Method",
    "SetupContext",
    "ViewSpec",
]


@dataclass(frozen=True)
class ViewSpec:
    """How one augmented view is made from a source image.

    Crop and flip run in FFCV on the CPU (numba); colour operations run batched on the training device with
    per-sample random parameters; normalisation comes last. Defaults are SimCLR's ImageNet set
    (Chen et al. 2020, appendix A).

    Attributes:
        size: output side length in pixels (square).
        scale: random-resized-crop area range, as a fraction of the source image.
        ratio: random-resized-crop aspect-ratio range.
        flip_p: probability of a horizontal flip.
        jitter: colour-jitter strengths (brightness, contrast, saturation, hue).
        jitter_p: probability of applying colour jitter.
        grayscale_p: probability of converting to grayscale.
        blur_p: probability of a gaussian blur (sigma in ``blur_sigma``, kernel ~10% of ``size``).
        blur_sigma: gaussian-blur sigma range.
        solarize_p: probability of solarization (threshold 0.5 on [0, 1] images).
    """

    size: int = 224
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.1)
    jitter_p: float = 0.8
    grayscale_p: float = 0.2
    blur_p: float = 0.0
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize_p: float = 0.0

    def __post_init__(self) -> None:
        if self.size < 1:
            raise ValueError(f"ViewSpec.size must be >= 1, got {self.size}")
        lo, hi = self.scale
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"ViewSpec.scale must satisfy 0 < lo <= hi <= 1, got {self.scale}")
        for name in ("flip_p", "jitter_p", "grayscale_p", "blur_p", "solarize_p"):
            p = getattr(self, name)
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"ViewSpec.{name} must be a probability in [0, 1], got {p}")

    @property
    def uses_color(self) -> bool:
        """Whether this view's augmentations only make sense on colour images (saturation/hue jitter)."""
        return self.jitter_p > 0 and (self.jitter[2] > 0 or self.jitter[3] > 0)


@runtime_checkable
class Encoder(Protocol):
    """What an encoder module must provide: ``forward(x: (N, 3, H, W)) -> (N, output_dim)`` features with no
    classifier head, and its feature dimension as ``output_dim``."""

    output_dim: int

    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...


class EncoderFactory(Protocol):
    """An encoder plugin is a factory ``fn(**kwargs) -> nn.Module`` (timm-style). Its keyword arguments are its
    config: they are validated against its signature. If it takes ``image_size``, the data's image size is passed,
    so small images (<= 64 px) get a small stem by default."""

    def __call__(self, **kwargs: Any) -> nn.Module: ...


@dataclass(frozen=True)
class SetupContext:
    """What a method may need to know about the run before its first step (:meth:`Method.setup`).

    Lets a method state its schedules in the paper's units (epochs) and convert them to steps itself, instead of
    asking the user to restate them in steps.
    """

    image_size: int  #: side of the source images, in pixels
    steps_per_epoch: int  #: optimiser steps per epoch (global batch)
    total_steps: int  #: optimiser steps of the whole run
    world_size: int = 1  #: data-parallel processes


class Method(nn.Module, ABC):
    """A self-supervised method: views in, a dict with ``"loss"`` and logged terms out.

    The trainer knows nothing method-specific. It wraps the method in DDP and calls ``forward(views)`` each step,
    then ``on_after_step`` (EMA teacher updates, queues). Subclasses set ``Config`` (a dataclass of
    hyperparameters with the paper's defaults) and implement ``view_specs`` and ``forward``.

    Args:
        encoder: the backbone (``output_dim`` attribute, ``(N, 3, H, W) -> (N, D)``). Kept as ``self.encoder``:
            it is what gets evaluated and exported.
        cfg: an instance of ``Config``.
    """

    #: The entry-point name, set by the registry when it loads the class (the entry point is the one place a
    #: plugin's name is written); empty on a class that was not loaded through it.
    name: ClassVar[str] = ""
    Config: ClassVar[type] = object
    #: True for methods whose augmentations or targets need colour; refused on grayscale datasets.
    requires_color: ClassVar[bool] = False
    #: ``optim`` settings (``{"name": "lars", "lr": 0.2}``) the method needs instead of sslrun's defaults, e.g. the
    #: paper's optimiser where the default SGD diverges. :func:`sslrun.core.plugins.build.build_config` layers them just
    #: above the defaults: a config file, a flag or ``--set`` still overrides each key.
    optim_defaults: ClassVar[dict[str, Any]] = {}
    #: Non-empty: why this method's BatchNorm must stay per rank (MoCo v2's shuffle-BN relies on it); the trainer
    #: then does not convert it to SyncBatchNorm under ``system.sync_bn``, and says so in one line.
    per_rank_batchnorm: str = ""

    def __init__(self, encoder: nn.Module, cfg: Any) -> None:
        super().__init__()
        if not hasattr(encoder, "output_dim"):
            raise TypeError(f"{type(self).__name__}: the encoder must declare `output_dim`")
        self.encoder = encoder
        self.cfg = cfg

    @classmethod
    @abstractmethod
    def view_specs(cls, cfg: Any, image_size: int) -> list[ViewSpec]:
        """The views this method trains on, for source images of side ``image_size``; one spec per view."""

    @abstractmethod
    def forward(self, views: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """One training step's loss. ``views[i]`` is ``(N, 3, H_i, W_i)``, normalised, on the training device.

        Returns:
            A dict with a scalar ``"loss"`` to minimise, plus any other scalar terms to log.
        """

    def momentum_schedule(self) -> tuple[float, float] | None:
        """``(base, final)`` EMA momentum for methods with a teacher; the trainer runs a cosine schedule from
        base to final over training (BYOL, DINO) and passes the current value to :meth:`on_after_step`."""
        return None

    def setup(self, ctx: SetupContext) -> None:
        """Called once by the trainer after the method is built and before the first step (also on resume), with
        the run's :class:`SetupContext`. No-op by default; override to turn epoch-based schedules into steps."""

    @torch.no_grad()
    def on_after_step(self, step: int, momentum: float | None) -> None:
        """Called after each optimiser step (EMA update of a teacher, queue bookkeeping). No-op by default."""

    def param_groups(self) -> list[dict[str, Any]]:
        """Parameter groups for the optimiser. Biases and normalisation parameters are excluded from weight decay
        and LARS adaptation (``"lars_exclude": True``), as in SimCLR/BYOL."""
        decay, no_decay = [], []
        for p in self.parameters():
            if not p.requires_grad:
                continue
            (no_decay if p.ndim <= 1 else decay).append(p)
        return [
            {"params": decay},
            {"params": no_decay, "weight_decay": 0.0, "lars_exclude": True},
        ]

    def visuals(self) -> dict[str, torch.Tensor] | None:
        """Images to show in TensorBoard (``(N, 3, H, W)`` in [0, 1]) from the last step, or None."""
        return None

    #: per-channel mean/std the views were normalised with (set by :meth:`set_normalization`; identity until then)
    norm_mean: tuple[float, ...] = (0.0, 0.0, 0.0)
    norm_std: tuple[float, ...] = (1.0, 1.0, 1.0)

    def set_normalization(self, mean: Sequence[float], std: Sequence[float]) -> None:
        """Tell the method how its views were normalised (the training split's manifest ``mean``/``std``, in 0..1
        units). The trainer calls it once after building the method, before the first step. Methods whose targets
        or visuals live in pixel space (pretext tasks: colorization's Lab conversion, image grids) use it to undo
        the normalisation; others can ignore it. Optional extension: the default just records the values."""
        self.norm_mean = tuple(float(m) for m in mean)
        self.norm_std = tuple(float(s) for s in std)


@dataclass(frozen=True)
class DatasetInfo:
    """What the data pipeline needs to know about a prepared split."""

    image_size: int
    grayscale: bool
    num_classes: int | None


class Dataset(ABC):
    """A dataset plugin turns raw files into an indexable of ``(image, label)`` pairs; core writes the FFCV
    ``.beton`` from it (fields ``image``: RGB uint8 HxWx3 — grayscale replicated to 3 channels — and ``label``:
    int, -1 where a split has no labels), with a manifest, a progress bar and an atomic rename.

    Subclasses set ``Config`` (a dataclass with at least ``root: str | None``), ``splits`` and
    ``eval_splits``, and implement :meth:`info` and :meth:`open_split`.
    """

    #: The entry-point name, set by the registry when it loads the class (the entry point is the one place a
    #: plugin's name is written); empty on a class that was not loaded through it.
    name: ClassVar[str] = ""
    Config: ClassVar[type] = object
    #: Split names this dataset provides; the first is used for pretraining.
    splits: ClassVar[tuple[str, ...]] = ("train", "test")
    #: The labelled splits used by the kNN monitor and evaluation: (bank/train, query/test), or None.
    eval_splits: ClassVar[tuple[str, str] | None] = ("train", "test")

    def __init__(self, cfg: Any) -> None:
        self.cfg = cfg

    @abstractmethod
    def info(self) -> DatasetInfo:
        """Image size (side length after preparation), grayscale or colour, number of classes."""

    @abstractmethod
    def open_split(self, split: str) -> Sequence[tuple[np.ndarray, int]]:
        """An indexable (``len`` and ``[i]``) of ``(HxWx3 uint8 image, int label)`` for ``split``.

        Raises:
            DataError: the raw files are missing (say where to put them, or that ``download`` needs a network)
                or unreadable.
        """


def config_fields(config_cls: type) -> dict[str, dataclasses.Field[Any]]:
    """The fields of a plugin's ``Config`` dataclass, by name."""
    return {f.name: f for f in dataclasses.fields(config_cls)}
