"""I-JEPA's multi-block masks (Assran et al. 2023, "Self-Supervised Learning from Images with a Joint-Embedding
Predictive Architecture", https://arxiv.org/abs/2301.08243; the official ``MaskCollator``): ``M`` target blocks
and one context block, as patch indices on a ``grid_h x grid_w`` patch grid.

Per batch, one target block size and one context block size are drawn (all samples share them, so the index
tensors stack); per sample, the positions. A block size comes from one uniform number ``r``: scale
``s = lo + r (hi - lo)``, aspect ``a = lo_a + r (hi_a - lo_a)``, ``h = round(sqrt(s L a))``,
``w = round(sqrt(s L / a))``, both capped at the grid side minus one (as the official ``_sample_block_size``).
The context block loses every target patch and must keep more than ``min_keep`` patches. The official code
redraws its position until it does, and after every 20 failed draws lets one more target (the last first) overlap
it; here the position is drawn uniformly among the valid ones at the strictest level that has any, which is what
redrawing converges to, without a loop. Context index lists are cut to the shortest one of the batch, keeping the
first patches in raster order (official collation).

Vectorised over the batch (box sums by convolution): a global batch of 256 on a 14 x 14 grid takes milliseconds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["BlockMasks", "block_size", "sample_block_masks"]


@dataclass(frozen=True)
class BlockMasks:
    """Patch indices (raster order, ``row * grid_w + col``) for one batch.

    Attributes:
        context: ``(N, Lc)`` long, increasing along each row: the context patches of each sample.
        targets: ``(M, N, Lt)`` long, increasing along each row: the patches of target block ``m`` of each sample.
    """

    context: torch.Tensor
    targets: torch.Tensor

    def rows(self, start: int, stop: int, device: torch.device | str | None = None) -> BlockMasks:
        """The masks of samples ``start:stop`` (this rank's share of a global batch), on ``device``."""
        return BlockMasks(self.context[start:stop].to(device), self.targets[:, start:stop].to(device))


def block_size(
    r: float, grid_h: int, grid_w: int, scale: tuple[float, float], aspect: tuple[float, float]
) -> tuple[int, int]:
    """``(h, w)`` of a block for the uniform draw ``r`` (one number for both scale and aspect, as officially)."""
    s = scale[0] + r * (scale[1] - scale[0])
    keep = int(grid_h * grid_w * s)
    a = aspect[0] + r * (aspect[1] - aspect[0])
    h = int(round(math.sqrt(keep * a)))
    w = int(round(math.sqrt(keep / a)))
    return max(1, min(h, grid_h - 1)), max(1, min(w, grid_w - 1))


def _blocks(n: int, h: int, w: int, grid_h: int, grid_w: int, gen: torch.Generator) -> torch.Tensor:
    """``(n, grid_h, grid_w)`` bool: one ``h x w`` block per sample at a uniform position fully inside the grid."""
    top = torch.randint(0, grid_h - h + 1, (n, 1, 1), generator=gen)
    left = torch.randint(0, grid_w - w + 1, (n, 1, 1), generator=gen)
    rows = torch.arange(grid_h).view(1, -1, 1)
    cols = torch.arange(grid_w).view(1, 1, -1)
    return (rows >= top) & (rows < top + h) & (cols >= left) & (cols < left + w)


def _indices(mask: torch.Tensor, length: int) -> torch.Tensor:
    """The first ``length`` True positions of each row of ``mask (N, L)``, in increasing order."""
    order = torch.argsort((~mask).to(torch.uint8), dim=1, stable=True)  # True positions first, each in order
    return order[:, :length]


def sample_block_masks(
    n: int,
    grid_h: int,
    grid_w: int,
    gen: torch.Generator,
    num_targets: int = 4,
    target_scale: tuple[float, float] = (0.15, 0.2),
    target_aspect: tuple[float, float] = (0.75, 1.5),
    context_scale: tuple[float, float] = (0.85, 1.0),
    min_keep: int = 10,
) -> BlockMasks:
    """Context and target masks for ``n`` samples (CPU tensors; see the module docstring).

    Args:
        n: samples (the global batch, so that every rank can take its rows of one draw).
        grid_h, grid_w: patch grid.
        gen: a CPU generator; the same state gives the same masks.
        num_targets: ``M`` target blocks (4).
        target_scale, target_aspect: target block area fraction (0.15-0.2) and aspect ratio h/w (0.75-1.5).
        context_scale: context block area fraction (0.85-1.0), aspect 1.
        min_keep: a context must keep more than this many patches (10).
    """
    th, tw = block_size(float(torch.rand(1, generator=gen)), grid_h, grid_w, target_scale, target_aspect)
    ch, cw = block_size(float(torch.rand(1, generator=gen)), grid_h, grid_w, context_scale, (1.0, 1.0))
    targets = torch.stack([_blocks(n, th, tw, grid_h, grid_w, gen) for _ in range(num_targets)])  # (M, n, H, W)
    # allowed[r] = the patches a context may hold once the last r targets may overlap it (r = 0: none may)
    unions = torch.cat([torch.zeros_like(targets[:1]), targets.cumsum(dim=0) > 0])  # unions[k]: first k targets
    allowed = (~unions.flip(0)).float()  # (M + 1, n, H, W)
    # kept patches for every top-left corner of the context block: (M + 1, n, H - ch + 1, W - cw + 1)
    box = torch.ones(1, 1, ch, cw)
    kept = F.conv2d(allowed.flatten(0, 1).unsqueeze(1), box).view(num_targets + 1, n, -1)
    valid = kept > min_keep + 0.5
    level = torch.where(valid.any(dim=2), torch.arange(num_targets + 1).view(-1, 1), num_targets + 1).amin(dim=0)
    level = level.clamp(max=num_targets)  # no valid corner at all (a tiny grid): overlap everything, any corner
    samples = torch.arange(n)
    ok = valid[level, samples] | ~valid[level, samples].any(dim=1, keepdim=True)  # (n, corners)
    scores = torch.rand(ok.shape, generator=gen).masked_fill(~ok, -1.0)
    corner = scores.argmax(dim=1)  # uniform among the valid corners
    corners_w = grid_w - cw + 1
    top, left = (corner // corners_w).view(-1, 1, 1), (corner % corners_w).view(-1, 1, 1)
    rows = torch.arange(grid_h).view(1, -1, 1)
    cols = torch.arange(grid_w).view(1, 1, -1)
    block = (rows >= top) & (rows < top + ch) & (cols >= left) & (cols < left + cw)
    context = (block & allowed[level, samples].bool()).flatten(1)
    target_idx = torch.stack([_indices(t, th * tw) for t in targets.flatten(2)])  # each block has th * tw patches
    return BlockMasks(context=_indices(context, int(context.sum(dim=1).min())), targets=target_idx)
