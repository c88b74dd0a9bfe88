"""The machine this process runs on: usable CPU cores and the torch device to compute on."""

from __future__ import annotations

import os

import torch

from sslrun.core.errors import ConfigError

__all__ = ["parse_device", "usable_cores"]


def usable_cores() -> int:
    """CPU cores this process may run on: the affinity mask (a container's or ``taskset``'s limit), not the
    machine's count."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def parse_device(name: str | torch.device | None, *, flag: str = "--device") -> torch.device:
    """``auto`` (or None) -> CUDA when available, else CPU; ``cpu``/``cuda``/``cuda:N`` as given.

    Raises:
        ConfigError: not a torch device, or CUDA asked for where no GPU is visible (the message names ``flag``).
    """
    if name is None or (isinstance(name, str) and name in ("", "auto")):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(f"{flag} {name!r} is not a torch device; use auto, cpu, cuda or cuda:N") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{flag} {device} was asked for but no CUDA GPU is visible; use {flag} cpu")
    return device
