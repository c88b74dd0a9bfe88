"""Tuned fine-tuning (``sslrun eval finetune --tune``): the choice of lr / weight decay / length never depends on
the test split, the test split is read once, after the choice, and the pad + crop + flip augmentation touches
training batches only.

The data is real: small .beton files written by the project's writer and read through its FFCV loaders. Their
class is the image's colour (4 colours, random brightness, pixel noise), so a tiny CNN learns it in a few steps.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from sslrun.core.data.writer import write_beton
from sslrun.core.errors import ConfigError
from sslrun.core.eval import tune as tune_module
from sslrun.core.eval.labelled import SubsetImages, black_fill, pad_crop_flip
from sslrun.core.eval.tune import TuneGrid, tune_finetune, tuned_batch

COLOURS = np.array([(210, 40, 40), (40, 190, 40), (40, 60, 220), (220, 200, 30)], dtype=np.float32)
SIDE = 16
GRID = TuneGrid(lrs=(0.1, 2.0), weight_decays=(5e-4,), steps=(10, 30), holdout=0.25)


def _images(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 4
    base = COLOURS[labels][:, None, None, :] * rng.uniform(0.6, 1.0, (n, 1, 1, 1))
    imgs = np.clip(base + rng.normal(0, 12, (n, SIDE, SIDE, 3)), 0, 255).astype(np.uint8)
    return imgs, labels


def _beton(path: Path, imgs: np.ndarray, labels: np.ndarray, split: str) -> Path:
    samples = [(imgs[i], int(labels[i])) for i in range(len(labels))]
    write_beton(samples, path, dataset="colours", split=split, num_classes=4, grayscale=False, progress=False)
    return path


@pytest.fixture(scope="module")
def splits(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A train split, its test split, and the same test images with every label wrong."""
    d = tmp_path_factory.mktemp("tuning")
    train_imgs, train_labels = _images(96, 0)
    test_imgs, test_labels = _images(48, 1)
    return {
        "train": _beton(d / "train.beton", train_imgs, train_labels, "train"),
        "test": _beton(d / "test.beton", test_imgs, test_labels, "test"),
        "wrong": _beton(d / "wrong.beton", test_imgs, (test_labels + 1) % 4, "test"),
    }


class TinyEncoder(nn.Module):
    """conv-BN-ReLU-pool: enough to tell colours apart."""

    output_dim = 8

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).flatten(1)


def _tune(splits: dict[str, Path], test: str, calls: list[str] | None = None) -> tune_module.TunedFinetune:
    torch.manual_seed(0)
    encoder = TinyEncoder()
    return tune_finetune(
        encoder,
        num_classes=4,
        train_path=splits["train"],
        indices=np.arange(48),  # a 48-image labelled subset, 12 of each class: 12 held out, 36 to fit
        test_path=splits[test],
        image_size=SIDE,
        device=torch.device("cpu"),
        grid=GRID,
        seed=0,
        log=None if calls is None else (lambda line: calls.append("trial")),
    )


def test_the_test_split_never_changes_the_choice_and_is_read_once_at_the_end(
    splits: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str] = []
    real_score = tune_module.score_split

    def spy(model: nn.Module, path: Path, **kw: object) -> tuple[float, float, int]:
        calls.append(f"test:{path.name}")
        return real_score(model, path, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(tune_module, "score_split", spy)
    good = _tune(splits, "test", calls)
    # every trial ran before the test split was read, and it was read exactly once
    assert calls == ["trial"] * 3 + ["test:test.beton"]
    assert good.num_fit == 36 and good.num_heldout == 12 and len(good.trials) == 3
    assert good.outcome.top1 >= 0.75  # colours are easy: the wiring works

    calls.clear()
    wrong = _tune(splits, "wrong", calls)
    assert calls == ["trial"] * 3 + ["test:wrong.beton"]
    # every label of the test split is wrong: the score collapses, the choice and every trial stay the same
    assert wrong.outcome.top1 <= 0.25

    def setting(t: tune_module.Trial) -> tuple[object, ...]:
        return (t.lr, t.weight_decay, t.epochs, t.steps, t.heldout_top1, t.train_top1, t.final_loss)  # not seconds

    assert setting(wrong.chosen) == setting(good.chosen)
    assert [setting(t) for t in wrong.trials] == [setting(t) for t in good.trials]
    assert wrong.recipe == good.recipe and wrong.recipe.augment == "pad_crop" and not wrong.recipe.drop_last
    details = good.details()
    assert details["tuning"]["chosen"]["lr"] in GRID.lrs and "train_top1" in details


def test_pad_crop_flip_is_a_shifted_padded_window_and_seeded() -> None:
    x = torch.arange(2 * 3 * 6 * 6, dtype=torch.float32).view(2, 3, 6, 6)
    fill = torch.full((1, 3, 1, 1), -7.0)
    out = pad_crop_flip(x, 2, 0.5, torch.Generator().manual_seed(3), fill)
    again = pad_crop_flip(x, 2, 0.5, torch.Generator().manual_seed(3), fill)
    assert torch.equal(out, again) and out.shape == x.shape
    padded = torch.nn.functional.pad(x - fill, (2, 2, 2, 2)) + fill
    for i in range(2):  # each output is one 6x6 window of the padded image, flipped or not
        windows = [padded[i, :, r : r + 6, c : c + 6] for r in range(5) for c in range(5)]
        assert any(torch.equal(out[i], w) or torch.equal(out[i], w.flip(-1)) for w in windows)
    assert torch.equal(pad_crop_flip(x, 0, 0.0, torch.Generator().manual_seed(0)), x)  # nothing to do
    assert torch.equal(pad_crop_flip(x, 0, 1.0, torch.Generator().manual_seed(0)), x.flip(-1))
    shifted = [pad_crop_flip(x, 2, 0.0, torch.Generator().manual_seed(s), fill) for s in range(8)]
    assert any(not torch.equal(s, x) for s in shifted)  # offsets are random, not always the centre


class Recorder(nn.Module):
    """A linear classifier that keeps every input it sees."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3 * SIDE * SIDE, 4)
        self.seen: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x.detach().clone())
        return self.fc(x.flatten(1))


def test_augmentation_touches_training_batches_only(splits: dict[str, Path]) -> None:
    from sslrun.core.data.format import BetonReader

    indices = np.arange(0, 40)
    images = SubsetImages.load(splits["train"], indices, image_size=SIDE, device=torch.device("cpu"))
    # the stored images, in the order of `indices`, normalised: what scoring must see
    reader = BetonReader(splits["train"])
    raw = torch.stack([torch.from_numpy(reader[int(i)][0]).permute(2, 0, 1).float() / 255 for i in indices])
    mean = torch.tensor(reader.manifest.mean).view(1, 3, 1, 1)
    std = torch.tensor(reader.manifest.std).view(1, 3, 1, 1)
    torch.testing.assert_close(images.images, (raw - mean) / std, atol=1e-5, rtol=1e-5)
    assert images.labels.tolist() == [int(reader[int(i)][1]) for i in indices]
    torch.testing.assert_close(images.fill, black_fill(reader.manifest.mean, reader.manifest.std))

    model = Recorder()
    images.top1(model, batch_size=64)
    assert torch.equal(torch.cat(model.seen), images.images)  # scoring: unchanged images, every one once

    batches = list(images.batches(0, 16, seed=0, pad=4, flip_p=0.5))
    assert len(batches) == images.steps_per_epoch(16) == 3 and all(x.shape[0] == 16 for x, _ in batches)
    train_x = torch.cat([x for x, _ in batches])
    assert not any(torch.equal(train_x[k], images.images[j]) for k in range(8) for j in range(40))
    # yet each training image is its own labelled image, padded with black, shifted and maybe flipped
    padded = torch.nn.functional.pad(images.images - images.fill, (4, 4, 4, 4)) + images.fill
    for x, y in batches[:1]:
        for k in range(4):
            match = [
                j
                for j in range(40)
                for r in range(9)
                for c in range(9)
                if torch.equal(x[k], (w := padded[j, :, r : r + SIDE, c : c + SIDE])) or torch.equal(x[k], w.flip(-1))
            ]
            assert match and all(int(images.labels[j]) == int(y[k]) for j in match)


def test_grid_and_batch_rules() -> None:
    assert tuned_batch(600, 256) == 32 and tuned_batch(6000, 256) == 256 and tuned_batch(60, 256) == 16
    assert tuned_batch(10, 256) == 10  # never more than the subset
    with pytest.raises(ConfigError, match="hold-out share"):
        TuneGrid(holdout=1.0)
    with pytest.raises(ConfigError, match="at least one lr"):
        TuneGrid(lrs=())


@pytest.mark.slow
def test_cli_finetune_tune_from_scratch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`sslrun eval finetune --tune --from-scratch` end to end: prepared image folder, JSON with every trial."""
    import json

    from test_evaluation import write_colour_folder
    from typer.testing import CliRunner

    from sslrun.cli import app

    monkeypatch.setattr(tune_module, "TuneGrid", lambda: GRID)  # the default grid is minutes of CPU
    root = write_colour_folder(tmp_path / "colours", n_train=24, n_test=12)
    args = ["eval", "finetune", "--from-scratch", "--encoder", "small_cnn", "--dataset", "imagefolder"]
    args += ["--root", str(root), "--set", "size=16", "--data-dir", str(tmp_path / "data"), "--device", "cpu"]
    args += ["--label-fraction", "0.5", "--output", str(tmp_path / "out")]
    runner = CliRunner()
    result = runner.invoke(app, [*args, "--tune", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["kind"] == "scratch_tuned" and data["num_labelled"] == 48 and data["num_test"] == 48
    tuning = data["details"]["tuning"]
    assert len(tuning["trials"]) == 3 and tuning["num_heldout"] == 12 and tuning["chosen"]["lr"] in GRID.lrs
    assert data["details"]["recipe"]["augment"] == "pad_crop" and data["details"]["recipe"]["drop_last"] is False
    assert (tmp_path / "out" / "eval_scratch_tuned_imagefolder_0.5_seed0.json").is_file()
    bad = runner.invoke(app, [*args, "--tune", "--lr", "0.1"])
    assert bad.exit_code != 0 and "--tune chooses lr, weight decay and epochs itself; drop --lr" in bad.output


def test_benchmark_reuses_only_evaluations_whose_settings_did_not_change() -> None:
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import accuracy

    old = {"eval_max_samples": None, "linear_iters": None, "finetune_epochs": None}  # a report from before tuning
    now = {**old, "tune": True, "tune_grid": {"lrs": [0.05]}}
    evals = {"knn": {"top1": 0.8}, "linear@0.01": {"top1": 0.7}, "finetune@0.01": {"top1": 0.6}}
    prev = {"settings": old, "result": {"train": {}, "evals": evals}}
    assert set(accuracy.reusable_evals(prev, now)) == {"knn", "linear@0.01"}  # the untuned fine-tune is redone
    assert set(accuracy.reusable_evals(prev, {**old, "tune": False, "tune_grid": None})) == set(evals)
    assert accuracy.reusable_evals({"settings": old, "result": evals}, {**now, "linear_iters": 5}) == {
        "knn": {"top1": 0.8}
    }
    report = {"methods": {"simclr": {"evals": {"linear@0.1": {"top1": 0.84}, "finetune@0.1": {"top1": 0.9}}}}}
    report["scratch"] = {"finetune@0.1": {"top1": 0.896}}
    gap = accuracy.label_gap(report, "0.1", None)
    assert gap["best"] == "simclr/finetune@0.1" and gap["gain"] == pytest.approx(0.004) and gap["met"] is None
