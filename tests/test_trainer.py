"""The training engine end to end on real data (Fashion-MNIST .beton files, real FFCV loaders), on this CPU.

* loop tests use ``TinySSL``, a small Method defined here and registered through a fake distribution's entry
  points (the same discovery path as a third-party plugin): it has an EMA teacher (momentum schedule +
  ``on_after_step``), BatchNorm buffers, dropout drawing from torch's RNG, and can return NaN at a given step;
* the CLI test runs the real simclr + small_cnn plugins and reads the TensorBoard events back with
  TensorBoard's own ``EventAccumulator``.

Each training builds one FFCV loader (a few seconds of numba JIT), so the runs are tiny and few.
"""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from typer.testing import CliRunner

from sslrun.cli import app
from sslrun.core.config import ExperimentConfig, PluginRef
from sslrun.core.errors import CheckpointError, TrainingError
from sslrun.core.interfaces import Method, ViewSpec
from sslrun.core.plugins import registry
from sslrun.core.train.callbacks import TrainHooks
from sslrun.core.train.checkpoint import load_checkpoint
from sslrun.core.train.trainer import train

runner = CliRunner()


# ---- a tiny method, registered as a plugin -------------------------------------------------------------------
@dataclass
class TinyConfig:
    dim: int = 16
    nan_at_step: int = -1  # return a NaN loss at this (0-based) step: the NaN-guard test
    sigint_at_step: int = -1  # send this process SIGINT during this step, as Ctrl-C would: the resume test


class TinySSL(Method):
    """BYOL-flavoured toy: online projector vs an EMA teacher projector on the other view (plus dropout)."""

    name = "tiny"
    Config = TinyConfig

    def __init__(self, encoder: nn.Module, cfg: TinyConfig) -> None:
        super().__init__(encoder, cfg)
        self.projector = nn.Sequential(nn.Dropout(0.2), nn.Linear(encoder.output_dim, cfg.dim))
        self.teacher = nn.Linear(encoder.output_dim, cfg.dim)
        self.teacher.load_state_dict(self.projector[1].state_dict())
        self.teacher.requires_grad_(False)
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))
        self.last_momentum: float | None = None

    @classmethod
    def view_specs(cls, cfg: TinyConfig, image_size: int) -> list[ViewSpec]:
        spec = ViewSpec(size=image_size, scale=(0.3, 1.0), jitter=(0.4, 0.4, 0.0, 0.0), grayscale_p=0.0)
        return [spec, spec]

    def momentum_schedule(self) -> tuple[float, float]:
        return (0.9, 1.0)

    def forward(self, views: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        x1, x2 = views
        p = F.normalize(self.projector(self.encoder(x1)), dim=1)
        with torch.no_grad():
            t = F.normalize(self.teacher(self.encoder(x2)), dim=1)
        align = (2 - 2 * (p * t).sum(1)).mean()
        loss = align
        if int(self.calls) == self.cfg.nan_at_step:
            loss = loss * float("nan")
        if int(self.calls) == self.cfg.sigint_at_step:
            os.kill(os.getpid(), signal.SIGINT)
        self.calls += 1
        self._last_view = x1[:4].detach()
        return {"loss": loss, "align": align.detach()}

    def visuals(self) -> dict[str, torch.Tensor]:
        mean = torch.tensor(self.norm_mean).view(1, 3, 1, 1)
        std = torch.tensor(self.norm_std).view(1, 3, 1, 1)
        return {"input": (self._last_view * std + mean).clamp(0, 1)}

    @torch.no_grad()
    def on_after_step(self, step: int, momentum: float | None) -> None:
        assert momentum is not None
        self.last_momentum = momentum
        for pt, ps in zip(self.teacher.parameters(), self.projector[1].parameters(), strict=True):
            pt.mul_(momentum).add_(ps.detach(), alpha=1 - momentum)


def _install_tiny_plugin(root: Path) -> None:
    """A fake installed distribution whose entry point names :class:`TinySSL`, and a registry that sees it."""
    info = root / "sslrun_test_tiny-0.1.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    (info / "entry_points.txt").write_text(f"[sslrun.methods]\ntiny = {TinySSL.__module__}:TinySSL\n")
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: sslrun-test-tiny\nVersion: 0.1\n")
    registry._REGISTRIES["method"] = registry.Registry("method", path=[*sys.path, str(root)])


@pytest.fixture
def tiny_plugin(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(registry._REGISTRIES, "method", None)  # restored after the test
    _install_tiny_plugin(tmp_path_factory.mktemp("plugins"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the trainer's torch thread count once FFCV is imported


def tiny_cfg(output: Path, data_dir: str, root: str, **log: int) -> ExperimentConfig:
    """2 epochs x 8 steps of batch 32 over the first 256 Fashion-MNIST images, CPU, no kNN."""
    cfg = ExperimentConfig()
    cfg.method = PluginRef("tiny")
    cfg.encoder = PluginRef("small_cnn", {"width": 4})
    cfg.data.dataset = "fashion-mnist"
    cfg.data.root = root
    cfg.data.data_dir = data_dir
    cfg.data.max_samples = 256
    cfg.data.batch_size = 32
    cfg.data.num_workers = 1
    cfg.optim.name = "lars"
    cfg.optim.lr = 0.5
    cfg.schedule.epochs = 2
    cfg.schedule.warmup_epochs = 0.5
    cfg.system.device = "cpu"
    cfg.log.knn_every = 0
    cfg.log.checkpoint_every = log.get("checkpoint_every", 5)
    cfg.log.log_every = log.get("log_every", 5)
    cfg.log.progress = "plain"
    cfg.output = str(output)
    return cfg


# ---- resume equivalence (Ctrl-C mid-epoch, then --resume, through the CLI) ---------------------------------------
@pytest.mark.timeout(300)
def test_ctrl_c_then_resume_ends_with_the_same_weights(
    tiny_plugin: None, tmp_path: Path, session_data_dir: str, fashion_mnist_dir: str
) -> None:
    full = train(tiny_cfg(tmp_path / "full", session_data_dir, fashion_mnist_dir))
    assert (full.steps, full.epochs, full.interrupted) == (16, 2, False)

    # the same experiment through `sslrun train -c FILE`; the method sends SIGINT to this process (as Ctrl-C
    # would) while running step 10, mid-epoch 2
    cfg_file = tmp_path / "cut.toml"
    cfg_file.write_text(tiny_cfg(tmp_path / "cut", session_data_dir, fashion_mnist_dir).to_toml())
    handler_before = signal.getsignal(signal.SIGINT)
    res = runner.invoke(app, ["train", "-c", str(cfg_file), "--set", "method.kwargs.sigint_at_step=10"])
    assert res.exit_code == 0, res.output
    assert signal.getsignal(signal.SIGINT) is handler_before  # the trainer's handler is removed again
    lines = res.output.strip().splitlines()
    resume_cmd = f"sslrun train --config {tmp_path / 'cut' / 'config.toml'} --resume"
    assert lines[-2] == f"stopped at step 11; resume with: {resume_cmd}", lines
    assert any(line.startswith("SIGINT: stopping after this step") for line in lines)
    # the run finished step 10 (the 11th), checkpointed and returned
    ck = load_checkpoint(tmp_path / "cut" / "checkpoints" / "last.pt")
    assert (ck["step"], ck["epoch"], ck["batch_in_epoch"]) == (11, 1, 3)

    # exactly the printed command
    res = runner.invoke(app, resume_cmd.split()[1:])
    assert res.exit_code == 0, res.output
    assert f"resumed at step 11 (epoch 2, batch 3) from {tmp_path / 'cut' / 'checkpoints' / 'last.pt'}" in res.output
    a = load_checkpoint(full.checkpoint)
    b = load_checkpoint(tmp_path / "cut" / "checkpoints" / "last.pt")
    assert b["step"] == 16 and b["epoch"] == 2
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        torch.testing.assert_close(b["model"][k], a["model"][k], atol=1e-6, rtol=0, msg=k)
    for k, st in a["optimizer"]["state"].items():
        torch.testing.assert_close(
            b["optimizer"]["state"][k]["momentum_buffer"], st["momentum_buffer"], atol=1e-6, rtol=0
        )
    assert int(b["model"]["calls"]) == 16
    # the teacher really moved with the momentum schedule (so the EMA path is part of the comparison)
    assert not torch.equal(a["model"]["teacher.weight"], a["model"]["projector.1.weight"])

    # metrics.jsonl of the resumed run was appended to, and the resumed steps continue after the checkpoint
    rows = [json.loads(line) for line in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    loss_steps = [r["step"] for r in rows if "train/loss" in r]
    assert loss_steps == [5, 10, 11, 15, 16]
    full_rows = [json.loads(line) for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    full_loss = {r["step"]: r["train/loss"] for r in full_rows if "train/loss" in r}
    resumed_loss = {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}
    assert resumed_loss[16] == pytest.approx(full_loss[16], abs=1e-5)  # mean of steps 16 alone in both runs
    # step files: only the newest are kept, last.pt is the newest
    names = sorted(p.name for p in (tmp_path / "cut" / "checkpoints").iterdir())
    assert names == ["last.pt", "step_00000011.pt", "step_00000015.pt", "step_00000016.pt"]


# ---- NaN guard and incompatible checkpoints ------------------------------------------------------------------
@pytest.mark.timeout(300)
def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(
    tiny_plugin: None, tmp_path: Path, session_data_dir: str, fashion_mnist_dir: str
) -> None:
    cfg = tiny_cfg(tmp_path / "nan", session_data_dir, fashion_mnist_dir, checkpoint_every=2, log_every=1)
    cfg.method.kwargs = {"nan_at_step": 5}
    cfg.optim.name = "adamw"
    cfg.optim.lr = 1e-3
    cfg.optim.grad_clip = 1.0
    cfg.log.visuals_every = 2
    with pytest.raises(TrainingError, match=r"non-finite loss at step 5 ") as err:
        train(cfg)
    assert "\n" not in str(err.value) and "step_00000004" not in str(err.value)
    assert str(tmp_path / "nan" / "checkpoints" / "last.pt") in str(err.value)
    ck = load_checkpoint(tmp_path / "nan" / "checkpoints" / "last.pt")
    assert ck["step"] == 4  # not 5 or 6: the NaN state was never written
    assert all(torch.isfinite(v).all() for v in ck["model"].values() if v.is_floating_point())
    assert not (tmp_path / "nan" / "checkpoints" / "step_00000006.pt").exists()
    rows = [json.loads(line) for line in (tmp_path / "nan" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    assert all(math.isfinite(r["train/loss"]) and r["opt/grad_norm"] > 0 for r in rows)  # clipping logs the norm
    assert all(
        r["opt/momentum"] == pytest.approx(1 - 0.1 * (math.cos(math.pi * (r["step"] - 1) / 16) + 1) / 2) for r in rows
    )

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(tmp_path / "nan" / "tb"), size_guidance={"images": 0})
    ea.Reload()  # the method's visuals every 2 steps, the augmented views at the start
    assert [e.step for e in ea.Images("visuals/input")] == [2, 4] and ea.Images("views/augmented")[0].step == 0

    # resuming it with another encoder is refused before any data is touched
    cfg.resume = True
    cfg.encoder.kwargs = {"width": 8}
    with pytest.raises(CheckpointError, match=r"encoder=.*'width': 4.*'width': 8"):
        train(cfg)
    cfg.method.name = "simclr"
    cfg.method.kwargs = {}
    cfg.encoder.kwargs = {"width": 4}
    with pytest.raises(CheckpointError, match="method='tiny'.*method='simclr'"):
        train(cfg)
    # --resume without a checkpoint
    cfg.output = str(tmp_path / "empty")
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        train(cfg)


# ---- monitor and online kNN on their own ---------------------------------------------------------------------
def test_monitor_writes_jsonl_and_tensorboard_and_is_silent_off_rank0(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from sslrun.core.train.monitor import Monitor, flatten_hparams, format_eta

    off = Monitor(tmp_path / "r1", enabled=False, total_steps=10, epochs=1)
    off.scalars(1, 0.1, {"train/loss": 1.0})
    off.progress(1, 0, 1.0, 10.0, force=True)
    off.close()
    assert not (tmp_path / "r1").exists() and capsys.readouterr().out == ""

    mon = Monitor(tmp_path / "r0", enabled=True, progress="plain", total_steps=10, epochs=2)
    mon.scalars(5, 0.5, {"train/loss": 2.0, "opt/lr": 0.1})
    mon.progress(5, 0, 2.0, 1234.0, force=True)
    mon.progress(6, 0, 1.5, 1234.0)  # throttled: within PLAIN_EVERY_S of the last line
    mon.image_grid("views/augmented", [torch.rand(8, 3, 28, 28), torch.rand(8, 3, 12, 12)], 0)
    mon.hparams({"optim": {"lr": 0.1, "betas": [0.9, 0.99]}, "resume": False, "x": None}, {"final_loss": 1.5})
    mon.close()
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 1 and out[0].startswith("step 5/10  epoch 1/2  loss 2.0000  1,234 img/s  eta ")
    row = json.loads((tmp_path / "r0" / "metrics.jsonl").read_text())
    assert row["step"] == 5 and row["epoch"] == 0.5 and row["train/loss"] == 2.0
    ea = EventAccumulator(str(tmp_path / "r0" / "tb"))
    ea.Reload()
    assert ea.Scalars("opt/lr")[0].step == 5 and ea.Scalars("hparam/final_loss")[0].value == 1.5
    assert ea.Tags()["images"] == ["views/augmented"]
    assert flatten_hparams({"a": {"b": 1, "c": None, "d": [1, 2]}}) == {"a.b": 1, "a.c": "None", "a.d": "[1, 2]"}
    assert format_eta(3725) == "1:02:05" and format_eta(float("inf")) == "?"


class Pixels(nn.Module):
    """Raw normalised pixels as features (so the kNN result can be recomputed independently)."""

    output_dim = 3 * 28 * 28

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)


@pytest.mark.timeout(300)
def test_online_knn_matches_a_direct_computation_and_restores_state(
    session_data_dir: str, fashion_mnist_dir: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sslrun.core.config import DataCfg
    from sslrun.core.data.cache import ensure_prepared
    from sslrun.core.data.format import BetonReader
    from sslrun.core.train.knn import knn_accuracy
    from sslrun.core.train.online_knn import OnlineKnn

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    data = DataCfg(dataset="fashion-mnist", root=fashion_mnist_dir, data_dir=session_data_dir)
    knn = OnlineKnn(data, ("train", "test"), torch.device("cpu"), k=20, t=0.1, max_samples=300)
    enc = Pixels().train()
    torch.manual_seed(5)
    expected_next = torch.rand(3)
    torch.manual_seed(5)
    result = knn.evaluate(enc)
    assert enc.training and torch.equal(torch.rand(3), expected_next)  # train mode and RNG restored
    knn.close()

    def pixels(split: str) -> tuple[torch.Tensor, torch.Tensor]:
        reader = BetonReader(ensure_prepared(data, split))
        m = reader.manifest
        imgs = torch.stack([torch.from_numpy(reader[i][0]) for i in range(300)]).permute(0, 3, 1, 2).float() / 255
        x = (imgs - torch.tensor(m.mean).view(1, 3, 1, 1)) / torch.tensor(m.std).view(1, 3, 1, 1)
        return x.flatten(1), torch.from_numpy(reader.labels[:300])

    bank, bank_y = pixels("train")
    query, query_y = pixels("test")
    ref = knn_accuracy(query, query_y, bank, bank_y, 10, k=20, t=0.1, topk=(1, 5))
    assert result["knn/top1"] == pytest.approx(100 * ref[1], abs=1e-4)
    assert result["knn/top5"] == pytest.approx(100 * ref[5], abs=1e-4)
    assert 40 < result["knn/top1"] < 100 and result["knn/time_s"] > 0  # raw-pixel kNN on Fashion-MNIST: ~70%


# ---- the CLI ---------------------------------------------------------------------------------------------------
def test_train_cli_rejects_bad_flags_in_one_line(tmp_path: Path) -> None:
    out = str(tmp_path / "run")
    for args, expected in (
        (["--device", "tpu"], "error: system.device: 'tpu' is not one of 'auto', 'cpu', 'cuda'"),
        (["--set", "optim.nope=1"], "error: unknown config key optim.nope"),
        (["--set", "optim.name=adam"], "error: optim.name: 'adam' is not one of"),
        (["--method", "nosuch"], "error: unknown method 'nosuch'"),
    ):
        res = runner.invoke(app, ["train", "--output", out, *args])
        assert res.exit_code == 2, (args, res.output)
        assert res.output.startswith(expected) and res.output.count("\n") == 1, res.output
    res = runner.invoke(app, ["train", "--epochs", "0"])
    assert res.exit_code == 2 and "--epochs" in res.output
    assert not (tmp_path / "run").exists()


def test_train_cli_missing_dataset_is_a_clear_error(tmp_path: Path) -> None:
    empty = tmp_path / "raw"
    empty.mkdir()
    res = runner.invoke(
        app,
        [
            "train",
            "--dataset",
            "fashion-mnist",
            "--root",
            str(empty),
            "--data-dir",
            str(tmp_path / "cache"),
            "--set",
            "data.dataset_kwargs.download=false",
            "--output",
            str(tmp_path / "run"),
            "--device",
            "cpu",
        ],
    )
    assert res.exit_code == 2, res.output
    assert res.output.startswith("error: ") and res.output.count("\n") == 1, res.output
    assert str(empty) in res.output or "fashion-mnist" in res.output


@pytest.mark.timeout(300)
def test_sslrun_train_simclr_fashion_mnist_writes_everything(
    tmp_path: Path, session_data_dir: str, fashion_mnist_dir: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path / "runs" / "t"
    args = [
        "train",
        "--method",
        "simclr",
        "--encoder",
        "small_cnn",
        "--dataset",
        "fashion-mnist",
        "--root",
        fashion_mnist_dir,
        "--data-dir",
        session_data_dir,
        "--epochs",
        "1",
        "--batch-size",
        "64",
        "--num-workers",
        "1",
        "--device",
        "cpu",
        "--output",
        str(out),
        "--set",
        "data.max_samples=512",
        "--set",
        "log.knn_max_samples=512",
        "--set",
        "log.log_every=2",
        "--set",
        "method.kwargs.hidden_dim=128",
        "--set",
        "schedule.warmup_epochs=10",  # the whole run is warm-up (checked on the lr curve below)
    ]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    lines = res.output.strip().splitlines()
    assert lines[-1].startswith(f"checkpoint: {out / 'checkpoints' / 'last.pt'}")
    assert f"tensorboard --logdir {out / 'tb'}" in lines[-1] and str(out / "metrics.jsonl") in lines[-1]
    assert any("kNN top-1" in line for line in lines)

    # config.toml is the resolved config and rebuilds it
    cfg = ExperimentConfig.from_dict(tomllib.loads((out / "config.toml").read_text()))
    assert cfg.method.name == "simclr" and cfg.data.max_samples == 512
    ck = load_checkpoint(out / "checkpoints" / "last.pt")
    assert (ck["step"], ck["epoch"], ck["batch_in_epoch"]) == (8, 1, 0)
    assert ck["plugins"]["method:simclr"] == "sslrun==0.1.0" and ck["config"]["method"]["name"] == "simclr"

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "train/loss" in r] == [2, 4, 6, 8]
    knn = [r for r in rows if "knn/top1" in r]
    assert len(knn) == 1 and 10.0 < knn[0]["knn/top1"] <= 100.0 and knn[0]["knn/time_s"] > 0
    assert knn[0]["step"] == 8 and knn[0]["epoch"] == 1.0

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(out / "tb"), size_guidance={"scalars": 0, "images": 0})
    ea.Reload()
    tags = ea.Tags()
    for tag in (
        "train/loss",
        "opt/lr",
        "opt/weight_decay",
        "perf/images_per_s",
        "perf/data_time_s",
        "perf/compute_time_s",
        "perf/epoch_time_s",
        "knn/top1",
        "knn/time_s",
    ):
        assert tag in tags["scalars"], (tag, tags["scalars"])
    assert [e.step for e in ea.Scalars("train/loss")] == [2, 4, 6, 8]
    assert all(math.isfinite(e.value) for e in ea.Scalars("train/loss"))
    lr = [e.value for e in ea.Scalars("opt/lr")]
    assert lr[0] < max(lr)  # warm-up: 1 epoch x 10 warm-up epochs never reaches the peak
    assert "views/augmented" in tags["images"]

    # a second fresh run into the same directory is refused; --resume of a finished run is a no-op
    res = runner.invoke(app, args)
    assert res.exit_code == 2 and "--resume" in res.output


# ---- DDP: two gloo ranks, torchrun-style environment -------------------------------------------------------------
class StopAt(TrainHooks):
    """Rank 1 asks to stop at one step; counts what the hooks saw."""

    def __init__(self, rank: int, at: int) -> None:
        self.rank, self.at = rank, at
        self.polls = 0
        self.logged: list[int] = []
        self.checkpoints: list[tuple[int, str | None]] = []

    def should_stop(self) -> bool:
        self.polls += 1
        return self.rank == 1 and self.polls == self.at

    def on_log(self, step: int, metrics: dict[str, float]) -> None:
        self.logged.append(step)

    def on_checkpoint(self, step: int, epoch: int, path: Path | None, metrics: dict[str, float]) -> None:
        self.checkpoints.append((step, None if path is None else str(path)))


def _ddp_worker(rank: int, port: int, plugin_root: str, cfg_dict: dict, result_dir: str) -> None:
    os.environ.update(
        {
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "GLOO_SOCKET_IFNAME": "lo",
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": "2",
            "LOCAL_WORLD_SIZE": "2",
            "OMP_NUM_THREADS": "1",
        }
    )
    torch.set_num_threads(1)
    _install_tiny_plugin(Path(plugin_root))
    hooks = StopAt(rank, at=6)
    res = train(ExperimentConfig.from_dict(cfg_dict), hooks)
    Path(result_dir, f"rank{rank}.json").write_text(
        json.dumps(
            {
                "steps": res.steps,
                "interrupted": res.interrupted,
                "checkpoint": None if res.checkpoint is None else str(res.checkpoint),
                "logged": hooks.logged,
                "checkpoints": hooks.checkpoints,
                "loss": res.final_loss,
            }
        )
    )


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_ddp_two_ranks_stop_together_and_only_rank0_writes(
    tmp_path: Path, session_data_dir: str, fashion_mnist_dir: str
) -> None:
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    plugin_root = tmp_path / "plugins"
    _install_tiny_plugin(plugin_root)
    registry.reset_registries()
    cfg = tiny_cfg(tmp_path / "ddp", session_data_dir, fashion_mnist_dir, checkpoint_every=4, log_every=2)
    cfg.data.batch_size = 32  # 16 per rank; 8 steps per epoch over 256 images
    # spawn, not fork: a forked child inherits numba's compiled-function registry half-valid and FFCV's pipeline
    # compilation then fails with a KeyError inside numba's dispatcher (seen here)
    mp.spawn(_ddp_worker, args=(port, str(plugin_root), cfg.to_dict(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    # rank 1 asked to stop while running step 6 (its 6th poll): both ranks finished it and stopped
    assert r0["steps"] == r1["steps"] == 6 and r0["interrupted"] and r1["interrupted"]
    assert r0["logged"] == r1["logged"] == [2, 4, 6]
    assert [c[0] for c in r0["checkpoints"]] == [c[0] for c in r1["checkpoints"]] == [4, 6]
    assert all(p is None for _, p in r1["checkpoints"]) and all(p for _, p in r0["checkpoints"])
    assert r0["checkpoint"] and r1["checkpoint"] is None
    assert r0["loss"] == r1["loss"]  # logged metrics are all-reduced
    ck = load_checkpoint(tmp_path / "ddp" / "checkpoints" / "last.pt")
    assert ck["rng"]["world_size"] == 2 and len(ck["rng"]["ranks"]) == 2
    assert not any(k.startswith("module.") for k in ck["model"])
    assert (tmp_path / "ddp" / "tb").is_dir() and (tmp_path / "ddp" / "metrics.jsonl").exists()
