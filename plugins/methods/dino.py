"""DINO: self-distillation with no labels (Caron, Touvron, Misra, Jégou, Mairal, Bojanowski & Joulin 2021,
"Emerging Properties in Self-Supervised Vision Transformers", https://arxiv.org/abs/2104.14294)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from sslrun.core.errors import ConfigError
from sslrun.core.interfaces import Method, SetupContext, ViewSpec
from sslrun.plugins.common.ema import frozen_copy, update_momentum
from sslrun.plugins.common.heads import DINOProjectionHead
from sslrun.plugins.common.losses import DINOLoss
from sslrun.plugins.common.views import for_image_size

__all__ = ["DINO", "DINOConfig"]


@dataclass
class DINOConfig:
    """DINO hyperparameters (paper / ``main_dino.py`` defaults)."""

    # Head: MLP 2048-2048-256 (GELU), L2 norm, weight-normalised linear layer to K = 65536 prototypes.
    out_dim: int = 65536
    hidden_dim: int = 2048
    bottleneck_dim: int = 256
    use_bn_in_head: bool = False
    # Fix the last layer's weight norm to 1 (True: stabler; the paper's ViT-S runs use False).
    norm_last_layer: bool = True
    # Student temperature tau_s.
    student_temp: float = 0.1
    # Teacher temperature tau_t: linear warm-up from 0.04 to 0.07 during the first 30 epochs (section 4 and
    # appendix). Given in epochs, as in the paper; setup() turns it into optimiser steps for the run's batch size.
    # teacher_temp_warmup_steps, when set, gives the warm-up in steps instead (and wins over the epochs).
    warmup_teacher_temp: float = 0.04
    teacher_temp: float = 0.07
    teacher_temp_warmup_epochs: float = 30.0
    teacher_temp_warmup_steps: int | None = None
    # Centre EMA rate m (eq. 4).
    center_momentum: float = 0.9
    # Teacher EMA rate lambda: cosine from 0.996 to 1 (section 3.1). main_dino.py suggests 0.9995 at batch 256.
    momentum_teacher: float = 0.996
    momentum_teacher_final: float = 1.0
    # Multi-crop: 2 global views at the image size, num_local_crops local views at image_size * 96 / 224
    # (96 px at 224). main_dino.py defaults to 8 local crops (the paper's best ViT-S/16 run uses 10; 6 is a
    # cheaper setting of its compute table). On CPU with small images, 2-4 local crops train much faster.
    num_local_crops: int = 8
    global_crops_scale: tuple[float, float] = (0.4, 1.0)
    local_crops_scale: tuple[float, float] = (0.05, 0.4)
    local_crop_size: int | None = None  # None = round(image_size * 96 / 224)
    # Keep the head's last layer fixed during the first epoch (main_dino.py: "helps training");
    # freeze_last_layer_steps, when set, gives the period in steps instead.
    freeze_last_layer_epochs: float = 1.0
    freeze_last_layer_steps: int | None = None

    def __post_init__(self) -> None:
        if min(self.out_dim, self.hidden_dim, self.bottleneck_dim) < 1:
            raise ConfigError("dino: out_dim, hidden_dim and bottleneck_dim must be >= 1")
        if min(self.student_temp, self.warmup_teacher_temp, self.teacher_temp) <= 0:
            raise ConfigError("dino: student_temp, warmup_teacher_temp and teacher_temp must be > 0")
        for key in (
            "teacher_temp_warmup_epochs",
            "teacher_temp_warmup_steps",
            "freeze_last_layer_epochs",
            "freeze_last_layer_steps",
        ):
            value = getattr(self, key)
            if value is not None and value < 0:
                raise ConfigError(f"dino: {key} must be >= 0, got {value}")
        for key in ("center_momentum", "momentum_teacher", "momentum_teacher_final"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise ConfigError(f"dino: {key} must be in [0, 1], got {getattr(self, key)}")
        if self.num_local_crops < 0:
            raise ConfigError(f"dino: num_local_crops must be >= 0, got {self.num_local_crops}")
        for key in ("global_crops_scale", "local_crops_scale"):
            lo, hi = getattr(self, key)
            if not 0 < lo <= hi <= 1:
                raise ConfigError(f"dino: {key} must satisfy 0 < lo <= hi <= 1, got {getattr(self, key)}")
        if self.local_crop_size is not None and self.local_crop_size < 1:
            raise ConfigError(f"dino: local_crop_size must be >= 1, got {self.local_crop_size}")


class DINO(Method):
    """DINO: a student network matches the output distribution of a momentum teacher across views.

    The teacher (EMA of the student's encoder and head, ``requires_grad=False``) sees the two global views; the
    student sees all views (multi-crop). Its outputs are centred (an EMA centre of the teacher's outputs over the
    global batch, all-reduced across ranks) and sharpened (teacher temperature below the student's); the student
    minimises the cross entropy to the teacher on every pair of different views (:class:`DINOLoss`).

    ``step_count`` (a buffer, so it is checkpointed) counts optimiser steps through :meth:`on_after_step`; the
    teacher temperature warm-up and the frozen-last-layer period are functions of it, computed on the device
    without host synchronisation. Both are configured in epochs and turned into steps by :meth:`setup`; a DINO
    that is driven by hand without :meth:`setup` uses only the ``*_steps`` settings (the epoch-based periods count
    as 0 steps until it knows the epoch length). Logged: ``teacher_temp``.

    Args:
        encoder: backbone with ``output_dim`` (it must accept the local crops' smaller resolution: global pooling).
        cfg: :class:`DINOConfig`.
    """

    Config = DINOConfig

    step_count: torch.Tensor

    def __init__(self, encoder: nn.Module, cfg: DINOConfig) -> None:
        super().__init__(encoder, cfg)
        self.head = DINOProjectionHead(
            encoder.output_dim,
            cfg.out_dim,
            cfg.hidden_dim,
            cfg.bottleneck_dim,
            use_bn=cfg.use_bn_in_head,
            norm_last_layer=cfg.norm_last_layer,
        )
        self.teacher_encoder = frozen_copy(encoder)
        self.teacher_head = frozen_copy(self.head)
        self.criterion = DINOLoss(cfg.out_dim, cfg.student_temp, cfg.center_momentum)
        self.register_buffer("step_count", torch.zeros((), dtype=torch.long))
        self.warmup_steps = cfg.teacher_temp_warmup_steps or 0
        self.freeze_steps = cfg.freeze_last_layer_steps or 0

    def setup(self, ctx: SetupContext) -> None:
        """Turn the epoch-based warm-up and frozen-last-layer period into optimiser steps of this run (a
        ``*_steps`` setting wins over its ``*_epochs``). Idempotent; called again on resume."""
        cfg = self.cfg
        self.warmup_steps = _in_steps(cfg.teacher_temp_warmup_steps, cfg.teacher_temp_warmup_epochs, ctx)
        self.freeze_steps = _in_steps(cfg.freeze_last_layer_steps, cfg.freeze_last_layer_epochs, ctx)

    def param_groups(self) -> list[dict[str, Any]]:
        """The default groups, with the last layer's parameters split off into groups marked ``"frozen_steps"``:
        during the frozen period the trainer sets their gradients to None before the optimiser step, so weight
        decay, momentum and LARS leave them unchanged, as ``cancel_gradients_last_layer`` does in ``main_dino.py``
        (a zero gradient alone would still let weight decay move them when ``norm_last_layer=False``)."""
        last = {id(p) for p in self.head.last_layer.parameters()}
        out = []
        for group in super().param_groups():
            out.append({**group, "params": [p for p in group["params"] if id(p) not in last]})
            frozen = [p for p in group["params"] if id(p) in last]
            if frozen:
                out.append({**group, "params": frozen, "frozen_steps": self.freeze_steps})
        return out

    @classmethod
    def view_specs(cls, cfg: DINOConfig, image_size: int) -> list[ViewSpec]:
        """Two global views (BYOL's asymmetric blur/solarize pair at ``global_crops_scale``) and
        ``num_local_crops`` local views (blur p=0.5) at ``image_size * 96 / 224`` with ``local_crops_scale``.
        Small images: no blur; the local crops keep their small scale (that is the point of them)."""
        colour = {"jitter": (0.4, 0.4, 0.2, 0.1), "jitter_p": 0.8, "grayscale_p": 0.2}
        g1 = ViewSpec(size=image_size, scale=cfg.global_crops_scale, blur_p=1.0, **colour)
        g2 = ViewSpec(size=image_size, scale=cfg.global_crops_scale, blur_p=0.1, solarize_p=0.2, **colour)
        local_size = cfg.local_crop_size or max(1, round(image_size * 96 / 224))
        local = ViewSpec(size=local_size, scale=cfg.local_crops_scale, blur_p=0.5, **colour)
        return [
            for_image_size(g1, image_size),
            for_image_size(g2, image_size),
            *[for_image_size(local, image_size, floor_scale=False)] * cfg.num_local_crops,
        ]

    def momentum_schedule(self) -> tuple[float, float]:
        """``(momentum_teacher, momentum_teacher_final)`` = (0.996, 1.0)."""
        return (self.cfg.momentum_teacher, self.cfg.momentum_teacher_final)

    @torch.no_grad()
    def on_after_step(self, step: int, momentum: float | None) -> None:
        """EMA update of the teacher, then one more step counted."""
        m = self.cfg.momentum_teacher if momentum is None else momentum
        update_momentum(self.encoder, self.teacher_encoder, m)
        update_momentum(self.head, self.teacher_head, m)
        self.step_count += 1

    def teacher_temperature(self) -> torch.Tensor:
        """``tau_t`` for the current step: linear from ``warmup_teacher_temp`` to ``teacher_temp`` over
        the warm-up steps, then constant (a 0-d tensor on the buffer's device)."""
        cfg = self.cfg
        if self.warmup_steps == 0:
            return torch.tensor(cfg.teacher_temp, device=self.step_count.device)
        frac = (self.step_count.float() / self.warmup_steps).clamp(max=1.0)
        return cfg.warmup_teacher_temp + (cfg.teacher_temp - cfg.warmup_teacher_temp) * frac

    def forward(self, views: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """``views = [global_1, global_2, local_1, ...]`` -> ``{"loss", "teacher_temp"}``."""
        if len(views) < 2:
            raise ValueError(f"dino needs the 2 global views first, got {len(views)} view(s)")
        # 0 while the last layer is frozen, 1 afterwards: gates its gradient without a host sync. The layer stays in
        # the graph, so DDP sees it used; the trainer then drops its zero gradient (param_groups' frozen_steps)
        gate = (self.step_count >= self.freeze_steps).float()
        student_out = _multicrop(self.encoder, lambda f: self.head(f, gate), views)
        with torch.no_grad():
            teacher_out = _multicrop(self.teacher_encoder, self.teacher_head, views[:2])
        temp = self.teacher_temperature()
        loss = self.criterion(student_out, teacher_out, temp)
        return {"loss": loss, "teacher_temp": temp.detach()}


def _in_steps(steps: int | None, epochs: float, ctx: SetupContext) -> int:
    """``steps`` if given, else ``epochs`` of this run in optimiser steps (rounded)."""
    return steps if steps is not None else round(epochs * ctx.steps_per_epoch)


def _multicrop(
    backbone: nn.Module, head: Callable[[torch.Tensor], torch.Tensor], views: list[torch.Tensor]
) -> list[torch.Tensor]:
    """Run consecutive views of the same resolution through ``backbone`` as one batch, then the head once on all
    features (DINO's ``MultiCropWrapper``); returns one ``(B, K)`` output per view."""
    feats, start = [], 0
    while start < len(views):
        end = start
        while end < len(views) and views[end].shape[-2:] == views[start].shape[-2:]:
            end += 1
        feats.append(backbone(torch.cat(views[start:end])))
        start = end
    out = head(torch.cat(feats))
    return list(out.chunk(len(views)))
