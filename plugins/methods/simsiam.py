"""SimSiam: siamese networks with a stop-gradient (Chen & He 2021, "Exploring Simple Siamese Representation
Learning", https://arxiv.org/abs/2011.10566)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sslrun.core.errors import ConfigError
from sslrun.core.interfaces import Method, ViewSpec
from sslrun.plugins.common.heads import SimSiamPredictionHead, SimSiamProjectionHead
from sslrun.plugins.common.losses import negative_cosine_similarity
from sslrun.plugins.common.views import for_image_size

__all__ = ["SimSiam", "SimSiamConfig"]


@dataclass
class SimSiamConfig:
    """SimSiam hyperparameters (paper defaults, section 4)."""

    # Projector: 3 layers of 2048 with BN on each, including the output.
    projection_dim: int = 2048
    # Predictor bottleneck: 2048 -> 512 -> 2048 (section 4.4: the bottleneck helps).
    prediction_hidden_dim: int = 512
    # Section 4.4 / appendix: the predictor's lr is not decayed ("fix lr for predictor" helps).
    fix_predictor_lr: bool = True

    def __post_init__(self) -> None:
        if self.projection_dim < 1 or self.prediction_hidden_dim < 1:
            raise ConfigError("simsiam: projection_dim and prediction_hidden_dim must be >= 1")


class SimSiam(Method):
    """SimSiam: ``L = D(p1, stopgrad(z2)) / 2 + D(p2, stopgrad(z1)) / 2`` with ``D`` the negative cosine; no
    negatives, no momentum encoder. The stop-gradient is what prevents collapse (section 4.1).

    Besides the loss it logs ``z_std``, the mean over dimensions of the standard deviation of the L2-normalised
    projections (fig. 2): about ``1/sqrt(d)`` while healthy, 0 when the representation collapses.

    The paper keeps the predictor's learning rate fixed (not decayed): with ``fix_predictor_lr`` its parameter
    groups are marked ``"fixed_lr"`` and the trainer holds them at the peak lr.

    Args:
        encoder: backbone with ``output_dim``.
        cfg: :class:`SimSiamConfig`.
    """

    Config = SimSiamConfig

    def __init__(self, encoder: nn.Module, cfg: SimSiamConfig) -> None:
        super().__init__(encoder, cfg)
        self.projector = SimSiamProjectionHead(encoder.output_dim, cfg.projection_dim, cfg.projection_dim)
        self.predictor = SimSiamPredictionHead(cfg.projection_dim, cfg.prediction_hidden_dim, cfg.projection_dim)

    def param_groups(self) -> list[dict[str, Any]]:
        """The default groups, with the predictor's parameters split off into ``fixed_lr`` groups."""
        groups = super().param_groups()
        if not self.cfg.fix_predictor_lr:
            return groups
        predictor = {id(p) for p in self.predictor.parameters()}
        out = []
        for group in groups:
            out.append({**group, "params": [p for p in group["params"] if id(p) not in predictor]})
            fixed = [p for p in group["params"] if id(p) in predictor]
            if fixed:
                out.append({**group, "params": fixed, "fixed_lr": True})
        return out

    @classmethod
    def view_specs(cls, cfg: SimSiamConfig, image_size: int) -> list[ViewSpec]:
        """MoCo v2's augmentation (section 4): crop (0.2-1), jitter (0.4, 0.4, 0.4, 0.1) p=0.8, grayscale p=0.2,
        blur p=0.5, flip. Small images: no blur (the paper's CIFAR runs also drop it)."""
        spec = ViewSpec(
            size=image_size, scale=(0.2, 1.0), jitter=(0.4, 0.4, 0.4, 0.1), jitter_p=0.8, grayscale_p=0.2, blur_p=0.5
        )
        spec = for_image_size(spec, image_size)
        return [spec, spec]

    def forward(self, views: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """``views = [x1, x2]`` -> ``{"loss", "z_std"}``."""
        x1, x2 = views
        z1 = self.projector(self.encoder(x1))
        z2 = self.projector(self.encoder(x2))
        p1, p2 = self.predictor(z1), self.predictor(z2)
        loss = 0.5 * negative_cosine_similarity(p1, z2) + 0.5 * negative_cosine_similarity(p2, z1)
        z_std = F.normalize(z1.detach().float(), dim=1).std(dim=0).mean()
        return {"loss": loss, "z_std": z_std}
