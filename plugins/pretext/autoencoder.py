"""Plain and denoising autoencoders: reconstruct the image from the encoder's feature vector.

Plain autoencoding (Hinton & Salakhutdinov 2006) and denoising autoencoding (Vincent et al. 2008, "Extracting and
Composing Robust Features with Denoising Autoencoders", ICML: corrupt the input, reconstruct the clean image). The
weakest of the pretext tasks for semantic features (pixel reconstruction rewards low-level detail), it is the
baseline the others are compared with, and a quick sanity check of a new encoder or dataset.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from sslrun.core.errors import ConfigError
from sslrun.core.pretext import PretextMethod
from sslrun.plugins.common.heads import ConvDecoder

__all__ = ["Autoencoder", "AutoencoderConfig"]


@dataclass
class AutoencoderConfig:
    """Hyperparameters of :class:`Autoencoder`."""

    # "none" = plain autoencoder; "gaussian" adds N(0, noise_std^2) in normalised units; "masking" zeroes (sets to
    # the dataset mean) a fraction mask_prob of the pixels, Vincent et al.'s masking noise
    noise: Literal["none", "gaussian", "masking"] = "gaussian"
    noise_std: float = 0.5  # in normalised units, i.e. about 0.1-0.15 of the pixel range for typical std ~0.25
    mask_prob: float = 0.25
    decoder_channels: int = 128

    def __post_init__(self) -> None:
        if self.noise_std < 0:
            raise ConfigError(f"method.kwargs.noise_std must be >= 0, got {self.noise_std}")
        if not 0.0 <= self.mask_prob < 1.0:
            raise ConfigError(f"method.kwargs.mask_prob must be in [0, 1), got {self.mask_prob}")
        if self.decoder_channels < 1:
            raise ConfigError(f"method.kwargs.decoder_channels must be >= 1, got {self.decoder_channels}")


class Autoencoder(PretextMethod):
    """Reconstruct the (clean) image from the features of a (corrupted) copy; mean squared error.

    ``make_inputs``: ``images`` -> ``(corrupted images, images)``, both normalised ``(N, 3, H, W)``.
    """

    Config = AutoencoderConfig

    def make_inputs(
        self, images: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.cfg
        if cfg.noise == "gaussian":
            noise = torch.randn(images.shape, generator=generator, device=images.device, dtype=images.dtype)
            return images + cfg.noise_std * noise, images
        if cfg.noise == "masking":
            n, _, h, w = images.shape
            keep = torch.rand((n, 1, h, w), generator=generator, device=images.device) >= cfg.mask_prob
            return images * keep, images  # 0 = the dataset mean colour in normalised space
        return images, images

    def build_head(self, encoder: nn.Module, image_size: int) -> nn.Module:
        return ConvDecoder(encoder.output_dim, 3, image_size, self.cfg.decoder_channels)

    def loss(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Mean squared error over all pixels and channels (in float32)."""
        return F.mse_loss(pred.float(), target.float())

    def visualize(
        self, images: torch.Tensor, inputs: torch.Tensor, pred: torch.Tensor, targets: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        return {
            "input": self.denormalize(inputs.float()),
            "prediction": self.denormalize(pred.float()),
            "target": self.denormalize(targets.float()),
        }
