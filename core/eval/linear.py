"""Linear probe on frozen features: multinomial logistic regression fitted full-batch with L-BFGS.

The standard linear-evaluation protocol (Kolesnikov et al. 2019, "Revisiting Self-Supervised Visual
Representation Learning"; the L-BFGS logistic-regression variant of CLIP's linear probe, Radford et al. 2021,
appendix A.3): the encoder is frozen, features are extracted once without augmentation, and only a linear
classifier is trained on them. No BatchNorm layer is used; features are standardised with the training subset's
per-dimension mean and std instead, which is a fixed affine map (so the classifier stays linear in the raw
features) that makes L-BFGS well conditioned whatever the feature scale of the encoder.

The L2 penalty is tuned lightly: each value of a small log-spaced grid is fitted on 80% of the labelled subset
and scored on the held-out 20% (class-balanced, seeded); the best value is then refitted on the whole subset.
The test split is never looked at before the final score.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from sslrun.core.eval.subsets import holdout_split

__all__ = ["DEFAULT_WEIGHT_DECAYS", "LinearProbe", "fit_logistic", "topk_accuracy", "train_linear_probe"]

#: L2 penalties tried (on the mean cross-entropy). sklearn's default C=1 is 1/N per sample: 2e-5 for 50k
#: samples, 2e-3 for 500 (1% of CIFAR-10), so this grid brackets both ends of the label fractions.
DEFAULT_WEIGHT_DECAYS: tuple[float, ...] = (1.0, 1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6)


@dataclass
class LinearProbe:
    """A fitted linear classifier on standardised features.

    Attributes:
        weight: ``(C, D)`` class weights.
        bias: ``(C,)``.
        mean: ``(D,)`` feature mean of the training subset.
        std: ``(D,)`` feature std of the training subset (floored at 1e-6).
        weight_decay: the L2 penalty chosen on the held-out part.
        val_accuracy: held-out top-1 accuracy for every penalty tried (empty when the subset was too small to
            hold anything out).
    """

    weight: torch.Tensor
    bias: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    weight_decay: float
    val_accuracy: dict[float, float] = field(default_factory=dict)

    @torch.no_grad()
    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, D)`` raw features -> ``(N, C)`` class scores."""
        x = (x.to(self.weight) - self.mean) / self.std
        return x @ self.weight.T + self.bias


def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = (1, 5)) -> dict[int, float]:
    """Fraction of rows whose label is among the ``k`` highest scores, for each ``k`` (capped at the number of
    classes, so top-5 of a 4-class problem is 1.0 by definition; callers report it only where it applies)."""
    ranked = scores.argsort(dim=1, descending=True)
    labels = labels.to(ranked.device)
    return {k: (ranked[:, : min(k, scores.shape[1])] == labels[:, None]).any(dim=1).float().mean().item() for k in ks}


def fit_logistic(
    x: torch.Tensor,
    y: torch.Tensor,
    num_classes: int,
    weight_decay: float,
    *,
    max_iter: int = 300,
    init: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Minimise ``mean CE(x W^T + b, y) + weight_decay / 2 * ||W||^2`` with full-batch L-BFGS.

    The problem is strongly convex for ``weight_decay > 0``, so L-BFGS with a strong-Wolfe line search converges
    to the unique optimum in a few hundred iterations (each one full pass over ``x``); the bias is not decayed.

    Args:
        x: ``(N, D)`` standardised features (float32).
        y: ``(N,)`` labels in ``[0, num_classes)``.
        num_classes: C.
        weight_decay: L2 penalty on W.
        max_iter: L-BFGS iterations.
        init: warm start ``(W, b)`` (e.g. the solution for a stronger penalty).

    Returns:
        ``(W (C, D), b (C,))``, detached.
    """
    d = x.shape[1]
    if init is None:
        w = torch.zeros(num_classes, d, device=x.device, dtype=x.dtype)
        b = torch.zeros(num_classes, device=x.device, dtype=x.dtype)
    else:
        w, b = (t.detach().clone().to(x) for t in init)
    w.requires_grad_(True)
    b.requires_grad_(True)
    opt = torch.optim.LBFGS(
        [w, b],
        lr=1.0,
        max_iter=max_iter,
        history_size=20,
        tolerance_grad=1e-7,
        tolerance_change=1e-10,
        line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(x @ w.T + b, y) + 0.5 * weight_decay * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach(), b.detach()


def train_linear_probe(
    x: torch.Tensor,
    y: torch.Tensor,
    num_classes: int,
    *,
    weight_decays: Sequence[float] = DEFAULT_WEIGHT_DECAYS,
    max_iter: int = 300,
    holdout: float = 0.2,
    seed: int = 0,
) -> LinearProbe:
    """Fit a linear probe on frozen features, choosing the L2 penalty on a held-out part of the training subset.

    Args:
        x: ``(N, D)`` features of the labelled training subset (any float dtype; on the device to fit on).
        y: ``(N,)`` labels.
        num_classes: C.
        weight_decays: penalties to try; a single value skips the tuning.
        max_iter: L-BFGS iterations per fit.
        holdout: share of the subset held out for choosing the penalty.
        seed: seed of the held-out split.

    Returns:
        The probe refitted on all of ``x`` with the chosen penalty.

    Examples:
        >>> x = torch.randn(200, 8); y = (x[:, 0] > 0).long()
        >>> probe = train_linear_probe(x, y, 2, weight_decays=(1e-3,))
        >>> topk_accuracy(probe.logits(x), y, (1,))[1] > 0.95
        True
    """
    if not weight_decays:
        raise ValueError("weight_decays must hold at least one value")
    x = x.float()
    y = y.long().to(x.device)
    mean = x.mean(dim=0)
    std = x.std(dim=0, unbiased=False).clamp_min(1e-6)
    xs = (x - mean) / std
    wds = sorted((float(v) for v in weight_decays), reverse=True)  # strong -> weak: each fit warm-starts the next
    val_accuracy: dict[float, float] = {}
    chosen = wds[0]
    if len(wds) > 1:
        fit_idx, val_idx = holdout_split(y.cpu().numpy(), holdout, seed)
        if val_idx.size > 0:
            fit_t = torch.from_numpy(fit_idx).to(x.device)
            val_t = torch.from_numpy(val_idx).to(x.device)
            init = None
            for wd in wds:
                init = fit_logistic(xs[fit_t], y[fit_t], num_classes, wd, max_iter=max_iter, init=init)
                scores = xs[val_t] @ init[0].T + init[1]
                val_accuracy[wd] = topk_accuracy(scores, y[val_t], (1,))[1]
            # Ties go to the stronger penalty (first in the strong -> weak order): the simpler model.
            chosen = max(wds, key=lambda wd: (val_accuracy[wd], wd))
    w, b = fit_logistic(xs, y, num_classes, chosen, max_iter=max_iter)
    return LinearProbe(w, b, mean, std, chosen, val_accuracy)
