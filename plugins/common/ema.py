"""Momentum (EMA) teachers: MoCo's key encoder, BYOL's target network, DINO's teacher.

The teacher is a frozen deep copy of the student (``requires_grad=False``): DDP then neither reduces gradients for
it nor requires it to take part in the backward pass, and the optimiser never sees it (``Method.param_groups``
skips frozen parameters). Every rank applies the same EMA to the same (DDP-synchronised) student weights, so
teachers stay identical across ranks without any communication.

Only parameters are averaged. Buffers (BatchNorm running statistics) are the teacher's own: it runs in training
mode and uses batch statistics, as in MoCo and BYOL, so its running averages only matter if it is evaluated.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

__all__ = ["frozen_copy", "update_momentum"]


def frozen_copy(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` whose parameters do not require gradients (the teacher's initial weights are the
    student's, as in every EMA method)."""
    teacher = copy.deepcopy(module)
    teacher.requires_grad_(False)
    return teacher


@torch.no_grad()
def update_momentum(student: nn.Module, teacher: nn.Module, momentum: float) -> None:
    """``teacher <- momentum * teacher + (1 - momentum) * student``, parameter by parameter.

    Args:
        student: the online network.
        teacher: its EMA copy (same architecture; parameters matched by name).
        momentum: ``m`` in [0, 1]; 1 keeps the teacher, 0 copies the student.

    Raises:
        ValueError: ``momentum`` outside [0, 1], or the two modules do not have the same parameters.
    """
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"EMA momentum must be in [0, 1], got {momentum}")
    s_params = dict(student.named_parameters())
    t_params = dict(teacher.named_parameters())
    if s_params.keys() != t_params.keys():
        raise ValueError("update_momentum: student and teacher do not have the same parameters")
    names = list(s_params)
    t_list = [t_params[n].data for n in names]
    s_list = [s_params[n].data.to(t_params[n].dtype) for n in names]
    # one fused kernel per dtype/device group: t = t + (1 - m) * (s - t) = m * t + (1 - m) * s
    torch._foreach_lerp_(t_list, s_list, 1.0 - momentum)
