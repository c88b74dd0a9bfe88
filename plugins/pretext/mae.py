"""Masked autoencoders (He, Chen, Xie, Li, Dollár & Girshick 2022, "Masked Autoencoders Are Scalable Vision
Learners", CVPR).

A random 75% of the image patches is removed; the ViT encoder runs on the visible 25% only (so pretraining is ~3x
cheaper than a full forward), and a lightweight transformer decoder, given the encoded visible patches plus a
shared learned mask token at every removed position, reconstructs the pixels of the removed patches. The loss is
the mean squared error on the removed patches only, against per-patch normalised pixels (``norm_pix_loss``, the
paper's better-performing target, table 1d). The method of choice for ViTs: strong fine-tuning results, no
augmentation beyond crop + flip, no negatives or momentum encoder. Its linear-probe accuracy is lower than that
of contrastive or self-distillation features (the paper says so itself); evaluate MAE by fine-tuning.

Needs a ViT encoder: ``vit_tiny``, ``vit_small``, or any encoder plugin that offers ``patch_size``,
``patch_tokens(x)`` (position-embedded patch tokens) and ``forward_tokens(tokens)`` (CLS + blocks + norm) like
:class:`sslrun.plugins.encoders.vit.VisionTransformer`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from sslrun.core.errors import ConfigError
from sslrun.core.interfaces import ViewSpec
from sslrun.core.pretext import PretextMethod
from sslrun.plugins.common.patches import patchify, unpatchify
from sslrun.plugins.encoders.vit import Block, sincos_pos_embed_2d

__all__ = ["MAE", "MAEConfig", "MAEDecoder", "mae_loss", "random_patch_mask"]


@dataclass
class MAEConfig:
    """Hyperparameters of :class:`MAE` (defaults: the paper's, section 4 and appendix A.1)."""

    mask_ratio: float = 0.75
    decoder_dim: int = 512
    decoder_depth: int = 8  # the paper: 8 blocks for linear probing; 1 is enough for fine-tuning (table 1a)
    decoder_heads: int = 16
    norm_pix_loss: bool = True  # targets: each patch's pixels normalised by the patch's mean and std

    def __post_init__(self) -> None:
        if not 0.0 < self.mask_ratio < 1.0:
            raise ConfigError(f"method.kwargs.mask_ratio must be in (0, 1), got {self.mask_ratio}")
        if self.decoder_depth < 1 or self.decoder_dim < 1 or self.decoder_heads < 1:
            raise ConfigError("method.kwargs.decoder_depth, decoder_dim and decoder_heads must be >= 1")
        if self.decoder_dim % self.decoder_heads or self.decoder_dim % 4:
            raise ConfigError(
                f"method.kwargs.decoder_dim={self.decoder_dim} must be divisible by decoder_heads="
                f"{self.decoder_heads} and by 4 (sin-cos position embedding)"
            )


def random_patch_mask(
    n: int, num_patches: int, mask_ratio: float, generator: torch.Generator | None, device: torch.device
) -> torch.Tensor:
    """``(n, num_patches)`` bool, True = removed; every row removes exactly
    ``num_patches - int(num_patches * (1 - mask_ratio))`` patches, uniformly at random (MAE's per-sample shuffle)."""
    keep = int(num_patches * (1 - mask_ratio))
    noise = torch.rand((n, num_patches), generator=generator, device=device)
    removed = noise.argsort(dim=1)[:, keep:]
    mask = torch.zeros((n, num_patches), dtype=torch.bool, device=device)
    return mask.scatter_(1, removed, True)


def patch_targets(images: torch.Tensor, patch: int, norm_pix: bool) -> torch.Tensor:
    """``(N, L, p*p*3)`` reconstruction targets; per-patch normalised (mean 0, var 1) if ``norm_pix``."""
    target = patchify(images.float(), patch)
    if norm_pix:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)  # unbiased, as in the official code
        target = (target - mean) / (var + 1e-6) ** 0.5
    return target


def mae_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error over the removed patches: ``pred``/``target`` are ``(N, M, p*p*3)`` for the ``M``
    removed patches of each image. Every patch has the same pixel count, so this equals the paper's
    ``sum(mask * mean_pixels((pred - target)^2)) / sum(mask)`` over all patches."""
    return (pred.float() - target.float()).pow(2).mean()


class MAEDecoder(nn.Module):
    """The lightweight MAE decoder: ``Linear(D -> d)``, mask tokens at removed positions, fixed sin-cos position
    embedding, ``depth`` transformer blocks, ``Linear(d -> p*p*3)`` pixel predictor.

    Args:
        in_dim: the encoder's token width.
        grid: patches per side.
        patch_size: pixels per patch side.
        dim, depth, heads: decoder width, blocks and attention heads.
    """

    def __init__(self, in_dim: int, grid: int, patch_size: int, dim: int, depth: int, heads: int) -> None:
        super().__init__()
        self.embed = nn.Linear(in_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        pos = torch.cat([torch.zeros(1, dim), sincos_pos_embed_2d(dim, grid, grid)])
        self.register_buffer("pos_embed", pos.unsqueeze(0), persistent=False)  # fixed (the paper's)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pred = nn.Linear(dim, patch_size * patch_size * 3)
        nn.init.normal_(self.mask_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, latent: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``latent (N, 1 + V, D)`` (CLS + visible tokens in increasing patch order), ``mask (N, L)`` ->
        per-patch pixel predictions ``(N, L, p*p*3)``."""
        x = self.embed(latent)  # (N, 1 + V, d)
        n, length = mask.shape
        full = self.mask_token.to(x.dtype).expand(n, length, -1).clone()  # (N, L, d)
        full[~mask] = x[:, 1:].reshape(-1, x.shape[-1])  # boolean indexing is row-major = patch order
        x = torch.cat([x[:, :1], full], dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.pred(self.norm(x))[:, 1:]


class MAE(PretextMethod):
    """Masked-patch reconstruction with a ViT.

    ``make_inputs``: ``images (N, 3, H, W)`` -> ``(images, mask)`` with ``mask (N, L)`` bool, True = removed.
    ``predict`` runs the encoder on the visible patches and the decoder on all of them, and returns the predicted
    and target pixels of the removed patches, ``(N, M, p*p*3)`` each.
    """

    Config = MAEConfig

    @classmethod
    def view_specs(cls, cfg: MAEConfig, image_size: int) -> list[ViewSpec]:
        """RandomResizedCrop(scale 0.2-1) + flip, no colour augmentation (the paper's appendix A.1)."""
        return [ViewSpec(size=image_size, scale=(0.2, 1.0), jitter_p=0.0, grayscale_p=0.0)]

    def build_head(self, encoder: nn.Module, image_size: int) -> nn.Module:
        """Refuse encoders that are not ViTs, read the patch grid, and build the :class:`MAEDecoder`."""
        needed = ("patch_size", "patch_tokens", "forward_tokens")
        missing = [a for a in needed if not hasattr(encoder, a)]
        if missing:
            raise ConfigError(
                f"mae needs a ViT encoder (vit_tiny, vit_small), got {type(encoder).__name__} without "
                f"{', '.join(missing)}; pass --encoder vit_tiny"
            )
        self.patch_size = int(encoder.patch_size)
        if image_size % self.patch_size:
            raise ConfigError(
                f"mae: image size {image_size} is not a multiple of the encoder's patch size {self.patch_size}; "
                f"set encoder.kwargs.patch_size to a divisor of {image_size}"
            )
        self.grid = image_size // self.patch_size
        self.num_patches = self.grid**2
        cfg = self.cfg
        return MAEDecoder(
            encoder.output_dim, self.grid, self.patch_size, cfg.decoder_dim, cfg.decoder_depth, cfg.decoder_heads
        )

    def make_inputs(
        self, images: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        mask = random_patch_mask(images.shape[0], self.num_patches, self.cfg.mask_ratio, generator, images.device)
        return images, mask

    def predict(self, inputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mask = targets
        n = inputs.shape[0]
        tokens = self.encoder.patch_tokens(inputs)  # (N, L, D), position embedding added
        if tokens.shape[1] != mask.shape[1]:
            raise ConfigError(f"mae: {tokens.shape[1]} patches per image but the mask has {mask.shape[1]}")
        visible = tokens[~mask].reshape(n, -1, tokens.shape[-1])  # (N, V, D), increasing patch order
        latent = self.encoder.forward_tokens(visible)  # (N, 1 + V, D)
        pred = self.head(latent, mask)  # (N, L, p*p*3)
        target = patch_targets(inputs, self.patch_size, self.cfg.norm_pix_loss)
        removed = int(mask[0].sum())
        return pred[mask].reshape(n, removed, -1), target[mask].reshape(n, removed, -1)

    def loss(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return mae_loss(pred, target)

    def visualize(
        self, images: torch.Tensor, inputs: torch.Tensor, pred: torch.Tensor, targets: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """The visible patches (removed ones blank), visible + reconstructed patches, and the original."""
        mask, p, g = targets, self.patch_size, self.grid
        patches = patchify(inputs.float(), p)  # (n, L, P) normalised pixels
        recon = pred.float()
        if self.cfg.norm_pix_loss:  # undo the per-patch normalisation with the true patch statistics
            true = patches[mask].reshape(recon.shape)
            recon = recon * (true.var(dim=-1, keepdim=True) + 1e-6) ** 0.5 + true.mean(dim=-1, keepdim=True)
        filled = patches.clone()
        filled[mask] = recon.reshape(-1, recon.shape[-1])
        blank = patches.masked_fill(mask.unsqueeze(-1), 0.0)  # 0 = the dataset mean colour
        return {
            "input": self.denormalize(unpatchify(blank, p, g, g)),
            "prediction": self.denormalize(unpatchify(filled, p, g, g)),
            "target": self.denormalize(inputs.float()),
        }
