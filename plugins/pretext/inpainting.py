"""Inpainting: context encoders (Pathak, Krähenbühl, Donahue, Darrell & Efros 2016, "Context Encoders: Feature
Learning by Inpainting", CVPR).

A region of the image is removed and the network predicts the missing pixels from the context, with an L2 loss on
the removed region. Filling a hole needs an understanding of the scene around it, not only local texture. The paper
discusses three region shapes (section 3.3): the central square (its pictures), random blocks, and random regions
(which it prefers for feature learning, as a fixed central hole lets the network latch on to the hole's boundary);
here: ``center``, ``random_blocks`` and ``random_patch`` (a square at a random place). The paper's adversarial loss
is left out: it sharpens the pictures; the features are learned through the reconstruction loss.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from sslrun.core.errors import ConfigError
from sslrun.core.pretext import PretextMethod
from sslrun.plugins.common.heads import ConvDecoder
from sslrun.plugins.common.losses import masked_mse

__all__ = ["Inpainting", "InpaintingConfig"]


@dataclass
class InpaintingConfig:
    """Hyperparameters of :class:`Inpainting`."""

    # "center": the central square; "random_patch": one square at a random place; "random_blocks": num_blocks
    # smaller squares (side mask_fraction / 2, possibly overlapping: at most the same area as one patch)
    mask: Literal["center", "random_patch", "random_blocks"] = "random_patch"
    mask_fraction: float = 0.5  # side of the hole / side of the image; 0.5 = a quarter of the area (the paper's)
    num_blocks: int = 4
    decoder_channels: int = 128

    def __post_init__(self) -> None:
        if not 0.0 < self.mask_fraction < 1.0:
            raise ConfigError(f"method.kwargs.mask_fraction must be in (0, 1), got {self.mask_fraction}")
        if self.num_blocks < 1:
            raise ConfigError(f"method.kwargs.num_blocks must be >= 1, got {self.num_blocks}")
        if self.decoder_channels < 1:
            raise ConfigError(f"method.kwargs.decoder_channels must be >= 1, got {self.decoder_channels}")


def square_masks(
    n: int, size: int, side: int, count: int, generator: torch.Generator | None, device: torch.device
) -> torch.Tensor:
    """``(n, 1, size, size)`` bool masks, each the union of ``count`` squares of ``side`` px at uniformly random
    positions (fully inside the image)."""
    top = torch.randint(size - side + 1, (n, count, 1, 1), generator=generator, device=device)
    left = torch.randint(size - side + 1, (n, count, 1, 1), generator=generator, device=device)
    ar = torch.arange(size, device=device)
    rows = (ar.view(1, 1, -1, 1) >= top) & (ar.view(1, 1, -1, 1) < top + side)  # (n, count, size, 1)
    cols = (ar.view(1, 1, 1, -1) >= left) & (ar.view(1, 1, 1, -1) < left + side)  # (n, count, 1, size)
    return (rows & cols).any(dim=1, keepdim=True)


class Inpainting(PretextMethod):
    """Predict the masked pixels from the rest of the image.

    ``make_inputs``: ``images (N, 3, H, W)`` -> ``(masked images, targets)`` where the masked region is set to 0
    (the dataset mean colour: the paper fills holes with the mean) and ``targets (N, 4, H, W)`` packs the original
    image (channels 0-2) and the hole mask (channel 3, 1 = predict here) for the loss.
    """

    Config = InpaintingConfig

    def make_mask(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """``(N, 1, H, W)`` bool hole masks for a batch."""
        n, _, h, w = images.shape
        if h != w:
            raise ConfigError(f"inpainting expects square images, got {h}x{w}")
        side = max(1, round(self.cfg.mask_fraction * h))
        if self.cfg.mask == "center":
            mask = torch.zeros((n, 1, h, w), dtype=torch.bool, device=images.device)
            top = (h - side) // 2
            mask[:, :, top : top + side, top : top + side] = True
            return mask
        if self.cfg.mask == "random_patch":
            return square_masks(n, h, side, 1, generator, images.device)
        return square_masks(n, h, max(1, side // 2), self.cfg.num_blocks, generator, images.device)

    def make_inputs(
        self, images: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        mask = self.make_mask(images, generator)
        inputs = images.masked_fill(mask, 0.0)
        return inputs, torch.cat([images, mask.to(images.dtype)], dim=1)

    def build_head(self, encoder: nn.Module, image_size: int) -> nn.Module:
        return ConvDecoder(encoder.output_dim, 3, image_size, self.cfg.decoder_channels)

    def loss(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Pathak et al.'s reconstruction loss ``||M * (x - F((1 - M) * x))||^2``, averaged over the hole's
        pixels and channels (in float32)."""
        return masked_mse(pred.float(), target[:, :3].float(), target[:, 3:4].float())

    def visualize(
        self, images: torch.Tensor, inputs: torch.Tensor, pred: torch.Tensor, targets: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """The masked input, the input with the hole filled by the prediction, the original."""
        mask = targets[:, 3:4].float()
        filled = inputs.float() * (1 - mask) + pred.float() * mask
        return {
            "input": self.denormalize(inputs.float()),
            "prediction": self.denormalize(filled),
            "target": self.denormalize(targets[:, :3].float()),
        }
