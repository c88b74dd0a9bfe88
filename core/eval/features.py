"""What every evaluation starts from: a pretrained encoder rebuilt from a checkpoint, the labelled splits of a
dataset, and frozen features extracted once and cached.

The feature cache lives next to the checkpoint (``<ckpt dir>/eval_cache/``) and is keyed by the checkpoint's
sha256, the prepared split's sha256 (from its manifest) and the sample cap, so kNN and the linear probe share one
extraction, and a new checkpoint or a re-prepared dataset can never be served stale features.
"""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sslrun.core.config import DataCfg, ExperimentConfig
from sslrun.core.errors import CheckpointError, DataError
from sslrun.core.eval.probe_input import POOLED, encode
from sslrun.core.files import atomic_path, sha256_file

__all__ = [
    "EvalData",
    "Pretrained",
    "cached_features",
    "extract_features",
    "load_pretrained",
    "pretraining_manifest",
    "prepare_eval_data",
]

FEATURE_CACHE_FORMAT = "sslrun-features/1"


@dataclass
class Pretrained:
    """An encoder rebuilt from a checkpoint (or freshly initialised for the from-scratch baseline).

    Attributes:
        cfg: the experiment config stored in the checkpoint.
        encoder: the method's ``encoder`` module with the checkpoint's weights (in eval mode, on the CPU).
        image_size: the image side the encoder was built for (its small-image stem and ViT position embeddings
            depend on it).
        checkpoint: the checkpoint file, or None for a randomly initialised encoder.
        step: the global step the checkpoint was written at, if known.
        fingerprint: sha256 of the checkpoint file (the feature-cache key), None without a checkpoint.
    """

    cfg: ExperimentConfig
    encoder: nn.Module
    image_size: int
    checkpoint: Path | None = None
    step: int | None = None
    fingerprint: str | None = None


@dataclass(frozen=True)
class EvalData:
    """The two labelled splits of an evaluation: the train split (kNN bank, probe and fine-tuning data, from which
    the label subset is drawn) and the test split (queries, final score)."""

    dataset: str
    train_split: str
    test_split: str
    train: Path
    test: Path
    num_classes: int


def pretraining_manifest(cfg: ExperimentConfig) -> Any | None:
    """The manifest (:class:`sslrun.core.data.manifest.Manifest`) of the run's pretraining split when it is in the local
    data cache (``data.data_dir``), else None. Read without hashing the .beton: only sizes and statistics are
    needed here."""
    from sslrun.core.data.cache import cached_manifest
    from sslrun.core.plugins.registry import get_registry

    try:
        split = cfg.data.split or get_registry("dataset").get(cfg.data.dataset).splits[0]
        return cached_manifest(cfg.data, split)  # None when the cache holds the split with other settings
    except (DataError, OSError, IndexError):
        return None  # a damaged or foreign cache entry: callers fall back to the plugin's declared values


def _pretraining_image_size(cfg: ExperimentConfig, ckpt: dict[str, Any]) -> int:
    """The image side the checkpoint's encoder was built for (its small stem, stride or ViT position embeddings
    depend on it). The trainer builds the encoder with ``max(manifest.image_size)`` of the pretraining split, so:
    the size recorded in the checkpoint if there is one; else that split's manifest when it is in the data cache;
    else the dataset plugin's declared size (the same number for every fixed-size dataset)."""
    value = ckpt.get("image_size")
    if isinstance(value, int) and value > 0:
        return value
    manifest = pretraining_manifest(cfg)
    if manifest is not None:
        return int(max(manifest.image_size))
    from sslrun.core.plugins.resolve import build_dataset

    return int(build_dataset(cfg).info().image_size)


def _state_mismatch(expected: dict[str, torch.Tensor], found: Any) -> str | None:
    """The first difference between a module's state dict and a stored one, in words (None when they fit)."""
    if not isinstance(found, dict):
        return f"'model' is a {type(found).__name__}, not a state dict"
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    shapes = [
        f"{k}: {tuple(found[k].shape)} stored, {tuple(v.shape)} expected"
        for k, v in expected.items()
        if k in found and isinstance(found[k], torch.Tensor) and found[k].shape != v.shape
    ]
    for label, items in (("missing", missing), ("unexpected", unexpected), ("shape", shapes)):
        if items:
            more = f" and {len(items) - 1} more" if len(items) > 1 else ""
            return f"{label} {items[0]}{more}"
    return None


def load_pretrained(path: str | Path) -> Pretrained:
    """Rebuild the method of an sslrun checkpoint, load its weights and return its encoder.

    Args:
        path: a checkpoint file written by the trainer (``OUTPUT/checkpoints/last.pt``), or a run directory
            (its ``checkpoints/last.pt`` is used).

    Raises:
        CheckpointError: missing, unreadable or not an sslrun checkpoint, or weights that do not fit the method
            and encoder its config names.
        PluginError: the checkpoint's method or encoder plugin is not installed here.
    """
    from sslrun.core.plugins.resolve import build_method
    from sslrun.core.train.checkpoint import checkpoint_config, load_checkpoint

    p = Path(path)
    if p.is_dir() and (p / "checkpoints" / "last.pt").is_file():
        p = p / "checkpoints" / "last.pt"
    ckpt = load_checkpoint(p)
    cfg = checkpoint_config(ckpt, p)
    image_size = _pretraining_image_size(cfg, ckpt)
    method = build_method(cfg, image_size)
    problem = _state_mismatch(method.state_dict(), ckpt["model"])
    if problem is None:
        try:
            method.load_state_dict(ckpt["model"])
        except (RuntimeError, TypeError) as exc:
            problem = str(exc).strip().splitlines()[-1][:200]
    if problem is not None:
        raise CheckpointError(
            f"checkpoint {p}: the weights do not fit method {cfg.method.name!r} with encoder {cfg.encoder.name!r} "
            f"built for {image_size} px images ({problem}); was the plugin changed since it was written?"
        )
    encoder = method.encoder.eval()
    step = ckpt.get("step")
    return Pretrained(
        cfg=cfg,
        encoder=encoder,
        image_size=image_size,
        checkpoint=p.resolve(),
        step=int(step) if isinstance(step, int) else None,
        fingerprint=sha256_file(p),
    )


def prepare_eval_data(data_cfg: DataCfg) -> EvalData:
    """Prepare (or reuse) the dataset's labelled evaluation splits (``Dataset.eval_splits``) as .beton files.

    Raises:
        DataError: the dataset has no labelled evaluation splits, or its splits carry no class count.
    """
    from sslrun.core.data.cache import ensure_prepared
    from sslrun.core.data.format import verify_beton
    from sslrun.core.plugins.resolve import build_dataset

    dataset = build_dataset(ExperimentConfig(data=data_cfg))
    splits = type(dataset).eval_splits
    if not splits:
        raise DataError(
            f"dataset {data_cfg.dataset!r} has no labelled evaluation splits; evaluate on a labelled dataset "
            f"with --dataset (e.g. cifar10, fashion-mnist, stl10)"
        )
    train_split, test_split = splits
    train = ensure_prepared(data_cfg, train_split)
    test = ensure_prepared(data_cfg, test_split)
    num_classes = verify_beton(train).num_classes or dataset.info().num_classes
    if not num_classes:
        raise DataError(f"dataset {data_cfg.dataset!r} split {train_split!r} has no classes; it cannot be evaluated")
    return EvalData(data_cfg.dataset, train_split, test_split, Path(train), Path(test), int(num_classes))


@torch.no_grad()
def extract_features(
    encoder: nn.Module,
    path: Path,
    *,
    device: torch.device,
    batch_size: int = 256,
    image_size: int | None = None,
    max_samples: int | None = None,
    num_workers: int = 1,
    features: str = POOLED,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Frozen features of a whole prepared split, in file order, without augmentation.

    The encoder runs in eval mode (BatchNorm running statistics, no dropout); on CUDA under bf16 autocast with
    channels_last inputs. Images whose side differs from ``image_size`` (transfer to a dataset of another
    resolution) are resized to it, bilinear with antialiasing, since the encoder's stem or position embeddings
    were built for that size. ``features`` says which features (:mod:`sslrun.core.eval.probe_input`).

    Returns:
        ``(features (N, D) float32 on the CPU, labels (N,) int64 on the CPU)``.
    """
    from sslrun.core.data.eval_loader import EvalLoader

    was_training = encoder.training
    encoder.eval().to(device)
    cuda = device.type == "cuda"
    loader = EvalLoader(path, batch_size, device=device, num_workers=num_workers, max_samples=max_samples)
    feats: list[torch.Tensor] = []
    labels: list[torch.Tensor] = []
    try:
        for images, y in loader:
            if image_size is not None and images.shape[-1] != image_size:
                images = F.interpolate(images, size=(image_size, image_size), mode="bilinear", antialias=True)
            images = images.contiguous(memory_format=torch.channels_last)  # faster convolutions, CPU too
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
                f = encode(encoder, images, features)
            feats.append(f.float().cpu())
            # FFCV hands out views into a ring buffer that later batches overwrite: keep a copy.
            labels.append(y.detach().to("cpu", torch.long, copy=True))
    finally:
        loader.close()
        encoder.train(was_training)
    if not feats:
        raise DataError(f"{path} holds no samples; re-prepare it (sslrun data prepare)")
    return torch.cat(feats), torch.cat(labels)


def _cache_key(pre: Pretrained, path: Path, max_samples: int | None, image_size: int | None, features: str) -> str:
    from sslrun.core.data.format import verify_beton

    manifest = verify_beton(path)
    payload = {
        "format": FEATURE_CACHE_FORMAT,
        "checkpoint": pre.fingerprint,
        "beton": getattr(manifest, "sha256", None),
        "max_samples": max_samples,
        "image_size": image_size,
    }
    if features != POOLED:  # pooled features keep the key they always had, so existing caches stay valid
        payload["features"] = features
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def cached_features(
    pre: Pretrained,
    path: Path,
    *,
    dataset: str,
    split: str,
    device: torch.device,
    batch_size: int = 256,
    max_samples: int | None = None,
    num_workers: int = 1,
    cache_dir: Path | None = None,
    features: str = POOLED,
) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """:func:`extract_features` through a cache file next to the checkpoint.

    Args:
        pre: the pretrained encoder (its checkpoint's sha256 is part of the key).
        path: the prepared split.
        dataset, split: names used in the cache file's name.
        device: where the encoder runs.
        batch_size: extraction batch size.
        max_samples: only the first N samples of the split.
        num_workers: FFCV loader threads.
        cache_dir: where cache files go (default ``<checkpoint dir>/eval_cache``; no caching without a
            checkpoint).
        features: ``pooled`` or ``gridK`` (:mod:`sslrun.core.eval.probe_input`).

    Returns:
        ``(features, labels, hit)`` with ``hit`` True when the features came from the cache.
    """

    def extract() -> tuple[torch.Tensor, torch.Tensor]:
        return extract_features(
            pre.encoder,
            path,
            device=device,
            batch_size=batch_size,
            image_size=pre.image_size,
            max_samples=max_samples,
            num_workers=num_workers,
            features=features,
        )

    if pre.fingerprint is None:  # a randomly initialised encoder: nothing stable to key a cache on
        return (*extract(), False)
    assert pre.checkpoint is not None
    cache_dir = cache_dir or (pre.checkpoint.parent / "eval_cache")
    key = _cache_key(pre, path, max_samples, pre.image_size, features)
    file = cache_dir / f"features_{dataset}_{split}_{key[:16]}.pt"
    if file.is_file():
        try:
            blob = torch.load(file, weights_only=True, map_location="cpu")
            if blob.get("format") == FEATURE_CACHE_FORMAT and blob.get("key") == key:
                return blob["features"], blob["labels"], True
        except Exception:  # a damaged cache file is recomputed, never fatal
            pass
    f, y = extract()
    try:
        # atomic: a crash mid-save must not leave a truncated cache that a later run would trust
        with atomic_path(file) as tmp:
            torch.save({"format": FEATURE_CACHE_FORMAT, "key": key, "features": f, "labels": y}, tmp)
    except OSError as exc:  # a read-only checkpoint folder (shared storage): evaluate anyway, uncached
        print(f"note: features not cached ({exc}); they will be extracted again next time", file=sys.stderr)
    return f, y, False
