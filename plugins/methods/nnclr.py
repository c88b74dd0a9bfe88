"""NNCLR: nearest-neighbour contrastive learning (Dwibedi, Aytar, Tompson, Sermanet & Zisserman 2021, "With a Little
Help from My Friends: Nearest-Neighbor Contrastive Learning of Visual Representations",
https://arxiv.org/abs/2104.14548)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from sslrun.core.distributed import concat_all_gather, gather_with_grad, rank
from sslrun.core.errors import ConfigError
from sslrun.core.interfaces import Method, ViewSpec
from sslrun.plugins.common.views import byol_views

__all__ = ["NNCLR", "NNCLRConfig", "nearest_neighbour", "nnclr_loss"]


@dataclass
class NNCLRConfig:
    """NNCLR hyperparameters (paper defaults unless said otherwise)."""

    # Softmax temperature tau (0.1).
    temperature: float = 0.1
    # Support set Q: a FIFO queue of past projections. The paper uses 98,304 (24 batches of 4096; its ablation
    # finds larger sets better up to that size). 8192 is 32 batches of 256: about the same staleness per entry at
    # the batch sizes a CPU or a single GPU runs, a cheap nearest-neighbour lookup (B x Q dot products per step),
    # and still 14% of Fashion-MNIST. Raise it with the batch size.
    queue_size: int = 8192
    # Projection MLP: [2048, 2048, d] with BN after each layer and ReLU after the first two; d = 256.
    projection_hidden_dim: int = 2048
    projection_dim: int = 256
    # Prediction MLP: [4096, d], BN + ReLU on the hidden layer.
    prediction_hidden_dim: int = 4096

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise ConfigError(f"nnclr: temperature must be > 0, got {self.temperature}")
        if self.queue_size < 1:
            raise ConfigError(f"nnclr: queue_size must be >= 1, got {self.queue_size}")
        if min(self.projection_hidden_dim, self.projection_dim, self.prediction_hidden_dim) < 1:
            raise ConfigError("nnclr: head widths must be >= 1")


def _full(x: torch.Tensor) -> torch.Tensor:
    """float32 for half-precision tensors (autocast), unchanged otherwise: a softmax over cosines at tau = 0.1
    loses too much in bf16's 8 mantissa bits; float64 (tests) stays float64."""
    return x.float() if x.is_floating_point() and x.element_size() < 4 else x


@torch.no_grad()
def nearest_neighbour(z: torch.Tensor, support: torch.Tensor) -> torch.Tensor:
    """``NN(z, Q)``: for each row of ``z (B, D)``, the row of ``support (Q, D)`` with the highest cosine similarity
    (both normalised here); returned normalised, with no gradient (the support set is a constant)."""
    with torch.autocast(z.device.type, enabled=False):
        support = F.normalize(_full(support), dim=1)
        idx = (F.normalize(_full(z.detach()), dim=1) @ support.T).argmax(dim=1)
        return support[idx]


def nnclr_loss(nn_z: torch.Tensor, p: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """One direction of NNCLR's loss (algorithm 1's ``L``): cross entropy of ``NN(z_i) . p_j / tau`` over the
    predictions ``p_j`` of the other view of the GLOBAL batch (gathered with gradients), the positive being
    ``p_i``.

    Args:
        nn_z: ``(B, D)`` nearest neighbours of this rank's first-view projections (no gradient).
        p: ``(B, D)`` this rank's second-view predictions; normalised here.
        temperature: ``tau``.

    Returns:
        Scalar mean over this rank's rows (labels offset by ``rank * B``).
    """
    if nn_z.shape != p.shape or p.ndim != 2:
        raise ValueError(f"nnclr_loss needs two (B, D) tensors of one shape, got {nn_z.shape}, {p.shape}")
    labels = torch.arange(p.shape[0], device=p.device) + p.shape[0] * rank()
    with torch.autocast(p.device.type, enabled=False):
        p_all = gather_with_grad(F.normalize(_full(p), dim=1))  # (W * B, D)
        logits = F.normalize(_full(nn_z.detach()), dim=1) @ p_all.T / temperature
        return F.cross_entropy(logits, labels)


class NNCLR(Method):
    """NNCLR: SimCLR-style contrastive learning in which the positive of a view is not the other view's embedding
    but its nearest neighbour in a support set of past embeddings, so positives cover more semantic variation
    than augmentations do.

    ``loss = L(NN(z1), p2) / 2 + L(NN(z2), p1) / 2`` (algorithm 1), with ``z`` the normalised projections and ``p``
    the predictions; the nearest neighbours carry no gradient, which flows through the predictions only. Negatives
    are the predictions of the other images of the global batch (gathered from every rank with gradients).

    Support set: a registered buffer (checkpointed) of ``queue_size`` normalised first-view projections, written
    with wrap-around after each forward with the projections of the GLOBAL batch (all-gathered in rank order), so
    it is identical on every rank. It starts as random unit vectors (as MoCo's queue): the first
    ``queue_size / global batch`` steps look up neighbours among them until the queue has been written once.

    Args:
        encoder: backbone with ``output_dim``.
        cfg: :class:`NNCLRConfig`.
    """

    Config = NNCLRConfig
    # The paper's optimiser: LARS, lr 0.3 per 256 (4.8 at batch 4096), weight decay 1e-6; the trust coefficient
    # 0.001 of SimCLR's LARS, on which the paper builds.
    optim_defaults = {"name": "lars", "lr": 0.3, "weight_decay": 1e-6, "lars_eta": 0.001}

    queue: torch.Tensor
    queue_ptr: torch.Tensor

    def __init__(self, encoder: nn.Module, cfg: NNCLRConfig) -> None:
        super().__init__(encoder, cfg)
        h, d = cfg.projection_hidden_dim, cfg.projection_dim
        self.projector = nn.Sequential(
            nn.Linear(encoder.output_dim, h, bias=False),
            nn.BatchNorm1d(h),
            nn.ReLU(),
            nn.Linear(h, h, bias=False),
            nn.BatchNorm1d(h),
            nn.ReLU(),
            nn.Linear(h, d, bias=False),
            nn.BatchNorm1d(d),
        )
        self.predictor = nn.Sequential(
            nn.Linear(d, cfg.prediction_hidden_dim, bias=False),
            nn.BatchNorm1d(cfg.prediction_hidden_dim),
            nn.ReLU(),
            nn.Linear(cfg.prediction_hidden_dim, d),
        )
        self.register_buffer("queue", F.normalize(torch.randn(cfg.queue_size, d), dim=1))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))

    @classmethod
    def view_specs(cls, cfg: NNCLRConfig, image_size: int) -> list[ViewSpec]:
        """BYOL's asymmetric pair (the paper follows BYOL's augmentations). Small images: no blur, crop from 0.2."""
        return byol_views(image_size)

    def forward(self, views: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """``views = [x1, x2]`` -> ``{"loss", "nn_agree"}`` (the fraction of images whose two views have the same
        nearest neighbour)."""
        x1, x2 = views
        z1, z2 = self.projector(self.encoder(x1)), self.projector(self.encoder(x2))
        p1, p2 = self.predictor(z1), self.predictor(z2)
        support = self.queue.clone()  # the enqueue below writes into the queue in place
        nn1, nn2 = nearest_neighbour(z1, support), nearest_neighbour(z2, support)
        t = self.cfg.temperature
        loss = nnclr_loss(nn1, p2, t) / 2 + nnclr_loss(nn2, p1, t) / 2
        self._dequeue_and_enqueue(F.normalize(_full(z1.detach()), dim=1))
        return {"loss": loss, "nn_agree": (nn1 == nn2).all(dim=1).float().mean()}

    @torch.no_grad()
    def _dequeue_and_enqueue(self, z: torch.Tensor) -> None:
        keys = concat_all_gather(z.contiguous())  # (W * B, d): the same on every rank
        n, size = keys.shape[0], self.queue.shape[0]
        if n > size:
            raise ConfigError(
                f"nnclr: queue_size {size} is smaller than the global batch {n}; "
                f"set method.kwargs.queue_size to at least {n}"
            )
        idx = (self.queue_ptr + torch.arange(n, device=keys.device)) % size
        self.queue[idx] = keys.to(self.queue.dtype)
        self.queue_ptr.copy_((self.queue_ptr + n) % size)
