"""Downstream evaluation of a pretrained encoder: weighted kNN, linear probe, fine-tuning with few labels, and the
from-scratch baseline (``sslrun eval knn|linear|finetune``).

Every protocol reads the dataset's two labelled splits (``Dataset.eval_splits``: train, test), draws the same
class-balanced seeded label subset of the train split (:mod:`sslrun.core.eval.subsets`) and scores on the whole
test split:

* **knn** — weighted cosine kNN (Wu et al. 2018; DINO's ``eval_knn``) of frozen test features against the
  frozen features of the labelled subset, with both usual settings: k=20, T=0.07 (DINO) and k=200, T=0.1 (Wu
  et al., InstDisc; the online monitor's setting, reported as the headline ``top1``).
* **linear** — a linear classifier on frozen, cached features (:mod:`sslrun.core.eval.linear`).
* **finetune** — the whole encoder plus a linear head trained on the labelled subset
  (:mod:`sslrun.core.eval.finetune`); with ``from_scratch`` the same recipe from random initialisation, the
  baseline that shows what pretraining adds.

Results are :class:`EvalResult` objects, written as JSON next to the checkpoint:
``<ckpt dir>/eval_<kind>_<dataset>_<fraction>_seed<seed>.json``.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sslrun.core.config import DataCfg, ExperimentConfig, PluginRef
from sslrun.core.errors import ConfigError, DataError
from sslrun.core.eval.features import (
    EvalData,
    Pretrained,
    cached_features,
    load_pretrained,
    prepare_eval_data,
)
from sslrun.core.eval.probe_input import POOLED, check_features, grid_size
from sslrun.core.eval.subsets import balanced_subset
from sslrun.core.files import atomic_write_text
from sslrun.core.system import parse_device

__all__ = [
    "KNN_SETTINGS",
    "EvalOptions",
    "EvalResult",
    "PROTOCOLS",
    "evaluate",
    "label_subset",
    "make_result",
    "run_finetune",
    "run_knn",
    "run_linear",
    "scratch_encoder",
    "write_result",
]

#: (k, temperature) pairs of the kNN evaluation; the last one is the headline number.
KNN_SETTINGS: tuple[tuple[int, float], ...] = ((20, 0.07), (200, 0.1))
#: The protocols that read frozen features, and so take ``EvalOptions.features``.
FEATURE_KINDS = ("knn", "linear")
#: L-BFGS iterations of the linear probe when ``epochs`` is not given (each one is a full pass over the features).
LINEAR_DEFAULT_ITERS = 300
#: Fine-tuning epochs when ``epochs`` is not given.
FINETUNE_DEFAULT_EPOCHS = 30


@dataclass
class EvalOptions:
    """Knobs shared by the protocols.

    Attributes:
        label_fraction: share of the train split's labels used (class-balanced subset), in (0, 1].
        seed: seed of the label subset, of the probe's held-out split and of fine-tuning.
        device: ``auto``, ``cpu`` or ``cuda``.
        batch_size: feature-extraction and fine-tuning batch size.
        epochs: linear: L-BFGS iterations (default 300); finetune: epochs over the labelled subset (default 30).
        lr: fine-tuning base lr per 256 images (default 0.05, scaled linearly with the batch size).
        weight_decay: fine-tuning weight decay (default 5e-4).
        max_samples: use only the first N samples of each split (quick runs, tests).
        num_workers: FFCV loader threads.
        features: what kNN and the linear probe read: ``pooled`` (the encoder's output) or ``gridK`` (its last
            feature map average-pooled to K x K; :mod:`sslrun.core.eval.probe_input`).
    """

    label_fraction: float = 1.0
    seed: int = 0
    device: str = "auto"
    batch_size: int = 256
    epochs: int | None = None
    lr: float | None = None
    weight_decay: float | None = None
    max_samples: int | None = None
    num_workers: int = 1
    features: str = POOLED

    def __post_init__(self) -> None:
        grid_size(self.features)  # one line for an unknown name, before anything is loaded
        if not 0.0 < self.label_fraction <= 1.0:
            raise ConfigError(f"--label-fraction must be in (0, 1], got {self.label_fraction} (e.g. 0.01 for 1%)")
        if self.batch_size < 1:
            raise ConfigError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.epochs is not None and self.epochs < 1:
            raise ConfigError(f"--epochs must be >= 1, got {self.epochs}")
        if self.max_samples is not None and self.max_samples < 1:
            raise ConfigError(f"--max-samples must be >= 1, got {self.max_samples}")


@dataclass
class EvalResult:
    """One evaluation's outcome (what the JSON file holds).

    Attributes:
        kind: ``knn``, ``linear``, ``finetune`` or ``scratch`` (fine-tuning from random initialisation).
        dataset: the evaluation dataset.
        train_split, test_split: the labelled splits used.
        label_fraction: share of the train split's labels used.
        num_labelled: labelled training samples actually used.
        num_test: test samples scored.
        num_classes: classes of the dataset.
        seed: seed of the label subset (and of training).
        top1: headline top-1 accuracy on the test split, in [0, 1].
        top5: top-5 accuracy, or None where it does not apply (5 classes or fewer).
        seconds: wall time of the evaluation, data preparation and feature cache included.
        checkpoint: the evaluated checkpoint file, or None for a from-scratch run without one.
        checkpoint_step: the global step it was written at.
        encoder: the encoder plugin name.
        config: the pretraining experiment config (from the checkpoint).
        details: protocol-specific numbers (kNN settings, chosen weight decay, fine-tuning recipe and losses).
        features: the features kNN or the probe read (``pooled`` or ``gridK``; fine-tuning: always ``pooled``).
    """

    kind: str
    dataset: str
    train_split: str
    test_split: str
    label_fraction: float
    num_labelled: int
    num_test: int
    num_classes: int
    seed: int
    top1: float
    top5: float | None
    seconds: float
    checkpoint: str | None
    checkpoint_step: int | None
    encoder: str
    config: dict[str, Any] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)
    features: str = POOLED

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able data."""
        return asdict(self)

    def filename(self) -> str:
        """``eval_<kind>_<dataset>_<fraction>_seed<seed>.json`` (fraction as ``%g``: 0.01, 0.1, 1); ``<kind>``
        becomes ``<kind>-<features>`` for features other than ``pooled``, so the two never overwrite each other."""
        kind = self.kind if self.features == POOLED else f"{self.kind}-{self.features}"
        return f"eval_{kind}_{self.dataset}_{self.label_fraction:g}_seed{self.seed}.json"


def write_result(result: EvalResult, out_dir: Path) -> Path:
    """Write ``result`` as indented JSON into ``out_dir`` (created if needed); returns the file."""
    path = out_dir / result.filename()
    atomic_write_text(path, json.dumps(result.to_dict(), indent=2) + "\n")
    return path


# ---- shared pieces ---------------------------------------------------------------------------------------------
def _top5(num_classes: int, value: float) -> float | None:
    return value if num_classes > 5 else None


def label_subset(labels: torch.Tensor, data: EvalData, opts: EvalOptions) -> np.ndarray:
    """The labelled subset of the train split (indices into it); depends on labels, fraction and seed only."""
    return balanced_subset(labels.numpy(), opts.label_fraction, seed=opts.seed, num_classes=data.num_classes)


def make_result(
    kind: str,
    pre: Pretrained,
    data: EvalData,
    opts: EvalOptions,
    *,
    top1: float,
    top5: float | None,
    num_labelled: int,
    num_test: int,
    started: float,
    details: dict[str, Any],
) -> EvalResult:
    return EvalResult(
        kind=kind,
        dataset=data.dataset,
        train_split=data.train_split,
        test_split=data.test_split,
        label_fraction=opts.label_fraction,
        num_labelled=num_labelled,
        num_test=num_test,
        num_classes=data.num_classes,
        seed=opts.seed,
        top1=top1,
        top5=top5,
        seconds=round(time.perf_counter() - started, 3),
        checkpoint=str(pre.checkpoint) if pre.checkpoint else None,
        checkpoint_step=pre.step,
        encoder=pre.cfg.encoder.name,
        config=pre.cfg.to_dict(),
        details=details,
        features=opts.features if kind in FEATURE_KINDS else POOLED,
    )


def _features(pre: Pretrained, data: EvalData, opts: EvalOptions, device: torch.device) -> dict[str, Any]:
    """Train and test features (cached next to the checkpoint) and the label subset of the train split."""
    common = {
        "dataset": data.dataset,
        "device": device,
        "batch_size": opts.batch_size,
        "max_samples": opts.max_samples,
        "num_workers": opts.num_workers,
        "features": opts.features,
    }
    f_train, y_train, hit_train = cached_features(pre, data.train, split=data.train_split, **common)
    f_test, y_test, hit_test = cached_features(pre, data.test, split=data.test_split, **common)
    keep = y_test >= 0  # a test split with unlabelled samples: they cannot be scored
    f_test, y_test = f_test[keep], y_test[keep]
    if y_test.numel() == 0:
        raise DataError(f"split {data.test_split!r} of {data.dataset!r} has no labelled samples to score")
    idx = torch.from_numpy(label_subset(y_train, data, opts))
    return {
        "train": (f_train[idx], y_train[idx]),
        "test": (f_test, y_test),
        "cache_hit": bool(hit_train and hit_test),
    }


# ---- protocols ----------------------------------------------------------------------------------------------------
def run_knn(pre: Pretrained, data: EvalData, opts: EvalOptions) -> EvalResult:
    """Weighted cosine kNN of the test split against the labelled subset, for every :data:`KNN_SETTINGS` pair.

    The headline ``top1``/``top5`` are those of the last setting (k=200, T=0.1: the online monitor's, so the
    offline number continues its curve); every setting is in ``details["settings"]``.
    """
    from sslrun.core.train.knn import knn_accuracy

    started = time.perf_counter()
    device = parse_device(opts.device)
    feats = _features(pre, data, opts, device)
    (bank, bank_y), (query, query_y) = feats["train"], feats["test"]
    settings = []
    for k, t in KNN_SETTINGS:
        acc = knn_accuracy(
            query.to(device), query_y.to(device), bank.to(device), bank_y.to(device), data.num_classes, k=k, t=t
        )
        settings.append({"k": k, "t": t, "top1": acc[1], "top5": _top5(data.num_classes, acc[5])})
    head = settings[-1]
    return make_result(
        "knn",
        pre,
        data,
        opts,
        top1=head["top1"],
        top5=head["top5"],
        num_labelled=int(bank_y.numel()),
        num_test=int(query_y.numel()),
        started=started,
        details={"settings": settings, "feature_dim": int(bank.shape[1]), "feature_cache_hit": feats["cache_hit"]},
    )


def run_linear(pre: Pretrained, data: EvalData, opts: EvalOptions) -> EvalResult:
    """A linear probe on frozen features of the labelled subset, scored on the test split."""
    from sslrun.core.eval.linear import DEFAULT_WEIGHT_DECAYS, topk_accuracy, train_linear_probe

    started = time.perf_counter()
    device = parse_device(opts.device)
    feats = _features(pre, data, opts, device)
    (x, y), (xt, yt) = feats["train"], feats["test"]
    iters = opts.epochs or LINEAR_DEFAULT_ITERS
    probe = train_linear_probe(
        x.to(device),
        y.to(device),
        data.num_classes,
        max_iter=iters,
        seed=opts.seed,
        weight_decays=DEFAULT_WEIGHT_DECAYS,
    )
    test_acc = topk_accuracy(probe.logits(xt.to(device)), yt, (1, 5))
    train_acc = topk_accuracy(probe.logits(x.to(device)), y, (1,))[1]
    return make_result(
        "linear",
        pre,
        data,
        opts,
        top1=test_acc[1],
        top5=_top5(data.num_classes, test_acc[5]),
        num_labelled=int(y.numel()),
        num_test=int(yt.numel()),
        started=started,
        details={
            "solver": "lbfgs",
            "max_iter": iters,
            "weight_decay": probe.weight_decay,
            "val_accuracy": {f"{k:g}": v for k, v in probe.val_accuracy.items()},
            "train_top1": train_acc,
            "feature_dim": int(x.shape[1]),
            "feature_cache_hit": feats["cache_hit"],
        },
    )


def run_finetune(pre: Pretrained, data: EvalData, opts: EvalOptions) -> EvalResult:
    """Fine-tune the whole encoder plus a linear head on the labelled subset; score on the test split.

    Args:
        pre: the encoder to start from; a randomly initialised one (no checkpoint, from :func:`scratch_encoder`)
            is the from-scratch baseline and its result is labelled ``scratch``.
        data: the labelled splits.
        opts: shared options (``epochs``, ``lr``, ``weight_decay``, ``batch_size`` ...).
    """
    from sslrun.core.eval.finetune import FinetuneOptions, finetune, read_labels

    started = time.perf_counter()
    device = parse_device(opts.device)
    labels = read_labels(data.train, max_samples=opts.max_samples)
    indices = label_subset(labels, data, opts)
    ft = FinetuneOptions(
        epochs=opts.epochs or FINETUNE_DEFAULT_EPOCHS,
        batch_size=opts.batch_size,
        num_workers=opts.num_workers,
        **({"lr": opts.lr} if opts.lr is not None else {}),
        **({"weight_decay": opts.weight_decay} if opts.weight_decay is not None else {}),
    )
    out = finetune(
        pre.encoder,
        num_classes=data.num_classes,
        train_path=data.train,
        indices=indices,
        test_path=data.test,
        image_size=pre.image_size,
        device=device,
        opts=ft,
        seed=opts.seed,
        max_test_samples=opts.max_samples,
    )
    return make_result(
        "scratch" if pre.checkpoint is None else "finetune",
        pre,
        data,
        opts,
        top1=out.top1,
        top5=_top5(data.num_classes, out.top5),
        num_labelled=int(indices.size),
        num_test=out.num_test,
        started=started,
        details={"recipe": asdict(ft), "steps": out.steps, "final_loss": out.final_loss, "epoch_loss": out.epoch_loss},
    )


#: The protocols ``evaluate`` runs, by the name the ``sslrun eval`` commands give them.
PROTOCOLS: dict[str, Callable[[Pretrained, EvalData, EvalOptions], EvalResult]] = {
    "knn": run_knn,
    "linear": run_linear,
    "finetune": run_finetune,
}


# ---- entry point ----------------------------------------------------------------------------------------------
def scratch_encoder(cfg: ExperimentConfig, image_size: int, seed: int) -> Pretrained:
    """A randomly initialised encoder with the architecture ``cfg`` names (seeded, so baselines reproduce)."""
    from sslrun.core.plugins.resolve import build_encoder

    with torch.random.fork_rng(devices=[]):  # seeded without touching the caller's global RNG state
        torch.manual_seed(seed)
        encoder = build_encoder(cfg, image_size)
    return Pretrained(cfg=cfg, encoder=encoder, image_size=image_size)


def _eval_data_cfg(
    base: DataCfg | None,
    dataset: str | None,
    data_dir: str | None,
    root: str | None,
    dataset_kwargs: dict[str, Any] | None,
    num_workers: int,
) -> DataCfg:
    """The data config of the evaluation: the checkpoint's, with ``--dataset``/``--data-dir``/``--root``/``--set``
    on top. A different dataset drops the pretraining dataset's kwargs and raw-file root (they belong to it)."""
    if base is None:
        if dataset is None:
            raise ConfigError("--dataset is required when there is no --checkpoint to take it from")
        base = DataCfg(dataset=dataset)
    kwargs, base_root = dict(base.dataset_kwargs), base.root
    if dataset is not None and dataset != base.dataset:
        kwargs, base_root = {}, None
    kwargs.update(dataset_kwargs or {})
    return DataCfg(
        dataset=dataset or base.dataset,
        dataset_kwargs=kwargs,
        root=root if root is not None else base_root,
        data_dir=data_dir or base.data_dir,
        format=base.format,
        num_workers=num_workers,
    )


def evaluate(
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
    protocol: Callable[[Pretrained, EvalData, EvalOptions], EvalResult] | None = None,
) -> tuple[EvalResult, Path]:
    """Run one evaluation end to end and write its JSON file.

    Args:
        kind: a :data:`PROTOCOLS` name: ``knn``, ``linear`` or ``finetune``.
        checkpoint: an sslrun checkpoint (or a run directory); optional only for ``from_scratch``.
        dataset: evaluation dataset (default: the checkpoint's pretraining dataset).
        data_dir: cache of prepared .beton files (default: the checkpoint's).
        root: raw files of the dataset.
        dataset_kwargs: dataset plugin settings on top of the checkpoint's (e.g. ``{"size": 96}``).
        options: fraction, seed, device, epochs ...
        from_scratch: fine-tune the checkpoint's encoder architecture (or ``encoder``) from random weights.
        encoder: encoder plugin for ``from_scratch`` without a checkpoint.
        output: directory for the JSON (default: the checkpoint's directory; ``runs/eval`` without one).
        protocol: run this instead of ``PROTOCOLS[kind]`` (e.g. the tuned fine-tune of
            :mod:`sslrun.core.eval.tuned_eval`); the loading, checks and result file stay the same.

    Returns:
        ``(result, json_path)``.

    Raises:
        ConfigError / CheckpointError / DataError / PluginError: one line saying what to fix.
    """
    opts = options or EvalOptions()
    if kind not in PROTOCOLS:
        raise ConfigError(f"unknown evaluation {kind!r}; choose {', '.join(PROTOCOLS)}")
    if from_scratch and kind != "finetune":
        raise ConfigError("--from-scratch only applies to `sslrun eval finetune` (kNN/linear need trained weights)")
    if opts.features != POOLED and kind not in FEATURE_KINDS:
        raise ConfigError(f"--features {opts.features} applies to knn and linear; fine-tuning trains the whole encoder")
    if checkpoint is None and not from_scratch:
        raise ConfigError(f"`sslrun eval {kind}` needs --checkpoint PATH (a run's checkpoints/last.pt)")
    if encoder is not None and checkpoint is not None:
        raise ConfigError("--encoder is only for --from-scratch without a checkpoint (the checkpoint names one)")
    started = time.perf_counter()
    if checkpoint is not None:
        pre = load_pretrained(checkpoint)
        data_cfg = _eval_data_cfg(pre.cfg.data, dataset, data_dir, root, dataset_kwargs, opts.num_workers)
        if from_scratch:
            pre = scratch_encoder(pre.cfg, pre.image_size, opts.seed)
        out_dir = Path(output) if output else _results_dir(checkpoint)
    else:
        data_cfg = _eval_data_cfg(None, dataset, data_dir, root, dataset_kwargs, opts.num_workers)
        cfg = ExperimentConfig(encoder=PluginRef(encoder or "small_cnn"), data=data_cfg)
        from sslrun.core.plugins.resolve import build_dataset

        image_size = int(build_dataset(cfg).info().image_size)
        pre = scratch_encoder(cfg, image_size, opts.seed)
        out_dir = Path(output) if output else Path("runs") / "eval"
    check_features(pre.encoder, opts.features, pre.cfg.encoder.name)
    data = prepare_eval_data(data_cfg)
    result = (protocol or PROTOCOLS[kind])(pre, data, opts)
    result.seconds = round(time.perf_counter() - started, 3)
    if checkpoint is not None and from_scratch:
        result.details["architecture_from"] = str(Path(checkpoint).resolve())  # no weights taken from it
    if not math.isfinite(result.top1):
        raise DataError(f"evaluation produced a non-finite accuracy ({result.top1}); check the data")
    return result, write_result(result, out_dir)


def _results_dir(checkpoint: str | Path) -> Path:
    """Where results of ``checkpoint`` go: the checkpoint file's directory (a run directory's ``checkpoints/``)."""
    p = Path(checkpoint)
    if p.is_dir():
        return p / "checkpoints" if (p / "checkpoints").is_dir() else p
    return p.parent
