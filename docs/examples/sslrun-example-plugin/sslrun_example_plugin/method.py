"""Alignment and uniformity on the hypersphere (Wang & Isola 2020, https://arxiv.org/abs/2005.10242).

loss = align(z1, z2) + (uniform(z1) + uniform(z2)) / 2 with
align = E ||z1 - z2||^alpha and uniform = log E exp(-t ||z_i - z_j||^2) over pairs in the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from sslrun.core.interfaces import Method, ViewSpec


@dataclass
class AlignUniformConfig:
    proj_dim: int = 128  # projection output, L2-normalised
    alpha: float = 2.0  # paper default
    t: float = 2.0  # paper default
    uniform_weight: float = 1.0


class AlignUniform(Method):
    """Two views, a linear projection to the unit sphere, align + uniform loss."""

    Config = AlignUniformConfig

    def __init__(self, encoder: nn.Module, cfg: AlignUniformConfig) -> None:
        super().__init__(encoder, cfg)
        self.projector = nn.Linear(encoder.output_dim, cfg.proj_dim)

    @classmethod
    def view_specs(cls, cfg: AlignUniformConfig, image_size: int) -> list[ViewSpec]:
        view = ViewSpec(size=image_size, scale=(0.2, 1.0), blur_p=0.0)
        return [view, view]

    def forward(self, views: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        z1, z2 = (F.normalize(self.projector(self.encoder(v)), dim=1) for v in views[:2])
        align = (z1 - z2).norm(dim=1).pow(self.cfg.alpha).mean()
        uniform = sum(torch.pdist(z).pow(2).mul(-self.cfg.t).exp().mean().log() for z in (z1, z2)) / 2
        loss = align + self.cfg.uniform_weight * uniform
        return {"loss": loss, "align": align.detach(), "uniform": uniform.detach()}
