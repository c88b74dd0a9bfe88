"""End-to-end training throughput: ``sslrun train`` against the same method written with lightly 1.6.

For each method (SimCLR, BYOL) both sides pretrain the **same model** on the **same data** with the **same
settings**, and the benchmark reports steady-state images per second and the ratio:

* model: sslrun's ``small_cnn`` encoder (imported by the lightly script too) and the paper's heads (SimCLR:
  2048-128 projector, NT-Xent T=0.5; BYOL: 4096-256 projector and predictor, EMA target);
* data: the prepared Fashion-MNIST train split (60k 28x28 images); the lightly side reads the very same
  ``.beton`` with :class:`sslrun.core.data.format.BetonReader` into memory, then a torch ``DataLoader`` applies
  lightly's ``SimCLRTransform`` / ``BYOLTransform`` per image in worker processes, with parameters taken from the sslrun
  method's own view specs (crop scale, jitter, grayscale, blur, solarize: identical augmentations);
* sslrun side: :func:`sslrun.core.train.trainer.train` (FFCV decode and crops in numba threads, colour augmentations
  per batch in the fused CPU kernel, model in channels_last), no online kNN monitor, no TensorBoard;
* both: global batch, SGD (momentum 0.9, weight decay 5e-4), ``torch.set_num_threads(--threads)``
  (``OMP_NUM_THREADS``), ``--workers`` FFCV threads = DataLoader worker processes, fp32 on this CPU.

A third side, ``lightly+cl``, is the same lightly loop with the model and its inputs in channels_last memory
format: sslrun's default on every device, and a one-line change a lightly user can make by hand (it makes the
convolutions faster on this CPU too). The ratio against it separates what that default buys from what the rest
of sslrun (the FFCV loader, the fused colour kernel) buys.

Each side runs in its own fresh Python process (the lightly side with ``PYTHONPATH=benchmarks/.bench-env``,
created with pip on first use: the project's virtualenv is never changed). **Steady state only:** every step is
timestamped when it reaches its forward pass; the first ``--warmup-steps`` steps (FFCV's JIT compilation,
DataLoader worker start-up, allocator warm-up) are excluded and the rate is taken over the next ``--steps``
whole steps. The time from process start to the first step is reported separately ("start-up").

Usage::

    python benchmarks/throughput.py                       # SimCLR and BYOL, all sides (~7 min on 2 quiet cores)
    python benchmarks/throughput.py --methods simclr --repeats 3 --json   # median of 3 interleaved runs
    python benchmarks/throughput.py --skip-lightly --steps 2 --warmup-steps 1 --max-samples 512 --batch-size 64
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

_T0 = time.perf_counter()  # process start, for the start-up figure (before torch is imported)

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    BENCH_ENV,
    LoadSampler,
    StepTimer,
    ensure_bench_env,
    machine_info,
    print_json,
    print_table,
    steady_rate,
    usable_cores,
    write_result,
)

METHODS = ("simclr", "byol")
SIDES = ("sslrun", "lightly", "lightly+cl")
SGD_MOMENTUM = 0.9
WEIGHT_DECAY = 5e-4


# ---- sslrun side ----------------------------------------------------------------------------------------------
def run_sslrun(args: argparse.Namespace) -> dict[str, Any]:
    """Time ``sslrun.core.train.trainer.train`` for warm-up + measured steps; returns the steady-state figures."""
    from sslrun.core.config import ExperimentConfig, LogCfg, OptimCfg, PluginRef, ScheduleCfg, SystemCfg
    from sslrun.core.train.trainer import train

    timer = StepTimer()
    with tempfile.TemporaryDirectory(prefix="sslrun-throughput-") as out:
        cfg = ExperimentConfig(
            method=PluginRef(args.method),
            encoder=PluginRef("small_cnn", {"width": args.width}),
            data=_data_cfg(args),
            optim=OptimCfg(name="sgd", lr=args.lr, momentum=SGD_MOMENTUM, weight_decay=WEIGHT_DECAY),
            # a long schedule cut by max_steps: the lr curve is irrelevant to speed, the step count is what matters
            schedule=ScheduleCfg(epochs=100, max_steps=args.warmup_steps + args.steps + 1, warmup_epochs=0),
            system=SystemCfg(device="cpu", seed=0),
            log=LogCfg(tensorboard=False, knn_every=0, progress="off", checkpoint_every=10**9, visuals_every=0),
            output=out,
        )
        train(cfg, timer)
        threads = torch.get_num_threads()
    rate = steady_rate(timer.times, args.warmup_steps, args.batch_size)
    return {**rate, "startup_s": timer.times[0] - _T0, "torch_threads": threads}


def _data_cfg(args: argparse.Namespace) -> Any:
    from sslrun.core.config import DataCfg, default_data_dir

    return DataCfg(
        dataset="fashion-mnist",
        root=args.root,
        data_dir=args.data_dir or default_data_dir(),
        batch_size=args.batch_size,
        num_workers=args.workers,
        max_samples=args.max_samples,
    )


# ---- lightly side ---------------------------------------------------------------------------------------------
class _Images(torch.utils.data.Dataset):
    """In-memory uint8 images handed to a lightly multi-view transform as PIL images (what a lightly user's
    torchvision dataset does)."""

    def __init__(self, images: np.ndarray, transform: Any) -> None:
        self.images, self.transform = images, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[list[torch.Tensor], int]:
        from PIL import Image

        return self.transform(Image.fromarray(self.images[i])), 0


def _lightly_transform(method: str, image_size: int, mean: list[float], std: list[float]) -> Any:
    """lightly's own transform for ``method``, parameterised from sslrun's view specs so the views are the same."""
    from lightly.transforms import BYOLTransform, BYOLView1Transform, BYOLView2Transform, SimCLRTransform

    from sslrun.core.plugins.resolve import method_class

    cls = method_class(method)
    specs = cls.view_specs(cls.Config(), image_size)
    norm = {"mean": mean, "std": std}

    def kw(s: Any) -> dict[str, Any]:
        b, c, sat, h = s.jitter
        return {
            "input_size": s.size,
            "cj_prob": s.jitter_p,
            "cj_strength": 1.0,
            "cj_bright": b,
            "cj_contrast": c,
            "cj_sat": sat,
            "cj_hue": h,
            "min_scale": s.scale[0],
            "random_gray_scale": s.grayscale_p,
            "gaussian_blur": s.blur_p,
            "sigmas": s.blur_sigma,
            "hf_prob": s.flip_p,
            "normalize": norm,
        }

    if method == "simclr":
        assert specs[0] == specs[1]
        return SimCLRTransform(**kw(specs[0]))
    return BYOLTransform(
        view_1_transform=BYOLView1Transform(**kw(specs[0]), solarization_prob=specs[0].solarize_p),
        view_2_transform=BYOLView2Transform(**kw(specs[1]), solarization_prob=specs[1].solarize_p),
    )


def run_lightly(args: argparse.Namespace) -> dict[str, Any]:
    """The lightly 1.6 way (its examples/pytorch/simclr.py and byol.py loops), on sslrun's small_cnn; with
    ``--side lightly+cl``, model and inputs in channels_last memory format."""
    import copy

    import lightly
    from lightly.loss import NegativeCosineSimilarity, NTXentLoss
    from lightly.models.modules import BYOLPredictionHead, BYOLProjectionHead, SimCLRProjectionHead
    from lightly.models.utils import deactivate_requires_grad, update_momentum
    from lightly.utils.scheduler import cosine_schedule
    from torch import nn

    from sslrun.core.data.cache import ensure_prepared
    from sslrun.core.data.format import BetonReader
    from sslrun.core.plugins.resolve import method_class
    from sslrun.plugins.encoders.small_cnn import small_cnn

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    reader = BetonReader(ensure_prepared(_data_cfg(args), "train"))
    n = min(len(reader), args.max_samples or len(reader))
    images = np.stack([reader[i][0] for i in range(n)])
    size = int(images.shape[1])
    mean, std = list(reader.manifest.mean), list(reader.manifest.std)
    ds = _Images(images, _lightly_transform(args.method, size, mean, std))
    loader = torch.utils.data.DataLoader(
        ds,
        batch_size=args.batch_size,
        shuffle=True,
        num_workers=args.workers,
        drop_last=True,
        persistent_workers=args.workers > 0,
    )
    mcfg = method_class(args.method).Config()
    backbone = small_cnn(width=args.width, image_size=size)
    if args.method == "simclr":
        model: nn.Module = nn.ModuleDict(
            {"backbone": backbone, "head": SimCLRProjectionHead(backbone.output_dim, mcfg.hidden_dim, mcfg.output_dim)}
        )
        criterion: nn.Module = NTXentLoss(temperature=mcfg.temperature)
    else:
        proj = BYOLProjectionHead(backbone.output_dim, mcfg.projection_hidden_dim, mcfg.projection_dim)
        pred = BYOLPredictionHead(mcfg.projection_dim, mcfg.prediction_hidden_dim, mcfg.projection_dim)
        model = nn.ModuleDict({"backbone": backbone, "projection_head": proj, "prediction_head": pred})
        model["backbone_momentum"] = copy.deepcopy(backbone)
        model["projection_head_momentum"] = copy.deepcopy(proj)
        deactivate_requires_grad(model["backbone_momentum"])
        deactivate_requires_grad(model["projection_head_momentum"])
        criterion = NegativeCosineSimilarity()
    channels_last = args.side == "lightly+cl"
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=args.lr * args.batch_size / 256, momentum=SGD_MOMENTUM, weight_decay=WEIGHT_DECAY)
    total = args.warmup_steps + args.steps + 1
    times: list[float] = []
    model.train()
    while len(times) < total:
        for (x0, x1), _ in loader:
            if channels_last:
                x0, x1 = (x.contiguous(memory_format=torch.channels_last) for x in (x0, x1))
            if args.method == "simclr":
                z0 = model["head"](model["backbone"](x0))
                z1 = model["head"](model["backbone"](x1))
                loss = criterion(z0, z1)
            else:
                m = cosine_schedule(len(times), total, mcfg.tau_base, mcfg.tau_final)
                update_momentum(model["backbone"], model["backbone_momentum"], m=m)
                update_momentum(model["projection_head"], model["projection_head_momentum"], m=m)
                p0 = model["prediction_head"](model["projection_head"](model["backbone"](x0)))
                p1 = model["prediction_head"](model["projection_head"](model["backbone"](x1)))
                with torch.no_grad():
                    z0 = model["projection_head_momentum"](model["backbone_momentum"](x0))
                    z1 = model["projection_head_momentum"](model["backbone_momentum"](x1))
                loss = 0.5 * (criterion(p0, z1) + criterion(p1, z0))
            times.append(time.perf_counter())  # same phase as the sslrun side: after the forward pass
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if not torch.isfinite(loss):
                raise RuntimeError(f"lightly side: non-finite loss at step {len(times) - 1}")
            if len(times) >= total:
                break
    rate = steady_rate(times, args.warmup_steps, args.batch_size)
    return {
        **rate,
        "startup_s": times[0] - _T0,
        "torch_threads": torch.get_num_threads(),
        "lightly": lightly.__version__,
    }


# ---- driver -----------------------------------------------------------------------------------------------------
def _side(side: str, args: argparse.Namespace, method: str) -> dict[str, Any]:
    """Run one side in a fresh process; returns its JSON result."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--side", side, "--methods", method]
    cmd += _passthrough(args)
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    if side.startswith("lightly"):
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(BENCH_ENV), env.get("PYTHONPATH", "")) if p)
    with LoadSampler() as load:
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-15:])
        raise SystemExit(f"error: the {side} side of {method} failed:\n{tail}")
    return {**json.loads(done.stdout.strip().splitlines()[-1]), "load": load.summary()}


def _median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the median images/s (the lower one of the middle two for an even count), plus every run's
    figure under ``all_images_per_s``."""
    ordered = sorted(runs, key=lambda r: r["images_per_s"])
    return {**ordered[(len(ordered) - 1) // 2], "all_images_per_s": [r["images_per_s"] for r in runs]}


def _passthrough(args: argparse.Namespace) -> list[str]:
    out = ["--batch-size", str(args.batch_size), "--threads", str(args.threads), "--workers", str(args.workers)]
    out += ["--warmup-steps", str(args.warmup_steps), "--steps", str(args.steps), "--width", str(args.width)]
    out += ["--lr", str(args.lr)]
    for flag, value in (("--max-samples", args.max_samples), ("--data-dir", args.data_dir), ("--root", args.root)):
        if value is not None:
            out += [flag, str(value)]
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated: simclr, byol (default: both)")
    p.add_argument("--batch-size", type=int, default=256, help="global batch (both sides)")
    cores = usable_cores()
    p.add_argument("--threads", type=int, default=cores, help=f"torch threads on both sides (default {cores})")
    p.add_argument("--workers", type=int, default=min(2, cores),
                   help="FFCV threads = DataLoader worker processes (default: min(2, usable cores))")  # fmt: skip
    p.add_argument("--warmup-steps", type=int, default=10, help="untimed steps first (JIT, worker start-up)")
    p.add_argument("--steps", type=int, default=40, help="timed steps after the warm-up")
    p.add_argument("--width", type=int, default=32, help="small_cnn width (32: 256-d features, the default)")
    p.add_argument("--lr", type=float, default=0.06, help="SGD lr per 256 images (speed does not depend on it)")
    p.add_argument("--max-samples", type=int, default=None, help="use the first N training images (quick runs)")
    p.add_argument("--data-dir", default=None, help="cache of prepared .beton files (default: sslrun's)")
    p.add_argument("--root", default=None, help="Fashion-MNIST IDX files (default: the usual places)")
    p.add_argument("--repeats", type=int, default=1, help="runs per side, interleaved; the median run is reported")
    p.add_argument("--skip-lightly", action="store_true", help="measure the sslrun side only (no lightly env)")
    p.add_argument("--json", action="store_true", help="print a JSON object as the last line")
    p.add_argument(
        "--result",
        default=None,
        help="write the JSON result, with the command, date and machine, to this file (e.g. docs/results/X.json)",
    )
    p.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)  # internal: one side, one method
    args = p.parse_args(argv)
    args.method_list = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in args.method_list if m not in METHODS]
    if unknown or not args.method_list:
        p.error(f"unknown method(s) {', '.join(unknown) or '(none)'}; choose from {', '.join(METHODS)}")
    if min(args.steps, args.batch_size - 1, args.threads, args.workers, args.repeats) < 1 or args.warmup_steps < 0:
        p.error("--steps, --threads, --workers, --repeats >= 1, --warmup-steps >= 0 and --batch-size >= 2 are needed")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.side:  # worker mode: one side, one method, one JSON line
        args.method = args.method_list[0]
        result = run_sslrun(args) if args.side == "sslrun" else run_lightly(args)
        print_json(result)
        return 0

    from sslrun.core.data.cache import ensure_prepared

    ensure_prepared(_data_cfg(args), "train")  # prepare once, outside every timing
    if not args.skip_lightly:
        ensure_bench_env()
    before = machine_info()
    results: dict[str, dict[str, Any]] = {}
    sides = ["sslrun"] if args.skip_lightly else list(SIDES)
    for method in args.method_list:
        runs: dict[str, list[dict[str, Any]]] = {side: [] for side in sides}
        for i in range(args.repeats):  # interleaved, so a burst of load hits both sides alike
            for side in sides:
                print(f"  {method}: {side} side ({i + 1}/{args.repeats}) ...", file=sys.stderr, flush=True)
                runs[side].append(_side(side, args, method))
        r: dict[str, Any] = {side: _median_run(runs[side]) for side in sides}
        if not args.skip_lightly:
            r["ratio"] = r["sslrun"]["images_per_s"] / r["lightly"]["images_per_s"]
            r["ratio_median_step"] = r["lightly"]["median_step_s"] / r["sslrun"]["median_step_s"]
            r["ratio_vs_channels_last"] = r["sslrun"]["images_per_s"] / r["lightly+cl"]["images_per_s"]
        results[method] = r
    load_after = round(os.getloadavg()[0], 2)

    rows = []
    for method, r in results.items():
        s, lt, cl = r["sslrun"], r.get("lightly"), r.get("lightly+cl")
        rows.append(
            [
                method,
                f"{s['images_per_s']:,.0f}",
                f"{lt['images_per_s']:,.0f}" if lt else "skipped",
                f"{r['ratio']:.2f}x" if lt else "-",
                f"{r['ratio_median_step']:.2f}x" if lt else "-",
                f"{cl['images_per_s']:,.0f}" if cl else "skipped",
                f"{r['ratio_vs_channels_last']:.2f}x" if cl else "-",
                f"{s['startup_s']:.1f}",
                f"{lt['startup_s']:.1f}" if lt else "-",
                " / ".join(str(x["load"]["load_mean"]) for x in (s, lt, cl) if x),
            ]
        )
    print_table(
        f"Training throughput, small_cnn (width {args.width}) on Fashion-MNIST 28x28, global batch {args.batch_size}, "
        f"{args.threads} torch threads, {args.workers} loader workers, CPU fp32",
        ["method", "sslrun img/s", "lightly img/s", "ratio", "median-step ratio", "lightly+cl img/s"]
        + ["ratio vs lightly+cl", "sslrun start-up s", "lightly start-up s", "load sslrun / lightly / +cl"],
        rows,
        notes=[
            f"steady state: {args.steps} timed steps after {args.warmup_steps} untimed warm-up steps "
            f"(JIT, worker start-up excluded); start-up = process start to first step; median of {args.repeats} "
            f"interleaved run(s) per side",
            "median-step ratio: the same comparison at each side's median step time (robust to steps slowed down "
            "by other processes; a large gap to the ratio means the machine was not quiet)",
            "lightly+cl: the lightly loop with model and inputs in channels_last (sslrun's default, by hand)",
            f"load: mean 1-min load average while each side ran; {before['load_avg_1min']} before, {load_after} "
            f"after, on {before['cpu_count']} cores ({before['cpu']}); {before['date']}",
        ],
    )
    if args.json or args.result:
        keys = ("batch_size", "threads", "workers", "warmup_steps", "steps", "width", "repeats")
        settings = {k: getattr(args, k) for k in keys}
        settings |= {"lr": args.lr, "max_samples": args.max_samples, "skip_lightly": args.skip_lightly}
        report = {"results": results, "settings": settings, "machine": before, "load_avg_after": load_after}
        if args.json:
            print_json(report)
        if args.result:
            write_result(args.result, report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
