"""The random parameters of one batch's colour augmentation, shared by the torch path
(:mod:`sslrun.core.data.augment`) and the numba CPU kernel (:mod:`sslrun.core.data.color_cpu`), which draw and
consume them respectively; a module of its own so that neither of the two imports the other."""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

__all__ = ["ColorParams"]


@dataclass
class ColorParams:
    """Per-sample random parameters of one batch of one view (all on the CPU, length N)."""

    jitter: torch.Tensor  # bool: apply colour jitter
    factors: torch.Tensor  # (N, 4) float: brightness, contrast, saturation factors and hue shift
    order: torch.Tensor  # (N, 4) long: the order of the four jitter operations
    gray: torch.Tensor  # bool
    blur: torch.Tensor  # bool
    sigma: torch.Tensor  # float
    solarize: torch.Tensor  # bool

    def rows(self, index: slice) -> ColorParams:
        """The parameters of some samples only (e.g. one rank's part of a global batch)."""
        return ColorParams(**{f.name: getattr(self, f.name)[index].contiguous() for f in fields(self)})
