"""Throughput of the sslrun multi-view loader against a torchvision DataLoader doing the same augmentations.

Both sides make 2 SimCLR views per image (``SimCLR.view_specs``: random-resized crop, flip, colour jitter p=0.8,
grayscale p=0.2; no blur at these sizes, as in SimCLR's CIFAR setting) and return normalised float batches:

* sslrun: :class:`sslrun.core.data.loader.ViewLoader` (FFCV decode + seeded crop/flip in numba threads, colour
  augmentations per batch after the loader; here on the CPU, the only device of the benchmark box, where jitter and
  grayscale run in the fused numba kernel of :mod:`sslrun.core.data.color_cpu`);
* torchvision: ``DataLoader`` over PIL images with ``transforms.v2`` (RandomResizedCrop, RandomHorizontalFlip,
  RandomApply(ColorJitter, p=0.8), RandomGrayscale(0.2), PILToTensor, ToDtype, Normalize), the same number of
  worker processes as sslrun has FFCV threads, the same batch size.

Datasets: Fashion-MNIST (28x28, raw pixels; prepared with ``ensure_prepared``) and a synthetic set of 64x64 JPEGs
written by the benchmark (quality 90 on both sides: in the .beton for sslrun, as PIL-encoded bytes decoded on
every access for torchvision).

A second row per dataset drops the colour operations on both sides (crop + flip + normalise only): on this
CPU-only benchmark the "device" of sslrun's colour stack is the same CPU that runs FFCV, so that row separates
the FFCV part from the cost of batched colour augmentation without a GPU.

Timing excludes start-up on both sides: sslrun's first epoch (numba JIT compilation, several seconds) is run
untimed, then whole epochs are timed; torchvision's first batch (worker start-up) is untimed, then a fixed
number of batches is timed. Throughput counts source images per second (each gives 2 views). Next to the wall
clock, it reports images per CPU-second of all the processes and threads involved (psutil): on a shared
machine that ratio moves much less with the other jobs than the wall clock does.

ImageNet-scale rows (``--photos N``): ``N`` photo-like JPEGs (:mod:`photos`: gradients, colour fields and textures
in 5 aspect ratios, the longer side 256 px, as ImageNet prepared with ``max_side=256``) in a class-per-folder tree,
prepared with ``imagefolder --set max_side=256 --format jpg`` (whole images of varying shape). Crop + flip +
normalise only, on both sides (the colour stack belongs on the GPU at this size): SimCLR's 2 views at 224 px and
DINO's multi-crop (2 x 224 + 6 x 96), sslrun's ViewLoader against torchvision's ``ImageFolder`` + ``transforms.v2``
reading the same JPEG files. Next to them, the decode limit: JPEGs of the ``.beton`` decoded per CPU-second by
libjpeg-turbo alone (FFCV's ``imdecode``, one thread, no crop), i.e. the most any loader that decodes each image
once could deliver per core.

Usage::

    python benchmarks/loader.py              # the table (2-3 minutes on 2 quiet cores)
    python benchmarks/loader.py --json       # ... and a JSON object as the last line
    python benchmarks/loader.py --photos 2000 --only-photos --json    # the 224-px rows only
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sslrun.core.interfaces import ViewSpec

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import tv_view_transform, write_result  # the benchmarks' shared helpers live beside this script


def simclr_views(image_size: int) -> list[ViewSpec]:
    """SimCLR's two views for this image size (the method plugin's own specs)."""
    from sslrun.plugins.methods.simclr import SimCLR

    return SimCLR.view_specs(SimCLR.Config(), image_size)


# ---- data -------------------------------------------------------------------------------------------------------
def fashion_mnist(data_dir: str, root: str | None) -> Path:
    """The prepared Fashion-MNIST train split (60k 28x28 grayscale, replicated to RGB)."""
    from sslrun.core.config import DataCfg
    from sslrun.core.data.cache import ensure_prepared

    return ensure_prepared(DataCfg(dataset="fashion-mnist", root=root, data_dir=data_dir), "train", progress=False)


def synthetic_jpeg(out_dir: Path, n: int, side: int = 64) -> Path:
    """``n`` smooth random ``side``x``side`` RGB images (low-frequency colour fields plus noise, so JPEG behaves
    as on photos rather than on white noise), written as a JPEG .beton."""
    from sslrun.core.data.writer import write_beton

    rng = np.random.default_rng(0)
    coarse = rng.integers(0, 256, (n, 4, 4, 3)).astype(np.float32)
    up = torch.nn.functional.interpolate(
        torch.from_numpy(coarse).permute(0, 3, 1, 2), size=(side, side), mode="bicubic"
    )
    imgs = (up.permute(0, 2, 3, 1).numpy() + rng.normal(0, 12, (n, side, side, 3))).clip(0, 255).astype(np.uint8)
    path = out_dir / "synthetic64.beton"
    write_beton(
        [(imgs[i], int(i % 10)) for i in range(n)],
        path,
        dataset="synthetic",
        split="train",
        num_classes=10,
        grayscale=False,
        fmt="jpg",
        progress=False,
    )
    return path


# ---- torchvision side -------------------------------------------------------------------------------------------
class _TwoViews(torch.utils.data.Dataset):
    """The same images as the .beton (raw pixels, or JPEG bytes decoded with PIL per access), 2 views each."""

    def __init__(self, path: Path, views: list[ViewSpec], mean: list[float], std: list[float]) -> None:
        from sslrun.core.data.format import BetonReader

        reader = BetonReader(path)
        self.jpeg = reader.manifest.image_format == "jpg"
        self.items: list[Any] = []
        for i in range(len(reader)):
            img, label = reader[i]
            if self.jpeg:  # keep compressed bytes: decoding is part of the per-sample work, as in FFCV
                from PIL import Image

                buf = io.BytesIO()
                Image.fromarray(img).save(buf, format="JPEG", quality=90)
                self.items.append((buf.getvalue(), label))
            else:
                self.items.append((img, label))
        self.transforms = [tv_view_transform(v, mean, std) for v in views]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[Any, ...]:
        from PIL import Image

        data, label = self.items[i]
        img = Image.open(io.BytesIO(data)).convert("RGB") if self.jpeg else Image.fromarray(data)
        return (*(t(img) for t in self.transforms), label)


def _cpu_seconds() -> float:
    """User + system CPU time of this process (all its threads) and its live children (DataLoader workers)."""
    import psutil

    me = psutil.Process()
    total = sum(me.cpu_times()[:2])
    for child in me.children(recursive=True):
        with contextlib.suppress(psutil.NoSuchProcess):  # a worker that just exited
            total += sum(child.cpu_times()[:2])
    return total


@dataclasses.dataclass
class Measure:
    """Images/s by the wall clock, and images per CPU-second (all processes and threads involved): the second
    is robust to other jobs on a shared machine, the first is what a training loop waits for."""

    img_s: float
    img_per_cpu_s: float
    first_s: float = 0.0  # sslrun: the untimed first epoch (numba JIT)


def bench_torchvision(path: Path, views: list[ViewSpec], batch: int, workers: int, batches: int) -> Measure:
    """A DataLoader over ``batches`` batches after an untimed first batch (worker start-up)."""
    from sslrun.core.data.format import verify_beton

    m = verify_beton(path)
    ds = _TwoViews(path, views, m.mean, m.std)
    dl = torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=True, num_workers=workers, drop_last=True)
    it = iter(dl)
    next(it)  # worker start-up; from here on the workers keep their prefetch queue full, before and after
    t0, c0 = time.perf_counter(), _cpu_seconds()
    for _ in range(batches):
        next(it)
    elapsed, cpu = time.perf_counter() - t0, _cpu_seconds() - c0
    del it
    return Measure(batches * batch / elapsed, batches * batch / cpu)


# ---- sslrun side ------------------------------------------------------------------------------------------------
def bench_sslrun(path: Path, views: list[ViewSpec], batch: int, workers: int, epochs: int) -> Measure:
    """``epochs`` whole epochs after an untimed first one (numba compiles on its first batch)."""
    from sslrun.core.data.loader import ViewLoader

    loader = ViewLoader(path, views, batch, device="cpu", num_workers=workers, seed=0)
    try:
        t0 = time.perf_counter()
        for _ in loader.epoch(0):
            pass
        first = time.perf_counter() - t0
        t0, c0 = time.perf_counter(), _cpu_seconds()
        done = 0
        for e in range(1, epochs + 1):
            for vs, _ in loader.epoch(e):
                done += vs[0].shape[0]
        elapsed, cpu = time.perf_counter() - t0, _cpu_seconds() - c0
        return Measure(done / elapsed, done / cpu, first)
    finally:
        loader.close()


# ---- ImageNet-scale rows: whole photo-like JPEGs, 224-px views -------------------------------------------------------
def dino_views() -> list[ViewSpec]:
    """DINO's multi-crop at 224 px: 2 global views (scale 0.4-1) and 6 local 96-px views (0.05-0.4); crop and
    flip only."""
    glob = ViewSpec(size=224, scale=(0.4, 1.0), jitter_p=0.0, grayscale_p=0.0)
    local = ViewSpec(size=96, scale=(0.05, 0.4), jitter_p=0.0, grayscale_p=0.0)
    return [glob, glob, *[local] * 6]


def photo_beton(out_dir: Path, n: int, workers: int) -> tuple[Path, Path]:
    """``n`` photo-like 256-px JPEGs in ``out_dir/photos`` and their ``.beton`` (whole images, jpg)."""
    from photos import write_photo_folder

    from sslrun.core.config import DataCfg
    from sslrun.core.data.cache import prepare_split

    root = out_dir / "photos"
    write_photo_folder(root, n, long_side=(256, 256), workers=workers)
    cfg = DataCfg(dataset="imagefolder", root=str(root), format="jpg",
                  dataset_kwargs={"max_side": 256, "test_fraction": 0.0})  # fmt: skip
    path, _, _ = prepare_split(cfg, "train", output=out_dir / "photos.beton", num_workers=workers, progress=False)
    return root, path


def decode_limit(path: Path, seconds: float = 5.0) -> float:
    """JPEGs of ``path`` one core decodes per CPU-second with libjpeg-turbo alone (FFCV's ``imdecode``)."""
    from sslrun.core.data.ffcv_compat import import_ffcv
    from sslrun.core.data.format import BetonReader

    import_ffcv()
    from ffcv.libffcv import imdecode

    r = BetonReader(path)
    items = [(r.stored_bytes(i), int(h), int(w)) for i, (h, w) in enumerate(r.sizes[: min(len(r), 2000)])]
    dst = np.empty(int(r.sizes[:, 0].max()) * int(r.sizes[:, 1].max()) * 3, np.uint8)
    done, t0 = 0, time.process_time()
    while time.process_time() - t0 < seconds:
        for buf, h, w in items:
            imdecode(buf, dst, h, w, h, w, 0, 0, 1, 1, False, False)
        done += len(items)
    return done / (time.process_time() - t0)


class _FolderViews(torch.utils.data.Dataset):
    """torchvision's ImageFolder (PIL decode per access) with one ``transforms.v2`` pipeline per view."""

    def __init__(self, root: Path, views: list[ViewSpec], mean: list[float], std: list[float]) -> None:
        from torchvision.datasets import ImageFolder

        self.folder = ImageFolder(str(root))
        self.transforms = [tv_view_transform(v, mean, std) for v in views]

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, i: int) -> tuple[Any, ...]:
        img, label = self.folder[i]
        return (*(t(img) for t in self.transforms), label)


def bench_torchvision_folder(root: Path, views: list[ViewSpec], mean: list[float], std: list[float], batch: int,
                             workers: int, batches: int) -> Measure:  # fmt: skip
    """As :func:`bench_torchvision`, over the JPEG files themselves."""
    ds = _FolderViews(root, views, mean, std)
    dl = torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=True, num_workers=workers, drop_last=True)
    it = iter(dl)
    next(it)
    t0, c0 = time.perf_counter(), _cpu_seconds()
    for _ in range(batches):
        next(it)
    elapsed, cpu = time.perf_counter() - t0, _cpu_seconds() - c0
    del it
    return Measure(batches * batch / elapsed, batches * batch / cpu)


def photo_rows(tmp: Path, n: int, batch: int, workers: int, epochs: int, tv_batches: int) -> dict[str, Any]:
    """The 224-px rows and the decode limit."""
    from sslrun.core.data.format import verify_beton

    t0 = time.perf_counter()
    root, path = photo_beton(tmp, n, workers)
    m = verify_beton(path)
    _log(f"photos: {n} JPEGs written and prepared in {time.perf_counter() - t0:.1f} s")
    limit = decode_limit(path)
    _log(f"photos: decode limit {limit:,.0f} img per CPU-s (libjpeg-turbo, one core)")
    simclr = [ViewSpec(size=224, jitter_p=0.0, grayscale_p=0.0)] * 2
    out: dict[str, Any] = {"images": n, "stored_sizes": [m.image_size_min, m.image_size],
                           "decode_limit_img_per_cpu_s": round(limit)}  # fmt: skip
    for name, specs in (("simclr 2x224", simclr), ("dino 2x224+6x96", dino_views())):
        tv = bench_torchvision_folder(root, specs, m.mean, m.std, batch, workers, tv_batches)
        _log(f"photos [{name}]: torchvision {tv.img_s:,.0f} img/s, {tv.img_per_cpu_s:,.0f} img/CPU-s")
        ss = bench_sslrun(path, specs, batch, workers, epochs)
        _log(f"photos [{name}]: sslrun {ss.img_s:,.0f} img/s, {ss.img_per_cpu_s:,.0f} img/CPU-s")
        out[name] = {
            "sslrun_img_s": round(ss.img_s),
            "torchvision_img_s": round(tv.img_s),
            "sslrun_img_per_cpu_s": round(ss.img_per_cpu_s),
            "torchvision_img_per_cpu_s": round(tv.img_per_cpu_s),
            "speedup_per_cpu_s": round(ss.img_per_cpu_s / tv.img_per_cpu_s, 1),
            "fraction_of_decode_limit": round(ss.img_per_cpu_s / limit, 2),
            "sslrun_first_epoch_s": round(ss.first_s, 1),
        }
    return out


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--json", action="store_true", help="print a JSON object as the last line")
    p.add_argument(
        "--result",
        default=None,
        help="write the JSON result, with the command, date and machine, to this file (e.g. docs/results/X.json)",
    )
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workers", type=int, default=min(2, len(os.sched_getaffinity(0))),
                   help="FFCV threads = DataLoader worker processes (default: min(2, usable cores))")  # fmt: skip
    p.add_argument("--epochs", type=int, default=2, help="timed sslrun epochs after the untimed JIT epoch")
    p.add_argument("--tv-batches", type=int, default=24, help="timed torchvision batches after the first")
    p.add_argument("--synthetic", type=int, default=20000, help="images in the synthetic 64x64 JPEG set")
    p.add_argument("--data-dir", default=None, help="cache of prepared .beton files (default: sslrun's)")
    p.add_argument("--fmnist-root", default=None, help="Fashion-MNIST IDX files (default: the usual places)")
    p.add_argument("--no-crop-flip", action="store_true", help="skip the crop+flip-only comparison")
    p.add_argument("--photos", type=int, default=0, help="photo-like 256-px JPEGs for the 224-px rows (0: none)")
    p.add_argument("--only-photos", action="store_true", help="only the 224-px rows")
    p.add_argument("--torch-threads", type=int, default=1,
                   help="torch threads for sslrun's colour augmentations (FFCV uses the others)")  # fmt: skip
    args = p.parse_args(argv)

    from sslrun.core.config import default_data_dir
    from sslrun.core.data.format import verify_beton

    load_before = os.getloadavg()
    torch.set_num_threads(args.torch_threads)
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="sslrun-bench-") as tmp:
        sets = {
            "fashion-mnist (28px raw)": lambda: fashion_mnist(args.data_dir or default_data_dir(), args.fmnist_root),
            "synthetic (64px jpeg)": lambda: synthetic_jpeg(Path(tmp), args.synthetic),
        }
        if args.only_photos:
            sets = {}
        photos = (
            photo_rows(Path(tmp), args.photos, args.batch_size, args.workers, args.epochs, args.tv_batches)
            if args.photos
            else None
        )
        for name, make in sets.items():
            t0 = time.perf_counter()
            path = make()
            _log(f"{name}: data ready in {time.perf_counter() - t0:.1f} s")
            size = verify_beton(path).image_size[0]
            views = simclr_views(size)
            variants = {"full": views}
            if not args.no_crop_flip:  # the FFCV part alone: what the colour stack costs on a CPU-only box
                variants["crop+flip"] = [dataclasses.replace(v, jitter_p=0.0, grayscale_p=0.0) for v in views]
            results[name] = {"image_size": size}
            for variant, specs in variants.items():
                tv = bench_torchvision(path, specs, args.batch_size, args.workers, args.tv_batches)
                _log(f"{name} [{variant}]: torchvision {tv.img_s:,.0f} img/s, {tv.img_per_cpu_s:,.0f} img/CPU-s")
                torch.set_num_threads(args.torch_threads)
                ss = bench_sslrun(path, specs, args.batch_size, args.workers, args.epochs)
                _log(f"{name} [{variant}]: sslrun {ss.img_s:,.0f} img/s, {ss.img_per_cpu_s:,.0f} img/CPU-s "
                     f"(first epoch with JIT: {ss.first_s:.1f} s)")  # fmt: skip
                row = {
                    "sslrun_img_s": round(ss.img_s),
                    "torchvision_img_s": round(tv.img_s),
                    "speedup": round(ss.img_s / tv.img_s, 1),
                    "sslrun_img_per_cpu_s": round(ss.img_per_cpu_s),
                    "torchvision_img_per_cpu_s": round(tv.img_per_cpu_s),
                    "speedup_per_cpu_s": round(ss.img_per_cpu_s / tv.img_per_cpu_s, 1),
                    "sslrun_first_epoch_s": round(ss.first_s, 1),
                }
                if variant == "full":
                    results[name].update(row)
                else:
                    results[name]["crop_flip_only"] = row
    load_after = os.getloadavg()

    print(f"\n2 SimCLR views per image, batch {args.batch_size}, {args.workers} workers, CPU only, "
          f"torch threads {args.torch_threads}; sslrun's first (JIT) epoch excluded from timing")  # fmt: skip
    print(f"{'dataset':<26} {'augmentations':<12} {'sslrun img/s':>13} {'torchvision img/s':>18} {'speedup':>8}"
          f" {'per CPU-s':>10} {'JIT epoch s':>12}")  # fmt: skip
    for name, r in results.items():
        for variant, row in (("SimCLR", r), ("crop+flip", r.get("crop_flip_only"))):
            if row is None:
                continue
            print(
                f"{name:<26} {variant:<12} {row['sslrun_img_s']:>13,} {row['torchvision_img_s']:>18,} "
                f"{row['speedup']:>7}x {row['speedup_per_cpu_s']:>9}x {row['sslrun_first_epoch_s']:>12}"
            )
    if photos is not None:
        print(f"\n{photos['images']} photo-like JPEGs (whole, 256 px max side), crop+flip+normalise, "
              f"decode limit {photos['decode_limit_img_per_cpu_s']:,} img per CPU-s")  # fmt: skip
        print(f"{'views':<18} {'sslrun img/s':>13} {'torchvision img/s':>18} {'sslrun /CPU-s':>14} "
              f"{'tv /CPU-s':>10} {'per CPU-s':>10} {'of limit':>9}")  # fmt: skip
        for name in ("simclr 2x224", "dino 2x224+6x96"):
            row = photos[name]
            print(f"{name:<18} {row['sslrun_img_s']:>13,} {row['torchvision_img_s']:>18,} "
                  f"{row['sslrun_img_per_cpu_s']:>14,} {row['torchvision_img_per_cpu_s']:>10,} "
                  f"{row['speedup_per_cpu_s']:>9}x {row['fraction_of_decode_limit']:>9.0%}")  # fmt: skip
        results["photos (256px whole jpeg, 224px views)"] = photos
    print("speedup: by the wall clock; per CPU-s: images per CPU-second of all processes and threads involved")
    print(f"load average (1 min) before/after: {load_before[0]:.2f} / {load_after[0]:.2f} on {os.cpu_count()} cores")
    if args.json or args.result:
        out = {
            **results,
            "batch_size": args.batch_size,
            "workers": args.workers,
            "views": 2,
            "first_epoch_excluded": True,
            "load_avg_before_after": [round(load_before[0], 2), round(load_after[0], 2)],
        }
        if args.json:
            print(json.dumps(out))
        if args.result:
            write_result(args.result, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
