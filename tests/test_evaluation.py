"""Downstream evaluation: label subsets, the linear probe's solver, kNN wiring, checkpoint errors, and the whole
path (real trainer checkpoint -> real .beton files -> FFCV loaders -> kNN / linear / fine-tune / CLI JSON).

The integration data is an image folder whose class is obvious from its colour (4 colours, random brightness,
a dark distractor patch and pixel noise), so any encoder that keeps colour information separates it: accuracies
below ~0.9 there mean the evaluation wiring is broken (labels misaligned with features, wrong subset, ...).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from sslrun.cli import app
from sslrun.core.errors import CheckpointError, ConfigError, DataError
from sslrun.core.eval.linear import DEFAULT_WEIGHT_DECAYS, fit_logistic, topk_accuracy, train_linear_probe
from sslrun.core.eval.subsets import balanced_subset, holdout_split

COLOURS = np.array([(210, 40, 40), (40, 190, 40), (40, 60, 220), (220, 200, 30)], dtype=np.float32)


# ---- label subsets ------------------------------------------------------------------------------------------------
def _labels() -> np.ndarray:
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(10), 103)
    y[rng.choice(y.size, 40, replace=False)] = -1  # some unlabelled samples: never picked
    return rng.permutation(y)


@pytest.mark.parametrize("fraction", [0.01, 0.1, 0.37, 1.0])
def test_subsets_are_balanced_reproducible_and_nested(fraction: float) -> None:
    y = _labels()
    idx = balanced_subset(y, fraction, seed=3)
    labelled = int((y >= 0).sum())
    assert idx.size == (labelled if fraction == 1.0 else max(10, round(fraction * labelled)))
    assert (np.diff(idx) > 0).all() and (y[idx] >= 0).all()
    counts = np.bincount(y[idx], minlength=10)
    assert counts.max() - counts.min() <= 1 or fraction == 1.0  # 100% keeps the natural (uneven) counts
    np.testing.assert_array_equal(idx, balanced_subset(y, fraction, seed=3))  # same seed -> same indices
    if fraction < 1.0:
        assert not np.array_equal(idx, balanced_subset(y, fraction, seed=4))
        smaller = balanced_subset(y, fraction / 10, seed=3)
        assert set(smaller.tolist()) <= set(idx.tolist())  # 1% inside 10% inside 100% for one seed
    # depends only on labels, fraction and seed: a copy of the labels gives the same subset
    np.testing.assert_array_equal(idx, balanced_subset(y.copy(), fraction, seed=3, num_classes=10))


def test_subset_with_a_small_class_and_bad_input() -> None:
    y = np.concatenate([np.zeros(3, np.int64), np.ones(200, np.int64), np.full(200, 2)])
    idx = balanced_subset(y, 0.1, seed=0)
    counts = np.bincount(y[idx])
    assert idx.size == 40 and counts[0] == 3  # the small class gives everything it has ...
    assert abs(int(counts[1]) - int(counts[2])) <= 1  # ... and the rest is shared evenly
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ConfigError, match="label fraction"):
            balanced_subset(y, bad)
    with pytest.raises(DataError, match="no labelled samples"):
        balanced_subset(np.full(10, -1), 0.5)


def test_holdout_split_is_disjoint_balanced_and_keeps_every_class() -> None:
    y = np.concatenate([np.repeat(np.arange(4), 25), [4]])  # class 4 has a single sample
    fit, held = holdout_split(y, 0.2, seed=1)
    assert not set(fit) & set(held) and sorted([*fit, *held]) == list(range(y.size))
    assert held.size == 20 and 4 in y[fit]
    assert np.bincount(y[held], minlength=5)[:4].tolist() == [5, 5, 5, 5]
    np.testing.assert_array_equal(held, holdout_split(y, 0.2, seed=1)[1])


# ---- linear probe -------------------------------------------------------------------------------------------------
def _naive_objective(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, b: torch.Tensor, wd: float) -> torch.Tensor:
    """mean_i -log softmax(x_i W^T + b)_{y_i} + wd/2 ||W||^2, written out by hand in float64."""
    z = x.double() @ w.double().T + b.double()  # (N, C)
    m = z.max(dim=1, keepdim=True).values
    log_p = z - (m + torch.log(torch.exp(z - m).sum(dim=1, keepdim=True)))
    return -log_p[torch.arange(len(y)), y].mean() + 0.5 * wd * (w.double() ** 2).sum()


@pytest.mark.parametrize("wd", [1e-1, 1e-3])
def test_fit_logistic_reaches_the_optimum_of_the_naive_objective(wd: float) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 12, generator=g)
    y = (x[:, :3].argmax(1) + (torch.rand(300, generator=g) < 0.2).long()) % 3  # noisy, not separable
    w, b = fit_logistic(x, y, 3, wd, max_iter=500)
    w64, b64 = w.double().requires_grad_(), b.double().requires_grad_()
    grad_w, grad_b = torch.autograd.grad(_naive_objective(x, y, w64, b64, wd), (w64, b64))
    assert grad_w.abs().max() < 1e-4 and grad_b.abs().max() < 1e-4  # stationary point of a strictly convex loss
    # and no perturbation does better (the naive objective, not the solver's, decides)
    best = _naive_objective(x, y, w, b, wd)
    for _ in range(5):
        dw = 1e-2 * torch.randn(w.shape, generator=g)
        assert _naive_objective(x, y, w + dw, b, wd) > best


def test_linear_probe_tunes_on_heldout_labels_and_classifies() -> None:
    g = torch.Generator().manual_seed(1)
    centers = 3 * torch.randn(5, 32, generator=g)
    y = torch.arange(400) % 5
    x = centers[y] + torch.randn(400, 32, generator=g) + 100.0  # large offset: the standardisation handles it
    yt = torch.arange(200) % 5
    xt = centers[yt] + torch.randn(200, 32, generator=g) + 100.0
    probe = train_linear_probe(x, y, 5, max_iter=100, seed=0)
    assert set(probe.val_accuracy) == set(DEFAULT_WEIGHT_DECAYS)
    best = max(probe.val_accuracy.values())
    assert probe.val_accuracy[probe.weight_decay] == best
    assert probe.weight_decay == max(wd for wd, acc in probe.val_accuracy.items() if acc == best)  # ties: stronger
    assert topk_accuracy(probe.logits(xt), yt, (1,))[1] > 0.95
    # random labels: the probe cannot beat chance on new data
    y_rand = torch.randint(0, 5, (400,), generator=g)
    probe_rand = train_linear_probe(x, y_rand, 5, max_iter=100)
    assert topk_accuracy(probe_rand.logits(xt), torch.randint(0, 5, (200,), generator=g), (1,))[1] < 0.4


# ---- kNN wiring with stand-in features ----------------------------------------------------------------------------
def test_knn_uses_the_label_subset_as_bank_and_reports_both_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    from sslrun.core.config import ExperimentConfig
    from sslrun.core.eval import evaluate as evaluation
    from sslrun.core.eval.features import EvalData, Pretrained
    from sslrun.core.train.knn import knn_accuracy

    g = torch.Generator().manual_seed(0)
    centers = torch.randn(8, 16, generator=g)
    y_train, y_test = torch.arange(800) % 8, torch.arange(160) % 8
    f_train = centers[y_train] + 0.8 * torch.randn(800, 16, generator=g)
    f_test = centers[y_test] + 0.8 * torch.randn(160, 16, generator=g)
    splits = {"train": (f_train, y_train), "test": (f_test, y_test)}

    def stand_in(pre: object, path: Path, *, split: str, **_: object) -> tuple[torch.Tensor, torch.Tensor, bool]:
        return (*splits[split], False)

    monkeypatch.setattr(evaluation, "cached_features", stand_in)
    pre = Pretrained(cfg=ExperimentConfig(), encoder=torch.nn.Identity(), image_size=16)
    data = EvalData("toy", "train", "test", Path("train.beton"), Path("test.beton"), 8)
    res = evaluation.run_knn(pre, data, evaluation.EvalOptions(label_fraction=0.1, seed=2, device="cpu"))
    idx = torch.from_numpy(balanced_subset(y_train.numpy(), 0.1, seed=2))
    assert res.num_labelled == 80 and res.num_test == 160
    assert [(s["k"], s["t"]) for s in res.details["settings"]] == [(20, 0.07), (200, 0.1)]
    for s in res.details["settings"]:
        ref = knn_accuracy(f_test, y_test, f_train[idx], y_train[idx], 8, k=s["k"], t=s["t"])
        assert s["top1"] == pytest.approx(ref[1]) and s["top5"] == pytest.approx(ref[5])
    assert res.top1 == res.details["settings"][-1]["top1"] > 0.8
    assert json.loads(json.dumps(res.to_dict()))["kind"] == "knn"


# ---- checkpoint errors --------------------------------------------------------------------------------------------
def _contract_checkpoint(path: Path, width: int = 8, claim_width: int | None = None) -> Path:
    """A checkpoint in the trainer's format (sslrun.core.train.checkpoint.save_checkpoint) of an untrained method."""
    from sslrun.core.config import DataCfg, ExperimentConfig, PluginRef
    from sslrun.core.plugins.resolve import build_method
    from sslrun.core.train.checkpoint import save_checkpoint

    data = DataCfg(dataset="synthetic", dataset_kwargs={"size": 16, "num_classes": 4})
    cfg = ExperimentConfig(encoder=PluginRef("small_cnn", {"width": width}), data=data)
    method = build_method(cfg, 16)
    if claim_width is not None:
        cfg.encoder.kwargs["width"] = claim_width
    return save_checkpoint({"config": cfg.to_dict(), "model": method.state_dict(), "step": 0}, path)


def test_bad_checkpoints_are_one_line_errors(tmp_path: Path) -> None:
    from sslrun.core.eval.features import load_pretrained

    text = tmp_path / "notes.txt"
    text.write_text("not a checkpoint\n")
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, foreign)
    mismatched = _contract_checkpoint(tmp_path / "mismatch.pt", width=8, claim_width=16)
    cases = {
        tmp_path / "missing.pt": "does not exist",
        text: "unreadable",
        foreign: "not an sslrun checkpoint",
        mismatched: "weights do not fit",
    }
    runner = CliRunner()
    for path, message in cases.items():
        with pytest.raises(CheckpointError, match=message) as info:
            load_pretrained(path)
        assert "\n" not in str(info.value)
        result = runner.invoke(app, ["eval", "knn", "--checkpoint", str(path), "--device", "cpu"])
        assert result.exit_code == 2, result.output
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0]
    # a good contract-format checkpoint rebuilds its encoder
    pre = load_pretrained(_contract_checkpoint(tmp_path / "good.pt"))
    assert pre.image_size == 16 and pre.encoder.output_dim == 64 and pre.step == 0 and len(pre.fingerprint) == 64


def test_eval_option_errors() -> None:
    from sslrun.core.eval.evaluate import EvalOptions, evaluate

    with pytest.raises(ConfigError, match="--label-fraction"):
        EvalOptions(label_fraction=0.0)
    with pytest.raises(ConfigError, match="needs --checkpoint"):
        evaluate("linear", None, dataset="synthetic")
    with pytest.raises(ConfigError, match="--from-scratch only applies"):
        evaluate("knn", None, dataset="synthetic", from_scratch=True)
    with pytest.raises(ConfigError, match="--features must be"):
        EvalOptions(features="prepool")
    with pytest.raises(ConfigError, match="--features grid2 applies to knn and linear"):
        evaluate("finetune", None, dataset="synthetic", from_scratch=True, options=EvalOptions(features="grid2"))


# ---- the whole path: trainer checkpoint -> evaluation ------------------------------------------------------------
def write_colour_folder(root: Path, n_train: int, n_test: int, size: int = 16, seed: int = 0) -> Path:
    """``root/{train,test}/class<c>/<i>.png``: class = dominant colour, plus brightness, a patch and noise."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("test", n_test)):
        for c, base in enumerate(COLOURS):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                img = np.empty((size, size, 3), np.float32)
                img[:] = base * rng.uniform(0.6, 1.0)
                h, w = rng.integers(size // 4, size // 2, 2)
                y0, x0 = rng.integers(0, size - h), rng.integers(0, size - w)
                img[y0 : y0 + h, x0 : x0 + w] = rng.uniform(0, 80)
                img += rng.normal(0, 12, img.shape)
                Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(folder / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A checkpoint written by the real trainer (SimCLR, small CNN, 8 steps on the colour folder)."""
    from sslrun.core.config import DataCfg, ExperimentConfig, LogCfg, PluginRef, ScheduleCfg, SystemCfg
    from sslrun.core.train.trainer import train

    base = tmp_path_factory.mktemp("eval")
    root = write_colour_folder(base / "colours", n_train=48, n_test=24)
    data_dir = base / "data"
    cfg = ExperimentConfig(
        method=PluginRef("simclr"),
        encoder=PluginRef("small_cnn", {"width": 8}),
        data=DataCfg(
            dataset="imagefolder",
            dataset_kwargs={"size": 16},
            root=str(root),
            data_dir=str(data_dir),
            batch_size=32,
            num_workers=1,
        ),
        schedule=ScheduleCfg(epochs=2, max_steps=8, warmup_epochs=0),
        log=LogCfg(knn_every=0, tensorboard=False, progress="off"),
        system=SystemCfg(device="cpu"),
        output=str(base / "run"),
    )
    result = train(cfg)
    assert result.checkpoint is not None and result.steps == 8
    return {"checkpoint": result.checkpoint, "root": root, "data_dir": data_dir}


@pytest.mark.slow
def test_knn_and_linear_from_a_trainer_checkpoint(trained: dict[str, Path]) -> None:
    from sslrun.core.data.format import BetonReader
    from sslrun.core.eval.evaluate import EvalOptions, evaluate
    from sslrun.core.eval.features import cached_features, load_pretrained
    from sslrun.core.eval.finetune import read_labels

    ckpt = trained["checkpoint"]
    opts = EvalOptions(label_fraction=0.25, seed=0, device="cpu", epochs=100)
    knn, knn_json = evaluate("knn", ckpt, options=opts)
    assert knn_json == ckpt.parent / "eval_knn_imagefolder_0.25_seed0.json"
    assert knn.num_labelled == 48 and knn.num_test == 96 and knn.num_classes == 4 and knn.top5 is None
    assert knn.top1 >= 0.9 and all(s["top1"] >= 0.9 for s in knn.details["settings"])
    assert not knn.details["feature_cache_hit"]
    assert json.loads(knn_json.read_text()) == json.loads(json.dumps(knn.to_dict()))

    linear, linear_json = evaluate("linear", ckpt, options=opts)
    assert linear.details["feature_cache_hit"]  # kNN's extraction is reused (same checkpoint, same files)
    assert linear.top1 >= 0.9 and linear.num_labelled == knn.num_labelled
    saved = json.loads(linear_json.read_text())
    assert saved["config"]["method"]["name"] == "simclr" and saved["checkpoint_step"] == 8
    assert saved["label_fraction"] == 0.25 and saved["seconds"] > 0

    # the subset depends on the labels only: the same 48 images a fine-tune would use
    train_path = trained["data_dir"] / "imagefolder" / "train.beton"
    labels = read_labels(train_path)
    counts = np.bincount(labels.numpy()[balanced_subset(labels.numpy(), 0.25, seed=0)])
    assert counts.tolist() == [12, 12, 12, 12]

    # the cached features are the encoder's eval-mode outputs on the normalised images, in file order
    pre = load_pretrained(ckpt)
    feats, cached_labels, hit = cached_features(
        pre, train_path, dataset="imagefolder", split="train", device=torch.device("cpu")
    )
    assert hit and torch.equal(cached_labels, labels)
    reader = BetonReader(train_path)
    images = torch.stack([torch.from_numpy(reader[i][0]).permute(2, 0, 1).float() / 255 for i in range(0, 192, 7)])
    mean = torch.tensor(reader.manifest.mean).view(1, 3, 1, 1)
    std = torch.tensor(reader.manifest.std).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = pre.encoder.eval()((images - mean) / std)
    torch.testing.assert_close(feats[0:192:7], expected, atol=1e-4, rtol=1e-4)

    # the probe on the last feature map pooled to 2 x 2: its own cache entry and result file, beside the pooled one
    grid_opts = EvalOptions(label_fraction=0.25, seed=0, device="cpu", epochs=100, features="grid2")
    grid, grid_json = evaluate("linear", ckpt, options=grid_opts)
    assert grid_json == ckpt.parent / "eval_linear-grid2_imagefolder_0.25_seed0.json" and linear_json.is_file()
    assert grid.features == "grid2" and linear.features == "pooled"
    assert grid.details["feature_dim"] == 4 * linear.details["feature_dim"] and not grid.details["feature_cache_hit"]
    assert grid.top1 >= 0.9
    grid_feats, _, hit = cached_features(
        pre, train_path, dataset="imagefolder", split="train", device=torch.device("cpu"), features="grid2"
    )
    assert hit
    with torch.no_grad():
        fmap = pre.encoder.eval().feature_map((images - mean) / std)
    torch.testing.assert_close(grid_feats[0:192:7], F.adaptive_avg_pool2d(fmap, 2).flatten(1), atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_finetune_and_from_scratch_baseline(trained: dict[str, Path]) -> None:
    from sslrun.core.eval.evaluate import EvalOptions, evaluate
    from sslrun.core.eval.features import load_pretrained

    ckpt = trained["checkpoint"]
    before = {k: v.clone() for k, v in load_pretrained(ckpt).encoder.state_dict().items()}
    opts = EvalOptions(label_fraction=0.5, seed=0, device="cpu", epochs=4, batch_size=16, lr=1.0)
    ft, ft_json = evaluate("finetune", ckpt, options=opts)
    assert ft.kind == "finetune" and ft.num_labelled == 96 and ft.details["steps"] == 4 * 6
    assert ft.top1 >= 0.9
    assert ft.details["epoch_loss"][-1] < ft.details["epoch_loss"][0]
    scratch, scratch_json = evaluate("finetune", ckpt, options=opts, from_scratch=True)
    assert scratch_json.name == "eval_scratch_imagefolder_0.5_seed0.json" and ft_json.is_file()
    assert scratch.checkpoint is None and scratch.details["architecture_from"] == str(ckpt.resolve())
    assert scratch.num_labelled == ft.num_labelled and scratch.details["steps"] == ft.details["steps"]
    assert 0.0 <= scratch.top1 <= 1.0 and scratch.details["epoch_loss"][-1] < scratch.details["epoch_loss"][0]
    after = load_pretrained(ckpt).encoder.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the checkpoint itself is never modified


@pytest.mark.slow
def test_cli_eval_prints_table_and_json(trained: dict[str, Path]) -> None:
    runner = CliRunner()
    args = ["eval", "knn", "--checkpoint", str(trained["checkpoint"]), "--label-fraction", "0.25", "--device", "cpu"]
    result = runner.invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["kind"] == "knn" and data["top1"] >= 0.9 and data["label_fraction"] == 0.25
    assert {"top1", "top5", "seconds", "checkpoint", "config", "label_fraction"} <= set(data)
    table = runner.invoke(app, [*args, "--features", "grid2"])
    assert table.exit_code == 0 and "top-1" in table.stdout and "k=20 T=0.07" in table.stdout
    assert "grid2 (256-d)" in table.stdout  # width 8 -> 64 channels x 2 x 2
    wrong = runner.invoke(app, [*args, "--features", "conv5"])
    assert wrong.exit_code != 0 and "--features must be 'pooled' or 'gridK'" in wrong.output
    assert "Traceback" not in wrong.output
    bad = runner.invoke(app, ["eval", "linear", "--checkpoint", str(trained["checkpoint"]), "--label-fraction", "2"])
    assert bad.exit_code == 2
