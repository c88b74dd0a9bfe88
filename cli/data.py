"""``sslrun data prepare|inspect``: datasets as FFCV .beton files, and what is in one."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from sslrun.cli.common import dataset_settings, friendly
from sslrun.cli.options import DataDirOpt, JsonOpt, RootOpt

app = typer.Typer(help="Prepare datasets as FFCV .beton files and inspect them.")


@app.command("prepare")
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
        list[str] | None,
        typer.Option(
            "--set",
            help="Dataset setting KEY=VALUE, e.g. --set size=96 or --set max_side=256 --set jpeg_quality=85 "
            "(imagefolder).",
        ),
    ] = None,
    workers: Annotated[int, typer.Option(min=1, help="Writer processes (1 = in this process).")] = 1,
    force: Annotated[bool, typer.Option("--force", help="Prepare again even if a valid cached file exists.")] = False,
) -> None:
    """Write a dataset split as an FFCV .beton (+ manifest) into the cache (or --output); reused when cached."""
    import warnings

    from sslrun.core.config import DataCfg, coerce_dataclass
    from sslrun.core.data.cache import prepare_dataset

    data: dict[str, Any] = {"dataset": name, "dataset_kwargs": dataset_settings(settings), "root": root, "format": fmt}
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
        stored = f"jpg quality {m.jpeg_quality}" if m.jpeg_quality is not None else m.image_format
        typer.echo(f"{name}/{s}: {m.num_samples} samples, {h}x{w}, {stored} -> {path} ({state})")


@app.command("inspect")
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
    as_json: JsonOpt = False,
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
    typer.echo("\n".join(summary_lines(info)))


def summary_lines(info: dict[str, Any]) -> list[str]:
    """The plain-text ``data inspect`` report of a :func:`sslrun.core.data.inspect.summarize` dict."""
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
    return lines
