"""MoCo v3 (Chen, Xie & He 2021, "An Empirical Study of Training Self-Supervised Vision Transformers",
https://arxiv.org/abs/2104.02057)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from sslrun.core.distributed import concat_all_gather, rank
from sslrun.core.errors import ConfigError
from sslrun.core.interfaces import Method, ViewSpec
from sslrun.plugins.common.ema import frozen_copy, update_momentum
from sslrun.plugins.common.views import byol_views

__all__ = ["MoCoV3", "MoCoV3Config", "mlp", "mocov3_contrastive_loss"]


@dataclass
class MoCoV3Config:
    """MoCo v3 hyperparameters (paper / official ``main_moco.py`` defaults)."""

    # Temperature tau: 0.2, the paper's ViT setting (and the official ViT scripts); its ResNet-50 recipe uses 1.0.
    temperature: float = 0.2
    # Heads: hidden width 4096 and output 256 (``--moco-mlp-dim``, ``--moco-dim``). The projector has 2 layers on a
    # ResNet-style encoder and 3 on a ViT, the predictor 2 (official ``MoCo_ResNet`` / ``MoCo_ViT``).
    hidden_dim: int = 4096
    output_dim: int = 256
    # Momentum encoder: m from 0.99 to 1 with a cosine schedule (``--moco-m 0.99 --moco-m-cos``).
    momentum: float = 0.99
    momentum_final: float = 1.0
    # ViT only: keep the random patch projection fixed (the paper's "random patch projection" trick; the official
    # ``--stop-grad-conv1``, used in all its ViT scripts). It stabilises training at large batch sizes.
    stop_grad_conv1: bool = False

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise ConfigError(f"mocov3: temperature must be > 0, got {self.temperature}")
        if self.hidden_dim < 1 or self.output_dim < 1:
            raise ConfigError("mocov3: hidden_dim and output_dim must be >= 1")
        for key in ("momentum", "momentum_final"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise ConfigError(f"mocov3: {key} must be in [0, 1], got {getattr(self, key)}")


def mlp(layers: int, in_dim: int, hidden_dim: int, out_dim: int, last_bn: bool) -> nn.Sequential:
    """The official ``_build_mlp``: bias-free Linear layers, BN + ReLU after every hidden layer, and (``last_bn``)
    a BatchNorm without affine parameters on the output, following SimCLR."""
    blocks: list[nn.Module] = []
    for i in range(layers):
        d_in = in_dim if i == 0 else hidden_dim
        d_out = out_dim if i == layers - 1 else hidden_dim
        blocks.append(nn.Linear(d_in, d_out, bias=False))
        if i < layers - 1:
            blocks += [nn.BatchNorm1d(d_out), nn.ReLU()]
        elif last_bn:
            blocks.append(nn.BatchNorm1d(d_out, affine=False))
    return nn.Sequential(*blocks)


def mocov3_contrastive_loss(q: torch.Tensor, k: torch.Tensor, temperature: float = 0.2) -> torch.Tensor:
    """One direction of MoCo v3's loss (algorithm 1, ``ctr``): InfoNCE of each query against the keys of the GLOBAL
    batch (all-gathered, no gradient), the positive being the key of the same image, scaled by ``2 * tau``.

    Args:
        q: ``(B, D)`` queries of this rank (predictor outputs); normalised here.
        k: ``(B, D)`` keys of this rank (momentum encoder, no gradient); normalised here.
        temperature: ``tau``.

    Returns:
        Scalar mean over this rank's queries; the labels are offset by ``rank * B``, the positions of this rank's
        keys in the gathered batch.
    """
    if q.shape != k.shape or q.ndim != 2:
        raise ValueError(f"mocov3_contrastive_loss needs two (B, D) tensors of one shape, got {q.shape}, {k.shape}")
    labels = torch.arange(q.shape[0], device=q.device) + q.shape[0] * rank()
    # float32 even under bf16 autocast (a softmax at tau = 0.2 over cosines); float64 inputs stay float64
    with torch.autocast(q.device.type, enabled=False):
        q = F.normalize(q.float() if q.element_size() < 4 else q, dim=1)
        k = concat_all_gather(F.normalize(k.detach().to(q.dtype), dim=1))  # (W * B, D)
        return F.cross_entropy(q @ k.T / temperature, labels) * (2 * temperature)


class MoCoV3(Method):
    """MoCo v3: a query branch (encoder, projector, predictor) and a momentum branch (EMA of encoder and projector)
    on two views; symmetric InfoNCE ``ctr(q1, k2) + ctr(q2, k1)`` with the other images of the batch, gathered from
    every rank, as negatives (no queue).

    The predictor is on the query side only. The momentum encoder is updated after each optimiser step with the
    cosine-scheduled momentum the trainer passes (the official code updates it at the start of the next forward:
    the same sequence of weights). The loss is per query, so DDP's gradient averaging over ranks gives exactly the
    gradient of one process on the global batch.

    ViT encoders (those with ``patch_embed``) get the 3-layer projector and a predictor ending in BN, as the
    official ``MoCo_ViT``; ``stop_grad_conv1`` freezes ``patch_embed`` (a frozen random projection).

    Args:
        encoder: backbone with ``output_dim``.
        cfg: :class:`MoCoV3Config`.

    Raises:
        ConfigError: ``stop_grad_conv1`` with an encoder that has no ``patch_embed``.
    """

    Config = MoCoV3Config
    # The ResNet recipe (main_moco.py defaults): LARS, lr 0.6 per 256, weight decay 1e-6, trust coefficient 0.001.
    # The ViT recipe is AdamW, lr 1.5e-4 per 256, weight decay 0.1 (set it with --set, see docs).
    optim_defaults = {"name": "lars", "lr": 0.6, "weight_decay": 1e-6, "lars_eta": 0.001}

    def __init__(self, encoder: nn.Module, cfg: MoCoV3Config) -> None:
        super().__init__(encoder, cfg)
        vit = hasattr(encoder, "patch_embed")
        if cfg.stop_grad_conv1:
            if not vit:
                raise ConfigError(
                    f"mocov3: stop_grad_conv1 needs a ViT encoder with `patch_embed`, got {type(encoder).__name__}; "
                    f"pass --encoder vit_tiny or drop method.kwargs.stop_grad_conv1"
                )
            encoder.patch_embed.requires_grad_(False)
        d, h = cfg.output_dim, cfg.hidden_dim
        self.projector = mlp(3 if vit else 2, encoder.output_dim, h, d, last_bn=True)
        self.predictor = mlp(2, d, h, d, last_bn=vit)
        self.momentum_encoder = frozen_copy(encoder)
        self.momentum_projector = frozen_copy(self.projector)

    @classmethod
    def view_specs(cls, cfg: MoCoV3Config, image_size: int) -> list[ViewSpec]:
        """BYOL's asymmetric pair (the official ``augmentation1`` / ``augmentation2``): crop 0.08-1, jitter
        0.4/0.4/0.2/0.1 p=0.8, grayscale p=0.2, blur p=1.0 / 0.1, solarize p=0 / 0.2. Small images: no blur, crop
        from 0.2 (the ResNet recipe's ``--crop-min .2``)."""
        return byol_views(image_size)

    def momentum_schedule(self) -> tuple[float, float]:
        """``(momentum, momentum_final)`` = (0.99, 1.0), cosine."""
        return (self.cfg.momentum, self.cfg.momentum_final)

    @torch.no_grad()
    def on_after_step(self, step: int, momentum: float | None) -> None:
        """EMA update of the momentum encoder and projector."""
        m = self.cfg.momentum if momentum is None else momentum
        update_momentum(self.encoder, self.momentum_encoder, m)
        update_momentum(self.projector, self.momentum_projector, m)

    def forward(self, views: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """``views = [x1, x2]`` -> ``{"loss"}``."""
        x1, x2 = views
        q1 = self.predictor(self.projector(self.encoder(x1)))
        q2 = self.predictor(self.projector(self.encoder(x2)))
        with torch.no_grad():
            k1 = self.momentum_projector(self.momentum_encoder(x1))
            k2 = self.momentum_projector(self.momentum_encoder(x2))
        t = self.cfg.temperature
        loss = mocov3_contrastive_loss(q1, k2, t) + mocov3_contrastive_loss(q2, k1, t)
        return {"loss": loss}
