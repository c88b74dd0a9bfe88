"""Rotation prediction (Gidaris, Singh & Komodakis 2018, "Unsupervised Representation Learning by Predicting
Image Rotations", ICLR).

Each image is rotated by 0, 90, 180 or 270 degrees and the network predicts which: to do so it must recognise the
objects and their canonical orientation. A strong, cheap baseline (no extra hyperparameters, one view); it works
on any dataset whose images have a canonical "up" (natural photos, not texture or top-down satellite data), and
on grayscale data.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from sslrun.core.errors import ConfigError
from sslrun.core.pretext import PretextMethod
from sslrun.plugins.common.heads import ClassifierHead
from sslrun.plugins.common.losses import accuracy

__all__ = ["Rotation", "RotationConfig", "rotate"]

NUM_ROTATIONS = 4


@dataclass
class RotationConfig:
    """Hyperparameters of :class:`Rotation`."""

    # The paper's best setting feeds all four rotated copies of every image in the same batch (section 3.2,
    # "Implementation details"): 4x the compute per step but a balanced, lower-variance loss.
    all_rotations: bool = True
    head_hidden_dim: int = 512  # MLP head width; 0 = a linear classifier on the encoder features

    def __post_init__(self) -> None:
        if self.head_hidden_dim < 0:
            raise ConfigError(f"method.kwargs.head_hidden_dim must be >= 0, got {self.head_hidden_dim}")


def rotate(images: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Rotate each image ``images[i] (C, H, W)`` by ``k[i] * 90`` degrees counter-clockwise (square images)."""
    out = images.clone()
    for r in range(1, NUM_ROTATIONS):
        sel = k == r
        if sel.any():
            out[sel] = torch.rot90(images[sel], r, dims=(2, 3))
    return out


class Rotation(PretextMethod):
    """4-way rotation classification.

    ``make_inputs``: ``images (N, 3, H, W)`` -> rotated images and labels ``k`` (rotation ``k * 90`` degrees
    counter-clockwise). With ``all_rotations`` the batch is ``(4N, ...)``, the four rotations of each image next
    to each other (labels ``0, 1, 2, 3, 0, 1, ...``); otherwise one random rotation per image.
    """

    Config = RotationConfig

    def make_inputs(
        self, images: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        n = images.shape[0]
        if images.shape[-1] != images.shape[-2]:
            raise ConfigError(f"rotation needs square images, got {tuple(images.shape[-2:])}")
        if self.cfg.all_rotations:
            rotated = torch.stack([torch.rot90(images, r, dims=(2, 3)) for r in range(NUM_ROTATIONS)], dim=1)
            labels = torch.arange(NUM_ROTATIONS, device=images.device).repeat(n)
            return rotated.flatten(0, 1), labels  # (4N, 3, H, W), (4N,)
        labels = torch.randint(NUM_ROTATIONS, (n,), generator=generator, device=images.device)
        return rotate(images, labels), labels

    def build_head(self, encoder: nn.Module, image_size: int) -> nn.Module:
        return ClassifierHead(encoder.output_dim, NUM_ROTATIONS, self.cfg.head_hidden_dim)

    def loss(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of the rotation logits ``(N, 4)`` against the labels ``(N,)`` (in float32)."""
        return F.cross_entropy(pred.float(), target)

    def metrics(self, pred: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"acc": accuracy(pred, target)}

    def visualize(
        self, images: torch.Tensor, inputs: torch.Tensor, pred: torch.Tensor, targets: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Rotated input; the input turned back by the *predicted* angle; turned back by the true angle."""
        return {
            "input": self.denormalize(inputs),
            "prediction": self.denormalize(rotate(inputs, (-pred.argmax(dim=1)) % NUM_ROTATIONS)),
            "target": self.denormalize(rotate(inputs, (-targets) % NUM_ROTATIONS)),
        }
