"""BYOL: bootstrap your own latent (Grill et al. 2020, "Bootstrap Your Own Latent: A New Approach to
Self-Supervised Learning", https://arxiv.org/abs/2006.07733)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from sslrun.core.errors import ConfigError
from sslrun.core.interfaces import Method, ViewSpec
from sslrun.plugins.common.ema import frozen_copy, update_momentum
from sslrun.plugins.common.heads import BYOLPredictionHead, BYOLProjectionHead
from sslrun.plugins.common.losses import byol_loss
from sslrun.plugins.common.views import byol_views

__all__ = ["BYOL", "BYOLConfig"]


@dataclass
class BYOLConfig:
    """BYOL hyperparameters (paper defaults, section 3.3)."""

    # Projector and predictor: Linear(4096) -> BN -> ReLU -> Linear(256).
    projection_hidden_dim: int = 4096
    projection_dim: int = 256
    prediction_hidden_dim: int = 4096
    # Target EMA rate tau: cosine from tau_base to tau_final = 1 over training (section 3.2). 0.996 is for
    # batch 4096; with small batches a higher tau_base (0.99-0.999) may be needed.
    tau_base: float = 0.996
    tau_final: float = 1.0

    def __post_init__(self) -> None:
        for key in ("tau_base", "tau_final"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise ConfigError(f"byol: {key} must be in [0, 1], got {getattr(self, key)}")
        if min(self.projection_hidden_dim, self.projection_dim, self.prediction_hidden_dim) < 1:
            raise ConfigError("byol: head widths must be >= 1")


class BYOL(Method):
    """BYOL: the online network (encoder, projector, predictor) regresses the target network's projection of
    another view; the target is an EMA of the online encoder and projector. The loss is symmetrised: each view
    goes through both networks and the two regression losses are summed (eq. 3: ``L + L~``, in [0, 8]).

    The loss is per sample, so nothing is gathered across ranks; BatchNorm statistics are per rank (or global
    with SyncBatchNorm on CUDA). The target network has ``requires_grad=False`` and is updated after each optimiser
    step with the cosine-scheduled ``tau`` the trainer passes to :meth:`on_after_step`.

    Args:
        encoder: backbone with ``output_dim``.
        cfg: :class:`BYOLConfig`.
    """

    Config = BYOLConfig

    def __init__(self, encoder: nn.Module, cfg: BYOLConfig) -> None:
        super().__init__(encoder, cfg)
        self.projector = BYOLProjectionHead(encoder.output_dim, cfg.projection_hidden_dim, cfg.projection_dim)
        self.predictor = BYOLPredictionHead(cfg.projection_dim, cfg.prediction_hidden_dim, cfg.projection_dim)
        self.target_encoder = frozen_copy(encoder)
        self.target_projector = frozen_copy(self.projector)

    @classmethod
    def view_specs(cls, cfg: BYOLConfig, image_size: int) -> list[ViewSpec]:
        """The asymmetric pair of table 6 (blur 1.0 / 0.1, solarize 0 / 0.2). Small images: no blur, crop from 0.2."""
        return byol_views(image_size)

    def momentum_schedule(self) -> tuple[float, float]:
        """``(tau_base, tau_final)`` = (0.996, 1.0)."""
        return (self.cfg.tau_base, self.cfg.tau_final)

    @torch.no_grad()
    def on_after_step(self, step: int, momentum: float | None) -> None:
        """EMA update of the target encoder and projector."""
        tau = self.cfg.tau_base if momentum is None else momentum
        update_momentum(self.encoder, self.target_encoder, tau)
        update_momentum(self.projector, self.target_projector, tau)

    def forward(self, views: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """``views = [v, v']`` -> ``{"loss"}``."""
        x1, x2 = views
        p1 = self.predictor(self.projector(self.encoder(x1)))
        p2 = self.predictor(self.projector(self.encoder(x2)))
        with torch.no_grad():
            t1 = self.target_projector(self.target_encoder(x1))
            t2 = self.target_projector(self.target_encoder(x2))
        loss = byol_loss(p1, t2) + byol_loss(p2, t1)
        return {"loss": loss}
