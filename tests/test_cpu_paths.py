"""Paths of the trainer that run on a CPU and had no test: bf16 autocast (torch's CPU autocast), ``system.compile``
(inductor on the CPU), DINO's frozen last layer inside the real training step, the output check of ``sslrun train``
and the SyncBatchNorm decision. Runs use real Fashion-MNIST ``.beton`` files and FFCV loaders, a few steps each."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from sslrun.cli import app
from sslrun.core.config import ExperimentConfig, PluginRef
from sslrun.core.plugins.build import build_config
from sslrun.core.plugins.resolve import build_method
from sslrun.core.train.build import use_sync_bn
from sslrun.core.train.callbacks import Loop, TrainHooks
from sslrun.core.train.state import StepResult
from sslrun.core.train.trainer import train


def small_run(output: Path, data_dir: str, root: str, method: str, **kwargs: Any) -> ExperimentConfig:
    """``method`` on small_cnn(width=4), batch 32 of the first 256 Fashion-MNIST images, CPU, no kNN or files
    beyond the checkpoint."""
    cfg = ExperimentConfig()
    cfg.method = PluginRef(method, kwargs)
    cfg.encoder = PluginRef("small_cnn", {"width": 4})
    cfg.data.root, cfg.data.data_dir, cfg.data.max_samples = root, data_dir, 256
    cfg.data.batch_size, cfg.data.num_workers = 32, 1
    cfg.schedule.epochs = 1
    cfg.system.device = "cpu"
    cfg.log.knn_every, cfg.log.visuals_every, cfg.log.tensorboard, cfg.log.progress = 0, 0, False, "off"
    cfg.output = str(output)
    return cfg


class Probe(TrainHooks):
    """Records, per step, the dtype the encoder computed in, the loss, and DINO's last layer."""

    def __init__(self) -> None:
        self.dtypes: list[torch.dtype] = []
        self.losses: list[float] = []
        self.last_layer: list[list[torch.Tensor]] = []
        self.model: torch.nn.Module | None = None

    def on_train_start(self, loop: Loop) -> None:
        self.model = loop.model
        loop.run.method.encoder.register_forward_hook(lambda _m, _i, out: self.dtypes.append(out.dtype))
        self._snapshot(loop)

    def on_step_end(self, loop: Loop, result: StepResult) -> None:
        self.losses.append(float(result.terms["loss"].detach()))
        self._snapshot(loop)

    def _snapshot(self, loop: Loop) -> None:
        head = getattr(loop.run.method, "head", None)
        if head is not None and hasattr(head, "last_layer"):
            self.last_layer.append([p.detach().clone() for p in head.last_layer.parameters()])


@pytest.mark.timeout(300)
def test_bf16_autocast_on_cpu_and_dino_frozen_last_layer_in_the_trainer(
    tmp_path: Path, session_data_dir: str, fashion_mnist_dir: str
) -> None:
    """``system.precision=bf16`` runs the encoder in bfloat16 on a CPU and trains; DINO's last layer (with a
    learnable norm and weight decay, where a zero gradient would still move it) stays exactly unchanged during its
    2 frozen steps and trains afterwards."""
    cfg = small_run(
        tmp_path / "run",
        session_data_dir,
        fashion_mnist_dir,
        "dino",
        num_local_crops=2,
        out_dim=64,
        hidden_dim=32,
        bottleneck_dim=16,
        norm_last_layer=False,
        freeze_last_layer_steps=2,
    )
    cfg.system.precision = "bf16"
    cfg.optim.weight_decay = 0.1
    cfg.schedule.max_steps = 3
    probe = Probe()
    result = train(cfg, probe)
    assert result.steps == 3 and len(probe.losses) == 3
    assert all(torch.isfinite(torch.tensor(probe.losses)))
    assert probe.dtypes and set(probe.dtypes) == {torch.bfloat16}
    start, *after = probe.last_layer
    for step in (0, 1):
        assert all(torch.equal(a, b) for a, b in zip(start, after[step], strict=True)), f"moved at step {step}"
    assert not all(torch.equal(a, b) for a, b in zip(start, after[2], strict=True)), "never trained"


@pytest.mark.slow  # the first compiled step takes about 60 s on 2 busy cores
@pytest.mark.timeout(300)
def test_system_compile_trains_on_cpu(tmp_path: Path, session_data_dir: str, fashion_mnist_dir: str) -> None:
    """``system.compile`` wraps the method in torch.compile (inductor on the CPU) and the run trains and
    checkpoints."""
    cfg = small_run(tmp_path / "run", session_data_dir, fashion_mnist_dir, "simclr", hidden_dim=32, output_dim=16)
    cfg.system.compile = True
    cfg.schedule.max_steps = 2
    probe = Probe()
    result = train(cfg, probe)
    assert hasattr(probe.model, "_orig_mod"), "the trained model is not a torch.compile module"
    assert result.steps == 2 and all(torch.isfinite(torch.tensor(probe.losses)))
    assert probe.dtypes and set(probe.dtypes) == {torch.float32}
    assert result.checkpoint is not None and result.checkpoint.is_file()


def test_train_refuses_an_output_it_cannot_write_in_one_line(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    for output in ("/proc/x", str(blocker / "run")):
        res = CliRunner().invoke(app, ["train", "--device", "cpu", "--output", output])
        assert res.exit_code == 2, res.output
        lines = res.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"error: --output {output} cannot be written"), res.output
        assert "Traceback" not in res.output


def test_mocov2_keeps_per_rank_batchnorm_and_says_so(caplog: pytest.LogCaptureFixture) -> None:
    """The SyncBatchNorm decision, per method: on CUDA under DDP with system.sync_bn, MoCo v2 with shuffling BN
    keeps BatchNorm per rank (one log line), without shuffling it gets SyncBatchNorm, as every other method does."""
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    small = ["method.kwargs.queue_size=64", "method.kwargs.hidden_dim=16", "method.kwargs.output_dim=8"]
    moco_cfg = build_config(None, {"method.name": "mocov2"}, small)
    moco = build_method(moco_cfg, 28)
    with caplog.at_level(logging.WARNING, logger="sslrun.core.train.build"):
        assert not use_sync_bn(moco_cfg, moco, cuda, 2)
    assert "mocov2 keeps BatchNorm per rank" in caplog.text and "shuffle_bn=false" in caplog.text
    plain_cfg = build_config(None, {"method.name": "mocov2"}, [*small, "method.kwargs.shuffle_bn=false"])
    assert use_sync_bn(plain_cfg, build_method(plain_cfg, 28), cuda, 2)
    simclr_cfg = build_config(None, {"method.name": "simclr"})
    simclr = build_method(simclr_cfg, 28)
    assert use_sync_bn(simclr_cfg, simclr, cuda, 2)
    assert not use_sync_bn(simclr_cfg, simclr, cpu, 2)  # gloo cannot run SyncBatchNorm
    assert not use_sync_bn(simclr_cfg, simclr, cuda, 1)
    simclr_cfg.system.sync_bn = False
    assert not use_sync_bn(simclr_cfg, simclr, cuda, 2)
