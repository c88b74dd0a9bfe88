"""``sslrun eval finetune --tune``: the fine-tuning protocol with lr, weight decay and length chosen on held-out
labels (:mod:`sslrun.core.eval.tune`), end to end, like :func:`sslrun.core.eval.evaluate.evaluate`.

Same checkpoint handling, data, label subset and JSON file as ``evaluate("finetune", ...)``; the result's kind is
``finetune_tuned`` (``scratch_tuned`` from random weights), so it never overwrites an untuned result, and its
``details["tuning"]`` lists every setting tried with its held-out and train accuracy.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

from sslrun.core.errors import ConfigError
from sslrun.core.eval.evaluate import (
    EvalOptions,
    EvalResult,
    evaluate,
    label_subset,
    make_result,
)
from sslrun.core.eval.features import EvalData, Pretrained
from sslrun.core.eval.finetune import FinetuneOptions, read_labels
from sslrun.core.eval.tune import TuneGrid, tune_finetune
from sslrun.core.system import parse_device

__all__ = ["evaluate_tuned", "run_tuned_finetune"]


def run_tuned_finetune(pre: Pretrained, data: EvalData, opts: EvalOptions, grid: TuneGrid | None = None) -> EvalResult:
    """Tune on a held-out part of the labelled subset, retrain on all of it, score the test split once.

    Raises:
        ConfigError: ``opts`` fixes lr, weight decay or epochs (tuning chooses them).
    """
    fixed = [f for f in ("lr", "weight_decay", "epochs") if getattr(opts, f) is not None]
    if fixed:
        flags = ", ".join("--" + f.replace("_", "-") for f in fixed)
        raise ConfigError(f"--tune chooses lr, weight decay and epochs itself; drop {flags} or drop --tune")
    started = time.perf_counter()
    device = parse_device(opts.device)
    labels = read_labels(data.train, max_samples=opts.max_samples)
    indices = label_subset(labels, data, opts)
    tuned = tune_finetune(
        pre.encoder,
        num_classes=data.num_classes,
        train_path=data.train,
        indices=indices,
        test_path=data.test,
        image_size=pre.image_size,
        device=device,
        base=FinetuneOptions(batch_size=opts.batch_size, num_workers=opts.num_workers),
        grid=grid,
        seed=opts.seed,
        max_test_samples=opts.max_samples,
        log=lambda line: print(line, file=sys.stderr, flush=True),
    )
    out = tuned.outcome
    return make_result(
        "scratch_tuned" if pre.checkpoint is None else "finetune_tuned",
        pre,
        data,
        opts,
        top1=out.top1,
        top5=out.top5 if data.num_classes > 5 else None,
        num_labelled=int(indices.size),
        num_test=out.num_test,
        started=started,
        details=tuned.details(),
    )


def evaluate_tuned(
    kind: str,
    checkpoint: str | Path | None,
    *,
    dataset: str | None = None,
    data_dir: str | None = None,
    root: str | None = None,
    dataset_kwargs: dict[str, Any] | None = None,
    options: EvalOptions | None = None,
    from_scratch: bool = False,
    encoder: str | None = None,
    output: str | Path | None = None,
    grid: TuneGrid | None = None,
) -> tuple[EvalResult, Path]:
    """:func:`sslrun.core.eval.evaluate.evaluate` for ``kind="finetune"`` with tuning; same arguments, plus
    ``grid`` (default :class:`~sslrun.core.eval.tune.TuneGrid`). Returns ``(result, json_path)``.

    Raises:
        ConfigError / CheckpointError / DataError / PluginError: one line saying what to fix.
    """
    if kind != "finetune":
        raise ConfigError(f"--tune applies to `sslrun eval finetune` only, not {kind!r}")
    return evaluate(
        kind,
        checkpoint,
        dataset=dataset,
        data_dir=data_dir,
        root=root,
        dataset_kwargs=dataset_kwargs,
        options=options,
        from_scratch=from_scratch,
        encoder=encoder,
        output=output,
        protocol=lambda pre, data, opts: run_tuned_finetune(pre, data, opts, grid),
    )
