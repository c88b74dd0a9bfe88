"""Schedules against their closed forms, the lr scaling rule, and the optimisers (LARS against its formula)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sslrun.core.config import ExperimentConfig, OptimCfg
from sslrun.core.errors import ConfigError
from sslrun.core.train.optim import LARS, apply_schedules, build_optimizer
from sslrun.core.train.schedules import build_schedules, scaled_lr, warmup_cosine, warmup_cosine_value


def test_lr_scaling_rule() -> None:
    assert scaled_lr(0.3, 256) == pytest.approx(0.3)
    assert scaled_lr(0.3, 4096) == pytest.approx(4.8)  # SimCLR: 0.3 x 4096 / 256
    assert scaled_lr(0.06, 64) == pytest.approx(0.015)


def test_warmup_cosine_matches_closed_form() -> None:
    base, final, total, warmup = 2.0, 0.1, 50, 10
    arr = warmup_cosine(base, final, total, warmup)
    assert arr.shape == (total,)
    for s in range(total):
        if s < warmup:
            expected = base * (s + 1) / warmup
        else:
            expected = final + (base - final) * 0.5 * (1 + math.cos(math.pi * (s - warmup) / (total - warmup)))
        assert arr[s] == pytest.approx(expected, abs=1e-12)
        assert warmup_cosine_value(s, base, final, total, warmup) == pytest.approx(expected, abs=1e-12)
    assert arr[warmup - 1] == pytest.approx(base)  # the warm-up ends exactly at the peak
    assert arr[warmup] == pytest.approx(base)  # and the cosine starts there
    assert np.all(np.diff(arr[warmup:]) <= 0)


def test_build_schedules_lr_wd_momentum() -> None:
    cfg = ExperimentConfig()
    cfg.data.batch_size = 512
    cfg.optim.lr = 0.3
    cfg.optim.weight_decay = 0.04
    cfg.optim.weight_decay_end = 0.4  # DINO's schedule
    cfg.schedule.epochs = 4
    cfg.schedule.warmup_epochs = 1.5
    cfg.schedule.min_lr_ratio = 0.01
    s = build_schedules(cfg, steps_per_epoch=10, momentum=(0.996, 1.0))
    assert s.total_steps == 40 and s.warmup_steps == 15
    peak = 0.3 * 512 / 256
    lr, wd, mom = s.at(0)
    assert lr == pytest.approx(peak / 15) and wd == pytest.approx(0.04) and mom == pytest.approx(0.996)
    assert s.at(14)[0] == pytest.approx(peak)
    # cosine half-way through the decay part: (peak + final) / 2
    assert s.at(15 + 25 // 2)[0] == pytest.approx(
        peak * 0.01 + (peak - peak * 0.01) * 0.5 * (1 + math.cos(math.pi * 12 / 25))
    )
    # BYOL: tau = 1 - (1 - tau_base) (cos(pi k / K) + 1) / 2
    for k in (0, 7, 20, 39):
        assert s.at(k)[2] == pytest.approx(1 - (1 - 0.996) * (math.cos(math.pi * k / 40) + 1) / 2)
        assert s.at(k)[1] == pytest.approx(0.4 + (0.04 - 0.4) * 0.5 * (1 + math.cos(math.pi * k / 40)))
    assert s.at(1000) == s.at(39)  # past the end: the last value
    # constant wd and no momentum when not asked for
    cfg.optim.weight_decay_end = None
    s2 = build_schedules(cfg, steps_per_epoch=10)
    assert s2.momentum is None and s2.at(5)[2] is None and np.all(s2.weight_decay == 0.04)


def test_max_steps_does_not_reshape_the_schedule() -> None:
    cfg = ExperimentConfig()
    cfg.schedule.epochs = 3
    a = build_schedules(cfg, 7)
    cfg.schedule.max_steps = 5
    b = build_schedules(cfg, 7)
    assert np.array_equal(a.lr, b.lr)


def _naive_lars_step(w, v, *, g, lr, momentum, wd, eta, exclude):
    """SimCLR's lars_optimizer.py (classic momentum), written out element by element in float64."""
    w, g, v = w.double(), g.double(), v.double()
    if wd:
        g = g + wd * w
    trust = 1.0
    if not exclude:
        wn, gn = math.sqrt(float((w * w).sum())), math.sqrt(float((g * g).sum()))
        trust = eta * wn / gn if wn > 0 and gn > 0 else 1.0
    v = momentum * v + lr * trust * g
    return w - v, v


def test_lars_matches_its_formula_on_a_tiny_example() -> None:
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(3, 4))
    b = torch.nn.Parameter(torch.randn(4))
    zero = torch.nn.Parameter(torch.zeros(2, 2))  # ||w|| = 0: trust ratio falls back to 1
    opt = LARS(
        [{"params": [w, zero]}, {"params": [b], "weight_decay": 0.0, "lars_exclude": True}],
        lr=0.5,
        momentum=0.9,
        weight_decay=0.01,
        eta=0.02,
    )
    ref = {"w": (w.detach().clone(), torch.zeros(3, 4)), "b": (b.detach().clone(), torch.zeros(4))}
    ref["zero"] = (zero.detach().clone(), torch.zeros(2, 2))
    plain = (w.detach().clone(), torch.zeros(3, 4))  # the same steps without layer-wise adaptation
    for it in range(3):
        grads = {"w": torch.randn(3, 4), "b": torch.randn(4), "zero": torch.randn(2, 2)}
        for name, p in (("w", w), ("b", b), ("zero", zero)):
            p.grad = grads[name].clone()
        lr = 0.5 / (it + 1)  # the schedule changes lr between steps: it enters the momentum buffer
        for group in opt.param_groups:
            group["lr"] = lr
        opt.step()
        for name, excl, wd in (("w", False, 0.01), ("b", True, 0.0), ("zero", False, 0.01)):
            w_ref, v_ref = ref[name]
            ref[name] = _naive_lars_step(
                w_ref, v_ref, g=grads[name], lr=lr, momentum=0.9, wd=wd, eta=0.02, exclude=excl
            )
        plain = _naive_lars_step(*plain, lr=lr, momentum=0.9, wd=0.01, eta=0.02, exclude=True, g=grads["w"])
    for name, p in (("w", w), ("b", b), ("zero", zero)):
        torch.testing.assert_close(p.detach().double(), ref[name][0], atol=1e-6, rtol=1e-6)
    # the trust ratio is really applied: without it the weights end up elsewhere
    assert (w.detach().double() - plain[0]).abs().max() > 0.1


def test_build_optimizer_groups_and_schedules() -> None:
    lin = torch.nn.Linear(4, 3)
    groups = [{"params": [lin.weight]}, {"params": [lin.bias], "weight_decay": 0.0, "lars_exclude": True}]
    for name, cls in (("sgd", torch.optim.SGD), ("lars", LARS), ("adamw", torch.optim.AdamW)):
        opt = build_optimizer(groups, OptimCfg(name=name, weight_decay=1e-4), lr=0.1)
        assert isinstance(opt, cls)
        apply_schedules(opt, lr=0.25, weight_decay=0.05)
        decayed, fixed = opt.param_groups
        assert decayed["lr"] == fixed["lr"] == 0.25
        assert decayed["weight_decay"] == 0.05 and fixed["weight_decay"] == 0.0  # biases never decay
        assert fixed["lars_exclude"] and not decayed["lars_exclude"]
    with pytest.raises(ConfigError, match="no trainable parameters"):
        build_optimizer([{"params": [torch.nn.Parameter(torch.ones(1), requires_grad=False)]}], OptimCfg(), 0.1)


def test_fixed_lr_groups_keep_the_peak_lr() -> None:
    """SimSiam's predictor: groups marked fixed_lr are not decayed by the schedule."""
    import torch

    from sslrun.core.train.optim import apply_schedules

    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([{"params": [a]}, {"params": [b], "fixed_lr": True}], lr=0.1)
    apply_schedules(opt, lr=0.01, weight_decay=0.0, peak_lr=0.5)
    assert [g["lr"] for g in opt.param_groups] == [0.01, 0.5]


def test_simsiam_marks_only_the_predictor_fixed() -> None:
    from sslrun.core.plugins.build import build_config
    from sslrun.core.plugins.resolve import build_method

    m = build_method(build_config(None, {"method.name": "simsiam"}), 28)
    fixed = {id(p) for g in m.param_groups() if g.get("fixed_lr") for p in g["params"]}
    assert fixed == {id(p) for p in m.predictor.parameters()}
    assert sum(len(g["params"]) for g in m.param_groups()) == len([p for p in m.parameters() if p.requires_grad])


def test_default_warmup_is_the_smaller_of_10_epochs_and_a_tenth_of_the_run() -> None:
    """Unset, the warm-up is min(10 epochs, epochs / 10), so a short run reaches the cosine decay; an explicit
    ``schedule.warmup_epochs`` is used as given."""
    cfg = ExperimentConfig()
    assert cfg.schedule.warmup_epochs is None
    for epochs, warmup_steps in ((1, 10), (10, 100), (100, 1000), (400, 1000)):
        cfg.schedule.epochs = epochs
        s = build_schedules(cfg, steps_per_epoch=100)
        assert s.warmup_steps == warmup_steps, epochs
        peak = float(s.lr.max())
        assert s.lr[warmup_steps - 1] == pytest.approx(peak)  # the warm-up ends at the peak
        assert s.lr[-1] < 0.01 * peak  # and the cosine decays to the end
    cfg.schedule.epochs, cfg.schedule.warmup_epochs = 1, 10.0  # explicit: the whole 1-epoch run warms up
    s = build_schedules(cfg, steps_per_epoch=100)
    assert s.warmup_steps == 100 and s.lr[-1] == pytest.approx(float(s.lr.max()))
    with pytest.raises(ConfigError, match="warmup_epochs"):
        ExperimentConfig.from_dict({"schedule": {"warmup_epochs": -1}})


def test_the_launch_plan_line_shows_the_warmup(tmp_path) -> None:
    from sslrun.cluster.plan import plan_launch

    cfg = ExperimentConfig(output=str(tmp_path / "run"))
    cfg.schedule.epochs = 1
    line = plan_launch(cfg, embedded=True, local_cpus=2, local_gpus=0).describe()
    assert line.endswith("; 1 epoch, lr warm-up 0.1 epochs then cosine"), line
    cfg.schedule.epochs, cfg.schedule.warmup_epochs = 200, 5
    assert (
        plan_launch(cfg, embedded=True, local_cpus=2, local_gpus=0)
        .describe()
        .endswith("; 200 epochs, lr warm-up 5 epochs then cosine")
    )


@pytest.mark.parametrize("name", ["sgd", "lars", "adamw"])
def test_frozen_groups_get_no_update_at_all(name: str) -> None:
    """A group with ``frozen_steps`` keeps its weights exactly (no weight decay, no momentum) while frozen, then
    trains; a zero gradient alone would still move them through weight decay."""
    from sslrun.core.train.optim import drop_frozen_grads

    torch.manual_seed(0)
    frozen, free = torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(4, 3))
    zeroed = torch.nn.Parameter(frozen.detach().clone())
    groups = [{"params": [frozen], "frozen_steps": 2}, {"params": [free]}, {"params": [zeroed]}]
    opt = build_optimizer(groups, OptimCfg(name=name, weight_decay=0.1), lr=0.1)
    start = frozen.detach().clone()
    for step in range(3):
        opt.zero_grad()
        (frozen.sum() * (1.0 if step >= 2 else 0.0) + free.square().sum() + zeroed.sum() * 0.0).backward()
        drop_frozen_grads(opt, step)
        opt.step()
        if step < 2:
            assert torch.equal(frozen.detach(), start), f"{name}: moved at step {step}"
    assert not torch.equal(frozen.detach(), start), f"{name}: still frozen after its period"
    assert not torch.equal(zeroed.detach(), start), f"{name}: a zero gradient should have let weight decay act"


def test_dino_puts_its_last_layer_in_frozen_groups() -> None:
    from sslrun.core.interfaces import SetupContext
    from sslrun.core.plugins.build import build_config
    from sslrun.core.plugins.resolve import build_method

    m = build_method(build_config(None, {"method.name": "dino"}, ["method.kwargs.norm_last_layer=false"]), 28)
    m.setup(SetupContext(image_size=28, steps_per_epoch=7, total_steps=70))
    groups = m.param_groups()
    frozen = {id(p): g["frozen_steps"] for g in groups if "frozen_steps" in g for p in g["params"]}
    assert frozen == {id(p): 7 for p in m.head.last_layer.parameters()}  # freeze_last_layer_epochs=1
    assert sum(len(g["params"]) for g in groups) == len([p for p in m.parameters() if p.requires_grad])


def test_lars_trust_coefficient_is_the_papers_where_their_lars_is_claimed() -> None:
    from sslrun.core.plugins.build import build_config

    assert OptimCfg().lars_eta == 0.001  # You et al. 2017 and the official SSL code
    for name in ("barlow_twins", "vicreg", "swav", "mocov3", "nnclr"):
        cfg = build_config(None, {"method.name": name})
        assert (cfg.optim.name, cfg.optim.lars_eta) == ("lars", 0.001), name
