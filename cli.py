"""The ``sslrun`` command line (Typer). Thin: every command parses flags, builds an :class:`ExperimentConfig`
and calls into ``sslrun.core`` (or ``sslrun.cluster`` for ``launch``, imported lazily so that the rest of the CLI
never starts Ray). Every :class:`SslrunError` is printed as one ``error:`` line and exits with status 2.
"""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from sslrun.core.errors import SslrunError

app = typer.Typer(
    name="sslrun",
    help="Distributed self-supervised pretraining for vision: Ray Train + DDP + FFCV, methods as plugins.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
plugins_app = typer.Typer(help="List and check the installed plugins (methods, encoders, pretext tasks, datasets).")
config_app = typer.Typer(help="Show the resolved experiment config.")
data_app = typer.Typer(help="Prepare datasets as FFCV .beton files and inspect them.")
eval_app = typer.Typer(help="Downstream evaluation of a pretrained encoder: knn, linear, finetune.")
app.add_typer(plugins_app, name="plugins")
app.add_typer(config_app, name="config")
app.add_typer(data_app, name="data")
app.add_typer(eval_app, name="eval")

F = TypeVar("F", bound=Callable[..., Any])


def friendly(fn: F) -> F:
    """Turn :class:`SslrunError` into one ``error: ...`` line on stderr and exit status 2 (no traceback)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except SslrunError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from None

    return wrapper  # type: ignore[return-value]


# ---- experiment flags shared by `config show`, `train` and `launch` --------------------------------------------
ConfigFile = Annotated[
    Path | None, typer.Option("--config", "-c", help="TOML or YAML experiment config (flags and --set win over it).")
]
Overrides = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override any config key: --set optim.lr=0.3 --set method.kwargs.temperature=0.2"),
]
MethodOpt = Annotated[str | None, typer.Option(help="SSL method or pretext task (see `sslrun plugins list`).")]
PretextOpt = Annotated[str | None, typer.Option(help="Pretext task to train (same as --method NAME).")]
EncoderOpt = Annotated[str | None, typer.Option(help="Encoder: small_cnn for CPU, resnet18/50 or vit_* on GPUs.")]
DatasetOpt = Annotated[str | None, typer.Option(help="Dataset plugin; prepared to .beton on first use.")]
RootOpt = Annotated[str | None, typer.Option(help="Directory with the dataset's raw files.")]
DataDirOpt = Annotated[str | None, typer.Option(help="Cache of prepared .beton files (default ~/.cache/sslrun).")]
EpochsOpt = Annotated[int | None, typer.Option(min=1, help="Training epochs.")]
MaxStepsOpt = Annotated[int | None, typer.Option(min=1, help="Stop after this many global steps.")]
BatchOpt = Annotated[int | None, typer.Option(min=1, help="GLOBAL batch size (split across workers).")]
LrOpt = Annotated[float | None, typer.Option(help="Base lr per 256 images (scaled linearly with batch size).")]
OutputOpt = Annotated[str | None, typer.Option("--output", "-o", help="Output directory of the run.")]
SeedOpt = Annotated[int | None, typer.Option(help="Random seed.")]
DeviceOpt = Annotated[str | None, typer.Option(help="auto, cpu or cuda.")]
WorkersOpt = Annotated[int | None, typer.Option(min=1, help="FFCV loader threads per process.")]
ResumeOpt = Annotated[bool, typer.Option("--resume", help="Continue from OUTPUT/checkpoints/last.pt.")]


def experiment_from_cli(
    config: Path | None = None,
    overrides: list[str] | None = None,
    *,
    method: str | None = None,
    pretext: str | None = None,
    encoder: str | None = None,
    dataset: str | None = None,
    root: str | None = None,
    data_dir: str | None = None,
    epochs: int | None = None,
    max_steps: int | None = None,
    batch_size: int | None = None,
    lr: float | None = None,
    output: str | None = None,
    seed: int | None = None,
    device: str | None = None,
    num_workers: int | None = None,
    resume: bool = False,
    extra: dict[str, Any] | None = None,
) -> Any:
    """defaults < --config file < flags < --set; plugin names and kwargs are validated here, on the driver."""
    from sslrun.core.errors import ConfigError
    from sslrun.core.plugins.build import build_config
    from sslrun.core.plugins.resolve import validate_plugins

    if method and pretext and method != pretext:
        raise ConfigError(f"--method {method} and --pretext {pretext} disagree; give one of them")
    flags: dict[str, Any] = {
        "method.name": method or pretext,
        "encoder.name": encoder,
        "data.dataset": dataset,
        "data.root": root,
        "data.data_dir": data_dir,
        "schedule.epochs": epochs,
        "schedule.max_steps": max_steps,
        "data.batch_size": batch_size,
        "optim.lr": lr,
        "output": output,
        "system.seed": seed,
        "system.device": device,
        "data.num_workers": num_workers,
        "resume": True if resume else None,
        **(extra or {}),
    }
    cfg = build_config(config, flags, overrides)
    return validate_plugins(cfg)


# ---- plugins ---------------------------------------------------------------------------------------------------
@plugins_app.command("list")
@friendly
def plugins_list(
    kind: Annotated[str | None, typer.Option(help="method, encoder, pretext or dataset.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Name, kind, distribution==version and status (ok / broken: reason) of every plugin."""
    from sslrun.core.errors import ConfigError
    from sslrun.core.plugins.registry import KINDS, get_registry

    if kind is not None and kind not in KINDS:
        raise ConfigError(f"unknown plugin kind {kind!r}; kinds: {', '.join(KINDS)}")
    rows = []
    for k in [kind] if kind else KINDS:
        reg = get_registry(k)
        for name in reg.names():
            info = reg.info(name)
            rows.append(
                {"name": name, "kind": k, "dist": info.dist_version, "target": info.target, "status": reg.check(name)}
            )
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table("name", "kind", "distribution", "status")
    for r in rows:
        table.add_row(r["name"], r["kind"], r["dist"], r["status"])
    Console(width=160).print(table)


@plugins_app.command("check")
@friendly
def plugins_check() -> None:
    """Import and validate every plugin; exit 1 if any is broken."""
    from sslrun.core.plugins.registry import KINDS, get_registry

    broken = 0
    for k in KINDS:
        reg = get_registry(k)
        for name in reg.names():
            status = reg.check(name)
            if status != "ok":
                broken += 1
                info = reg.info(name)
                typer.echo(f"{k} {name} ({info.dist_version}): {status}")
    if broken:
        typer.echo(f"{broken} broken plugin(s)", err=True)
        raise typer.Exit(1)
    typer.echo("all plugins ok")


# ---- config ----------------------------------------------------------------------------------------------------
@config_app.command("show")
@friendly
def config_show(
    config: ConfigFile = None,
    overrides: Overrides = None,
    method: MethodOpt = None,
    pretext: PretextOpt = None,
    encoder: EncoderOpt = None,
    dataset: DatasetOpt = None,
    epochs: EpochsOpt = None,
    batch_size: BatchOpt = None,
    lr: LrOpt = None,
    output: OutputOpt = None,
) -> None:
    """Print the resolved config as TOML (defaults < --config < flags < --set)."""
    cfg = experiment_from_cli(
        config,
        overrides,
        method=method,
        pretext=pretext,
        encoder=encoder,
        dataset=dataset,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        output=output,
    )
    typer.echo(cfg.to_toml())


# ---- data (issue 3) -------------------------------------------------------------------------------------------
def _dataset_kwargs(items: list[str] | None) -> dict[str, Any]:
    """``--set size=96`` (or ``--set data.dataset_kwargs.size=96``) -> ``{"size": 96}``."""
    from sslrun.core.config import parse_scalar
    from sslrun.core.errors import ConfigError

    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        key = key.strip().removeprefix("data.dataset_kwargs.")
        if not sep or not key or "." in key:
            raise ConfigError(f"--set {item!r} must look like KEY=VALUE with a dataset setting (e.g. --set size=96)")
        out[key] = parse_scalar(raw.strip())
    return out


@data_app.command("prepare")
@friendly
def data_prepare(
    name: Annotated[
        str, typer.Argument(help="Dataset: fashion-mnist, cifar10, cifar100, stl10, imagefolder, synthetic.")
    ],
    root: RootOpt = None,
    split: Annotated[
        str | None, typer.Option(help="One split (default: the pretraining split plus the evaluation splits).")
    ] = None,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Write this .beton (one split) instead of the cache.")
    ] = None,
    fmt: Annotated[
        str, typer.Option("--format", help="raw (exact pixels; small images) or jpg (smaller files).")
    ] = "raw",
    data_dir: DataDirOpt = None,
    settings: Annotated[
        list[str] | None, typer.Option("--set", help="Dataset setting KEY=VALUE, e.g. --set size=96 (imagefolder).")
    ] = None,
    workers: Annotated[int, typer.Option(min=1, help="Writer processes (1 = in this process).")] = 1,
    force: Annotated[bool, typer.Option("--force", help="Prepare again even if a valid cached file exists.")] = False,
) -> None:
    """Write a dataset split as an FFCV .beton (+ manifest) into the cache (or --output); reused when cached."""
    import warnings

    from sslrun.core.config import DataCfg, coerce_dataclass
    from sslrun.core.data.beton import prepare_dataset

    data: dict[str, Any] = {"dataset": name, "dataset_kwargs": _dataset_kwargs(settings), "root": root, "format": fmt}
    if data_dir is not None:
        data["data_dir"] = data_dir
    data_cfg = coerce_dataclass(DataCfg, data, "data")
    with warnings.catch_warnings(record=True) as caught:  # skipped images etc.: one plain line each
        warnings.simplefilter("always")
        try:
            done = prepare_dataset(data_cfg, split, output=output, force=force, num_workers=workers)
        finally:
            for warning in caught:
                typer.echo(f"warning: {warning.message}", err=True)
    for s, path, m, written in done:
        h, w = m.image_size
        state = "prepared" if written else "cached, verified"
        typer.echo(f"{name}/{s}: {m.num_samples} samples, {h}x{w}, {m.image_format} -> {path} ({state})")


@data_app.command("inspect")
@friendly
def data_inspect(
    file: Annotated[Path, typer.Argument(help="A prepared .beton file.")],
    grid: Annotated[Path | None, typer.Option(help="Write a PNG grid of samples here.")] = None,
    views: Annotated[
        str | None, typer.Option(help="Also write a grid of the augmented views METHOD would train on.")
    ] = None,
    views_out: Annotated[
        Path | None, typer.Option(help="Where the --views grid goes (default: <grid>-<METHOD>-views.png).")
    ] = None,
    n: Annotated[int, typer.Option(min=1, help="Samples in the grid (rows of the --views grid: n // 8).")] = 64,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Count, fields, image sizes, label histogram and mean/std of a .beton; optional sample and view grids."""
    from sslrun.core.data.inspect import summarize, write_sample_grid, write_views_grid

    info = summarize(file)
    if grid is not None:
        info["grid"] = str(write_sample_grid(file, grid, n))
    if views is not None:
        target = views_out or (grid or Path(file.stem + ".png")).with_name(f"{(grid or file).stem}-{views}-views.png")
        info["views_grid"] = str(write_views_grid(file, views, target, max(1, n // 8)))
    if as_json:
        typer.echo(json.dumps(info, indent=2))
        return
    hist = ", ".join(f"{k}: {v}" for k, v in info["label_histogram"].items())
    lines = [
        f"file:        {info['file']} ({info['bytes'] / 2**20:.1f} MiB)",
        f"dataset:     {info['dataset']} / {info['split']}",
        f"samples:     {info['num_samples']}",
        f"fields:      {', '.join(info['fields'])}",
        f"image sizes: {', '.join(info['image_sizes'])}{' (grayscale)' if info['grayscale'] else ''}",
        f"classes:     {info['num_classes'] if info['num_classes'] is not None else 'none (unlabelled)'}",
        f"mean / std:  {info['mean']} / {info['std']}",
        f"labels:      {hist}",
    ]
    lines += [f"grid:        {info['grid']}"] if "grid" in info else []
    lines += [f"views grid:  {info['views_grid']}"] if "views_grid" in info else []
    typer.echo("\n".join(lines))


# ---- train (issue 4) ------------------------------------------------------------------------------------------
@app.command("train")
@friendly
def train_cmd(
    config: ConfigFile = None,
    overrides: Overrides = None,
    method: MethodOpt = None,
    pretext: PretextOpt = None,
    encoder: EncoderOpt = None,
    dataset: DatasetOpt = None,
    root: RootOpt = None,
    data_dir: DataDirOpt = None,
    epochs: EpochsOpt = None,
    max_steps: MaxStepsOpt = None,
    batch_size: BatchOpt = None,
    lr: LrOpt = None,
    output: OutputOpt = None,
    seed: SeedOpt = None,
    device: DeviceOpt = None,
    num_workers: WorkersOpt = None,
    resume: ResumeOpt = False,
) -> None:
    """Pretrain on this machine (one process, or one per GPU under torchrun); see docs/training.md.

    Writes OUTPUT/config.toml, OUTPUT/checkpoints/, OUTPUT/tb/ (TensorBoard) and OUTPUT/metrics.jsonl.
    Ctrl-C writes a checkpoint at the next step and stops; --resume continues from OUTPUT/checkpoints/last.pt.
    """
    import os

    from sslrun.core.train.trainer import check_output_free, summary_line, train

    cfg = experiment_from_cli(
        config,
        overrides,
        method=method,
        pretext=pretext,
        encoder=encoder,
        dataset=dataset,
        root=root,
        data_dir=data_dir,
        epochs=epochs,
        max_steps=max_steps,
        batch_size=batch_size,
        lr=lr,
        output=output,
        seed=seed,
        device=device,
        num_workers=num_workers,
        resume=resume,
    )
    check_output_free(cfg)
    result = train(cfg)
    if os.environ.get("RANK", "0") != "0":
        return  # under torchrun only rank 0 prints (the process group is gone by now)
    if result.interrupted:
        typer.echo(
            f"stopped at step {result.steps}; resume with: sslrun train --config {result.output / 'config.toml'} "
            f"--resume"
        )
    typer.echo(summary_line(result))


# ---- eval / export (issue 8) ----------------------------------------------------------------------------------
CheckpointOpt = Annotated[
    str | None, typer.Option("--checkpoint", help="An sslrun checkpoint (OUTPUT/checkpoints/last.pt) or run directory.")
]
EvalDatasetOpt = Annotated[
    str | None, typer.Option(help="Labelled dataset to evaluate on (default: the checkpoint's pretraining dataset).")
]
FractionOpt = Annotated[
    float,
    typer.Option(
        "--label-fraction", min=0.0, max=1.0, help="Share of the train labels: 0.01, 0.1 or 1 (class-balanced)."
    ),
]
EvalSeedOpt = Annotated[int, typer.Option(help="Seed of the label subset (same seed = same images for every method).")]
EvalBatchOpt = Annotated[int, typer.Option(min=1, help="Batch size for feature extraction and fine-tuning.")]
MaxSamplesOpt = Annotated[int | None, typer.Option(min=1, help="Use only the first N images of each split (quick).")]
EvalOutputOpt = Annotated[
    str | None, typer.Option("--output", "-o", help="Directory for the JSON result (default: the checkpoint's).")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print only the JSON result.")]
SettingsOpt = Annotated[
    list[str] | None, typer.Option("--set", help="Dataset setting KEY=VALUE for --dataset, e.g. --set size=96.")
]


def _run_eval(kind: str, checkpoint: str | None, as_json: bool, options: dict[str, Any], **kwargs: Any) -> None:
    """Shared body of the `eval` commands: run, then print a rich table (or only the JSON)."""
    from sslrun.core.eval.evaluate import EvalOptions, evaluate, result_rows

    result, path = evaluate(kind, checkpoint, options=EvalOptions(**options), **kwargs)  # type: ignore[arg-type]
    if as_json:
        typer.echo(json.dumps(result.to_dict(), indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table("", "value", title=f"sslrun eval {kind}", show_header=False)
    for name, value in result_rows(result, path):
        table.add_row(name, value)
    Console(width=160).print(table)


@eval_app.command("knn")
@friendly
def eval_knn(
    checkpoint: CheckpointOpt = None,
    dataset: EvalDatasetOpt = None,
    label_fraction: FractionOpt = 1.0,
    seed: EvalSeedOpt = 0,
    data_dir: DataDirOpt = None,
    root: RootOpt = None,
    settings: SettingsOpt = None,
    device: DeviceOpt = None,
    batch_size: EvalBatchOpt = 256,
    max_samples: MaxSamplesOpt = None,
    num_workers: WorkersOpt = None,
    output: EvalOutputOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Weighted cosine kNN on frozen features (k=20 T=0.07 and k=200 T=0.1); see docs/evaluation.md."""
    _run_eval(
        "knn",
        checkpoint,
        as_json,
        {"label_fraction": label_fraction, "seed": seed, "device": device or "auto", "batch_size": batch_size}
        | {"max_samples": max_samples, "num_workers": num_workers or 1},
        dataset=dataset,
        data_dir=data_dir,
        root=root,
        dataset_kwargs=_dataset_kwargs(settings),
        output=output,
    )


@eval_app.command("linear")
@friendly
def eval_linear(
    checkpoint: CheckpointOpt = None,
    dataset: EvalDatasetOpt = None,
    label_fraction: FractionOpt = 1.0,
    epochs: Annotated[
        int | None, typer.Option(min=1, help="L-BFGS iterations, each one full pass over the features (300).")
    ] = None,
    seed: EvalSeedOpt = 0,
    data_dir: DataDirOpt = None,
    root: RootOpt = None,
    settings: SettingsOpt = None,
    device: DeviceOpt = None,
    batch_size: EvalBatchOpt = 256,
    max_samples: MaxSamplesOpt = None,
    num_workers: WorkersOpt = None,
    output: EvalOutputOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Linear probe on frozen, cached features (L-BFGS logistic regression, weight decay tuned on held-out labels)."""
    _run_eval(
        "linear",
        checkpoint,
        as_json,
        {"label_fraction": label_fraction, "seed": seed, "device": device or "auto", "batch_size": batch_size}
        | {"max_samples": max_samples, "epochs": epochs, "num_workers": num_workers or 1},
        dataset=dataset,
        data_dir=data_dir,
        root=root,
        dataset_kwargs=_dataset_kwargs(settings),
        output=output,
    )


@eval_app.command("finetune")
@friendly
def eval_finetune(
    checkpoint: CheckpointOpt = None,
    dataset: EvalDatasetOpt = None,
    label_fraction: FractionOpt = 1.0,
    epochs: Annotated[int | None, typer.Option(min=1, help="Epochs over the labelled subset (30).")] = None,
    lr: Annotated[float | None, typer.Option(help="Base lr per 256 images, SGD+Nesterov, cosine (0.05).")] = None,
    weight_decay: Annotated[float | None, typer.Option(help="Weight decay on weights (5e-4).")] = None,
    from_scratch: Annotated[
        bool, typer.Option("--from-scratch", help="Same recipe from random weights: the no-pretraining baseline.")
    ] = False,
    encoder: Annotated[
        str | None, typer.Option(help="Encoder for --from-scratch without --checkpoint (e.g. resnet18).")
    ] = None,
    seed: EvalSeedOpt = 0,
    data_dir: DataDirOpt = None,
    root: RootOpt = None,
    settings: SettingsOpt = None,
    device: DeviceOpt = None,
    batch_size: EvalBatchOpt = 256,
    max_samples: MaxSamplesOpt = None,
    num_workers: WorkersOpt = None,
    output: EvalOutputOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Fine-tune the whole encoder + a linear head on the labelled subset (light crop+flip), score on test."""
    _run_eval(
        "finetune",
        checkpoint,
        as_json,
        {"label_fraction": label_fraction, "seed": seed, "device": device or "auto", "batch_size": batch_size}
        | {"max_samples": max_samples, "epochs": epochs, "lr": lr, "weight_decay": weight_decay}
        | {"num_workers": num_workers or 1},
        dataset=dataset,
        data_dir=data_dir,
        root=root,
        dataset_kwargs=_dataset_kwargs(settings),
        output=output,
        from_scratch=from_scratch,
        encoder=encoder,
    )


@app.command("export")
@friendly
def export_cmd(
    checkpoint: Annotated[str, typer.Option("--checkpoint", help="An sslrun checkpoint or run directory.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="The file to write, e.g. encoder.pt.")],
    as_json: JsonOpt = False,
) -> None:
    """Write the encoder's weights alone (plain state_dict + metadata), loadable without sslrun."""
    from sslrun.core.eval.export import export_encoder

    meta = export_encoder(checkpoint, output)
    if as_json:
        typer.echo(json.dumps({"output": str(output), **meta}, indent=2))
        return
    typer.echo(
        f"wrote {output}: encoder {meta['encoder']} ({meta['output_dim']}-d, kwargs {meta['kwargs']}); "
        f"load it with torch.load({str(output)!r}, weights_only=True), see docs/evaluation.md"
    )


# ---- launch (issue 7) -----------------------------------------------------------------------------------------
@app.command("launch")
@friendly
def launch_cmd(
    config: ConfigFile = None,
    overrides: Overrides = None,
    method: MethodOpt = None,
    pretext: PretextOpt = None,
    encoder: EncoderOpt = None,
    dataset: DatasetOpt = None,
    root: RootOpt = None,
    data_dir: DataDirOpt = None,
    epochs: EpochsOpt = None,
    max_steps: MaxStepsOpt = None,
    batch_size: BatchOpt = None,
    lr: LrOpt = None,
    output: OutputOpt = None,
    seed: SeedOpt = None,
    device: DeviceOpt = None,
    num_workers: WorkersOpt = None,
    nodes: Annotated[int | None, typer.Option(min=1, help="Nodes to spread the workers over (needs --address).")] = (
        None
    ),
    gpus_per_node: Annotated[
        int | None, typer.Option(min=0, help="GPUs per node, one worker each (default: all local GPUs, else CPU).")
    ] = None,
    workers_per_node: Annotated[
        int | None, typer.Option(min=1, help="Workers per node (default: GPUs per node; 2 CPU workers locally).")
    ] = None,
    cpus_per_worker: Annotated[
        int | None, typer.Option(min=1, help="CPUs Ray reserves per worker (also caps its loader threads).")
    ] = None,
    address: Annotated[
        str | None,
        typer.Option(help="Ray cluster: auto, HOST:PORT or ray://HOST:10001 (default: start Ray on this machine)."),
    ] = None,
    storage_path: Annotated[
        str | None,
        typer.Option(help="Checkpoint storage seen by all nodes: NFS path, s3://..., gs://... (default OUTPUT/ray)."),
    ] = None,
    name: Annotated[str | None, typer.Option(help="Run name; the same name with --resume continues it.")] = None,
    max_failures: Annotated[
        int | None, typer.Option(min=0, help="Restarts from the last checkpoint after a worker dies (default 0).")
    ] = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue the run stored under the same storage path and name.")
    ] = False,
) -> None:
    """Train on a Ray cluster with Ray Train (DDP); with no --address, on a local Ray started here."""
    from sslrun.cluster.launcher import launch

    cfg = experiment_from_cli(
        config,
        overrides,
        method=method,
        pretext=pretext,
        encoder=encoder,
        dataset=dataset,
        root=root,
        data_dir=data_dir,
        epochs=epochs,
        max_steps=max_steps,
        batch_size=batch_size,
        lr=lr,
        output=output,
        seed=seed,
        device=device,
        num_workers=num_workers,
        resume=resume,
        extra={
            "cluster.nodes": nodes,
            "cluster.gpus_per_node": gpus_per_node,
            "cluster.workers_per_node": workers_per_node,
            "cluster.cpus_per_worker": cpus_per_worker,
            "cluster.address": address,
            "cluster.storage_path": storage_path,
            "cluster.name": name,
            "cluster.max_failures": max_failures,
        },
    )
    try:
        launch(cfg, echo=typer.echo)
    except KeyboardInterrupt:
        typer.echo("aborted", err=True)
        raise typer.Exit(130) from None


def main() -> None:
    """Console-script entry point."""
    app(prog_name="sslrun")


if __name__ == "__main__":
    sys.exit(main())
