"""torch.distributed helpers that are safe without a process group (one process = world of size 1).

The gradient-carrying gather is what makes losses over the global batch right under DDP: plain
``dist.all_gather`` returns tensors that do not require grad, so cross-rank terms would silently get no gradient.
:func:`gather_with_grad` is a small autograd function on public collectives only (``all_gather`` forward,
``all_reduce`` backward, both in every torch 2.x), so it works on gloo and NCCL alike: its backward sums the
gradients that every rank's loss sends to this rank's rows, and with per-rank losses averaged by DDP that equals
the one-process gradient.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["all_reduce_mean", "concat_all_gather", "gather_with_grad", "is_main", "rank", "world_size"]


def is_dist() -> bool:
    """True inside an initialised process group."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """Global rank (0 without a process group)."""
    return dist.get_rank() if is_dist() else 0


def world_size() -> int:
    """Number of processes (1 without a process group)."""
    return dist.get_world_size() if is_dist() else 1


def is_main() -> bool:
    """Only rank 0 writes files, TensorBoard events and progress output."""
    return rank() == 0


class _GatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0 whose backward returns, to each rank, the sum over ranks of the gradient of its rows.

    Every rank must hold the same number of rows (the trainer splits the global batch evenly)."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(x) for _ in range(world_size())]
        dist.all_gather(parts, x)
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> torch.Tensor:
        # each rank's loss sent gradients to every rank's rows: sum them over ranks, keep this rank's rows
        total = grad.contiguous().clone()
        dist.all_reduce(total)
        return total.chunk(world_size(), dim=0)[rank()]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """``(B, ...)`` per rank -> ``(world_size * B, ...)`` in rank order, with gradients flowing back to every rank."""
    if not is_dist() or world_size() == 1:
        return x
    return _GatherWithGrad.apply(x.contiguous())


@torch.no_grad()
def concat_all_gather(x: torch.Tensor) -> torch.Tensor:
    """``(B, ...)`` per rank -> ``(world_size * B, ...)``, no gradient (MoCo keys, DINO centre statistics)."""
    if not is_dist() or world_size() == 1:
        return x
    out = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out, dim=0)


@torch.no_grad()
def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean over ranks (a copy; ``x`` is unchanged)."""
    if not is_dist() or world_size() == 1:
        return x.clone()
    y = x.clone()
    dist.all_reduce(y)
    return y / world_size()
