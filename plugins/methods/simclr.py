"""SimCLR: contrastive learning with in-batch negatives (Chen, Kornblith, Norouzi & Hinton 2020, "A Simple
Framework for Contrastive Learning of Visual Representations", https://arxiv.org/abs/2002.05709)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sslrun.core.errors import ConfigError
from sslrun.core.interfaces import Method, ViewSpec
from sslrun.plugins.common.heads import SimCLRProjectionHead
from sslrun.plugins.common.losses import nt_xent_loss
from sslrun.plugins.common.views import SMALL_IMAGE, for_image_size

__all__ = ["SimCLR", "SimCLRConfig"]


@dataclass
class SimCLRConfig:
    """SimCLR hyperparameters (paper defaults)."""

    # NT-Xent temperature. 0.5 is the paper's CIFAR-10 setting (appendix B.9) and suits batches of 256-1024;
    # 0.1 is its ImageNet setting at batch 4096 with LARS (table 5).
    temperature: float = 0.5
    # Projection head g: one hidden layer as wide as the ResNet-50 features (2048), 128-d output (section 2.1).
    hidden_dim: int = 2048
    output_dim: int = 128
    # Colour distortion strength s (jitter = 0.8 s, 0.8 s, 0.8 s, 0.2 s); 1.0 on ImageNet. Small images use 0.5,
    # the paper's CIFAR-10 value (appendix B.9), whatever this says.
    color_strength: float = 1.0

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise ConfigError(f"simclr: temperature must be > 0, got {self.temperature}")
        if self.hidden_dim < 1 or self.output_dim < 1:
            raise ConfigError("simclr: hidden_dim and output_dim must be >= 1")
        if not 0 <= self.color_strength <= 2.5:  # hue jitter 0.2 s must stay <= 0.5
            raise ConfigError(f"simclr: color_strength must be in [0, 2.5], got {self.color_strength}")


class SimCLR(Method):
    """SimCLR: two augmented views of each image, a projection head, and NT-Xent over the global batch.

    The negatives of every anchor are the other ``2N - 2`` embeddings of the GLOBAL batch: embeddings are gathered
    from every rank with gradients flowing back (:func:`sslrun.core.distributed.gather_with_grad`), as SimCLR
    gathers across TPU cores. Both views go through the encoder as one ``2B`` batch, like the paper's
    implementation, so BatchNorm statistics cover both views.

    Args:
        encoder: backbone with ``output_dim``.
        cfg: :class:`SimCLRConfig`.
    """

    Config = SimCLRConfig

    def __init__(self, encoder: torch.nn.Module, cfg: SimCLRConfig) -> None:
        super().__init__(encoder, cfg)
        self.projector = SimCLRProjectionHead(encoder.output_dim, cfg.hidden_dim, cfg.output_dim)

    @classmethod
    def view_specs(cls, cfg: SimCLRConfig, image_size: int) -> list[ViewSpec]:
        """Two views of appendix A: crop (0.08-1), flip, colour jitter (p=0.8), grayscale (p=0.2), blur (p=0.5).
        Small images: no blur, crop scale from 0.2, jitter strength 0.5 (CIFAR-10 setting)."""
        s = cfg.color_strength if image_size > SMALL_IMAGE else 0.5
        spec = ViewSpec(
            size=image_size,
            scale=(0.08, 1.0),
            jitter=(0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s),
            jitter_p=0.8,
            grayscale_p=0.2,
            blur_p=0.5,
        )
        spec = for_image_size(spec, image_size)
        return [spec, spec]

    def forward(self, views: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """``views = [x1, x2]`` (each ``(B, 3, H, W)``) -> ``{"loss"}``."""
        x1, x2 = views
        b = x1.shape[0]
        z = self.projector(self.encoder(torch.cat([x1, x2])))  # (2B, out)
        loss = nt_xent_loss(z[:b], z[b:], self.cfg.temperature, gather=True)
        return {"loss": loss}
