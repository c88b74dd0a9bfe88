"""MoCo v2: momentum contrast with a queue of negatives (He, Fan, Wu, Xie & Girshick 2019, "Momentum Contrast for
Unsupervised Visual Representation Learning", https://arxiv.org/abs/1911.05722; Chen, Fan, Girshick & He 2020,
"Improved Baselines with Momentum Contrastive Learning", https://arxiv.org/abs/2003.04297)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from sslrun.core.distributed import concat_all_gather, rank, world_size
from sslrun.core.errors import ConfigError
from sslrun.core.interfaces import Method, ViewSpec
from sslrun.plugins.common.ema import frozen_copy, update_momentum
from sslrun.plugins.common.heads import MoCoV2ProjectionHead
from sslrun.plugins.common.losses import info_nce_loss
from sslrun.plugins.common.views import for_image_size

__all__ = ["MoCoV2", "MoCoV2Config"]


@dataclass
class MoCoV2Config:
    """MoCo v2 hyperparameters (paper defaults)."""

    # InfoNCE temperature: 0.2 in MoCo v2 (0.07 in v1).
    temperature: float = 0.2
    # Number of negative keys K. The queue is written with wrap-around, so it need not be a multiple of the
    # global batch, but it must hold at least one global batch.
    queue_size: int = 65536
    # Key-encoder momentum m, fixed at 0.999 in the paper. Set momentum_final = 1.0 to ramp it with a cosine
    # schedule (as BYOL and MoCo v3 do); equal values mean a constant momentum.
    momentum: float = 0.999
    momentum_final: float = 0.999
    # MLP head: fc(2048) -> ReLU -> fc(128) on a ResNet-50 (the hidden width is the feature width there).
    hidden_dim: int = 2048
    output_dim: int = 128
    # Shuffling BN (MoCo v1, section 3.3): the key encoder sees the global batch in a random order across ranks,
    # so a query and its key never share BatchNorm statistics. Only has an effect with more than one rank.
    shuffle_bn: bool = True

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise ConfigError(f"mocov2: temperature must be > 0, got {self.temperature}")
        if self.queue_size < 1:
            raise ConfigError(f"mocov2: queue_size must be >= 1, got {self.queue_size}")
        for key in ("momentum", "momentum_final"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise ConfigError(f"mocov2: {key} must be in [0, 1], got {getattr(self, key)}")
        if self.hidden_dim < 1 or self.output_dim < 1:
            raise ConfigError("mocov2: hidden_dim and output_dim must be >= 1")


class MoCoV2(Method):
    """MoCo v2: a query encoder trained with InfoNCE against the momentum key encoder's key of another view (the
    positive) and a queue of ``K`` keys from earlier batches (the negatives).

    Queue and DDP: every rank enqueues the keys of the GLOBAL batch (all-gathered, in rank order), so the queues
    of all ranks stay identical. The queue is a registered buffer, saved in checkpoints; the trainer does not
    re-broadcast buffers under DDP, which would only re-send ``K * output_dim * 4`` bytes per step (32 MiB with
    the defaults) that every rank already holds.

    Shuffling BN: with several ranks and ``shuffle_bn``, the key batch is gathered, permuted with a permutation
    drawn on rank 0 and broadcast, split back over the ranks for the key encoder, and un-shuffled afterwards (the
    official ``_batch_shuffle_ddp``). With one process a permutation cannot change batch statistics, so nothing is
    done. SyncBatchNorm would not stop the leak shuffling BN exists for: the positive key would still be
    normalised with the statistics of the current batch and the queued negatives with those of earlier batches,
    a difference the query can learn to spot (MoCo, section 3.3). So with ``shuffle_bn`` the method keeps BN per
    rank (:attr:`per_rank_batchnorm`) and the trainer's ``system.sync_bn`` does not apply to it, which the trainer
    says at run time; ``shuffle_bn=false`` lets ``system.sync_bn`` apply on CUDA.

    The key encoder is updated after each optimiser step (:meth:`on_after_step`); the paper updates it at the start
    of the next forward, which is the same sequence of weights.

    Args:
        encoder: backbone with ``output_dim``.
        cfg: :class:`MoCoV2Config`.
    """

    Config = MoCoV2Config

    queue: torch.Tensor
    queue_ptr: torch.Tensor

    def __init__(self, encoder: nn.Module, cfg: MoCoV2Config) -> None:
        super().__init__(encoder, cfg)
        self.projector = MoCoV2ProjectionHead(encoder.output_dim, cfg.hidden_dim, cfg.output_dim)
        self.key_encoder = frozen_copy(encoder)
        self.key_projector = frozen_copy(self.projector)
        # random unit vectors as initial negatives, as in the official code
        self.register_buffer("queue", F.normalize(torch.randn(cfg.queue_size, cfg.output_dim), dim=1))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))

    @property
    def per_rank_batchnorm(self) -> str:
        """Why BatchNorm must stay per rank (read by the trainer before it converts BN to SyncBatchNorm); empty
        when it need not."""
        if not self.cfg.shuffle_bn:
            return ""
        return "shuffling BN, as in the paper; set method.kwargs.shuffle_bn=false to use SyncBatchNorm instead"

    @classmethod
    def view_specs(cls, cfg: MoCoV2Config, image_size: int) -> list[ViewSpec]:
        """MoCo v2's augmentation (``aug_plus``): crop (0.2-1), colour jitter (0.4, 0.4, 0.4, 0.1) with p=0.8,
        grayscale p=0.2, blur p=0.5, flip. Small images: no blur."""
        spec = ViewSpec(
            size=image_size, scale=(0.2, 1.0), jitter=(0.4, 0.4, 0.4, 0.1), jitter_p=0.8, grayscale_p=0.2, blur_p=0.5
        )
        spec = for_image_size(spec, image_size)
        return [spec, spec]

    def momentum_schedule(self) -> tuple[float, float]:
        """``(m, m_final)``: constant 0.999 by default."""
        return (self.cfg.momentum, self.cfg.momentum_final)

    @torch.no_grad()
    def on_after_step(self, step: int, momentum: float | None) -> None:
        """EMA update of the key encoder and key projector."""
        m = self.cfg.momentum if momentum is None else momentum
        update_momentum(self.encoder, self.key_encoder, m)
        update_momentum(self.projector, self.key_projector, m)

    def forward(self, views: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """``views = [x_q, x_k]`` -> ``{"loss", "pos_sim"}`` (mean cosine of each query with its key)."""
        x_q, x_k = views
        q = self.projector(self.encoder(x_q))  # (B, out)
        k = self._keys(x_k)  # (B, out), unit norm, no grad
        # clone: the loss keeps the queue for backward, and the enqueue below writes into it in place
        loss = info_nce_loss(q, k, self.queue.clone(), self.cfg.temperature)
        self._dequeue_and_enqueue(k)
        pos_sim = (F.normalize(q.detach().float(), dim=1) * k.float()).sum(dim=1).mean()
        return {"loss": loss, "pos_sim": pos_sim}

    # ---- key encoder with shuffling BN ---------------------------------------------------------------------
    def _shuffle_across_ranks(self) -> bool:
        if not self.cfg.shuffle_bn or world_size() == 1:
            return False
        return not any(isinstance(m, nn.SyncBatchNorm) for m in self.key_encoder.modules())

    @torch.no_grad()
    def _keys(self, x: torch.Tensor) -> torch.Tensor:
        if not self._shuffle_across_ranks():
            return F.normalize(self.key_projector(self.key_encoder(x)), dim=1)
        x_all = concat_all_gather(x)  # (W*B, 3, H, W)
        n = x_all.shape[0]
        perm = torch.randperm(n, device=x.device)  # drawn on every rank (keeps RNG streams aligned) ...
        dist.broadcast(perm, src=0)  # ... but rank 0's is used everywhere
        mine = perm.view(world_size(), -1)[rank()]
        k = F.normalize(self.key_projector(self.key_encoder(x_all[mine])), dim=1)  # keys of samples perm[mine]
        k_all = concat_all_gather(k)  # row j holds the key of sample perm[j]
        unshuffle = torch.argsort(perm)
        b = x.shape[0]
        own = unshuffle[rank() * b : (rank() + 1) * b]  # rows holding this rank's own samples, in order
        return k_all[own]

    @torch.no_grad()
    def _dequeue_and_enqueue(self, k: torch.Tensor) -> None:
        keys = concat_all_gather(k.contiguous())  # (W*B, out): the same on every rank
        n, size = keys.shape[0], self.queue.shape[0]
        if n > size:
            raise ConfigError(
                f"mocov2: queue_size {size} is smaller than the global batch {n}; "
                f"set method.kwargs.queue_size to at least {n} (65536 in the paper)"
            )
        # wrap-around write: the queue need not be a multiple of the global batch
        idx = (self.queue_ptr + torch.arange(n, device=keys.device)) % size
        self.queue[idx] = keys.to(self.queue.dtype)
        self.queue_ptr.copy_((self.queue_ptr + n) % size)
