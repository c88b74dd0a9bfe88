"""I-JEPA: the image-based joint-embedding predictive architecture (Assran, Duval, Misra, Bojanowski, Vincent,
Rabbat, LeCun & Ballas 2023, "Self-Supervised Learning from Images with a Joint-Embedding Predictive
Architecture", https://arxiv.org/abs/2301.08243).

From one view, a context block of patches goes through the ViT encoder; a narrow ViT predictor, given the encoded
context and a mask token at each position of a target block, predicts the target encoder's representations of
those patches (an EMA of the encoder, run on the whole image). No augmentation beyond a crop, no pixels, no
negatives: prediction in representation space.

Needs a ViT encoder: ``vit_tiny``, ``vit_small``, or any encoder plugin that offers ``patch_size``,
``patch_tokens(x)`` (position-embedded patch tokens) and ``forward_tokens(tokens)`` (CLS + blocks + norm) like
:class:`sslrun.plugins.encoders.vit.VisionTransformer`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from sslrun.core.distributed import rank, world_size
from sslrun.core.errors import ConfigError
from sslrun.core.interfaces import Method, ViewSpec
from sslrun.core.rng import seed_from
from sslrun.plugins.common.ema import frozen_copy, update_momentum
from sslrun.plugins.encoders.vit import Block, sincos_pos_embed_2d
from sslrun.plugins.methods.ijepa_masks import BlockMasks, sample_block_masks

__all__ = ["IJEPA", "IJEPAConfig", "IJEPAPredictor", "ijepa_loss"]


@dataclass
class IJEPAConfig:
    """I-JEPA hyperparameters (the paper and the official ImageNet configs)."""

    # Multi-block masking: 4 target blocks of scale 0.15-0.2 and aspect ratio 0.75-1.5, one context block of scale
    # 0.85-1.0 (aspect 1) without the target patches; a context keeps more than min_keep = 10 patches.
    num_targets: int = 4
    target_scale: tuple[float, float] = (0.15, 0.2)
    target_aspect: tuple[float, float] = (0.75, 1.5)
    context_scale: tuple[float, float] = (0.85, 1.0)
    min_keep: int = 10
    # Predictor: a narrow ViT. The paper pairs a 32-block, 1280-wide ViT-H with a 12-block, 384-wide predictor;
    # None = half the encoder's width (96 on vit_tiny) and 6 blocks keep it below the 12-block encoders here.
    # The width must divide by predictor_heads and by 4 (sine-cosine position embedding).
    predictor_dim: int | None = None
    predictor_depth: int = 6
    predictor_heads: int = 3
    # Target encoder EMA: 0.996 -> 1.0 over training (the official schedule is linear; the trainer's is cosine).
    momentum: float = 0.996
    momentum_final: float = 1.0
    # Distance between predicted and target features (layer-normed): "l2" is the paper's squared L2 (here averaged
    # over dimensions too), "smooth_l1" what the official code minimises.
    loss: Literal["l2", "smooth_l1"] = "l2"
    # The only augmentation: a random resized crop of scale 0.3-1.0 (no flip, no colour).
    crop_scale: tuple[float, float] = (0.3, 1.0)

    def __post_init__(self) -> None:
        if self.num_targets < 1 or self.min_keep < 0:
            raise ConfigError("ijepa: num_targets must be >= 1 and min_keep >= 0")
        for key in ("target_scale", "context_scale", "crop_scale"):
            lo, hi = getattr(self, key)
            if not 0 < lo <= hi <= 1:
                raise ConfigError(f"ijepa: {key} must satisfy 0 < lo <= hi <= 1, got {getattr(self, key)}")
        lo, hi = self.target_aspect
        if not 0 < lo <= hi:
            raise ConfigError(f"ijepa: target_aspect must satisfy 0 < lo <= hi, got {self.target_aspect}")
        if self.predictor_depth < 1 or self.predictor_heads < 1:
            raise ConfigError("ijepa: predictor_depth and predictor_heads must be >= 1")
        if self.predictor_dim is not None and self.predictor_dim < 1:
            raise ConfigError(f"ijepa: predictor_dim must be >= 1, got {self.predictor_dim}")
        for key in ("momentum", "momentum_final"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise ConfigError(f"ijepa: {key} must be in [0, 1], got {getattr(self, key)}")
        if self.loss not in ("l2", "smooth_l1"):
            raise ConfigError(f"ijepa: loss must be 'l2' or 'smooth_l1', got {self.loss!r}")


def ijepa_loss(pred: torch.Tensor, target: torch.Tensor, kind: str = "l2") -> torch.Tensor:
    """Mean distance between predicted and target patch representations, ``(..., D)`` each (target detached):
    ``"l2"`` squared error, ``"smooth_l1"`` Huber with ``beta = 1``; averaged over every element, in float32 at
    least (under bf16 autocast too)."""
    dtype = torch.promote_types(pred.dtype, torch.float32)
    with torch.autocast(pred.device.type, enabled=False):
        p, t = pred.to(dtype), target.detach().to(dtype)
        return F.mse_loss(p, t) if kind == "l2" else F.smooth_l1_loss(p, t)


class IJEPAPredictor(nn.Module):
    """The official ``VisionTransformerPredictor``: ``Linear(D -> d)`` on the context tokens plus a fixed sin-cos
    position embedding of their positions; for each target block, a learned mask token plus the embedding of
    each target position; ``depth`` transformer blocks on ``[context, mask tokens]``; LayerNorm; ``Linear(d -> D)``
    of the mask tokens' outputs.

    Args:
        in_dim: the encoder's width ``D``.
        dim, depth, heads: predictor width ``d``, blocks and attention heads.
    """

    def __init__(self, in_dim: int, dim: int, depth: int, heads: int) -> None:
        super().__init__()
        self.dim = dim
        self.embed = nn.Linear(in_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.proj = nn.Linear(dim, in_dim)
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)  # official init_std
                nn.init.zeros_(m.bias)

    def forward(self, context: torch.Tensor, masks: BlockMasks, grid_h: int, grid_w: int) -> torch.Tensor:
        """``context (N, Lc, D)`` encoded context tokens at ``masks.context`` -> predictions ``(M * N, Lt, D)`` for
        ``masks.targets (M, N, Lt)``, target-block-major (row ``m * N + i`` is block ``m`` of sample ``i``)."""
        pos = sincos_pos_embed_2d(self.dim, grid_h, grid_w).to(context.device, context.dtype)  # (L, d)
        x = self.embed(context) + pos[masks.context]  # (N, Lc, d)
        m, n, lt = masks.targets.shape
        x = x.repeat(m, 1, 1)  # (M * N, Lc, d): every block is predicted from the same context
        queries = self.mask_token.to(x.dtype) + pos[masks.targets.reshape(m * n, lt)]  # (M * N, Lt, d)
        x = torch.cat([x, queries], dim=1)
        for block in self.blocks:
            x = block(x)
        return self.proj(self.norm(x)[:, context.shape[1] :])


class IJEPA(Method):
    """I-JEPA on a ViT encoder.

    Each step draws multi-block masks (:mod:`sslrun.plugins.methods.ijepa_masks`) for the GLOBAL batch from a
    generator keyed by ``(mask_seed, step)``, the same draw on every rank; each rank takes its own rows. So the
    masks, the cut of the context lists to the shortest one of the batch, and the loss are those of one process
    on the concatenated batch (the official code draws per rank and cuts per rank). ``mask_seed`` and
    ``step_count`` are buffers: a resumed run draws the masks an uninterrupted run would have drawn.

    The context encoder is the method's ``encoder`` (evaluated and exported). Its CLS token takes part in the
    attention but no loss reads it: evaluate I-JEPA features with ``--set encoder.kwargs.global_pool=mean``, the
    average-pooled patch tokens the paper probes. The target encoder (``requires_grad=False``) runs on all
    patches; its outputs are layer-normalised (no affine) before the targets are read, as in the official code.

    Args:
        encoder: a ViT with ``patch_size``, ``patch_tokens`` and ``forward_tokens``.
        cfg: :class:`IJEPAConfig`.

    Raises:
        ConfigError: the encoder is not such a ViT, or the predictor width does not fit its heads.
    """

    Config = IJEPAConfig
    # The official optimiser: AdamW, lr 1e-3 at batch 2048 (1.25e-4 per 256), weight decay 0.04 -> 0.4 (cosine).
    optim_defaults = {"name": "adamw", "lr": 1.25e-4, "weight_decay": 0.04, "weight_decay_end": 0.4}

    mask_seed: torch.Tensor
    step_count: torch.Tensor

    def __init__(self, encoder: nn.Module, cfg: IJEPAConfig) -> None:
        super().__init__(encoder, cfg)
        missing = [a for a in ("patch_size", "patch_tokens", "forward_tokens") if not hasattr(encoder, a)]
        if missing:
            raise ConfigError(
                f"ijepa needs a ViT encoder (vit_tiny, vit_small), got {type(encoder).__name__} without "
                f"{', '.join(missing)}; pass --encoder vit_tiny"
            )
        dim = cfg.predictor_dim or encoder.output_dim // 2
        if dim % cfg.predictor_heads or dim % 4:
            raise ConfigError(
                f"ijepa: predictor width {dim} must be divisible by predictor_heads={cfg.predictor_heads} and by 4; "
                f"set method.kwargs.predictor_dim"
            )
        self.predictor = IJEPAPredictor(encoder.output_dim, dim, cfg.predictor_depth, cfg.predictor_heads)
        self.target_encoder = frozen_copy(encoder)
        # drawn on the CPU even while the method is built on the meta device (config validation)
        seed = int(torch.randint(0, 2**62, (), device="cpu"))
        self.register_buffer("mask_seed", torch.tensor(seed, dtype=torch.long))
        self.register_buffer("step_count", torch.zeros((), dtype=torch.long))
        self._seed, self._step = seed, 0  # mirrors of the buffers: no device->host sync per step

    @classmethod
    def view_specs(cls, cfg: IJEPAConfig, image_size: int) -> list[ViewSpec]:
        """One view: a random resized crop of scale ``crop_scale`` (0.3-1), no flip, no colour, no blur."""
        return [ViewSpec(size=image_size, scale=cfg.crop_scale, flip_p=0.0, jitter_p=0.0, grayscale_p=0.0)]

    def momentum_schedule(self) -> tuple[float, float]:
        """``(momentum, momentum_final)`` = (0.996, 1.0)."""
        return (self.cfg.momentum, self.cfg.momentum_final)

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._seed, self._step = int(self.mask_seed), int(self.step_count)

    @torch.no_grad()
    def on_after_step(self, step: int, momentum: float | None) -> None:
        """EMA update of the target encoder, then one more step counted (the next masks)."""
        update_momentum(self.encoder, self.target_encoder, self.cfg.momentum if momentum is None else momentum)
        self._step += 1
        self.step_count.fill_(self._step)

    def masks(self, batch: int, grid_h: int, grid_w: int, device: torch.device) -> BlockMasks:
        """This rank's rows of the current step's masks for the global batch (``batch`` per rank)."""
        cfg = self.cfg
        gen = torch.Generator().manual_seed(seed_from(self._seed, self._step))
        masks = sample_block_masks(
            batch * world_size(),
            grid_h,
            grid_w,
            gen,
            num_targets=cfg.num_targets,
            target_scale=cfg.target_scale,
            target_aspect=cfg.target_aspect,
            context_scale=cfg.context_scale,
            min_keep=cfg.min_keep,
        )
        return masks.rows(rank() * batch, (rank() + 1) * batch, device)

    def forward(self, views: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """``views = [x]`` -> ``{"loss", "context_patches"}``."""
        x = views[0]
        p = int(self.encoder.patch_size)
        grid_h, grid_w = x.shape[-2] // p, x.shape[-1] // p
        masks = self.masks(x.shape[0], grid_h, grid_w, x.device)
        tokens = self.encoder.patch_tokens(x)  # (B, L, D) with position embedding
        d = tokens.shape[-1]
        context = torch.gather(tokens, 1, masks.context.unsqueeze(-1).expand(-1, -1, d))
        z = self.encoder.forward_tokens(context)[:, 1:]  # (B, Lc, D), CLS dropped
        pred = self.predictor(z, masks, grid_h, grid_w)  # (M * B, Lt, D)
        with torch.no_grad():
            h = self.target_encoder.forward_tokens(self.target_encoder.patch_tokens(x))[:, 1:]
            h = F.layer_norm(h, (d,))
            m, b, lt = masks.targets.shape
            idx = masks.targets.reshape(m * b, lt).unsqueeze(-1).expand(-1, -1, d)
            target = torch.gather(h.repeat(m, 1, 1), 1, idx)  # row m * B + i: block m of sample i
        loss = ijepa_loss(pred, target, self.cfg.loss)
        return {"loss": loss, "context_patches": torch.tensor(float(masks.context.shape[1]), device=x.device)}
