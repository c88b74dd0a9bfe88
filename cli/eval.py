"""``sslrun eval knn|linear|finetune`` (downstream evaluation of a pretrained encoder) and ``sslrun export`` (its
weights alone). The protocols live in :mod:`sslrun.core.eval`; this module parses flags and prints results."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from sslrun.cli.common import dataset_settings, friendly, print_table
from sslrun.cli.options import EvalFlags, ResultJsonOpt, expand_flags

if TYPE_CHECKING:
    from sslrun.core.eval.evaluate import EvalResult

FeaturesOpt = Annotated[
    str,
    typer.Option(
        help="Features read: 'pooled' (the encoder's output) or 'gridK', its last feature map average-pooled to "
        "K x K and flattened (e.g. grid2; CNNs and ViTs).",
    ),
]

app = typer.Typer(help="Downstream evaluation of a pretrained encoder: knn, linear, finetune.")


def _evaluate(
    kind: str,
    flags: EvalFlags,
    *,
    epochs: int | None = None,
    lr: float | None = None,
    weight_decay: float | None = None,
    from_scratch: bool = False,
    encoder: str | None = None,
    tune: bool = False,
    features: str = "pooled",
) -> None:
    """Run one evaluation, then print a rich table of it (or only its JSON)."""
    from sslrun.core.eval.checkpoint_uri import local_checkpoint
    from sslrun.core.eval.evaluate import EvalOptions, evaluate

    options = EvalOptions(
        label_fraction=flags.label_fraction,
        seed=flags.seed,
        device=flags.device or "auto",
        batch_size=flags.batch_size,
        epochs=epochs,
        lr=lr,
        weight_decay=weight_decay,
        max_samples=flags.max_samples,
        num_workers=flags.num_workers or 1,
        features=features,
    )
    from sslrun.core.eval.tuned_eval import evaluate_tuned

    run = evaluate_tuned if tune else evaluate  # tuned: lr, weight decay and epochs chosen on held-out labels
    result, path = run(
        kind,
        local_checkpoint(flags.checkpoint) if flags.checkpoint is not None else None,
        dataset=flags.dataset,
        data_dir=flags.data_dir,
        root=flags.root,
        dataset_kwargs=dataset_settings(flags.settings),
        options=options,
        from_scratch=from_scratch,
        encoder=encoder,
        output=flags.output,
    )
    if flags.as_json:
        typer.echo(json.dumps(result.to_dict(), indent=2))
        return
    print_table(("", "value"), result_rows(result, path), title=f"sslrun eval {kind}", show_header=False)


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}%"


def result_rows(result: EvalResult, json_path: Path | None = None) -> list[tuple[str, str]]:
    """``(field, value)`` rows summarising ``result`` for the table the ``eval`` commands print."""
    d = result.details
    rows = [
        ("protocol", {"scratch": "finetune from scratch (baseline)"}.get(result.kind, result.kind)),
        ("dataset", f"{result.dataset} ({result.train_split} -> {result.test_split}, {result.num_classes} classes)"),
        ("labels", f"{result.label_fraction:g} of {result.train_split}: {result.num_labelled} images"),
        ("seed", str(result.seed)),
        ("test images", str(result.num_test)),
        ("top-1", _pct(result.top1)),
        ("top-5", _pct(result.top5)),
    ]
    if result.kind in ("knn", "linear"):
        rows += [("features", f"{result.features} ({d['feature_dim']}-d)")]
    if result.kind == "knn":
        for st in d["settings"]:
            rows.append((f"kNN k={st['k']} T={st['t']:g}", f"{_pct(st['top1'])} (top-5 {_pct(st['top5'])})"))
    elif result.kind == "linear":
        rows += [("weight decay", f"{d['weight_decay']:g} (chosen on a held-out 20% of the labels)")]
        rows += [("train top-1", _pct(d["train_top1"]))]
    else:
        recipe = d["recipe"]
        rows += [("recipe", f"{recipe['epochs']} epochs, {d['steps']} steps, lr {recipe['lr']:g}/256, SGD+cosine")]
        rows += [("final train loss", f"{d['final_loss']:.4f}")]
        if "tuning" in d:
            t = d["tuning"]
            rows += [
                (
                    "tuned",
                    f"{len(t['trials'])} settings on {t['num_fit']} images, best held-out top-1 "
                    f"{_pct(t['chosen']['heldout_top1'])} of {t['num_heldout']}; train top-1 {_pct(d['train_top1'])}",
                )
            ]
    rows += [("seconds", f"{result.seconds:.1f}")]
    rows += [("checkpoint", f"{result.checkpoint} (step {result.checkpoint_step})" if result.checkpoint else "none")]
    if json_path is not None:
        rows += [("json", str(json_path))]
    return rows


@app.command("knn")
@friendly
@expand_flags
def eval_knn(flags: EvalFlags, features: FeaturesOpt = "pooled") -> None:
    """Weighted cosine kNN on frozen features (k=20 T=0.07 and k=200 T=0.1); see docs/evaluation.md."""
    _evaluate("knn", flags, features=features)


@app.command("linear")
@friendly
@expand_flags
def eval_linear(
    flags: EvalFlags,
    epochs: Annotated[
        int | None, typer.Option(min=1, help="L-BFGS iterations, each one full pass over the features (300).")
    ] = None,
    features: FeaturesOpt = "pooled",
) -> None:
    """Linear probe on frozen, cached features (L-BFGS logistic regression, weight decay tuned on held-out labels)."""
    _evaluate("linear", flags, epochs=epochs, features=features)


@app.command("finetune")
@friendly
@expand_flags
def eval_finetune(
    flags: EvalFlags,
    epochs: Annotated[int | None, typer.Option(min=1, help="Epochs over the labelled subset (30).")] = None,
    lr: Annotated[float | None, typer.Option(help="Base lr per 256 images, SGD+Nesterov, cosine (0.05).")] = None,
    weight_decay: Annotated[float | None, typer.Option(help="Weight decay on weights (5e-4).")] = None,
    from_scratch: Annotated[
        bool, typer.Option("--from-scratch", help="Same recipe from random weights: the no-pretraining baseline.")
    ] = False,
    encoder: Annotated[
        str | None, typer.Option(help="Encoder for --from-scratch without --checkpoint (e.g. resnet18).")
    ] = None,
    tune: Annotated[
        bool,
        typer.Option(
            "--tune",
            help="Choose lr, weight decay and epochs on a held-out 20% of the labelled subset (pad+crop+flip), "
            "then retrain on all of it; see docs/evaluation.md.",
        ),
    ] = False,
) -> None:
    """Fine-tune the whole encoder + a linear head on the labelled subset (light crop+flip), score on test."""
    _evaluate(
        "finetune",
        flags,
        epochs=epochs,
        lr=lr,
        weight_decay=weight_decay,
        from_scratch=from_scratch,
        encoder=encoder,
        tune=tune,
    )


@friendly
def export(
    checkpoint: Annotated[
        str,
        typer.Option(
            "--checkpoint",
            help="An sslrun checkpoint or run directory, or a URI: s3://bucket/runs/NAME (its newest checkpoint), "
            "a checkpoint_* directory in it, or a checkpoint file.",
        ),
    ],
    output: Annotated[Path, typer.Option("--output", "-o", help="The file to write, e.g. encoder.pt.")],
    as_json: ResultJsonOpt = False,
) -> None:
    """Write the encoder's weights alone (plain state_dict + metadata), loadable without sslrun."""
    from sslrun.core.data.remote import is_uri
    from sslrun.core.eval.checkpoint_uri import fetch_checkpoint
    from sslrun.core.eval.export import export_encoder

    source = None
    if is_uri(checkpoint):  # recorded as the checkpoint file's URI, without the query (it may hold credentials)
        checkpoint, source = fetch_checkpoint(checkpoint)
    meta = export_encoder(checkpoint, output, source=source)
    if as_json:
        typer.echo(json.dumps({"output": str(output), **meta}, indent=2))
        return
    typer.echo(
        f"wrote {output}: encoder {meta['encoder']} ({meta['output_dim']}-d, kwargs {meta['kwargs']}); "
        f"load it with torch.load({str(output)!r}, weights_only=True), see docs/evaluation.md"
    )
