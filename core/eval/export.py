"""Export a pretrained encoder's weights alone, loadable without sslrun (``sslrun export``).

The file is a plain ``torch.save`` dict that ``torch.load(path, weights_only=True)`` reads with nothing but torch
installed::

    {"format": "sslrun-encoder/1",
     "state_dict": {...},           # the encoder module's own parameters and buffers, no prefixes
     "meta": {"encoder": "resnet18", "kwargs": {"image_size": 32, ...}, "output_dim": 512,
              "sslrun_version": "0.1.0", "method": "simclr", "dataset": "cifar10", "step": 3900,
              "source_checkpoint": "...", "small_stem": true,
              "normalization": {"mean": [...], "std": [...]}}}   # None when the pretraining data is not cached

Key names are those of the encoder module itself (``method.encoder.`` is dropped, and so are the ``module.``
/ ``_orig_mod.`` prefixes DDP and ``torch.compile`` add), so they match the plain module: for the ResNet encoders
that is torchvision's ``resnet18()`` with the small stem applied and ``fc = nn.Identity()`` (docs/evaluation.md has
the snippet).
"""

from __future__ import annotations

from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from sslrun.core.errors import CheckpointError
from sslrun.core.files import atomic_path

__all__ = ["EXPORT_FORMAT", "export_encoder", "strip_prefixes"]

EXPORT_FORMAT = "sslrun-encoder/1"
#: Wrapper prefixes that never belong to the plain module's key names.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def _unwrap(key: str) -> str:
    """``key`` without any leading ``module.`` / ``_orig_mod.`` (DDP and torch.compile wrappers, in any order)."""
    while key.startswith(_WRAPPER_PREFIXES):
        key = next(key[len(w) :] for w in _WRAPPER_PREFIXES if key.startswith(w))
    return key


def strip_prefixes(state: dict[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """Keys without ``prefix`` (e.g. ``"encoder."`` when given a whole method's state) and without the DDP /
    torch.compile wrappers (``module.``, ``_orig_mod.``) before or after it.

    Keys not under ``prefix`` are dropped (they belong to other parts of the method: projector, teacher).
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        k = _unwrap(key)
        if prefix:
            if not k.startswith(prefix):
                continue
            k = _unwrap(k[len(prefix) :])
        out[k] = value
    return out


def _sslrun_version() -> str:
    try:
        return metadata.version("sslrun")
    except metadata.PackageNotFoundError:
        return "unknown"


def _plain(value: Any) -> Any:
    """Builtins only: ``torch.load(weights_only=True)`` refuses numpy scalars, arrays and ``pathlib.Path``."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)


def _normalization(cfg: Any, find_manifest: Any) -> dict[str, list[float]] | None:
    manifest = find_manifest(cfg)
    if manifest is None:
        return None
    return {"mean": [float(v) for v in manifest.mean], "std": [float(v) for v in manifest.std]}


def export_encoder(checkpoint: str | Path, output: str | Path, *, source: str | None = None) -> dict[str, Any]:
    """Write the encoder of ``checkpoint`` to ``output`` (atomically) and return its metadata.

    Args:
        checkpoint: an sslrun checkpoint file (or a run directory: its ``checkpoints/last.pt``).
        output: the file to write (``encoder.pt``); its parent directory is created.
        source: what to record as ``source_checkpoint`` instead of the file's path (the URI a downloaded
            checkpoint came from).

    Returns:
        The ``meta`` dict stored in the file.

    Raises:
        CheckpointError: the checkpoint is missing, unreadable or not an sslrun checkpoint, or the output path
            is a directory.

    Examples:
        >>> meta = export_encoder("runs/demo/checkpoints/last.pt", "encoder.pt")  # doctest: +SKIP
        >>> blob = torch.load("encoder.pt", weights_only=True)  # doctest: +SKIP
    """
    from sslrun.core.eval.features import load_pretrained, pretraining_manifest
    from sslrun.core.plugins.resolve import encoder_kwargs

    out = Path(output)
    if out.is_dir():
        raise CheckpointError(f"--output {out} is a directory; give a file name such as {out / 'encoder.pt'}")
    pre = load_pretrained(checkpoint)
    state = {k: v.detach().clone().cpu() for k, v in strip_prefixes(pre.encoder.state_dict()).items()}
    meta = _plain(
        {
            "encoder": pre.cfg.encoder.name,
            "kwargs": encoder_kwargs(pre.cfg, pre.image_size),
            "output_dim": int(pre.encoder.output_dim),
            "image_size": pre.image_size,
            "sslrun_version": _sslrun_version(),
            "method": pre.cfg.method.name,
            "dataset": pre.cfg.data.dataset,
            "step": pre.step,
            "source_checkpoint": source or str(pre.checkpoint),
            "small_stem": getattr(pre.encoder, "small_stem", None),
            # inputs must be normalised like the pretraining views: the pretraining split's per-channel stats
            "normalization": _normalization(pre.cfg, pretraining_manifest),
        }
    )
    with atomic_path(out) as tmp:
        torch.save({"format": EXPORT_FORMAT, "state_dict": state, "meta": meta}, tmp)
    return meta
