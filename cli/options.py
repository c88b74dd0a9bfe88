"""The command-line options that more than one command takes, each declared once, and the option groups.

Each option is one ``Annotated`` alias (its flag names and help); an option that only one command has is declared
at that command. Options that a family of commands takes together are the fields of a dataclass
(:class:`ExperimentFlags` for ``train``/``launch``, :class:`EvalFlags` for the ``eval`` commands): a command takes
the dataclass as one parameter, and :func:`expand_flags` shows Typer its fields as the individual options (Typer
cannot share ``**kwargs`` between commands).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

__all__ = ["EvalFlags", "ExperimentFlags", "expand_flags"]

# ---- the experiment: `config show`, `train`, `launch` ---------------------------------------------------------
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
DataDirOpt = Annotated[
    str | None,
    typer.Option(help="Cache of prepared .beton files: a path or s3:// / gs:// URI (default ~/.cache/sslrun)."),
]
EpochsOpt = Annotated[int | None, typer.Option(min=1, help="Training epochs.")]
MaxStepsOpt = Annotated[int | None, typer.Option(min=1, help="Stop after this many global steps.")]
BatchOpt = Annotated[int | None, typer.Option(min=1, help="GLOBAL batch size (split across workers).")]
LrOpt = Annotated[float | None, typer.Option(help="Base lr per 256 images (scaled linearly with batch size).")]
OutputOpt = Annotated[str | None, typer.Option("--output", "-o", help="Output directory of the run.")]
SeedOpt = Annotated[int | None, typer.Option(help="Random seed.")]
DeviceOpt = Annotated[str | None, typer.Option(help="auto, cpu or cuda.")]
WorkersOpt = Annotated[int | None, typer.Option(min=1, help="FFCV loader threads per process.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON.")]


@dataclass
class ExperimentFlags:
    """The experiment options ``train`` and ``launch`` share; the field names are
    :func:`sslrun.cli.common.experiment_from_cli`'s keyword arguments."""

    config: ConfigFile = None
    overrides: Overrides = None
    method: MethodOpt = None
    pretext: PretextOpt = None
    encoder: EncoderOpt = None
    dataset: DatasetOpt = None
    root: RootOpt = None
    data_dir: DataDirOpt = None
    epochs: EpochsOpt = None
    max_steps: MaxStepsOpt = None
    batch_size: BatchOpt = None
    lr: LrOpt = None
    output: OutputOpt = None
    seed: SeedOpt = None
    device: DeviceOpt = None
    num_workers: WorkersOpt = None


# ---- evaluation: `eval knn|linear|finetune` -------------------------------------------------------------------
CheckpointOpt = Annotated[
    str | None,
    typer.Option(
        "--checkpoint",
        help="An sslrun checkpoint (OUTPUT/checkpoints/last.pt) or run directory, or a URI: s3://bucket/runs/NAME "
        "(its newest checkpoint), a checkpoint_* directory, or a checkpoint file.",
    ),
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
ResultJsonOpt = Annotated[bool, typer.Option("--json", help="Print only the JSON result.")]
SettingsOpt = Annotated[
    list[str] | None, typer.Option("--set", help="Dataset setting KEY=VALUE for --dataset, e.g. --set size=96.")
]


@dataclass
class EvalFlags:
    """The options every ``eval`` command takes."""

    checkpoint: CheckpointOpt = None
    dataset: EvalDatasetOpt = None
    label_fraction: FractionOpt = 1.0
    seed: EvalSeedOpt = 0
    data_dir: DataDirOpt = None
    root: RootOpt = None
    settings: SettingsOpt = None
    device: DeviceOpt = None
    batch_size: EvalBatchOpt = 256
    max_samples: MaxSamplesOpt = None
    num_workers: WorkersOpt = None
    output: EvalOutputOpt = None
    as_json: ResultJsonOpt = False


# ---- sharing a group between commands --------------------------------------------------------------------------
F = TypeVar("F", bound=Callable[..., Any])


def expand_flags(fn: F) -> F:
    """Let a command take an option group: each parameter whose annotation is a dataclass (``flags:
    ExperimentFlags``) is shown to Typer as that dataclass's fields, in place, and is rebuilt from them before
    ``fn`` runs. Every parameter becomes keyword-only (Typer passes all of them by name).

    Raises:
        TypeError: a field of a group has the name of another parameter of ``fn``.
    """
    groups: dict[str, type] = {}
    params: list[inspect.Parameter] = []
    for p in inspect.signature(fn, eval_str=True).parameters.values():
        if not (isinstance(p.annotation, type) and dataclasses.is_dataclass(p.annotation)):
            params.append(p.replace(kind=inspect.Parameter.KEYWORD_ONLY))
            continue
        groups[p.name] = p.annotation
        hints = typing.get_type_hints(p.annotation, include_extras=True)
        params += [
            inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default, annotation=hints[f.name])
            for f in dataclasses.fields(p.annotation)
        ]
    names = [p.name for p in params]
    if len(set(names)) != len(names):
        raise TypeError(f"{fn.__name__}: an option group repeats a parameter name ({names})")

    @functools.wraps(fn)
    def wrapper(**kwargs: Any) -> Any:
        for name, group in groups.items():
            kwargs[name] = group(**{f.name: kwargs.pop(f.name) for f in dataclasses.fields(group)})
        return fn(**kwargs)

    wrapper.__signature__ = inspect.Signature(params, return_annotation=None)  # type: ignore[attr-defined]
    wrapper.__annotations__ = {p.name: p.annotation for p in params}
    return wrapper  # type: ignore[return-value]
