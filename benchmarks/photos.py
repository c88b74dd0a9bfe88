"""Photo-like JPEG folders for the ImageNet-scale data benchmarks and tests.

Real photos are not shipped with the repository, and white noise or flat colours are the wrong stand-ins: JPEG
compresses noise badly and flat colour trivially, so both give decode and file-size figures unlike those of
photos. Each image here is the sum of

* a smooth colour gradient across the frame (sky, walls),
* a low-frequency colour field (a 3x4 to 6x8 grid of random colours, upsampled bicubically: objects, shading),
* an oriented sinusoidal texture of random period 3-24 px (fabric, foliage, brick),
* mild pixel noise (sensor grain, uniform in -7..7, sigma 4),

at sizes and aspect ratios like ImageNet's: the longer side from 300 to 500 px and aspect ratios 4:3, 3:2, 1:1,
3:4 and 16:9 (ImageNet's training images average about 400x350). Quality 90 JPEG (4:2:0 chroma subsampling, as
most cameras write). The files come out at 30-70 KB for a 400-px image, close to ImageNet's average of ~110 KB
for its 500x375 images.

Usage::

    python benchmarks/photos.py DIR --n 10000          # DIR/<class>/img_XXXXXX.jpg, 10 class folders
"""

from __future__ import annotations

import argparse
import io
import os
from pathlib import Path

import numpy as np

#: (width, height) ratios drawn for the images; the longer side is drawn from LONG_SIDE.
ASPECTS = ((4, 3), (3, 2), (1, 1), (3, 4), (16, 9))
LONG_SIDE = (300, 500)


def photo(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """One photo-like ``(height, width, 3)`` uint8 image (see the module docstring)."""
    import cv2

    x = np.arange(width, dtype=np.float32) / width
    y = np.arange(height, dtype=np.float32)[:, None] / height
    angle = rng.uniform(0, np.pi)
    ramp = (np.cos(angle) * x + np.sin(angle) * y)[..., None]
    img = rng.uniform(40, 200, 3).astype(np.float32) + ramp * rng.uniform(-80, 80, 3).astype(np.float32)
    gh, gw = int(rng.integers(3, 7)), int(rng.integers(4, 9))
    coarse = rng.uniform(-60, 60, (gh, gw, 3)).astype(np.float32)
    img += cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC)
    # sin(a(x) + b(y)) = sin a cos b + cos a sin b: a separable texture, two outer products
    period, theta = rng.uniform(3, 24), rng.uniform(0, np.pi)
    a = 2 * np.pi * np.cos(theta) * np.arange(width, dtype=np.float32) / period
    b = 2 * np.pi * np.sin(theta) * np.arange(height, dtype=np.float32)[:, None] / period
    stripes = np.sin(a) * np.cos(b) + np.cos(a) * np.sin(b)
    mask = cv2.resize(rng.uniform(0, 1, (gh, gw)).astype(np.float32), (width, height))  # texture in patches
    img += (rng.uniform(10, 35) * stripes * mask)[..., None]
    img += rng.integers(-7, 8, (height, width, 3), dtype=np.int8)  # grain: uniform, about sigma 4
    return np.clip(img, 0, 255).astype(np.uint8)


def random_size(rng: np.random.Generator, long_side: tuple[int, int] = LONG_SIDE) -> tuple[int, int]:
    """``(width, height)``: a longer side in ``long_side`` and one of ``ASPECTS``."""
    aw, ah = ASPECTS[int(rng.integers(len(ASPECTS)))]
    long = int(rng.integers(long_side[0], long_side[1] + 1))
    return (long, max(1, round(long * ah / aw))) if aw >= ah else (max(1, round(long * aw / ah)), long)


def jpeg_bytes(img: np.ndarray, quality: int = 90) -> bytes:
    """``img`` as JPEG bytes (Pillow, 4:2:0 subsampling)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _write_one(args: tuple[Path, int, int, int, tuple[int, int]]) -> Path:
    root, i, classes, seed, long_side = args
    rng = np.random.default_rng([seed, i])
    w, h = random_size(rng, long_side)
    p = root / f"class_{i % classes}" / f"img_{i:06d}.jpg"
    p.write_bytes(jpeg_bytes(photo(rng, w, h)))
    return p


def write_photo_folder(
    root: Path,
    n: int,
    *,
    classes: int = 10,
    seed: int = 0,
    long_side: tuple[int, int] = LONG_SIDE,
    workers: int = 1,
) -> list[Path]:
    """Write ``n`` photo-like JPEGs as ``root/class_K/img_XXXXXX.jpg`` (``classes`` folders, round robin).

    Args:
        long_side: range of the longer side, in pixels (e.g. ``(256, 256)``: images as an ImageNet ``.beton``
            with ``max_side=256`` stores them).
        workers: processes that generate the images (the result does not depend on it).

    Returns:
        The written paths, in index order. Image ``i`` depends only on ``(seed, i)``.
    """
    for k in range(min(classes, n)):
        (root / f"class_{k}").mkdir(parents=True, exist_ok=True)
    jobs = [(root, i, classes, seed, long_side) for i in range(n)]
    if workers <= 1:
        return [_write_one(j) for j in jobs]
    import multiprocessing as mp

    with mp.get_context("fork").Pool(workers) as pool:
        return pool.map(_write_one, jobs, chunksize=64)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("root", type=Path)
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    args = p.parse_args(argv)
    write_photo_folder(args.root, args.n, classes=args.classes, seed=args.seed, workers=args.workers)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
