"""The SSL method plugins, driven by the method registry (a method added later is covered automatically): build
each with a small encoder, run forward/backward/``on_after_step`` on views shaped by its own ``view_specs``,
check the returned dict, the frozen teachers, the checkpointable state and the paper defaults. Then the
method-specific mechanics (MoCo queue, EMA, DINO warm-up and frozen last layer, heads), and an end-to-end
``sslrun train`` for every method (slow)."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from sslrun.core.config import coerce_dataclass
from sslrun.core.errors import ConfigError
from sslrun.core.interfaces import Method, ViewSpec
from sslrun.core.plugins.registry import get_registry
from sslrun.plugins.common.ema import frozen_copy, update_momentum
from sslrun.plugins.common.heads import BarlowTwinsProjectionHead, DINOProjectionHead, NormedLinear, ProjectionHead

METHODS = get_registry("method").names()

#: Smaller heads for CPU tests; the Config defaults stay the paper's (checked below).
SMALL_KWARGS: dict[str, dict[str, Any]] = {
    "mocov2": {"queue_size": 64},
    "dino": {"num_local_crops": 2, "freeze_last_layer_steps": 0},
    "swav": {"num_local_crops": 2},
    "ijepa": {"predictor_depth": 1},
}
#: Methods that need a ViT encoder (they predict patch tokens), and methods that train on a single view.
VIT_ONLY = {"ijepa"}
SINGLE_VIEW = {"ijepa"}


def small_config(cls: type[Method], **overrides: Any) -> Any:
    """``cls.Config`` with every ``*dim*`` width shrunk to 32 (generic, so methods added later get small heads
    too), plus :data:`SMALL_KWARGS` and ``overrides``."""
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls.Config):
        default = f.default if f.default is not dataclasses.MISSING else None
        if "dim" in f.name and isinstance(default, int) and not isinstance(default, bool) and default > 32:
            kwargs[f.name] = 32
    kwargs.update(SMALL_KWARGS.get(cls.name, {}))
    kwargs.update(overrides)
    return coerce_dataclass(cls.Config, kwargs, f"method.kwargs ({cls.name})")


class TinyEncoder(nn.Module):
    """A BatchNorm-free encoder (so DDP and one process see the same function) that accepts any resolution."""

    def __init__(self, output_dim: int = 16) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, kernel_size=3, stride=2, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc = nn.Linear(16, output_dim)
        self.output_dim = output_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(torch.relu(self.conv(x))).flatten(1))


def build_method(name: str, encoder: nn.Module | None = None, **overrides: Any) -> Method:
    cls = get_registry("method").get(name)
    if encoder is None and name in VIT_ONLY:
        from sslrun.plugins.encoders.vit import vit_tiny

        encoder = vit_tiny(image_size=28, depth=2)
    elif encoder is None:
        from sslrun.plugins.encoders.small_cnn import small_cnn

        encoder = small_cnn(width=4, image_size=28)  # output_dim 32
    return cls(encoder, small_config(cls, **overrides))


def make_views(method: Method, batch: int, image_size: int = 28, seed: int = 0) -> list[torch.Tensor]:
    """Random normalised views shaped by the method's own ``view_specs``."""
    g = torch.Generator().manual_seed(seed)
    specs = type(method).view_specs(method.cfg, image_size)
    return [torch.randn(batch, 3, s.size, s.size, generator=g) for s in specs]


def momentum_now(method: Method) -> float | None:
    sched = method.momentum_schedule()
    return None if sched is None else float(sched[0])


# ---- every registered method ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name", METHODS)
def test_forward_backward_and_after_step(name: str) -> None:
    torch.manual_seed(0)
    method = build_method(name)
    method.train()
    frozen_before = {n: p.detach().clone() for n, p in method.named_parameters() if not p.requires_grad}
    out = method(make_views(method, batch=8))

    assert "loss" in out
    for key, value in out.items():
        assert isinstance(value, torch.Tensor) and value.ndim == 0, f"{name}: {key} is not a scalar tensor"
        assert torch.isfinite(value), f"{name}: {key} = {value}"
        if key != "loss":
            assert not value.requires_grad, f"{name}: logged term {key} must be detached"
    assert out["loss"].requires_grad

    opt = torch.optim.SGD([p for p in method.parameters() if p.requires_grad], lr=0.1)
    out["loss"].backward()
    for pname, p in method.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, f"{name}: no gradient for {pname}"
        else:
            assert p.grad is None, f"{name}: frozen parameter {pname} got a gradient"
    assert any(float(p.grad.abs().sum()) > 0 for p in method.encoder.parameters())
    opt.step()
    method.on_after_step(0, momentum_now(method))
    if method.momentum_schedule() is not None:
        assert frozen_before, f"{name} has a momentum schedule but no frozen teacher"
        moved = [
            n for n, p in method.named_parameters() if not p.requires_grad and not torch.equal(p, frozen_before[n])
        ]
        assert moved, f"{name}: on_after_step did not move the teacher towards the student"


@pytest.mark.parametrize("name", METHODS)
def test_view_specs(name: str) -> None:
    cls = get_registry("method").get(name)
    cfg = cls.Config()
    for size in (28, 224):
        specs = cls.view_specs(cfg, size)
        assert len(specs) >= (1 if name in SINGLE_VIEW else 2) and all(isinstance(s, ViewSpec) for s in specs)
        assert all(1 <= s.size <= size for s in specs)
        if size <= 64:
            assert all(s.blur_p == 0 for s in specs), f"{name}: no gaussian blur on small images"
        elif name not in SINGLE_VIEW:  # I-JEPA's one view is a plain crop: the paper uses no colour or blur
            assert any(s.blur_p > 0 for s in specs), f"{name}: the paper's ImageNet views include a blur"


@pytest.mark.parametrize("name", METHODS)
def test_param_groups_cover_trainable_parameters_once(name: str) -> None:
    method = build_method(name)
    grouped = [p for g in method.param_groups() for p in g["params"]]
    trainable = [p for p in method.parameters() if p.requires_grad]
    assert len(grouped) == len({id(p) for p in grouped}) == len(trainable)
    assert {id(p) for p in grouped} == {id(p) for p in trainable}


@pytest.mark.parametrize("name", METHODS)
def test_state_dict_roundtrip_restores_buffers(name: str) -> None:
    torch.manual_seed(0)
    a = build_method(name)
    opt = torch.optim.SGD([p for p in a.parameters() if p.requires_grad], lr=0.1)
    for step in range(2):
        out = a(make_views(a, batch=8, seed=step))
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        a.on_after_step(step, momentum_now(a))
    torch.manual_seed(1)
    b = build_method(name)
    b.load_state_dict(a.state_dict())
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb)
    a.eval()
    b.eval()
    views = make_views(a, batch=8, seed=5)
    torch.manual_seed(2)
    la = a(views)["loss"]
    torch.manual_seed(2)
    lb = b(views)["loss"]
    assert torch.allclose(la, lb)


PAPER_DEFAULTS: dict[str, dict[str, Any]] = {
    "simclr": {"temperature": 0.5, "hidden_dim": 2048, "output_dim": 128},
    "mocov2": {"temperature": 0.2, "queue_size": 65536, "momentum": 0.999, "output_dim": 128},
    "byol": {"tau_base": 0.996, "tau_final": 1.0, "projection_hidden_dim": 4096, "projection_dim": 256},
    "barlow_twins": {"lambd": 5e-3, "hidden_dim": 8192, "output_dim": 8192},
    "simsiam": {"projection_dim": 2048, "prediction_hidden_dim": 512},
    "vicreg": {"sim_coeff": 25.0, "std_coeff": 25.0, "cov_coeff": 1.0, "output_dim": 8192},
    "dino": {
        "out_dim": 65536,
        "student_temp": 0.1,
        "warmup_teacher_temp": 0.04,
        "teacher_temp": 0.07,
        "center_momentum": 0.9,
        "momentum_teacher": 0.996,
        "momentum_teacher_final": 1.0,
        "global_crops_scale": (0.4, 1.0),
        "local_crops_scale": (0.05, 0.4),
    },
}


@pytest.mark.parametrize("name", sorted(PAPER_DEFAULTS))
def test_config_defaults_are_the_papers(name: str) -> None:
    cfg = get_registry("method").get(name).Config()
    for key, expected in PAPER_DEFAULTS[name].items():
        assert getattr(cfg, key) == expected, f"{name}.{key}"


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [
        ("simclr", {"temperature": 0}),
        ("mocov2", {"queue_size": 0}),
        ("byol", {"tau_base": 1.5}),
        ("barlow_twins", {"lambd": -1.0}),
        ("vicreg", {"std_coeff": -1.0}),
        ("simsiam", {"projection_dim": 0}),
        ("dino", {"local_crops_scale": [0.5, 0.2]}),
        ("dino", {"num_local_crops": -1}),
    ],
)
def test_bad_config_is_a_one_line_config_error(name: str, kwargs: dict[str, Any]) -> None:
    cls = get_registry("method").get(name)
    with pytest.raises(ConfigError, match=name) as exc:
        coerce_dataclass(cls.Config, kwargs, f"method.kwargs ({name})")
    assert "\n" not in str(exc.value)


# ---- method-specific mechanics -------------------------------------------------------------------------------
def test_simclr_views_follow_the_paper_and_its_cifar_changes() -> None:
    cls = get_registry("method").get("simclr")
    big = cls.view_specs(cls.Config(), 224)[0]
    small = cls.view_specs(cls.Config(), 32)[0]
    assert big.scale == (0.08, 1.0) and big.blur_p == 0.5 and big.jitter == pytest.approx((0.8, 0.8, 0.8, 0.2))
    assert small.scale == (0.2, 1.0) and small.blur_p == 0.0 and small.jitter == pytest.approx((0.4, 0.4, 0.4, 0.1))


def test_byol_views_are_asymmetric_and_ema_is_exact() -> None:
    cls = get_registry("method").get("byol")
    v1, v2 = cls.view_specs(cls.Config(), 224)
    assert (v1.blur_p, v1.solarize_p, v2.blur_p, v2.solarize_p) == (1.0, 0.0, 0.1, 0.2)
    method = build_method("byol")
    with torch.no_grad():
        for p in method.encoder.parameters():
            p.add_(1.0)  # the online network moves away from the target
    online = {n: p.clone() for n, p in method.encoder.named_parameters()}
    target = {n: p.clone() for n, p in method.target_encoder.named_parameters()}
    method.on_after_step(0, 0.9)
    for n, p in method.target_encoder.named_parameters():
        assert torch.allclose(p, 0.9 * target[n] + 0.1 * online[n], atol=1e-6)
    assert method.momentum_schedule() == (0.996, 1.0)


def test_mocov2_queue_wraps_around_and_refuses_a_batch_larger_than_the_queue() -> None:
    method = build_method("mocov2", queue_size=12)
    method.train()
    views = make_views(method, batch=8)
    out = method(views)
    assert int(method.queue_ptr) == 8
    assert 0.0 < float(out["pos_sim"]) <= 1.0
    keys_1 = method._keys(views[1])
    assert torch.allclose(method.queue[:8], keys_1, atol=1e-6)  # the first batch's keys, in order
    method(make_views(method, batch=8, seed=1))
    keys_2 = method._keys(make_views(method, batch=8, seed=1)[1])
    assert int(method.queue_ptr) == 4  # (8 + 8) % 12
    assert torch.allclose(method.queue[8:12], keys_2[:4], atol=1e-6)
    assert torch.allclose(method.queue[:4], keys_2[4:], atol=1e-6)  # wrapped around
    assert torch.allclose(method.queue.norm(dim=1), torch.ones(12), atol=1e-5)
    too_small = build_method("mocov2", queue_size=4)
    with pytest.raises(ConfigError, match="queue_size 4 is smaller than the global batch 8"):
        too_small(make_views(too_small, batch=8))


def test_mocov2_key_encoder_follows_the_momentum_and_has_no_grad() -> None:
    method = build_method("mocov2")
    assert all(not p.requires_grad for p in method.key_encoder.parameters())
    assert method.momentum_schedule() == (0.999, 0.999)
    with torch.no_grad():
        for p in method.projector.parameters():
            p.mul_(2.0)
    before = {n: p.clone() for n, p in method.key_projector.named_parameters()}
    online = {n: p.clone() for n, p in method.projector.named_parameters()}
    method.on_after_step(0, None)  # None: the configured momentum (0.999)
    for n, p in method.key_projector.named_parameters():
        assert torch.allclose(p, 0.999 * before[n] + 0.001 * online[n], atol=1e-6)


def test_dino_views_teacher_temperature_and_frozen_last_layer() -> None:
    cls = get_registry("method").get("dino")
    cfg = cls.Config()
    specs = cls.view_specs(cfg, 224)
    assert len(specs) == 2 + cfg.num_local_crops
    assert [s.size for s in specs[:3]] == [224, 224, 96]
    assert specs[0].scale == (0.4, 1.0) and specs[2].scale == (0.05, 0.4)
    assert (specs[0].blur_p, specs[1].blur_p, specs[1].solarize_p, specs[2].blur_p) == (1.0, 0.1, 0.2, 0.5)
    small = cls.view_specs(cfg, 28)
    assert small[2].size == 12 and small[2].scale == (0.05, 0.4)  # local crops keep their small scale

    method = build_method("dino", teacher_temp_warmup_steps=10, freeze_last_layer_steps=2)
    assert float(method.teacher_temperature()) == pytest.approx(0.04)
    views = make_views(method, batch=4)
    for step in range(2):
        out = method(views)
        method.zero_grad()
        out["loss"].backward()
        last = method.head.last_layer.weight_v.grad
        assert last is not None and float(last.abs().sum()) == 0.0, "the last layer is frozen for 2 steps"
        assert float(method.head.mlp.layers[0].weight.grad.abs().sum()) > 0
        method.on_after_step(step, 0.996)
    out = method(views)
    method.zero_grad()
    out["loss"].backward()
    assert float(method.head.last_layer.weight_v.grad.abs().sum()) > 0
    assert float(out["teacher_temp"]) == pytest.approx(0.04 + 0.03 * 2 / 10)
    for _ in range(20):
        method.on_after_step(0, 0.996)
    assert float(method.teacher_temperature()) == pytest.approx(0.07)

    resumed = build_method("dino", teacher_temp_warmup_steps=10, freeze_last_layer_steps=2)
    resumed.load_state_dict(method.state_dict())
    assert int(resumed.step_count) == 22 and float(resumed.teacher_temperature()) == pytest.approx(0.07)
    assert torch.equal(resumed.criterion.center, method.criterion.center)


def test_dino_center_moves_towards_the_teacher_mean() -> None:
    method = build_method("dino")
    assert torch.count_nonzero(method.criterion.center) == 0
    method(make_views(method, batch=4))
    assert torch.count_nonzero(method.criterion.center) > 0


# ---- building blocks: heads and EMA ----------------------------------------------------------------------------
def test_heads_follow_the_official_layouts() -> None:
    head = ProjectionHead([(8, 16, nn.BatchNorm1d(16), nn.ReLU()), (16, 4, None, None)])
    linears = [m for m in head.modules() if isinstance(m, nn.Linear)]
    assert linears[0].bias is None and linears[1].bias is not None  # no bias before a BatchNorm
    bt = BarlowTwinsProjectionHead(8, 16, 16)
    assert all(m.bias is None for m in bt.modules() if isinstance(m, nn.Linear))
    dino = DINOProjectionHead(8, out_dim=10, hidden_dim=16, bottleneck_dim=4)
    assert dino(torch.randn(3, 8)).shape == (3, 10)
    assert not dino.last_layer.weight_g.requires_grad  # norm_last_layer: g fixed to 1


def test_normed_linear_is_a_cosine_layer_and_the_gate_only_blocks_gradients() -> None:
    layer = NormedLinear(4, 5)
    x = torch.nn.functional.normalize(torch.randn(3, 4), dim=1)
    out = layer(x)
    assert float(out.detach().abs().max()) <= 1.0 + 1e-6  # unit rows and unit inputs: cosines
    gated = layer(x, torch.tensor(0.0))
    assert torch.equal(out, gated)
    gated.sum().backward()
    assert float(layer.weight_v.grad.abs().sum()) == 0.0
    layer.zero_grad()
    layer(x, torch.tensor(1.0)).sum().backward()
    assert float(layer.weight_v.grad.abs().sum()) > 0


def test_update_momentum_and_frozen_copy() -> None:
    student = nn.Linear(3, 2)
    teacher = frozen_copy(student)
    assert all(not p.requires_grad for p in teacher.parameters())
    assert all(p.requires_grad for p in student.parameters())
    with torch.no_grad():
        student.weight.fill_(1.0)
        teacher.weight.fill_(3.0)
    update_momentum(student, teacher, 0.75)
    assert torch.allclose(teacher.weight, torch.full((2, 3), 0.75 * 3 + 0.25 * 1))
    with pytest.raises(ValueError, match="same parameters"):
        update_momentum(student, nn.Linear(3, 2, bias=False), 0.5)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        update_momentum(student, teacher, 1.5)


# ---- end to end: `sslrun train` for every method ---------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", METHODS)
def test_sslrun_train_runs_every_method(
    name: str, tmp_path: Path, session_data_dir: str, fashion_mnist_dir: str
) -> None:
    """``sslrun train`` through the CLI app (in-process: the imports and FFCV's numba set-up are paid once for all
    methods): 3 steps of 1 epoch on 256 Fashion-MNIST images with small heads, then a finite logged loss and a
    checkpoint."""
    from typer.testing import CliRunner

    from sslrun.cli import app

    cls = get_registry("method").get(name)
    small = {k: v for k, v in dataclasses.asdict(small_config(cls)).items() if v != getattr(cls.Config(), k)}
    args = [
        "train",
        "--method", name,
        "--encoder", "vit_tiny" if name in VIT_ONLY else "small_cnn",
        "--dataset", "fashion-mnist",
        "--root", fashion_mnist_dir,
        "--data-dir", session_data_dir,
        "--epochs", "1",
        "--max-steps", "3",
        "--batch-size", "32",
        "--num-workers", "1",
        "--device", "cpu",
        "--output", str(tmp_path / "run"),
        "--set", "data.max_samples=256",
        "--set", "encoder.kwargs.depth=2" if name in VIT_ONLY else "encoder.kwargs.width=8",
        "--set", "log.knn_every=0",
        "--set", "log.tensorboard=false",
        "--set", "log.log_every=1",
    ]  # fmt: skip
    for key, value in small.items():
        args += ["--set", f"method.kwargs.{key}={json.dumps(list(value) if isinstance(value, tuple) else value)}"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, f"{name}: exit {result.exit_code}\n{result.output}\n{result.exception!r}"
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if x.strip()]
    losses = [rec["train/loss"] for rec in lines if "train/loss" in rec]
    assert losses and all(math.isfinite(v) for v in losses), lines
    assert (tmp_path / "run" / "checkpoints" / "last.pt").is_file()


def test_dino_schedules_are_given_in_epochs_and_set_up_in_steps() -> None:
    """The paper's units: warm-up and frozen last layer in epochs, turned into steps by ``setup(ctx)``; a ``*_steps``
    setting wins; ``setup`` can be called again (resume) with the same result."""
    from sslrun.core.interfaces import SetupContext

    method = build_method("dino", freeze_last_layer_steps=None)
    assert method.cfg.teacher_temp_warmup_epochs == 30 and method.cfg.freeze_last_layer_epochs == 1
    ctx = SetupContext(image_size=28, steps_per_epoch=10, total_steps=1000)
    for _ in range(2):
        method.setup(ctx)
        assert (method.warmup_steps, method.freeze_steps) == (300, 10)
    stepped = build_method("dino", teacher_temp_warmup_steps=7, freeze_last_layer_steps=3)
    stepped.setup(ctx)
    assert (stepped.warmup_steps, stepped.freeze_steps) == (7, 3)
    with pytest.raises(ConfigError, match="teacher_temp_warmup_epochs"):
        small_config(get_registry("method").get("dino"), teacher_temp_warmup_epochs=-1)
