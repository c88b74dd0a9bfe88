"""Checkpoint files: atomic writes, weights_only loading of everything we store (RNG states included), and the
one-line errors for missing, foreign, corrupt and incompatible checkpoints."""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from sslrun.core.config import ExperimentConfig
from sslrun.core.errors import CheckpointError
from sslrun.core.train.checkpoint import (
    FORMAT,
    capture_rng,
    check_compatible,
    load_checkpoint,
    restore_rng,
    save_checkpoint,
)
from sslrun.core.train.optim import LARS
from sslrun.core.train.state import TrainState


def _state(cfg: ExperimentConfig) -> dict:
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    opt = LARS(model.parameters(), lr=0.1)
    model(torch.randn(5, 3)).sum().backward()
    opt.step()
    return {
        "config": cfg.to_dict(),
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "step": 7,
        "epoch": 1,
        "batch_in_epoch": 2,
        "rng": {"world_size": 1, "ranks": [capture_rng()]},
        "metrics": {"train/loss": 1.5},
    }


def test_roundtrip_with_weights_only_and_rng_restore(tmp_path: Path) -> None:
    cfg = ExperimentConfig()
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    state = _state(cfg)
    expected = (random.random(), np.random.rand(), torch.rand(1).item())  # what follows the captured states
    path = save_checkpoint(state, tmp_path / "ck" / "step_00000007.pt", also=tmp_path / "ck" / "last.pt")
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.pt", "step_00000007.pt"]  # no temp files left
    # the file only holds tensors and builtins: the safe loader reads it, and so does plain weights_only
    torch.load(path, weights_only=True)
    ck = load_checkpoint(tmp_path / "ck" / "last.pt")
    assert ck["format"] == FORMAT and ck["step"] == 7 and ck["batch_in_epoch"] == 2
    torch.testing.assert_close(ck["model"]["0.weight"], state["model"]["0.weight"])
    random.random(), np.random.rand(), torch.rand(1)  # move every generator on
    restore_rng(ck["rng"]["ranks"][0])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_overwriting_last_keeps_the_step_file(tmp_path: Path) -> None:
    cfg = ExperimentConfig()
    a = _state(cfg)
    save_checkpoint(a, tmp_path / "step_1.pt", also=tmp_path / "last.pt")
    b = dict(a, step=8)
    save_checkpoint(b, tmp_path / "step_2.pt", also=tmp_path / "last.pt")
    assert load_checkpoint(tmp_path / "last.pt")["step"] == 8
    assert load_checkpoint(tmp_path / "step_1.pt")["step"] == 7  # a hard link is not rewritten in place


def test_a_failed_write_leaves_the_previous_file_intact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = ExperimentConfig()
    save_checkpoint(_state(cfg), tmp_path / "last.pt")

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(dict(_state(cfg), step=99), tmp_path / "last.pt")
    assert load_checkpoint(tmp_path / "last.pt")["step"] == 7
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_load_errors_are_one_line(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pt")
    (tmp_path / "garbage.pt").write_bytes(b"not a zip file at all")
    with pytest.raises(CheckpointError, match="unreadable") as err:
        load_checkpoint(tmp_path / "garbage.pt")
    assert "\n" not in str(err.value)
    torch.save({"state_dict": {}}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="not an sslrun checkpoint"):
        load_checkpoint(tmp_path / "foreign.pt")
    good = tmp_path / "good.pt"
    save_checkpoint(_state(ExperimentConfig()), good)
    data = good.read_bytes()
    (tmp_path / "truncated.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="unreadable"):
        load_checkpoint(tmp_path / "truncated.pt")


def test_incompatible_architecture_is_refused() -> None:
    cfg = ExperimentConfig()
    ck = {"config": cfg.to_dict()}
    check_compatible(ck, cfg)  # same architecture: fine, even if other settings change
    other = ExperimentConfig()
    other.optim.lr = 1.0
    check_compatible(ck, other)
    other.encoder.name = "resnet18"
    with pytest.raises(CheckpointError, match="encoder=.*small_cnn.*resnet18"):
        check_compatible(ck, other, "x.pt")
    other = ExperimentConfig()
    other.method.name = "byol"
    with pytest.raises(CheckpointError, match="method='simclr'.*method='byol'"):
        check_compatible(ck, other, "x.pt")
    other = ExperimentConfig()
    other.encoder.kwargs = {"width": 8}
    with pytest.raises(CheckpointError, match="width"):
        check_compatible(ck, other, "x.pt")


def test_positions_are_world_size_free_and_older_formats_resume_only_with_a_clear_refusal(tmp_path: Path) -> None:
    """A position saved on 2 ranks loads on any number; a format-1 file (per-rank position) loads for evaluation
    but is refused for resuming; another global batch is refused, naming the flag."""
    saved = TrainState(step=30, epoch=1, batch=5, global_batch=64, world_size=2)
    state = saved.state_dict()
    assert (state["samples_in_epoch"], state["global_batch"], state["world_size"]) == (320, 64, 2)
    resumed = TrainState(global_batch=64, world_size=1)
    resumed.load_state_dict(state)
    assert (resumed.step, resumed.epoch, resumed.batch, resumed.world_size) == (30, 1, 5, 1)
    with pytest.raises(CheckpointError, match="batch of 64 images, this run has 32; resume with --batch-size 64"):
        TrainState(global_batch=32).load_state_dict(state)
    old = {k: v for k, v in state.items() if k not in ("global_batch", "samples_in_epoch", "world_size")}
    save_checkpoint({**_state(ExperimentConfig()), **old, "format": "sslrun-checkpoint/1"}, tmp_path / "old.pt")
    ck = load_checkpoint(tmp_path / "old.pt")  # still readable: evaluation and export use its weights
    assert ck["format"] == "sslrun-checkpoint/1"
    with pytest.raises(CheckpointError, match="older sslrun .format sslrun-checkpoint/1.*cannot be continued exactly"):
        TrainState(global_batch=64).load_state_dict(ck, tmp_path / "old.pt")
