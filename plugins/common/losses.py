"""Self-supervised losses as pure, separately tested units (one paper, one function or module), plus the masked
reconstruction error and the top-1 accuracy the pretext tasks use.

Every loss here computes in float32 even under bf16/fp16 autocast: softmaxes at temperature 0.04-0.2, cosine
similarities and covariance matrices lose too much in 8 mantissa bits. float64 inputs stay float64 (tests).

Global-batch losses and DDP: a loss defined over the global batch gathers embeddings from every rank **with
gradients** (:func:`sslrun.core.distributed.gather_with_grad`, whose backward sums the gradients of every rank).
Each rank returns the mean over its own rows of per-row losses (NT-Xent, InfoNCE, DINO) or the global-batch loss
itself (Barlow Twins, VICReg statistics). In both cases DDP's gradient averaging then gives exactly the gradient
of one process on the concatenated batch: ``(1/W) sum_s sum_r dL_r/dz_s = d[(1/W) sum_r L_r]/dtheta``, and the
mean over ranks of the returned values is the one-process loss (checked in ``tests/test_ddp_losses.py``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from sslrun.core.distributed import all_reduce_mean, gather_with_grad, rank, world_size

__all__ = [
    "DINOLoss",
    "accuracy",
    "barlow_twins_loss",
    "byol_loss",
    "info_nce_loss",
    "masked_mse",
    "negative_cosine_similarity",
    "nt_xent_loss",
    "off_diagonal",
    "vicreg_loss",
]

T = TypeVar("T", bound=Callable[..., Any])


def _full_precision(fn: T) -> T:
    """Run ``fn`` with autocast off and half-precision tensor arguments cast to float32."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        def up(x: Any) -> Any:
            if isinstance(x, torch.Tensor) and x.dtype in (torch.float16, torch.bfloat16):
                return x.float()
            if isinstance(x, list | tuple):
                return type(x)(up(v) for v in x)
            return x

        def tensors(x: Any) -> list[torch.Tensor]:
            if isinstance(x, torch.Tensor):
                return [x]
            if isinstance(x, list | tuple):
                return [t for v in x for t in tensors(v)]
            return []

        found = tensors(list(args) + list(kwargs.values()))
        device = found[0].device.type if found else "cpu"
        with torch.autocast(device_type=device, enabled=False):
            return fn(*(up(a) for a in args), **{k: up(v) for k, v in kwargs.items()})

    return wrapper  # type: ignore[return-value]


def off_diagonal(m: torch.Tensor) -> torch.Tensor:
    """The off-diagonal elements of a square ``(D, D)`` matrix as a flat ``(D*D - D,)`` view (Barlow Twins code)."""
    n, n2 = m.shape
    if n != n2:
        raise ValueError(f"off_diagonal needs a square matrix, got {tuple(m.shape)}")
    return m.flatten()[:-1].view(n - 1, n + 1)[:, 1:].flatten()


@_full_precision
def nt_xent_loss(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.5, gather: bool = True) -> torch.Tensor:
    """NT-Xent, the normalised temperature-scaled cross entropy of SimCLR (Chen et al. 2020, eq. 1,
    https://arxiv.org/abs/2002.05709).

    For each of the ``2N`` embeddings of a global batch of ``N`` pairs, the positive is the other view of the same
    image and the negatives are the other ``2N - 2`` embeddings (both views of every other image)::

        l(i, j) = -log exp(sim(z_i, z_j) / t) / sum_{k != i} exp(sim(z_i, z_k) / t),   sim = cosine

    The loss is the mean of ``l`` over all ``2N`` anchors.

    Args:
        z1: ``(B, D)`` projections of the first view (this rank's rows).
        z2: ``(B, D)`` projections of the second view, row ``i`` pairs with ``z1[i]``.
        temperature: ``t``; 0.5 in the paper's CIFAR-10 runs, 0.1 for ImageNet at batch 4096 (appendix B.9, table 5).
        gather: take negatives from every rank (gathered with gradients), as SimCLR does across TPU cores.

    Returns:
        Scalar: the mean over this rank's ``2B`` anchors (DDP's average then gives the global-batch gradient).
    """
    if z1.shape != z2.shape or z1.ndim != 2:
        raise ValueError(f"nt_xent_loss needs two (B, D) tensors of one shape, got {z1.shape}, {z2.shape}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    z1, z2 = F.normalize(z1, dim=1), F.normalize(z2, dim=1)
    b = z1.shape[0]
    if gather and world_size() > 1:
        all1, all2, offset = gather_with_grad(z1), gather_with_grad(z2), rank() * b
    else:
        all1, all2, offset = z1, z2, 0
    n = all1.shape[0]
    anchors = torch.cat([z1, z2])  # (2B, D): this rank's anchors
    candidates = torch.cat([all1, all2])  # (2N, D): every embedding of the global batch
    logits = anchors @ candidates.T / temperature  # (2B, 2N)
    own = torch.arange(b, device=z1.device) + offset  # global index of each local pair
    self_col = torch.cat([own, own + n])  # where each anchor meets itself
    pos_col = torch.cat([own + n, own])  # where each anchor meets its other view
    rows = torch.arange(2 * b, device=z1.device)
    self_mask = torch.zeros_like(logits, dtype=torch.bool)
    self_mask[rows, self_col] = True
    logits = logits.masked_fill(self_mask, float("-inf"))  # k != i: an embedding is not its own negative
    return F.cross_entropy(logits, pos_col)


@_full_precision
def info_nce_loss(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float = 0.2) -> torch.Tensor:
    """InfoNCE with a queue of negatives, as in MoCo (He et al. 2019, eq. 1, https://arxiv.org/abs/1911.05722)::

        L_q = -log exp(q.k+ / t) / (exp(q.k+ / t) + sum_{k- in queue} exp(q.k- / t))

    Args:
        q: ``(B, D)`` queries (online encoder); normalised here.
        k: ``(B, D)`` positive keys (momentum encoder, no gradient); normalised here.
        queue: ``(K, D)`` negative keys, already L2-normalised.
        temperature: ``t``; 0.07 in MoCo v1, 0.2 in MoCo v2 (Chen et al. 2020, https://arxiv.org/abs/2003.04297).

    Returns:
        Scalar mean over the ``B`` queries.
    """
    if q.shape != k.shape or q.ndim != 2 or queue.ndim != 2 or queue.shape[1] != q.shape[1]:
        raise ValueError(f"info_nce_loss: q, k (B, D) and queue (K, D), got {q.shape}, {k.shape}, {queue.shape}")
    q, k = F.normalize(q, dim=1), F.normalize(k.detach(), dim=1)
    l_pos = (q * k).sum(dim=1, keepdim=True)  # (B, 1)
    l_neg = q @ queue.detach().T  # (B, K)
    logits = torch.cat([l_pos, l_neg], dim=1) / temperature  # (B, 1 + K); the positive is class 0
    return F.cross_entropy(logits, torch.zeros(q.shape[0], dtype=torch.long, device=q.device))


@_full_precision
def byol_loss(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """BYOL's regression loss (Grill et al. 2020, eq. 2, https://arxiv.org/abs/2006.07733): the squared distance of
    L2-normalised vectors, ``||p/|p| - z/|z| ||^2 = 2 - 2 cos(p, z)``, with the target ``z`` not back-propagated.

    Args:
        p: ``(B, D)`` online predictions.
        z: ``(B, D)`` target projections (the stop-gradient is applied here).

    Returns:
        Scalar mean over the batch (one direction; BYOL sums both, eq. 3).
    """
    return (2 - 2 * F.cosine_similarity(p, z.detach(), dim=1)).mean()


@_full_precision
def negative_cosine_similarity(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """SimSiam's ``D(p, stopgrad(z)) = -cos(p, z)`` (Chen & He 2021, eq. 1 and 3, https://arxiv.org/abs/2011.10566).

    Args:
        p: ``(B, D)`` predictor outputs.
        z: ``(B, D)`` projections of the other view (the stop-gradient is applied here: it is what prevents
            collapse, section 4.1).

    Returns:
        Scalar mean over the batch, in ``[-1, 1]``.
    """
    return -F.cosine_similarity(p, z.detach(), dim=1).mean()


def _standardise(z: torch.Tensor, eps: float) -> torch.Tensor:
    """Per-dimension batch normalisation without affine parameters (training-mode BatchNorm1d: biased variance)."""
    return (z - z.mean(dim=0)) / torch.sqrt(z.var(dim=0, unbiased=False) + eps)


@_full_precision
def barlow_twins_loss(
    z1: torch.Tensor, z2: torch.Tensor, lambd: float = 5e-3, eps: float = 1e-5, gather: bool = True
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Barlow Twins (Zbontar et al. 2021, eq. 1-2, https://arxiv.org/abs/2103.03230)::

        C_ij = sum_b zA_bi zB_bj / N            (zA, zB batch-normalised per dimension over the batch)
        L    = sum_i (1 - C_ii)^2 + lambda * sum_i sum_{j != i} C_ij^2

    With ``gather`` the normalisation statistics and ``C`` are over the GLOBAL batch (every rank's rows,
    gathered with gradients), as the official code does with SyncBatchNorm and an all-reduce of ``C``.

    Args:
        z1: ``(B, D)`` projections of view A (this rank).
        z2: ``(B, D)`` projections of view B.
        lambd: ``lambda``, the weight of the redundancy-reduction term; 5e-3 in the paper (0.0051 in its code).
        eps: BatchNorm's epsilon.
        gather: use the global batch across ranks.

    Returns:
        ``(loss, {"loss_inv": on-diagonal term, "loss_red": lambda * off-diagonal term})``, terms detached. The
        loss is the same on every rank.
    """
    if z1.shape != z2.shape or z1.ndim != 2:
        raise ValueError(f"barlow_twins_loss needs two (B, D) tensors of one shape, got {z1.shape}, {z2.shape}")
    if gather and world_size() > 1:
        z1, z2 = gather_with_grad(z1), gather_with_grad(z2)
    n = z1.shape[0]
    if n < 2:
        raise ValueError("barlow_twins_loss needs at least 2 samples in the (global) batch for batch statistics")
    c = _standardise(z1, eps).T @ _standardise(z2, eps) / n  # (D, D) cross-correlation
    on_diag = (torch.diagonal(c) - 1).pow(2).sum()
    off_diag = off_diagonal(c).pow(2).sum()
    loss = on_diag + lambd * off_diag
    return loss, {"loss_inv": on_diag.detach(), "loss_red": (lambd * off_diag).detach()}


@_full_precision
def vicreg_loss(
    x: torch.Tensor,
    y: torch.Tensor,
    sim_coeff: float = 25.0,
    std_coeff: float = 25.0,
    cov_coeff: float = 1.0,
    eps: float = 1e-4,
    gather: bool = True,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """VICReg (Bardes, Ponce & LeCun 2022, eq. 1-6, https://arxiv.org/abs/2105.04906)::

        s(Z, Z')  = 1/N sum_b ||z_b - z'_b||^2 / D                       (invariance; mean squared error)
        v(Z)      = 1/D sum_j max(0, 1 - sqrt(Var(z^j) + eps))           (variance; unbiased Var)
        c(Z)      = 1/D sum_{i != j} C(Z)_ij^2,  C(Z) = (Z - mean)^T (Z - mean) / (N - 1)
        L         = lambda s + mu (v(Z) + v(Z')) / 2 + nu (c(Z) + c(Z'))

    The variance and covariance terms are over the GLOBAL batch (gathered with gradients, like the official
    ``FullGatherLayer``); the invariance term is per sample, so it stays on this rank's rows (as in the official code).
    The variance term is averaged over the two branches as in the official implementation.

    Args:
        x: ``(B, D)`` expander outputs of view 1.
        y: ``(B, D)`` expander outputs of view 2.
        sim_coeff: ``lambda`` (25).
        std_coeff: ``mu`` (25).
        cov_coeff: ``nu`` (1).
        eps: added to the variance before the square root (1e-4).
        gather: variance/covariance statistics over every rank's rows.

    Returns:
        ``(loss, {"loss_inv", "loss_var", "loss_cov"})``: the unweighted terms, detached.
    """
    if x.shape != y.shape or x.ndim != 2:
        raise ValueError(f"vicreg_loss needs two (B, D) tensors of one shape, got {x.shape}, {y.shape}")
    inv = F.mse_loss(x, y)
    if gather and world_size() > 1:
        x, y = gather_with_grad(x), gather_with_grad(y)
    n, d = x.shape
    if n < 2:
        raise ValueError("vicreg_loss needs at least 2 samples in the (global) batch for variance statistics")
    x = x - x.mean(dim=0)
    y = y - y.mean(dim=0)
    std_x = torch.sqrt(x.var(dim=0) + eps)
    std_y = torch.sqrt(y.var(dim=0) + eps)
    var = (F.relu(1 - std_x).mean() + F.relu(1 - std_y).mean()) / 2
    cov_x = x.T @ x / (n - 1)
    cov_y = y.T @ y / (n - 1)
    cov = off_diagonal(cov_x).pow(2).sum() / d + off_diagonal(cov_y).pow(2).sum() / d
    loss = sim_coeff * inv + std_coeff * var + cov_coeff * cov
    return loss, {"loss_inv": inv.detach(), "loss_var": var.detach(), "loss_cov": cov.detach()}


class DINOLoss(nn.Module):
    """DINO's self-distillation loss with centering and sharpening (Caron et al. 2021, algorithm 1 and eq. 2-4,
    https://arxiv.org/abs/2104.14294).

    ``P_t = softmax((g_t(x) - c) / tau_t)``, ``P_s = softmax(g_s(x') / tau_s)``; the loss is the mean of the cross
    entropies ``-P_t(x) . log P_s(x')`` over every pair of a global view ``x`` (teacher) and any OTHER view ``x'``
    (student), then the centre moves: ``c <- m c + (1 - m) mean_batch g_t(x)``, the mean taken over the global batch
    of all teacher views (all-reduced across ranks) so every rank keeps the same centre.

    The centre is a buffer, so it is saved in checkpoints and identical on every rank.

    Args:
        out_dim: ``K``, the head's output dimension.
        student_temp: ``tau_s`` (0.1).
        center_momentum: ``m`` (0.9).
    """

    center: torch.Tensor

    def __init__(self, out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9) -> None:
        super().__init__()
        if out_dim < 1 or student_temp <= 0 or not 0.0 <= center_momentum <= 1.0:
            raise ValueError("DINOLoss needs out_dim >= 1, student_temp > 0 and 0 <= center_momentum <= 1")
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))

    def forward(
        self,
        student_out: Sequence[torch.Tensor],
        teacher_out: Sequence[torch.Tensor],
        teacher_temp: float | torch.Tensor,
        update_center: bool = True,
    ) -> torch.Tensor:
        """Loss for one step, then (by default) the centre update.

        Args:
            student_out: one ``(B, K)`` logit tensor per view, global views first (same order as the teacher's).
            teacher_out: one ``(B, K)`` logit tensor per global view (no gradient needed).
            teacher_temp: ``tau_t`` for this step (a float or a 0-d tensor, so a warm-up needs no host sync).
            update_center: move the centre towards this batch's teacher mean after computing the loss.

        Returns:
            Scalar mean over view pairs of the mean over this rank's rows.
        """
        return _dino_forward(self, list(student_out), list(teacher_out), teacher_temp, update_center)

    @torch.no_grad()
    def update_center(self, teacher_out: Sequence[torch.Tensor]) -> None:
        """``c <- m c + (1 - m) mean(teacher logits)`` over every teacher view of the global batch."""
        t = torch.cat([o.detach() for o in teacher_out]).to(self.center.dtype)  # (V_t * B, K)
        batch_center = all_reduce_mean(t.mean(dim=0, keepdim=True))  # equal batch sizes: mean of means
        self.center.mul_(self.center_momentum).add_(batch_center, alpha=1 - self.center_momentum)


@_full_precision
def _dino_forward(
    loss: DINOLoss,
    student_out: list[torch.Tensor],
    teacher_out: list[torch.Tensor],
    teacher_temp: float | torch.Tensor,
    update_center: bool,
) -> torch.Tensor:
    if not teacher_out or len(student_out) < len(teacher_out):
        raise ValueError("DINOLoss needs at least one teacher view and at least as many student views")
    if len(student_out) == 1:
        raise ValueError("DINOLoss needs at least two views: each teacher view is compared to the OTHER views")
    center = loss.center.to(teacher_out[0].dtype)
    targets = [F.softmax((t.detach() - center) / teacher_temp, dim=-1) for t in teacher_out]  # centre + sharpen
    log_probs = [F.log_softmax(s / loss.student_temp, dim=-1) for s in student_out]
    total = teacher_out[0].new_zeros(())
    pairs = 0
    for iq, q in enumerate(targets):
        for v, lp in enumerate(log_probs):
            if v == iq:
                continue  # the same view for teacher and student is skipped
            total = total + torch.sum(-q * lp, dim=-1).mean()
            pairs += 1
    if update_center:
        loss.update_center(teacher_out)
    return total / pairs


@_full_precision
def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error over the masked pixels only: ``sum(M * (pred - target)^2) / (C * sum(M))`` (the
    reconstruction loss of context encoders, Pathak et al. 2016, eq. 1).

    Args:
        pred: ``(N, C, H, W)``.
        target: ``(N, C, H, W)``.
        mask: ``(N, 1, H, W)``, 1 where the loss counts.
    """
    mask = mask.to(pred.dtype)
    sq = (pred - target).pow(2) * mask
    return sq.sum() / (mask.sum() * pred.shape[1]).clamp_min(1.0)


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Top-1 accuracy of ``logits (N, C)`` against ``labels (N,)``, as a float tensor (a metric to log)."""
    return (logits.argmax(dim=1) == labels).float().mean()
