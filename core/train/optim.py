"""Optimisers: SGD, LARS and AdamW over the method's parameter groups.

``method.param_groups()`` decides which parameters decay: a group that sets its own ``weight_decay`` (biases and
normalisation parameters, with 0) keeps it for the whole run; every other group follows the weight-decay schedule.
Groups marked ``"lars_exclude": True`` also skip LARS's layer-wise adaptation, as in SimCLR and BYOL. Groups with
``"frozen_steps": N`` get no update at all during the first ``N`` global steps (:func:`drop_frozen_grads`), and
groups marked ``"fixed_lr": True`` keep the peak lr (:func:`apply_schedules`).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from sslrun.core.config import OptimCfg
from sslrun.core.errors import ConfigError

__all__ = ["LARS", "apply_schedules", "build_optimizer", "drop_frozen_grads"]

#: Param-group key set by :func:`build_optimizer`: True where the group follows the weight-decay schedule.
SCHEDULED_WD = "scheduled_wd"


class LARS(torch.optim.Optimizer):
    """Layer-wise Adaptive Rate Scaling (You, Gitman & Ginsburg 2017, "Large Batch Training of Convolutional
    Networks"), in the form SimCLR (``lars_optimizer.py``) and BYOL use.

    For each parameter ``w`` with gradient ``g`` in a group that is not ``lars_exclude``::

        g     <- g + weight_decay * w
        trust  = eta * ||w|| / ||g||      (1 if either norm is 0)
        v     <- momentum * v + lr * trust * g
        w     <- w - v

    ``lars_exclude`` groups use ``trust = 1`` (plain SGD with momentum, lr inside the buffer); their weight decay
    comes from the group (0 for biases and norms). Nesterov momentum is not used by any of the papers here.

    Args:
        params: parameters or parameter groups (``lars_exclude`` is read per group).
        lr: learning rate (set every step by the trainer's schedule).
        momentum: heavy-ball momentum.
        weight_decay: L2 coefficient added to the gradient before the trust ratio.
        eta: trust coefficient (0.001 in You et al.; BYOL and many SSL recipes use larger values).
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        eta: float = 0.001,
    ) -> None:
        if lr < 0 or momentum < 0 or weight_decay < 0 or eta <= 0:
            raise ValueError("LARS needs lr >= 0, momentum >= 0, weight_decay >= 0 and eta > 0")
        defaults = {"lr": lr, "momentum": momentum, "weight_decay": weight_decay, "eta": eta, "lars_exclude": False}
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        """One LARS update of every parameter with a gradient (the formula is on the class)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, mom, wd, eta = group["lr"], group["momentum"], group["weight_decay"], group["eta"]
            adapt = not group["lars_exclude"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                if wd != 0:
                    g = g.add(p, alpha=wd)
                if adapt:
                    w_norm = torch.linalg.vector_norm(p)
                    g_norm = torch.linalg.vector_norm(g)
                    # where() keeps this on the device: no host sync per parameter
                    trust = torch.where(
                        (w_norm > 0) & (g_norm > 0), eta * w_norm / g_norm.clamp_min(1e-30), torch.ones_like(w_norm)
                    )
                    g = g * trust
                state = self.state[p]
                buf = state.get("momentum_buffer")
                if buf is None:
                    buf = state["momentum_buffer"] = torch.zeros_like(p)
                buf.mul_(mom).add_(g, alpha=lr)
                p.sub_(buf)
        return loss


def build_optimizer(groups: list[dict[str, Any]], cfg: OptimCfg, lr: float) -> torch.optim.Optimizer:
    """The optimiser named by ``cfg.name`` over ``groups`` (from ``method.param_groups()``).

    Args:
        groups: parameter groups; a group with its own ``weight_decay`` keeps it, the others get
            ``cfg.weight_decay`` and follow the schedule; ``lars_exclude`` is honoured by LARS.
        cfg: the optimiser config.
        lr: the initial learning rate (the trainer overwrites it every step from the schedule).

    Raises:
        ConfigError: unknown optimiser name, or no trainable parameters.
    """
    prepared = []
    for g in groups:
        params = [p for p in g["params"] if p.requires_grad]
        if not params:
            continue
        group = dict(g, params=params)
        group[SCHEDULED_WD] = "weight_decay" not in g
        group.setdefault("weight_decay", cfg.weight_decay)
        group.setdefault("lars_exclude", False)
        prepared.append(group)
    if not prepared:
        raise ConfigError("the method has no trainable parameters; check its param_groups()")
    if cfg.name == "sgd":
        return torch.optim.SGD(prepared, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.name == "lars":
        return LARS(prepared, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, eta=cfg.lars_eta)
    if cfg.name == "adamw":
        return torch.optim.AdamW(prepared, lr=lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    raise ConfigError(f"unknown optimiser {cfg.name!r}; choose sgd, lars or adamw")


def apply_schedules(
    optimizer: torch.optim.Optimizer, lr: float, weight_decay: float, peak_lr: float | None = None
) -> None:
    """Set this step's lr on every group (times its optional ``lr_scale``) and the scheduled weight decay on the
    groups that follow it. Groups marked ``"fixed_lr": True`` keep ``peak_lr`` throughout (SimSiam's predictor)."""
    for group in optimizer.param_groups:
        base = peak_lr if group.get("fixed_lr") and peak_lr is not None else lr
        group["lr"] = base * group.get("lr_scale", 1.0)
        if group.get(SCHEDULED_WD, True):
            group["weight_decay"] = weight_decay


def drop_frozen_grads(optimizer: torch.optim.Optimizer, step: int) -> None:
    """Set the gradients of every group with ``"frozen_steps" > step`` to None, between backward and
    ``optimizer.step()``.

    An optimiser skips a parameter without a gradient entirely, so weight decay, momentum and LARS leave it
    unchanged; a zero gradient would not (weight decay and the momentum buffer would still move it). This is
    DINO's ``cancel_gradients_last_layer``. The method still uses the parameters in its graph (their gradient is
    0 there), so DDP sees every parameter used and its reduction completes as usual.
    """
    for group in optimizer.param_groups:
        if group.get("frozen_steps", 0) > step:
            for p in group["params"]:
                p.grad = None
