"""Weighted k-nearest-neighbour classification on L2-normalised features (Wu et al. 2018, "Unsupervised Feature
Learning via Non-Parametric Instance Discrimination", eq. 8 as used by DINO's eval_knn): each of the k most
cosine-similar bank samples votes for its class with weight exp(sim / T)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["knn_predict", "knn_accuracy"]


@torch.no_grad()
def knn_predict(
    query: torch.Tensor,
    bank: torch.Tensor,
    bank_labels: torch.Tensor,
    num_classes: int,
    k: int = 200,
    t: float = 0.1,
    chunk: int = 1024,
) -> torch.Tensor:
    """Class scores ``(Q, num_classes)`` for ``query (Q, D)`` against ``bank (B, D)`` with labels ``(B,)``.

    Features are L2-normalised here; queries are processed in chunks so the similarity matrix stays small.
    """
    query = F.normalize(query.float(), dim=1)
    bank = F.normalize(bank.float(), dim=1)
    k = min(k, bank.shape[0])
    out = []
    for start in range(0, query.shape[0], chunk):
        sim = query[start : start + chunk] @ bank.T  # (q, B)
        top_sim, top_idx = sim.topk(k, dim=1)  # (q, k)
        weights = (top_sim / t).exp()
        votes = torch.zeros(sim.shape[0], num_classes, device=query.device)
        votes.scatter_add_(1, bank_labels[top_idx], weights)
        out.append(votes)
    return torch.cat(out)


@torch.no_grad()
def knn_accuracy(
    query: torch.Tensor,
    query_labels: torch.Tensor,
    bank: torch.Tensor,
    bank_labels: torch.Tensor,
    num_classes: int,
    k: int = 200,
    t: float = 0.1,
    topk: tuple[int, ...] = (1, 5),
) -> dict[int, float]:
    """Top-k accuracies (fractions in [0, 1]) of weighted kNN, keyed by k of top-k."""
    scores = knn_predict(query, bank, bank_labels, num_classes, k=k, t=t)
    ranked = scores.argsort(dim=1, descending=True)
    return {
        j: (ranked[:, : min(j, num_classes)] == query_labels[:, None]).any(dim=1).float().mean().item() for j in topk
    }
