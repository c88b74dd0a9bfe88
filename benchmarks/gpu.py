"""GPU pretraining throughput and model-FLOP utilisation: ResNet-18/50 SimCLR at bf16, sslrun's FFCV pipeline
against a torchvision DataLoader, on one CUDA GPU (an H100 or H200).

Both sides train the same :class:`sslrun.plugins.methods.simclr.SimCLR` module (ResNet trunk + 2048-128 projector,
NT-Xent over the batch) with the same optimiser (SGD), global batch, bf16 autocast and channels_last, on the same
images: a synthetic set of ``--image-size`` px JPEGs (quality 90; the ``synthetic`` dataset plugin, so no
download is needed on an offline GPU box):

* **sslrun**: :func:`sslrun.core.train.trainer.train` reading the ``.beton`` (FFCV JPEG decode + random-resized crop +
  flip in ``--workers`` numba threads, colour jitter/grayscale/blur/solarize batched on the GPU);
* **torchvision**: ``DataLoader`` with ``--workers`` worker processes decoding the same JPEG bytes with PIL and
  applying ``transforms.v2`` built from the same view specs (uint8 out of the workers, pinned memory,
  non-blocking copies, conversion and normalisation on the GPU).

Steady state only (the first ``--warmup-steps`` steps are excluded: FFCV JIT, cuDNN autotuning, worker start-up).
**MFU** = FLOPs of one training step (forward + backward, counted once with
``torch.utils.flop_counter.FlopCounterMode``) x steps/s / the device's peak dense bf16 FLOP/s, looked up by device
name in :data:`PEAK_BF16_TFLOPS` (or given with ``--peak-tflops``).

Usage::

    python benchmarks/gpu.py                       # resnet18 and resnet50, both loaders (~10 min on an H100)
    python benchmarks/gpu.py --models resnet50 --batch-size 256 --json
    python benchmarks/gpu.py --smoke               # tiny CPU run that checks the script itself (no GPU needed)
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (
    StepTimer,
    machine_info,
    print_json,
    print_table,
    steady_rate,
    tv_view_transform,
    usable_cores,
)

#: Peak dense (no sparsity) bf16 tensor-core TFLOP/s by device-name substring, most specific first. From NVIDIA's
#: datasheets, which quote the sparse figure: half of it is the dense one (H100 SXM 1,979 -> 989.5).
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.5),
    ("H200 NVL", 835.5),
    ("H100", 989.5),  # SXM5, e.g. "NVIDIA H100 80GB HBM3"
    ("H200", 989.5),  # SXM, "NVIDIA H200"; also GH200
    ("H800", 989.5),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
)
MODELS = ("resnet18", "resnet50")


def peak_tflops(device_name: str, override: float | None) -> float | None:
    """Peak dense bf16 TFLOP/s for ``device_name`` (``--peak-tflops`` wins); None when unknown."""
    if override is not None:
        return override
    for key, value in PEAK_BF16_TFLOPS:
        if key in device_name:
            return value
    return None


# ---- data -------------------------------------------------------------------------------------------------------
def data_cfg(args: argparse.Namespace, data_dir: str) -> Any:
    """The synthetic JPEG dataset both sides read."""
    from sslrun.core.config import DataCfg

    return DataCfg(
        dataset="synthetic",
        dataset_kwargs={"num_samples": args.num_samples, "test_samples": 64, "size": args.image_size},
        data_dir=data_dir,
        format="jpg",
        batch_size=args.batch_size,
        num_workers=args.workers,
    )


class JpegViews(torch.utils.data.Dataset):
    """JPEG bytes in memory, decoded by PIL in the DataLoader workers, one torchvision pipeline per view."""

    def __init__(self, jpegs: list[bytes], transforms: list[Any]) -> None:
        self.jpegs, self.transforms = jpegs, transforms

    def __len__(self) -> int:
        return len(self.jpegs)

    def __getitem__(self, i: int) -> list[torch.Tensor]:
        from PIL import Image

        img = Image.open(io.BytesIO(self.jpegs[i])).convert("RGB")
        return [t(img) for t in self.transforms]


def encode_jpegs(cfg: Any) -> list[bytes]:
    """The synthetic train split as JPEG bytes (quality 90, as the .beton is written)."""
    from PIL import Image

    from sslrun.core.plugins.resolve import build_dataset

    split = build_dataset(_experiment(cfg, "resnet18")).open_split("train")
    out = []
    for i in range(len(split)):
        buf = io.BytesIO()
        Image.fromarray(split[i][0]).save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def _experiment(data: Any, model: str, output: str = "unused", device: str = "cpu", max_steps: int = 1) -> Any:
    from sslrun.core.config import ExperimentConfig, LogCfg, OptimCfg, PluginRef, ScheduleCfg, SystemCfg

    return ExperimentConfig(
        method=PluginRef("simclr"),
        encoder=PluginRef(model),
        data=data,
        optim=OptimCfg(name="sgd", lr=0.3, momentum=0.9, weight_decay=1e-6),
        schedule=ScheduleCfg(epochs=100, max_steps=max_steps, warmup_epochs=0),
        system=SystemCfg(device=device, seed=0),  # precision auto: bf16 autocast on CUDA, fp32 on CPU
        log=LogCfg(tensorboard=False, knn_every=0, progress="off", checkpoint_every=10**9, visuals_every=0),
        output=output,
    )


# ---- the two sides ------------------------------------------------------------------------------------------------
def run_sslrun(args: argparse.Namespace, cfg: Any) -> dict[str, Any]:
    """Steady-state images/s of :func:`sslrun.core.train.trainer.train` (FFCV pipeline)."""
    from sslrun.core.train.trainer import train

    timer = StepTimer()
    with tempfile.TemporaryDirectory(prefix="sslrun-gpu-") as out:
        c = type(cfg).from_dict(cfg.to_dict())
        c.output = out
        c.schedule.max_steps = args.warmup_steps + args.steps + 1
        t0 = time.perf_counter()
        train(c, timer)
    return {**steady_rate(timer.times, args.warmup_steps, args.batch_size), "startup_s": timer.times[0] - t0}


def run_torchvision(args: argparse.Namespace, cfg: Any, jpegs: list[bytes], device: torch.device) -> dict[str, Any]:
    """The same method, optimiser and precision, fed by a torchvision ``DataLoader``."""
    from sslrun.core.data.cache import ensure_prepared
    from sslrun.core.data.format import verify_beton
    from sslrun.core.plugins.resolve import build_method, method_class, method_config
    from sslrun.core.train.optim import build_optimizer

    t0 = time.perf_counter()
    manifest = verify_beton(ensure_prepared(cfg.data, "train", progress=False))  # for its mean/std
    size = args.image_size
    specs = method_class("simclr").view_specs(method_config(cfg), size)
    # uint8 out of the workers, normalised on the device: the strongest usual DataLoader setup for a GPU
    ds = JpegViews(jpegs, [tv_view_transform(s, manifest.mean, manifest.std, normalize=False) for s in specs])
    mean = torch.tensor(manifest.mean, device=device).view(1, 3, 1, 1) * 255
    std = torch.tensor(manifest.std, device=device).view(1, 3, 1, 1) * 255
    loader = torch.utils.data.DataLoader(
        ds,
        batch_size=args.batch_size,
        shuffle=True,
        num_workers=args.workers,
        drop_last=True,
        pin_memory=device.type == "cuda",
        persistent_workers=True,
    )
    torch.manual_seed(0)
    cuda = device.type == "cuda"
    method = build_method(cfg, size).to(device)
    if cuda:
        method = method.to(memory_format=torch.channels_last)
    opt = build_optimizer(method.param_groups(), cfg.optim, cfg.optim.lr * args.batch_size / 256)
    times: list[float] = []
    total = args.warmup_steps + args.steps + 1
    while len(times) < total:
        for views in loader:
            views = [v.to(device, non_blocking=True).float().sub_(mean).div_(std) for v in views]
            if cuda:
                views = [v.contiguous(memory_format=torch.channels_last) for v in views]
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
                loss = method(views)["loss"]
            finite = bool(torch.isfinite(loss).item())  # one host sync per step, as sslrun's trainer does
            times.append(time.perf_counter())
            if not finite:
                raise RuntimeError(f"torchvision side: non-finite loss at step {len(times) - 1}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if len(times) >= total:
                break
    return {**steady_rate(times, args.warmup_steps, args.batch_size), "startup_s": times[0] - t0}


def step_flops(cfg: Any, batch: int, size: int, device: torch.device) -> int:
    """FLOPs of one training step (forward + backward of both views) of ``cfg``'s method, counted by
    ``FlopCounterMode`` on random inputs (the count does not depend on the pixels)."""
    from torch.utils.flop_counter import FlopCounterMode

    from sslrun.core.plugins.resolve import build_method

    method = build_method(cfg, size).to(device)
    cuda = device.type == "cuda"
    if cuda:
        method = method.to(memory_format=torch.channels_last)
    views = [torch.randn(batch, 3, size, size, device=device) for _ in range(2)]
    counter = FlopCounterMode(display=False)
    with counter:  # one context: entering it again would reset the count
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            loss = method(views)["loss"]
        loss.backward()
    total = int(counter.get_total_flops())
    del method, views, loss
    if cuda:
        torch.cuda.empty_cache()
    return total


# ---- driver -----------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated encoders (resnet18,resnet50)")
    p.add_argument("--batch-size", type=int, default=256, help="images per step (2 views each)")
    p.add_argument("--image-size", type=int, default=224, help="side of the synthetic JPEGs and of the views")
    p.add_argument("--num-samples", type=int, default=20000, help="synthetic training images")
    cores = usable_cores()
    p.add_argument("--workers", type=int, default=cores, help=f"FFCV threads = DataLoader workers ({cores})")
    p.add_argument("--warmup-steps", type=int, default=15, help="untimed steps first")
    p.add_argument("--steps", type=int, default=50, help="timed steps")
    p.add_argument("--peak-tflops", type=float, default=None, help="peak dense bf16 TFLOP/s (default: by name)")
    p.add_argument("--data-dir", default=None, help="where the .beton goes (default: a temporary folder)")
    p.add_argument("--skip-torchvision", action="store_true", help="measure the sslrun side only")
    p.add_argument("--smoke", action="store_true", help="tiny CPU run (resnet18, 16 px, 2 steps): checks the script")
    p.add_argument("--json", action="store_true", help="print a JSON object as the last line")
    p.add_argument("--side", choices=("sslrun", "torchvision"), help=argparse.SUPPRESS)  # internal: one side
    args = p.parse_args(argv)
    if args.smoke:
        args.models, args.batch_size, args.image_size, args.num_samples = "resnet18", 16, 16, 64
        args.warmup_steps, args.steps, args.workers = 1, 2, 1
    args.model_list = [m.strip() for m in args.models.split(",") if m.strip()]
    if not args.model_list:
        p.error("--models names no encoder")
    needed = (args.warmup_steps + args.steps + 2) * args.batch_size
    if not args.smoke and args.num_samples < needed:
        # the timed window must sit inside the first epoch: no epoch-end checkpoint or loader restart in it
        p.error(f"--num-samples {args.num_samples} is under one epoch of the measured steps; use >= {needed}")
    return args


def _side(side: str, args: argparse.Namespace, model: str, data_dir: str) -> dict[str, Any]:
    """Run one side for one encoder in a fresh process (its own CUDA context and thread pools: forking
    DataLoader workers from a process whose numba/TBB pool already runs is avoided); returns its JSON."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--side", side, "--models", model, "--data-dir", data_dir]
    cmd += ["--batch-size", str(args.batch_size), "--image-size", str(args.image_size)]
    cmd += ["--num-samples", str(args.num_samples), "--workers", str(args.workers)]
    cmd += ["--warmup-steps", str(args.warmup_steps), "--steps", str(args.steps)]
    cmd += ["--smoke"] if args.smoke else []
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-15:])
        raise SystemExit(f"error: the {side} side of {model} failed:\n{tail}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _worker(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """One side, one encoder (``--side``): the JSON the driver reads."""
    dcfg = data_cfg(args, args.data_dir)
    cfg = _experiment(dcfg, args.model_list[0], device=device.type)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    if args.side == "sslrun":
        flops = step_flops(cfg, args.batch_size, args.image_size, device)
        return {**run_sslrun(args, cfg), "flops_per_step": flops}
    return run_torchvision(args, cfg, encode_jpegs(dcfg), device)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        print(
            "error: benchmarks/gpu.py measures GPU throughput and needs a CUDA GPU, and none is visible here; run it "
            "on a GPU machine, or pass --smoke for a tiny CPU run that checks the script",
            file=sys.stderr,
        )
        return 2
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    if args.side:
        print_json(_worker(args, device))
        return 0
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = peak_tflops(name, args.peak_tflops)
    info = machine_info()
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="sslrun-gpu-data-") as tmp:
        data_dir = args.data_dir or tmp
        from sslrun.core.data.cache import ensure_prepared

        print("  preparing the synthetic JPEG .beton ...", file=sys.stderr, flush=True)
        ensure_prepared(data_cfg(args, data_dir), "train", num_workers=max(1, min(8, usable_cores())), progress=False)
        for model in args.model_list:
            print(f"  {model}: sslrun (FFCV) ...", file=sys.stderr, flush=True)
            s = _side("sslrun", args, model, data_dir)
            r: dict[str, Any] = {"flops_per_step": s.pop("flops_per_step"), "sslrun": s}
            if not args.skip_torchvision:
                print(f"  {model}: torchvision DataLoader ...", file=sys.stderr, flush=True)
                r["torchvision"] = _side("torchvision", args, model, data_dir)
                r["speedup"] = r["sslrun"]["images_per_s"] / r["torchvision"]["images_per_s"]
            for side in ("sslrun", "torchvision"):
                if side in r:
                    steps_per_s = r[side]["steps"] / r[side]["seconds"]
                    r[side]["mfu"] = None if peak is None else r["flops_per_step"] * steps_per_s / (peak * 1e12)
            results[model] = r

    def mfu(x: dict[str, Any] | None) -> str:
        return "-" if x is None else "n/a" if x["mfu"] is None else f"{100 * x['mfu']:.1f}%"

    rows = []
    for model, r in results.items():
        s, tv = r["sslrun"], r.get("torchvision")
        rows.append(
            [
                model,
                f"{r['flops_per_step'] / 1e12:.2f}",
                f"{s['images_per_s']:,.0f}",
                mfu(s),
                f"{tv['images_per_s']:,.0f}" if tv else "skipped",
                mfu(tv),
                f"{r['speedup']:.2f}x" if tv else "-",
            ]
        )
    precision = "bf16 autocast, channels_last" if device.type == "cuda" else "fp32 (CPU smoke run)"
    print_table(
        f"SimCLR pretraining on {name}: batch {args.batch_size} x 2 views, {args.image_size} px synthetic JPEGs, "
        f"{args.workers} loader workers, {precision}",
        ["encoder", "TFLOP/step", "sslrun img/s", "sslrun MFU", "torchvision img/s", "tv MFU", "speedup"],
        rows,
        notes=[
            f"steady state: {args.steps} timed steps after {args.warmup_steps} warm-up steps; MFU against "
            + (f"{peak:g} TFLOP/s dense bf16" if peak else "no known peak (pass --peak-tflops)"),
            f"{info['date']}, load average {info['load_avg_1min']} at start, {os.getloadavg()[0]:.2f} at end",
        ],
    )
    if args.json:
        print_json({"device": name, "peak_tflops": peak, "results": results, "settings": vars(args), "machine": info})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
