"""VICReg: variance-invariance-covariance regularisation (Bardes, Ponce & LeCun 2022, "VICReg:
Variance-Invariance-Covariance Regularization for Self-Supervised Learning", https://arxiv.org/abs/2105.04906)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from sslrun.core.errors import ConfigError
from sslrun.core.interfaces import Method, ViewSpec
from sslrun.plugins.common.heads import BarlowTwinsProjectionHead
from sslrun.plugins.common.losses import vicreg_loss
from sslrun.plugins.common.views import byol_views

__all__ = ["VICReg", "VICRegConfig"]


@dataclass
class VICRegConfig:
    """VICReg hyperparameters (paper defaults, section 4.1)."""

    # Loss coefficients lambda (invariance), mu (variance), nu (covariance): 25 / 25 / 1.
    sim_coeff: float = 25.0
    std_coeff: float = 25.0
    cov_coeff: float = 1.0
    # Expander: three layers of 8192 (BN + ReLU after the first two).
    hidden_dim: int = 8192
    output_dim: int = 8192

    def __post_init__(self) -> None:
        if min(self.sim_coeff, self.std_coeff, self.cov_coeff) < 0:
            raise ConfigError("vicreg: sim_coeff, std_coeff and cov_coeff must be >= 0")
        if self.hidden_dim < 1 or self.output_dim < 1:
            raise ConfigError("vicreg: hidden_dim and output_dim must be >= 1")


class VICReg(Method):
    """VICReg: an invariance term (MSE between the two views' embeddings) plus a variance hinge that keeps every
    dimension's standard deviation above 1 and a covariance penalty that decorrelates dimensions.

    The variance and covariance statistics are over the GLOBAL batch (embeddings gathered from every rank with
    gradients, like the official ``FullGatherLayer``); the invariance term is per sample and stays on each rank's
    rows. Logged: ``loss_inv``, ``loss_var``, ``loss_cov`` (unweighted).

    Args:
        encoder: backbone with ``output_dim``.
        cfg: :class:`VICRegConfig`.
    """

    Config = VICRegConfig
    # The paper's optimiser (section 4.1: LARS, base lr 0.2 per 256, weight decay 1e-6). With sslrun's default
    # SGD the variance/covariance terms blow up early: at lr 0.12 the loss went non-finite at step 14 on
    # Fashion-MNIST (docs/benchmarks.md), while LARS trained without trouble (measured with trust coefficient
    # 0.02; 0.001 is the official code's LARS default).
    optim_defaults = {"name": "lars", "lr": 0.2, "weight_decay": 1e-6, "lars_eta": 0.001}

    def __init__(self, encoder: nn.Module, cfg: VICRegConfig) -> None:
        super().__init__(encoder, cfg)
        self.projector = BarlowTwinsProjectionHead(encoder.output_dim, cfg.hidden_dim, cfg.output_dim)

    @classmethod
    def view_specs(cls, cfg: VICRegConfig, image_size: int) -> list[ViewSpec]:
        """BYOL's asymmetric pair (appendix C.1 follows Barlow Twins, which follows BYOL). Small images: no blur,
        crop from 0.2."""
        return byol_views(image_size)

    def forward(self, views: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """``views = [x, x']`` -> ``{"loss", "loss_inv", "loss_var", "loss_cov"}``."""
        x1, x2 = views
        z1 = self.projector(self.encoder(x1))
        z2 = self.projector(self.encoder(x2))
        loss, terms = vicreg_loss(z1, z2, self.cfg.sim_coeff, self.cfg.std_coeff, self.cfg.cov_coeff, gather=True)
        return {"loss": loss, **terms}
