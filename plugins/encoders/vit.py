"""A compact Vision Transformer (Dosovitskiy et al. 2021, "An Image is Worth 16x16 Words") for SSL.

``vit_tiny`` (192-d, 12 blocks, 3 heads) and ``vit_small`` (384-d, 12 blocks, 6 heads) follow DeiT/DINO's sizes.
The module exposes the pieces that masked image modelling needs (MAE, He et al. 2022, runs the blocks on the
visible tokens only): ``patch_embed``, ``cls_token``, ``pos_embed``, ``blocks``, ``norm``, ``patch_size`` and
:meth:`VisionTransformer.pos_embed_for`. Any encoder plugin that provides the same attributes works with the
``mae`` pretext task.

The patch size follows the image size: 4 px for images up to 64 px (a 32 px CIFAR image is then 8x8 = 64 tokens;
16 px patches would leave 4 tokens), 8 px up to 128 px (STL-10 at 96 px: 12x12 tokens) and 16 px from there on,
the paper's ImageNet setting.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sslrun.core.errors import ConfigError

__all__ = ["Block", "VisionTransformer", "default_patch_size", "sincos_pos_embed_2d", "vit_small", "vit_tiny"]


def default_patch_size(image_size: int) -> int:
    """4 px patches up to 64 px images, 8 px up to 128 px, 16 px (the paper's) above."""
    if image_size <= 64:
        return 4
    if image_size <= 128:
        return 8
    return 16


def sincos_pos_embed_2d(dim: int, grid_h: int, grid_w: int) -> torch.Tensor:
    """Fixed 2-D sine-cosine position embedding ``(grid_h * grid_w, dim)`` (MAE, He et al. 2022, appendix A.1):
    half of the channels encode the row, half the column, each as sin/cos at geometric frequencies."""
    if dim % 4:
        raise ValueError(f"sin-cos position embedding needs a dim divisible by 4, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))  # (D/4,)
    ys, xs = torch.meshgrid(
        torch.arange(grid_h, dtype=torch.float64), torch.arange(grid_w, dtype=torch.float64), indexing="ij"
    )

    def enc(pos: torch.Tensor) -> torch.Tensor:
        out = pos.reshape(-1, 1) * omega.reshape(1, -1)  # (L, D/4)
        return torch.cat([out.sin(), out.cos()], dim=1)  # (L, D/2)

    return torch.cat([enc(ys), enc(xs)], dim=1).float()  # (L, D)


class DropPath(nn.Module):
    """Stochastic depth per sample (Huang et al. 2016): drop a residual branch with probability ``p``."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1 - self.p)
        return x * keep / (1 - self.p)


class Attention(nn.Module):
    """Multi-head self-attention with fused QKV (uses PyTorch's scaled_dot_product_attention kernels)."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed dim {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, length, dim = x.shape
        qkv = self.qkv(x).reshape(n, length, 3, self.num_heads, dim // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (N, heads, L, D/heads)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(n, length, dim))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + Attn(LN(x))``, then ``x + MLP(LN(x))``."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, drop_path: float = 0.0) -> None:
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class VisionTransformer(nn.Module):
    """ViT encoder: ``(N, 3, H, W) -> (N, embed_dim)`` (the final-normed CLS token, or the mean patch token).

    Args:
        image_size: side of the training images; sets the position-embedding grid. Other input sizes work: the
            embedding is resized bicubically (DINO's ``interpolate_pos_encoding``), and a border that does not fill
            a whole patch is dropped.
        patch_size: side of a patch in pixels; ``None`` = :func:`default_patch_size` of ``image_size``.
        embed_dim: token width.
        depth: number of transformer blocks.
        num_heads: attention heads per block.
        mlp_ratio: MLP hidden width / ``embed_dim``.
        drop_path_rate: stochastic-depth rate of the last block (linearly increasing from 0 over the blocks).
        global_pool: ``"cls"`` (the CLS token, as in DINO/MAE linear probing) or ``"mean"`` (mean patch token).

    Attributes:
        output_dim: ``embed_dim``.
        patch_embed: ``Conv2d(3, embed_dim, patch_size, stride=patch_size)``.
        cls_token: ``(1, 1, embed_dim)``.
        pos_embed: ``(1, 1 + grid * grid, embed_dim)`` learnable, initialised with 2-D sine-cosine values.
        blocks: ``nn.ModuleList`` of :class:`Block`.
        norm: the final LayerNorm.
    """

    def __init__(
        self,
        image_size: int = 224,
        patch_size: int | None = None,
        embed_dim: int = 192,
        depth: int = 12,
        num_heads: int = 3,
        mlp_ratio: float = 4.0,
        drop_path_rate: float = 0.0,
        global_pool: str = "cls",
    ) -> None:
        super().__init__()
        patch_size = patch_size or default_patch_size(image_size)
        # ConfigError (not ValueError): these come from encoder.kwargs and must be a one-line message to the user
        if global_pool not in ("cls", "mean"):
            raise ConfigError(f"encoder.kwargs.global_pool must be 'cls' or 'mean', got {global_pool!r}")
        if not 1 <= patch_size <= image_size:
            raise ConfigError(f"encoder.kwargs.patch_size must be in [1, image size {image_size}], got {patch_size}")
        if depth < 1:
            raise ConfigError(f"encoder.kwargs.depth must be >= 1, got {depth}")
        if not 0.0 <= drop_path_rate < 1.0:
            raise ConfigError(f"encoder.kwargs.drop_path_rate must be in [0, 1), got {drop_path_rate}")
        self.image_size = image_size
        self.patch_size = patch_size
        self.grid_size = image_size // patch_size
        self.embed_dim = self.output_dim = embed_dim
        self.global_pool = global_pool
        self.patch_embed = nn.Conv2d(3, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        pos = torch.cat([torch.zeros(1, embed_dim), sincos_pos_embed_2d(embed_dim, self.grid_size, self.grid_size)])
        self.pos_embed = nn.Parameter(pos.unsqueeze(0))  # (1, 1 + L, D); row 0 is the CLS token's
        rates = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio, r) for r in rates)
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self._init_weights()

    def _init_weights(self) -> None:
        # MAE/DINO init: the patch projection like a Linear layer (xavier), truncated-normal Linear weights.
        w = self.patch_embed.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.patch_embed.bias)
        nn.init.normal_(self.cls_token, std=0.02)
        for m in self.blocks.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def pos_embed_for(self, grid_h: int, grid_w: int) -> torch.Tensor:
        """Position embedding ``(1, 1 + grid_h * grid_w, D)`` for a ``grid_h x grid_w`` patch grid (resized
        bicubically from the training grid when it differs)."""
        if grid_h == grid_w == self.grid_size:
            return self.pos_embed
        cls_pos, patch_pos = self.pos_embed[:, :1], self.pos_embed[:, 1:]
        g = self.grid_size
        patch_pos = patch_pos.reshape(1, g, g, -1).permute(0, 3, 1, 2)  # (1, D, g, g)
        patch_pos = F.interpolate(patch_pos, size=(grid_h, grid_w), mode="bicubic", align_corners=False)
        return torch.cat([cls_pos, patch_pos.flatten(2).transpose(1, 2)], dim=1)

    def patch_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """``x (N, 3, H, W)`` -> patch tokens ``(N, L, D)`` with their position embedding added (no CLS)."""
        if x.shape[-1] < self.patch_size or x.shape[-2] < self.patch_size:
            raise ValueError(f"input {tuple(x.shape[-2:])} is smaller than one {self.patch_size} px patch")
        tokens = self.patch_embed(x)  # (N, D, H/p, W/p)
        gh, gw = tokens.shape[-2:]
        return tokens.flatten(2).transpose(1, 2) + self.pos_embed_for(gh, gw)[:, 1:]

    def forward_tokens(self, patch_tokens: torch.Tensor) -> torch.Tensor:
        """Run the transformer on ``(N, L', D)`` position-embedded patch tokens (all of them, or the visible
        subset for MAE); prepends the CLS token and returns the normed ``(N, 1 + L', D)`` sequence."""
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(patch_tokens.shape[0], -1, -1)
        x = torch.cat([cls, patch_tokens], dim=1)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """``x (N, 3, H, W)`` -> the last layer's patch tokens on their grid, ``(N, output_dim, H/p, W/p)``; what
        ``sslrun eval --features gridK`` reads."""
        gh, gw = x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size
        tokens = self.forward_tokens(self.patch_tokens(x))[:, 1:]
        return tokens.transpose(1, 2).reshape(x.shape[0], -1, gh, gw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x (N, 3, H, W)`` -> ``(N, output_dim)``."""
        tokens = self.forward_tokens(self.patch_tokens(x))
        return tokens[:, 0] if self.global_pool == "cls" else tokens[:, 1:].mean(dim=1)


def _vit(
    embed_dim: int,
    num_heads: int,
    image_size: int | None,
    patch_size: int | None,
    depth: int,
    drop_path_rate: float,
    global_pool: str,
) -> VisionTransformer:
    return VisionTransformer(
        image_size=image_size or 224,
        patch_size=patch_size,
        embed_dim=embed_dim,
        depth=depth,
        num_heads=num_heads,
        drop_path_rate=drop_path_rate,
        global_pool=global_pool,
    )


def vit_tiny(
    image_size: int | None = None,
    patch_size: int | None = None,
    depth: int = 12,
    drop_path_rate: float = 0.0,
    global_pool: str = "cls",
) -> VisionTransformer:
    """ViT-Tiny (DeiT, Touvron et al. 2021): 192-d, 12 blocks, 3 heads, ~5.5 M parameters.

    Args:
        image_size: the data's image side (passed by the trainer); ``None`` = 224.
        patch_size: ``None`` = 4 px up to 64 px images, 8 px up to 128 px, else 16 px.
        depth: number of blocks (lower it for quick CPU experiments).
        drop_path_rate: stochastic depth (0.1 is DINO's setting for ViT-S).
        global_pool: ``"cls"`` or ``"mean"``.

    Example:
        >>> vit_tiny(image_size=32)(torch.zeros(2, 3, 32, 32)).shape
        torch.Size([2, 192])
    """
    return _vit(192, 3, image_size, patch_size, depth, drop_path_rate, global_pool)


def vit_small(
    image_size: int | None = None,
    patch_size: int | None = None,
    depth: int = 12,
    drop_path_rate: float = 0.0,
    global_pool: str = "cls",
) -> VisionTransformer:
    """ViT-Small (DeiT/DINO): 384-d, 12 blocks, 6 heads, ~21.7 M parameters. Arguments as :func:`vit_tiny`."""
    return _vit(384, 6, image_size, patch_size, depth, drop_path_rate, global_pool)
