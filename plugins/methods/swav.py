"""SwAV: swapping assignments between views (Caron, Misra, Mairal, Goyal, Bojanowski & Joulin 2020, "Unsupervised
Learning of Visual Features by Contrasting Cluster Assignments", https://arxiv.org/abs/2006.09882)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from sslrun.core.distributed import concat_all_gather, is_dist, world_size
from sslrun.core.errors import ConfigError
from sslrun.core.interfaces import Method, SetupContext, ViewSpec
from sslrun.plugins.common.views import for_image_size

__all__ = ["SwAV", "SwAVConfig", "sinkhorn", "swav_loss"]

#: The queue is only used when the global batch is at most this large: the paper adds it for its small-batch
#: setting (256 images on 4 GPUs); its batch-4096 runs have none.
QUEUE_MAX_BATCH = 256


@dataclass
class SwAVConfig:
    """SwAV hyperparameters (paper / official ``main_swav.py`` defaults)."""

    # Projection head: Linear(2048) -> BN -> ReLU -> Linear(128), then L2 normalisation (``hidden_mlp``, ``feat_dim``).
    hidden_dim: int = 2048
    output_dim: int = 128
    # K prototypes (3000 for ImageNet).
    num_prototypes: int = 3000
    # Softmax temperature tau of the swapped prediction (0.1).
    temperature: float = 0.1
    # Sinkhorn-Knopp: entropy weight epsilon and iterations (0.05 and 3, section 3.1 and the official scripts).
    epsilon: float = 0.05
    sinkhorn_iterations: int = 3
    # Multi-crop: 2 global views at the image size and N local views at image_size * 96 / 224 (``nmb_crops``
    # [2, 6], ``size_crops`` [224, 96]). None = 6 above 64 px, 4 on small images (2x28 + 4x12 px keeps a CPU step
    # cheap; the locals are tiny anyway).
    num_local_crops: int | None = None
    global_crops_scale: tuple[float, float] = (0.14, 1.0)
    local_crops_scale: tuple[float, float] = (0.05, 0.14)
    local_crop_size: int | None = None  # None = round(image_size * 96 / 224)
    # The prototypes get no gradient during the first epoch (``freeze_prototypes_niters``: 313 steps = 1 epoch at
    # batch 4096). Given in epochs, as in the paper; setup() turns it into optimiser steps for the run's batch
    # size. freeze_prototypes_steps, when set, gives the period in steps instead (and wins over the epochs).
    freeze_prototypes_epochs: float = 1.0
    freeze_prototypes_steps: int | None = None
    # Queue of embeddings from earlier batches, for small batches (``queue_length`` 3840 from epoch 15 on in the
    # batch-256 script). 0 disables it; it is only used when the global batch is <= 256 (QUEUE_MAX_BATCH).
    # queue_start_steps, when set, wins over queue_start_epochs, as above.
    queue_length: int = 3840
    queue_start_epochs: float = 15.0
    queue_start_steps: int | None = None

    def __post_init__(self) -> None:
        if min(self.hidden_dim, self.output_dim, self.num_prototypes) < 1:
            raise ConfigError("swav: hidden_dim, output_dim and num_prototypes must be >= 1")
        if self.temperature <= 0 or self.epsilon <= 0:
            raise ConfigError(f"swav: temperature and epsilon must be > 0, got {self.temperature}, {self.epsilon}")
        if self.sinkhorn_iterations < 1:
            raise ConfigError(f"swav: sinkhorn_iterations must be >= 1, got {self.sinkhorn_iterations}")
        if self.num_local_crops is not None and self.num_local_crops < 0:
            raise ConfigError(f"swav: num_local_crops must be >= 0, got {self.num_local_crops}")
        for key in ("global_crops_scale", "local_crops_scale"):
            lo, hi = getattr(self, key)
            if not 0 < lo <= hi <= 1:
                raise ConfigError(f"swav: {key} must satisfy 0 < lo <= hi <= 1, got {getattr(self, key)}")
        if self.local_crop_size is not None and self.local_crop_size < 1:
            raise ConfigError(f"swav: local_crop_size must be >= 1, got {self.local_crop_size}")
        for key in (
            "freeze_prototypes_epochs",
            "freeze_prototypes_steps",
            "queue_length",
            "queue_start_epochs",
            "queue_start_steps",
        ):
            value = getattr(self, key)
            if value is not None and value < 0:
                raise ConfigError(f"swav: {key} must be >= 0, got {value}")


def _sum_over_ranks(x: torch.Tensor) -> torch.Tensor:
    if is_dist() and world_size() > 1:
        dist.all_reduce(x)
    return x


@torch.no_grad()
def sinkhorn(scores: torch.Tensor, epsilon: float = 0.05, iterations: int = 3, shared_rows: int = 0) -> torch.Tensor:
    """Sinkhorn-Knopp codes for the samples of the GLOBAL batch (the official ``distributed_sinkhorn``).

    ``Q = exp(scores / epsilon)`` is rescaled so that each prototype gets an equal share ``1/K`` of the samples
    and each sample a total weight ``1/B``, alternating ``iterations`` times; the returned codes are the columns
    rescaled to sum to 1. Sums over samples are all-reduced across ranks, as in the official code, so the codes
    are those of one process on the concatenated batch. Computed in float64 after subtracting the global maximum
    (a constant factor, cancelled by the first normalisation): on cosine scores ``exp`` stays finite down to
    ``epsilon`` of about 0.003, where the official float32 ``exp(scores / epsilon)`` overflows below 0.0114.

    Args:
        scores: ``(N, K)`` prototype scores of this rank's samples.
        epsilon: entropy weight (0.05).
        iterations: alternating normalisations (3).
        shared_rows: the first ``shared_rows`` rows are identical on every rank (the queue): counted once, not
            all-reduced.

    Returns:
        ``(N, K)`` codes, each row summing to 1 (float32, or float64 for float64 scores).
    """
    s = scores.detach().double()
    peak = s.max()
    if is_dist() and world_size() > 1:
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    q = torch.exp((s - peak) / epsilon).T  # (K, N)
    k = q.shape[0]
    b = shared_rows + (q.shape[1] - shared_rows) * world_size()  # samples of the global problem

    def total(x: torch.Tensor, dim: int | None) -> torch.Tensor:
        sums = (lambda t: t.sum()) if dim is None else (lambda t: t.sum(dim=dim, keepdim=True))
        return _sum_over_ranks(sums(x[:, shared_rows:])) + sums(x[:, :shared_rows])

    q /= total(q, None)
    for _ in range(iterations):
        q /= total(q, 1)  # each prototype's row sums to 1/K ...
        q /= k
        q /= q.sum(dim=0, keepdim=True)  # ... and each sample's column to 1/B
        q /= b
    return (q * b).T.to(torch.promote_types(scores.dtype, torch.float32))


def swav_loss(scores: list[torch.Tensor], codes: list[torch.Tensor], temperature: float = 0.1) -> torch.Tensor:
    """The swapped prediction (eq. 1 and 2): the code of view ``i`` is predicted from every OTHER view's scores,
    ``-sum_k q_i^k log softmax(z_v . c_k / tau)``, averaged over the batch, the other views and the coded views.

    Args:
        scores: one ``(B, K)`` tensor of prototype scores ``z . c`` per view (all crops).
        codes: one ``(B, K)`` code per view that is assigned (the global views, first in ``scores``); no gradient.
        temperature: ``tau``.
    """
    if len(scores) < 2 or not codes or len(codes) > len(scores):
        raise ValueError(f"swav_loss needs >= 2 views and 1..{len(scores)} codes, got {len(scores)}, {len(codes)}")
    dtype = torch.promote_types(scores[0].dtype, torch.float32)  # float32 under autocast, float64 stays
    log_p = [F.log_softmax(s.to(dtype) / temperature, dim=1) for s in scores]
    loss = scores[0].new_zeros((), dtype=dtype)
    for i, q in enumerate(codes):
        others = [lp for v, lp in enumerate(log_p) if v != i]
        loss = loss + sum(-(q.detach().to(dtype) * lp).sum(dim=1).mean() for lp in others) / len(others)
    return loss / len(codes)


class SwAV(Method):
    """SwAV: online clustering. Each view's normalised embedding is scored against ``K`` learnable prototypes; the
    codes of the two global views are computed with Sinkhorn-Knopp (equipartition over the global batch), and
    every other view must predict them (swapped prediction).

    Multi-crop: consecutive views of one resolution go through the encoder as one batch (2 global + N local).
    The prototypes are L2-normalised before every forward (the official code does it at the start of each
    iteration). During the first ``freeze_prototypes_epochs`` their gradient is multiplied by 0 inside the graph,
    so DDP still sees them used; the official code sets it to None instead. Any weight decay they get meanwhile
    only scales them, which the normalisation undoes.

    Queue (small batches): a buffer holding the embeddings of the ``queue_length`` most recent global-batch samples
    for each global view, identical on every rank (filled with all-gathered embeddings). From
    ``queue_start_epochs`` on it is filled; once full, its scores against the current prototypes join the
    Sinkhorn problem, so the equipartition is over queue + batch. The official queue holds each GPU's own
    embeddings and all-reduces all sums; here the queue's sums are counted once, which is the same problem. Its
    length is rounded down to a multiple of the global batch, as in the official code.

    Epoch-based settings become steps in :meth:`setup`; a SwAV driven by hand without it uses only the
    ``*_steps`` settings (the epoch-based periods count as 0 steps until it knows the epoch length).
    ``step_count`` and ``queue_fill`` are buffers (checkpointed); Python mirrors avoid a host sync per step.

    Args:
        encoder: backbone with ``output_dim``; it must accept the local crops' smaller resolution.
        cfg: :class:`SwAVConfig`.
    """

    Config = SwAVConfig
    # The paper's optimiser: LARS, lr 0.6 per 256 (4.8 at batch 4096), weight decay 1e-6, trust coefficient 0.001
    # (main_swav.py with apex's LARC).
    optim_defaults = {"name": "lars", "lr": 0.6, "weight_decay": 1e-6, "lars_eta": 0.001}

    step_count: torch.Tensor
    queue: torch.Tensor
    queue_fill: torch.Tensor

    def __init__(self, encoder: nn.Module, cfg: SwAVConfig) -> None:
        super().__init__(encoder, cfg)
        self.projector = nn.Sequential(
            nn.Linear(encoder.output_dim, cfg.hidden_dim),
            nn.BatchNorm1d(cfg.hidden_dim),
            nn.ReLU(),
            nn.Linear(cfg.hidden_dim, cfg.output_dim),
        )
        self.prototypes = nn.Linear(cfg.output_dim, cfg.num_prototypes, bias=False)
        self.register_buffer("step_count", torch.zeros((), dtype=torch.long))
        self.register_buffer("queue", torch.zeros(2, cfg.queue_length, cfg.output_dim))
        self.register_buffer("queue_fill", torch.zeros((), dtype=torch.long))
        self._step = 0
        self._fill = 0
        self.freeze_steps = cfg.freeze_prototypes_steps or 0
        self.queue_start = cfg.queue_start_steps or 0

    @classmethod
    def view_specs(cls, cfg: SwAVConfig, image_size: int) -> list[ViewSpec]:
        """2 global views (crop ``global_crops_scale``) and N local views (``local_crops_scale``), SimCLR's colour
        distortion at strength 1 (jitter 0.8/0.8/0.8/0.2 p=0.8, grayscale p=0.2), blur p=0.5, flip. Small images:
        no blur, global crops from 0.2; locals keep their small scale."""
        colour = {"jitter": (0.8, 0.8, 0.8, 0.2), "jitter_p": 0.8, "grayscale_p": 0.2, "blur_p": 0.5}
        glob = ViewSpec(size=image_size, scale=cfg.global_crops_scale, **colour)
        local_size = cfg.local_crop_size or max(1, round(image_size * 96 / 224))
        local = ViewSpec(size=local_size, scale=cfg.local_crops_scale, **colour)
        n_local = cfg.num_local_crops
        if n_local is None:
            n_local = 6 if image_size > 64 else 4
        local = for_image_size(local, image_size, floor_scale=False)
        return [for_image_size(glob, image_size)] * 2 + [local] * n_local

    def setup(self, ctx: SetupContext) -> None:
        """Turn the epoch-based prototype freeze and queue start into optimiser steps of this run (a ``*_steps``
        setting wins over its ``*_epochs``). Idempotent; called again on resume."""
        cfg = self.cfg
        self.freeze_steps = _in_steps(cfg.freeze_prototypes_steps, cfg.freeze_prototypes_epochs, ctx)
        self.queue_start = _in_steps(cfg.queue_start_steps, cfg.queue_start_epochs, ctx)

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._step = int(self.step_count)
        self._fill = int(self.queue_fill)

    @torch.no_grad()
    def on_after_step(self, step: int, momentum: float | None) -> None:
        """Count the optimiser step (the freeze and the queue start are functions of it)."""
        self._step += 1
        self.step_count.fill_(self._step)

    def forward(self, views: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """``views = [global_1, global_2, local_1, ...]`` -> ``{"loss", "queue_used"}``."""
        if len(views) < 2:
            raise ValueError(f"swav needs the 2 global views first, got {len(views)} view(s)")
        with torch.no_grad():
            self.prototypes.weight.copy_(F.normalize(self.prototypes.weight, dim=1))
        h = self.projector(_multicrop(self.encoder, views))  # (V * B, D)
        w = self.prototypes.weight
        if self._step < self.freeze_steps:
            w = w.detach() + 0.0 * w  # same value, zero gradient, still in the graph for DDP
        # scores in float32 even under bf16 autocast: they are divided by tau = 0.1 and epsilon = 0.05
        with torch.autocast(h.device.type, enabled=False):
            z = F.normalize(h.float() if h.element_size() < 4 else h, dim=1)
            scores = list((z @ w.to(z.dtype).T).chunk(len(views)))
        b = views[0].shape[0]
        use_queue = self._queue_active(b * world_size())
        rows = self._queue_rows(b)
        queue_ready = use_queue and self._fill >= rows  # the official code waits until the queue is full
        codes = []
        with torch.no_grad(), torch.autocast(h.device.type, enabled=False):
            for i in range(2):  # the two global views are the ones assigned codes
                s, shared = scores[i].detach(), 0
                if queue_ready:
                    queued = self.queue[i, :rows].to(z.dtype) @ w.detach().to(z.dtype).T
                    s, shared = torch.cat([queued, s]), rows
                codes.append(sinkhorn(s, self.cfg.epsilon, self.cfg.sinkhorn_iterations, shared_rows=shared)[shared:])
            if use_queue:
                self._enqueue(z.detach(), b, rows)
        loss = swav_loss(scores, codes, self.cfg.temperature)
        return {"loss": loss, "queue_used": torch.tensor(float(queue_ready), device=loss.device)}

    # ---- queue -------------------------------------------------------------------------------------------------
    def _queue_rows(self, b: int) -> int:
        """Rows in use: ``queue_length`` rounded down to a multiple of the global batch (official code)."""
        n = b * world_size()
        return self.cfg.queue_length - self.cfg.queue_length % n

    def _queue_active(self, global_batch: int) -> bool:
        return self._step >= self.queue_start and global_batch <= min(QUEUE_MAX_BATCH, self.cfg.queue_length)

    @torch.no_grad()
    def _enqueue(self, z: torch.Tensor, b: int, rows: int) -> None:
        """Shift the first ``rows`` of the queue by one global batch and write the two global views' embeddings of
        the global batch at the front (newest first, rank order, as the official shift register)."""
        new = concat_all_gather(z[: 2 * b].view(2, b, -1).contiguous().transpose(0, 1))  # (W*B, 2, D)
        new = new.transpose(0, 1).to(self.queue.dtype)  # (2, W*B, D), rank order
        n = new.shape[1]
        self.queue[:, n:rows] = self.queue[:, : rows - n].clone()
        self.queue[:, :n] = new
        self._fill = min(self._fill + n, rows)
        self.queue_fill.fill_(self._fill)


def _in_steps(steps: int | None, epochs: float, ctx: SetupContext) -> int:
    """``steps`` if given, else ``epochs`` of this run in optimiser steps (rounded)."""
    return steps if steps is not None else round(epochs * ctx.steps_per_epoch)


def _multicrop(backbone: nn.Module, views: list[torch.Tensor]) -> torch.Tensor:
    """Features of all views, ``(V * B, D)`` in view order: consecutive views of one resolution go through
    ``backbone`` as one batch (the official code groups crops the same way)."""
    feats, start = [], 0
    while start < len(views):
        end = start
        while end < len(views) and views[end].shape[-2:] == views[start].shape[-2:]:
            end += 1
        feats.append(backbone(torch.cat(views[start:end])))
        start = end
    return torch.cat(feats)
