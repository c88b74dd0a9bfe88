"""Colorization: predict the colours of a grayscale image (Zhang, Isola & Efros 2016, "Colorful Image
Colorization", ECCV; as a representation learner in section 3.2 of that paper and in Larsson et al. 2017).

The encoder sees only the lightness of the image and must predict its colour, which needs knowing what the objects
are (grass is green, sky is blue). Three targets:

* ``rgb``: regress the RGB image with a mean squared error, the simple baseline (averages plausible colours: sepia
  results).
* ``ab``: regress the a*b* chrominance of CIE Lab, the lightness L* being the input, mean squared error.
* ``ab_classes`` (default, the paper's): classify each pixel's ab value into the quantised in-gamut ab bins (grid
  10), with soft-encoded targets (5 nearest bins, Gaussian sigma 5) and class rebalancing (lambda 0.5) so rare
  saturated colours are not drowned by the greyish majority (section 2.2). Differences from the paper: the bins
  are those of the sRGB gamut (261 bins, computed, where the paper has 313 from ImageNet), and the colour prior
  used for rebalancing is measured on each batch instead of once over ImageNet.

Needs colour images: the plugin sets ``requires_color`` and is refused on grayscale datasets.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from kornia.color import lab_to_rgb, rgb_to_lab
from torch import nn

from sslrun.core.errors import ConfigError
from sslrun.core.pretext import PretextMethod
from sslrun.plugins.common.heads import ConvDecoder

__all__ = [
    "Colorization",
    "ColorizationConfig",
    "ab_bins",
    "annealed_mean",
    "class_rebalancing_weights",
    "soft_encode",
]

#: ab values are divided by this for the ``ab`` regression head (ab spans about -110..110 on sRGB)
AB_SCALE = 110.0
#: ITU-R BT.601 luma weights (the RGB baseline's grayscale)
LUMA = (0.299, 0.587, 0.114)


@dataclass
class ColorizationConfig:
    """Hyperparameters of :class:`Colorization` (defaults: Zhang et al. 2016)."""

    target: Literal["rgb", "ab", "ab_classes"] = "ab_classes"
    bin_size: float = 10.0  # ab quantisation grid
    soft_neighbors: int = 5  # soft-encode each target over its 5 nearest bins...
    soft_sigma: float = 5.0  # ...with a Gaussian kernel of this width (ab units)
    rebalance: bool = True  # class rebalancing (section 2.2); False = plain cross-entropy
    rebalance_lambda: float = 0.5  # mixing of the colour prior with a uniform distribution
    temperature: float = 0.38  # annealed-mean decoding of the predicted distribution (images only)
    # predict ab at 1/output_stride of the image size; None = 1 up to 64 px, 4 above (the paper's 56 px output
    # for 224 px inputs: per-pixel logits over ~260 bins at full resolution would not fit in memory)
    output_stride: int | None = None
    decoder_channels: int = 128

    def __post_init__(self) -> None:
        if self.bin_size <= 0 or self.soft_sigma <= 0 or self.temperature <= 0:
            raise ConfigError("method.kwargs.bin_size, soft_sigma and temperature must be > 0")
        if self.soft_neighbors < 1:
            raise ConfigError(f"method.kwargs.soft_neighbors must be >= 1, got {self.soft_neighbors}")
        if not 0.0 <= self.rebalance_lambda <= 1.0:
            raise ConfigError(f"method.kwargs.rebalance_lambda must be in [0, 1], got {self.rebalance_lambda}")
        if self.output_stride is not None and self.output_stride < 1:
            raise ConfigError(f"method.kwargs.output_stride must be >= 1, got {self.output_stride}")
        if self.decoder_channels < 1:
            raise ConfigError(f"method.kwargs.decoder_channels must be >= 1, got {self.decoder_channels}")


@functools.cache
def ab_bins(bin_size: float = 10.0) -> torch.Tensor:
    """Centres ``(Q, 2)`` of the ab bins (a grid of ``bin_size``) that some sRGB colour falls into.

    The sRGB cube is sampled at 65 levels per channel (274,625 colours); denser sampling finds no further bin.
    """
    levels = torch.linspace(0.0, 1.0, 65)
    rgb = torch.stack(torch.meshgrid(levels, levels, levels, indexing="ij")).reshape(1, 3, -1, 1)
    ab = rgb_to_lab(rgb)[0, 1:, :, 0].T  # (M, 2)
    cells = torch.unique(torch.round(ab / bin_size).long(), dim=0)
    return cells.float() * bin_size


def soft_encode(ab: torch.Tensor, bins: torch.Tensor, k: int, sigma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Soft-encode ab values over their ``k`` nearest bins.

    Args:
        ab: ``(M, 2)`` ab values.
        bins: ``(Q, 2)`` bin centres.

    Returns:
        ``(indices (M, k), weights (M, k))``: nearest bins first, Gaussian weights ``exp(-d^2 / 2 sigma^2)``
        normalised to sum to 1.
    """
    dist = torch.cdist(ab, bins)  # (M, Q)
    d, idx = dist.topk(min(k, bins.shape[0]), dim=1, largest=False)
    w = torch.softmax(-(d**2) / (2 * sigma**2), dim=1)  # = normalised Gaussian weights
    return idx, w


def class_rebalancing_weights(
    nearest: torch.Tensor, bins: torch.Tensor, lam: float, sigma: float = 5.0
) -> torch.Tensor:
    """Per-bin weights ``w ∝ ((1 - lam) p + lam / Q)^-1`` with ``sum_q p_q w_q = 1`` (Zhang et al., eq. 4).

    ``p`` is the empirical distribution of ``nearest`` (each pixel's nearest bin), smoothed with a Gaussian of
    width ``sigma`` over the ab plane, as the paper smooths its ImageNet prior.
    """
    q = bins.shape[0]
    counts = torch.bincount(nearest, minlength=q).float()
    p = counts / counts.sum()
    kernel = torch.exp(-(torch.cdist(bins, bins) ** 2) / (2 * sigma**2))  # (Q, Q)
    p = kernel @ p
    p = p / p.sum()
    w = 1.0 / ((1 - lam) * p + lam / q)
    return w / (p * w).sum()


def annealed_mean(logits: torch.Tensor, bins: torch.Tensor, temperature: float) -> torch.Tensor:
    """Decode per-pixel class logits ``(N, Q, h, w)`` to ab ``(N, 2, h, w)``: the mean of the distribution
    re-normalised at ``temperature`` (``f_T(z) ∝ exp(log z / T)``, section 2.3; T = 0.38 in the paper)."""
    probs = torch.softmax(logits.float() / temperature, dim=1)
    return torch.einsum("nqhw,qc->nchw", probs, bins.to(logits.device))


class Colorization(PretextMethod):
    """Grayscale in, colour out.

    ``make_inputs``: ``images (N, 3, H, W)`` normalised -> ``(gray, target)``. ``gray`` is the grayscale image (the
    same value in all three channels, normalised like any view): the BT.601 luma for ``target="rgb"``, the Lab
    lightness L* rendered as a neutral grey for the ab targets. ``target`` is the normalised RGB image for
    ``"rgb"``, else the ab channels ``(N, 2, H/s, W/s)`` in Lab units (average-pooled by the output stride ``s``).
    """

    Config = ColorizationConfig
    requires_color = True

    def build_head(self, encoder: nn.Module, image_size: int) -> nn.Module:
        """A :class:`ConvDecoder` to the RGB image, or to the ab map (2 values or Q class logits per pixel) at
        ``1 / output_stride`` of the image size."""
        cfg = self.cfg
        self.stride = cfg.output_stride or (1 if image_size <= 64 else 4)
        self._bins: dict[torch.device, torch.Tensor] = {}
        if cfg.target == "rgb":
            return ConvDecoder(encoder.output_dim, 3, image_size, cfg.decoder_channels)
        if image_size % self.stride:
            raise ConfigError(
                f"colorization: image size {image_size} is not divisible by method.kwargs.output_stride={self.stride}"
            )
        out = 2 if cfg.target == "ab" else ab_bins(cfg.bin_size).shape[0]
        return ConvDecoder(encoder.output_dim, out, image_size // self.stride, cfg.decoder_channels)

    def bins_on(self, device: torch.device) -> torch.Tensor:
        """The ab bin centres ``(Q, 2)`` on ``device`` (copied once per device, not every step)."""
        if device not in self._bins:
            self._bins[device] = ab_bins(self.cfg.bin_size).to(device)
        return self._bins[device]

    def make_inputs(
        self, images: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        rgb = self.denormalize(images.float()).clamp(0.0, 1.0)
        if self.cfg.target == "rgb":
            luma = torch.tensor(LUMA, device=images.device).view(1, 3, 1, 1)
            gray = (rgb * luma).sum(dim=1, keepdim=True).expand(-1, 3, -1, -1)
            return self.normalize(gray).to(images.dtype), images
        lab = rgb_to_lab(rgb)  # L in 0..100, a/b in about -110..110
        neutral = torch.cat([lab[:, :1], torch.zeros_like(lab[:, 1:])], dim=1)
        gray = lab_to_rgb(neutral, clip=True)  # R = G = B: the grey of the same lightness
        ab = lab[:, 1:]
        if self.stride > 1:
            ab = F.avg_pool2d(ab, self.stride)
        return self.normalize(gray).to(images.dtype), ab

    def loss(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """``rgb``: MSE on normalised RGB; ``ab``: MSE on ``ab / 110``; ``ab_classes``: the paper's multinomial
        cross-entropy ``-sum_pixels w(pixel) sum_q Z_q log P_q`` averaged over pixels (eq. 2), with soft targets
        ``Z`` and rebalancing weights ``w`` of each pixel's nearest bin (all in float32)."""
        pred = pred.float()
        if self.cfg.target == "rgb":
            return F.mse_loss(pred, target.float())
        if self.cfg.target == "ab":
            return F.mse_loss(pred, target.float() / AB_SCALE)
        cfg = self.cfg
        bins = self.bins_on(pred.device)
        ab = target.float().permute(0, 2, 3, 1).reshape(-1, 2)  # (M, 2), M = N * h * w
        idx, z = soft_encode(ab, bins, cfg.soft_neighbors, cfg.soft_sigma)  # (M, k) each
        logp = F.log_softmax(pred, dim=1).permute(0, 2, 3, 1).reshape(-1, bins.shape[0])  # (M, Q)
        per_pixel = -(z * logp.gather(1, idx)).sum(dim=1)  # (M,)
        if cfg.rebalance:
            weights = class_rebalancing_weights(idx[:, 0], bins, cfg.rebalance_lambda, cfg.soft_sigma)
            per_pixel = per_pixel * weights[idx[:, 0]]
        return per_pixel.mean()

    def predicted_rgb(self, inputs: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
        """The predicted colour image in 0..1 from the gray ``inputs`` and the head's output."""
        if self.cfg.target == "rgb":
            return self.denormalize(pred.float())
        ab = (
            pred.float() * AB_SCALE
            if self.cfg.target == "ab"
            else annealed_mean(pred, self.bins_on(pred.device), self.cfg.temperature)
        )
        size = inputs.shape[-2:]
        if ab.shape[-2:] != size:
            ab = F.interpolate(ab, size=size, mode="bilinear", align_corners=False)
        lightness = rgb_to_lab(self.denormalize(inputs.float()).clamp(0.0, 1.0))[:, :1]
        return lab_to_rgb(torch.cat([lightness, ab], dim=1), clip=True)

    def visualize(
        self, images: torch.Tensor, inputs: torch.Tensor, pred: torch.Tensor, targets: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """The grayscale input, its predicted colours, and the original image."""
        return {
            "input": self.denormalize(inputs.float()),
            "prediction": self.predicted_rgb(inputs, pred),
            "target": self.denormalize(images.float()),
        }
