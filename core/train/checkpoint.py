"""Checkpoints: one ``torch.save`` dict of named states plus the config, written atomically, loaded safely.

Format (``"format": "sslrun-checkpoint/2"``)::

    config          cfg.to_dict() of the run that wrote it
    model           method.state_dict() (the unwrapped module: no "module." / "_orig_mod." prefixes)
    optimizer       optimizer.state_dict()
    step            optimiser steps done (the global step the run continues from)
    epoch           epoch of the next batch to read
    batch_in_epoch  index of the next global batch to read within that epoch (the position in the data stream)
    global_batch    images per optimiser step over all ranks; samples_in_epoch = batch_in_epoch * global_batch
    world_size      ranks that wrote it (for the record: it resumes on any number of ranks)
    schedules       {"total_steps", "warmup_steps", "steps_per_epoch"}
    rng             {"world_size": W, "ranks": [per-rank states of torch, cuda, python, numpy]}
    plugins         cfg.plugin_versions ("kind:name" -> "dist==version")
    metrics         the last logged metrics (floats)

Everything in it is a tensor or a builtin, so ``torch.load(weights_only=True)`` reads it: that loader refuses
numpy arrays, so numpy's RNG state is stored as a tensor plus ints. Files are written to a temporary name in the same
directory and renamed with ``os.replace``, so a crash mid-write never leaves a truncated ``last.pt``. A run keeps
``OUTPUT/checkpoints/step_XXXXXXXX.pt`` files (the newest :data:`KEEP_STEP_FILES`) and ``last.pt``, a hard link to
the newest. Format 1 (before the data position was world-size free) still loads for evaluation and export, but
resuming it is refused (:meth:`~sslrun.core.train.state.TrainState.load_state_dict`).
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from sslrun.core.config import ExperimentConfig
from sslrun.core.errors import CheckpointError, ConfigError
from sslrun.core.files import atomic_path

__all__ = [
    "FORMAT",
    "KEEP_STEP_FILES",
    "capture_rng",
    "check_compatible",
    "checkpoint_config",
    "checkpoint_dir",
    "gather_rng",
    "load_checkpoint",
    "restore_rank_rng",
    "restore_rng",
    "save_checkpoint",
    "seed_all",
    "write_step_checkpoint",
]

FORMAT = "sslrun-checkpoint/2"
#: Older formats that still load (weights, config) for evaluation and export.
READABLE_FORMATS = (FORMAT, "sslrun-checkpoint/1")
REQUIRED_KEYS = ("config", "model", "step")
#: Step files kept in OUTPUT/checkpoints besides last.pt (older ones are deleted as new ones are written).
KEEP_STEP_FILES = 3


def checkpoint_dir(cfg: ExperimentConfig) -> Path:
    """``OUTPUT/checkpoints``."""
    return Path(cfg.output).expanduser() / "checkpoints"


def save_checkpoint(state: dict[str, Any], path: Path, also: Path | None = None) -> Path:
    """Atomically write ``state`` (with the format tag) to ``path``; if ``also`` is given, atomically point that
    name at the same bytes too (a hard link when the filesystem allows it, else a copy).

    Returns:
        ``path``.
    """
    with atomic_path(path, fsync=True) as tmp:
        torch.save({"format": FORMAT, **state}, tmp)
    if also is not None:
        with atomic_path(also) as tmp_also:
            try:
                os.link(path, tmp_also)
            except OSError:
                shutil.copyfile(path, tmp_also)
    return path


def write_step_checkpoint(state: dict[str, Any], directory: Path, step: int) -> Path:
    """``directory/step_<step>.pt`` and ``last.pt`` pointing at it; step files beyond the newest
    :data:`KEEP_STEP_FILES` are deleted.

    Returns:
        The step file.
    """
    path = save_checkpoint(state, directory / f"step_{step:08d}.pt", also=directory / "last.pt")
    for old in sorted(directory.glob("step_*.pt"))[:-KEEP_STEP_FILES]:
        old.unlink(missing_ok=True)
    return path


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read an sslrun checkpoint onto the CPU with ``weights_only=True``.

    Raises:
        CheckpointError: the file is missing, unreadable, or not an sslrun checkpoint.
    """
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"checkpoint {p} does not exist; check the path (runs keep OUTPUT/checkpoints/last.pt)")
    try:
        ckpt = torch.load(p, weights_only=True, map_location="cpu")
    except Exception as exc:  # torch raises many types for corrupt files (UnpicklingError, RuntimeError, EOFError)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"checkpoint {p} is unreadable ({first[:200]}); it may be truncated: use another file in its folder"
        ) from exc
    if not isinstance(ckpt, dict) or ckpt.get("format") not in READABLE_FORMATS:
        found = ckpt.get("format") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointError(f"{p} is not an sslrun checkpoint (format {found!r}, expected {FORMAT!r})")
    missing = [k for k in REQUIRED_KEYS if k not in ckpt]
    if missing:
        raise CheckpointError(f"checkpoint {p} lacks {', '.join(missing)}; it was not written by sslrun train")
    return ckpt


def checkpoint_config(ckpt: dict[str, Any], path: str | Path = "checkpoint") -> ExperimentConfig:
    """The :class:`ExperimentConfig` stored in a checkpoint.

    Raises:
        CheckpointError: the stored config does not fit this version of sslrun.
    """
    try:
        return ExperimentConfig.from_dict(ckpt["config"])
    except ConfigError as exc:
        raise CheckpointError(f"the config stored in {path} does not fit this sslrun version: {exc}") from exc


def check_compatible(ckpt: dict[str, Any], cfg: ExperimentConfig, path: str | Path = "checkpoint") -> None:
    """Refuse a checkpoint whose architecture (method and encoder with their kwargs) differs from ``cfg``'s.

    Raises:
        CheckpointError: naming both architectures.
    """
    theirs = checkpoint_config(ckpt, path).architecture()
    ours = cfg.architecture()
    if theirs != ours:
        diff = [k for k in ours if ours[k] != theirs.get(k)]
        raise CheckpointError(
            f"checkpoint {path} was trained with {_describe(theirs, diff)} but this config has "
            f"{_describe(ours, diff)}; use a matching --method/--encoder or another --output"
        )


def _describe(arch: dict[str, Any], keys: list[str]) -> str:
    return ", ".join(f"{k}={arch.get(k)!r}" for k in keys)


# ---- RNG states ------------------------------------------------------------------------------------------------
def capture_rng() -> dict[str, Any]:
    """This process's RNG states as tensors and builtins (loadable with ``weights_only=True``)."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),  # (version, tuple of 625 ints, gauss_next): builtins only
        "numpy": {
            "name": str(np_state[0]),
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng`.

    Raises:
        CheckpointError: the stored state is malformed.
    """
    try:
        torch.set_rng_state(state["torch"])
        random.setstate(_to_tuples(state["python"]))
        n = state["numpy"]
        np.random.set_state(
            (n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
        )
        if "cuda" in state and torch.cuda.is_available():
            cuda_states = state["cuda"]
            if len(cuda_states) == torch.cuda.device_count():
                torch.cuda.set_rng_state_all(cuda_states)
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"the RNG state in the checkpoint is malformed ({exc}); it cannot be resumed") from exc


def seed_all(seed: int) -> None:
    """Seed Python's, numpy's and torch's global generators (torch's call also seeds every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def gather_rng(world: int) -> dict[str, Any]:
    """Every rank's RNG states for a checkpoint: ``{"world_size", "ranks"}`` (a collective under DDP)."""
    mine = capture_rng()
    states: list[Any] = [mine]
    if world > 1:
        states = [None] * world
        dist.all_gather_object(states, mine)
    return {"world_size": world, "ranks": states}


def restore_rank_rng(rng: dict[str, Any], rank: int, world: int, reseed: int) -> None:
    """Continue this rank's generators from a checkpoint's :func:`gather_rng` states.

    Written with another world size, the states do not map onto the ranks: the generators are seeded from
    ``reseed`` instead (the data order stays exact, since it depends only on seed, epoch and batch).
    """
    ranks = rng.get("ranks", [])
    if rng.get("world_size") == world and len(ranks) == world:
        restore_rng(ranks[rank])
    else:
        seed_all(reseed)


def _to_tuples(x: Any) -> Any:
    return tuple(_to_tuples(v) for v in x) if isinstance(x, tuple | list) else x
