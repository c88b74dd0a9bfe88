"""``sslrun data inspect``: what is in a prepared .beton (count, fields, image sizes, label histogram, mean/std),
a PNG grid of its samples, and a grid of the augmented views a method would train on.

Samples for the grid are read with :class:`sslrun.core.data.format.BetonReader` (numpy/OpenCV, no numba JIT: an
inspection answers in a second); the augmented views come from the training loader
(:func:`sslrun.core.data.loader.sample_views`), so they are exactly what the method sees.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from sslrun.core.data.format import BetonReader, verify_beton
from sslrun.core.data.manifest import FIELDS
from sslrun.core.errors import DataError

__all__ = ["compose_grid", "summarize", "write_sample_grid", "write_views_grid"]


def summarize(path: str | Path) -> dict[str, Any]:
    """Verify ``path`` and describe it: dataset/split, count, fields, image sizes, labels, mean/std, bytes.

    Raises:
        DataError: the file is missing, foreign, truncated or corrupt.
    """
    reader = BetonReader(path)
    m = reader.manifest
    sizes = reader.sizes
    distinct = {f"{h}x{w}" for h, w in np.unique(sizes, axis=0)} if len(sizes) else set()
    return {
        "file": str(Path(path)),
        "dataset": m.dataset,
        "split": m.split,
        "num_samples": len(reader),
        "fields": [f"{name} ({kind}{', ' + m.image_format if name == 'image' else ''})" for name, kind in FIELDS],
        "image_size": m.image_size,
        "image_sizes": sorted(distinct),
        "grayscale": m.grayscale,
        "num_classes": m.num_classes,
        "mean": m.mean,
        "std": m.std,
        "label_histogram": {str(k): v for k, v in sorted(m.label_histogram.items())},
        "bytes": m.bytes,
        "dataset_config": m.dataset_config,
    }


def compose_grid(rows: Sequence[Sequence[np.ndarray]], pad: int = 2, min_cell: int = 64) -> np.ndarray:
    """Tile HxWx3 uint8 images into one image: ``rows[r][c]`` at row r, column c, on a grey background.

    Cells are as large as the largest image; small images are enlarged by an integer factor (nearest neighbour,
    so pixels stay visible) until a cell is at least ``min_cell`` pixels.
    """
    if not rows or not any(len(r) for r in rows):
        raise DataError("nothing to draw: no images")
    ch = max(img.shape[0] for r in rows for img in r)
    cw = max(img.shape[1] for r in rows for img in r)
    zoom = max(1, math.ceil(min_cell / max(ch, cw)))
    ch, cw = ch * zoom, cw * zoom
    ncol = max(len(r) for r in rows)
    out = np.full((len(rows) * (ch + pad) + pad, ncol * (cw + pad) + pad, 3), 128, dtype=np.uint8)
    for r, row in enumerate(rows):
        for c, img in enumerate(row):
            big = img.repeat(zoom, 0).repeat(zoom, 1)
            y, x = pad + r * (ch + pad), pad + c * (cw + pad)
            out[y : y + big.shape[0], x : x + big.shape[1]] = big
    return out


def _save_png(grid: np.ndarray, out: str | Path) -> Path:
    from PIL import Image

    out = Path(out).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        Image.fromarray(grid).save(out, format="PNG")
    except OSError as exc:
        raise DataError(f"cannot write {out}: {exc}") from exc
    return out


def write_sample_grid(path: str | Path, out: str | Path, n: int = 64) -> Path:
    """A PNG grid of ``n`` samples spread evenly over the file (square-ish layout)."""
    reader = BetonReader(path)
    n = max(1, min(n, len(reader)))
    idx = np.linspace(0, len(reader) - 1, n).round().astype(int)
    images = [reader[int(i)][0] for i in idx]
    ncol = math.ceil(math.sqrt(n))
    rows = [images[i : i + ncol] for i in range(0, n, ncol)]
    return _save_png(compose_grid(rows), out)


def write_views_grid(path: str | Path, method: str, out: str | Path, n: int = 8) -> Path:
    """A PNG grid with one row per sample and one column per augmented view of ``method`` (its default Config).

    Raises:
        UnknownPluginError: ``method`` is not an installed method or pretext task.
        DataError: the file is not a valid .beton.
    """
    import torch

    from sslrun.core.data.loader import sample_views
    from sslrun.core.plugins.resolve import method_class

    manifest = verify_beton(path)
    cls = method_class(method)
    image_size = max(manifest.image_size)
    specs = cls.view_specs(cls.Config(), image_size)
    views = sample_views(Path(path), specs, n)  # list over views of (n, 3, H, W) in [0, 1]
    arrays = [
        (v.detach().cpu().float().clamp(0, 1) * 255 + 0.5).to(torch.uint8).permute(0, 2, 3, 1).numpy() for v in views
    ]
    count = min(len(a) for a in arrays)
    rows = [[a[i] for a in arrays] for i in range(count)]
    return _save_png(compose_grid(rows), out)
