"""Pretext tasks, the PretextMethod base class they subclass, and their registration.

Each task's ``make_inputs`` is checked for correct targets (rotating back by the label recovers the image, the
jigsaw un-permuted by its label is the image, inpainting holes, colorization grayscale/Lab, MAE mask counts), each
loss against a naive re-implementation of the paper's formula, and each task learns a fixed batch. The base class is
checked for its seeded, checkpointed randomness and its visuals. The last test trains every registered task for a
few steps through ``sslrun train``.
"""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from kornia.color import rgb_to_lab

from sslrun.core.config import DataCfg, ExperimentConfig, PluginRef
from sslrun.core.errors import ConfigError
from sslrun.core.interfaces import Method, ViewSpec
from sslrun.core.plugins.registry import get_registry
from sslrun.core.plugins.resolve import build_method, method_class, method_config, validate_plugins
from sslrun.core.pretext import PretextMethod
from sslrun.core.rng import step_seed

PRETEXTS = get_registry("pretext").names()
MEAN = (0.5, 0.45, 0.4)
STD = (0.25, 0.24, 0.26)

#: small, fast settings per task for CPU tests (the defaults are the papers')
FAST_KWARGS = {
    "rotation": {"head_hidden_dim": 64},
    "jigsaw": {"head_hidden_dim": 64},
    "inpainting": {"decoder_channels": 32},
    "autoencoder": {"decoder_channels": 32},
    "colorization": {"decoder_channels": 32},
    "mae": {"decoder_depth": 1, "decoder_dim": 64, "decoder_heads": 4},
}
SMALL_CNN = PluginRef("small_cnn", {"width": 8})
SMALL_VIT = PluginRef("vit_tiny", {"depth": 2})


def images(n: int = 4, size: int = 32, seed: int = 0) -> torch.Tensor:
    """Smooth random colour images (bilinear upsampling of 4x4 noise), normalised with MEAN/STD."""
    g = torch.Generator().manual_seed(seed)
    x = F.interpolate(torch.rand(n, 3, 4, 4, generator=g), size=(size, size), mode="bilinear", align_corners=False)
    return normalize(x)


def normalize(x: torch.Tensor) -> torch.Tensor:
    return (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


def denormalize(x: torch.Tensor) -> torch.Tensor:
    return x * torch.tensor(STD).view(1, 3, 1, 1) + torch.tensor(MEAN).view(1, 3, 1, 1)


def gen(seed: int = 1) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def encoder_for(name: str) -> PluginRef:
    return SMALL_VIT if name == "mae" else SMALL_CNN


def build(name: str, size: int = 32, encoder: PluginRef | None = None, **kwargs) -> Method:
    cfg = ExperimentConfig(
        method=PluginRef(name, {**FAST_KWARGS.get(name, {}), **kwargs}), encoder=encoder or encoder_for(name)
    )
    method = build_method(cfg, size)
    method.set_normalization(MEAN, STD)
    return method


def task(name: str, size: int = 32, **kwargs) -> PretextMethod:
    return build(name, size, **kwargs)


# ---- the base class, for every registered task ----------------------------------------------------------------
def test_builtin_tasks_are_registered():
    assert set(PRETEXTS) >= {"rotation", "colorization", "inpainting", "jigsaw", "mae", "autoencoder"}


@pytest.mark.parametrize("name", PRETEXTS)
def test_adapter_class(name: str):
    task_cls = get_registry("pretext").get(name)
    cls = method_class(name)
    assert issubclass(cls, Method) and cls is task_cls  # the registered class is the Method itself
    assert cls.name == name and cls.Config is task_cls.Config
    assert cls.requires_color is task_cls.requires_color
    specs = cls.view_specs(task_cls.Config(), 32)
    assert len(specs) == 1 and isinstance(specs[0], ViewSpec) and specs[0].size == 32
    assert not specs[0].uses_color  # no colour jitter: colorization and visuals need the true colours


@pytest.mark.parametrize("name", PRETEXTS)
def test_forward_backward_visuals(name: str):
    torch.manual_seed(0)
    method = build(name)
    out = method([images()])
    assert out["loss"].ndim == 0 and torch.isfinite(out["loss"])
    out["loss"].backward()
    unused = [n for n, p in method.head.named_parameters() if p.grad is None]
    assert not unused, f"head parameters without gradient: {unused}"
    assert all(p.grad is not None for p in method.encoder.parameters())
    vis = method.visuals()
    if vis is not None:
        for name_, img in vis.items():
            assert img.ndim == 4 and img.shape[1] == 3 and img.shape[0] <= method.num_visuals, name_
            assert img.min() >= 0 and img.max() <= 1 and img.dtype == torch.float32


def test_pretext_needs_image_size():
    cls = method_class("rotation")
    enc = torch.nn.Linear(3, 3)
    enc.output_dim = 3
    with pytest.raises(ConfigError, match="needs the image size"):
        cls(enc, cls.Config())


def test_bad_task_kwargs_are_config_errors():
    for name, kwargs, match in [
        ("mae", {"mask_ratio": 1.5}, "mask_ratio"),
        ("jigsaw", {"grid": 7}, "grid"),
        ("jigsaw", {"grid": 2, "num_permutations": 30}, "exceeds the 24"),
        ("inpainting", {"mask": "circle"}, "not one of"),
        ("colorization", {"target": "hsv"}, "not one of"),
        ("rotation", {"nope": 1}, "unknown config key"),
    ]:
        cfg = ExperimentConfig(method=PluginRef(name, kwargs))
        with pytest.raises(ConfigError, match=match):
            method_config(cfg)


# ---- seeded randomness that survives checkpoints -----------------------------------------------------------
def test_step_randomness_is_checkpointed():
    torch.manual_seed(0)
    a = build("inpainting")
    x = images()
    for _ in range(3):
        a([x])
    state = {k: v.clone() for k, v in a.state_dict().items()}
    torch.manual_seed(123)  # different weights and a different pretext seed
    b = build("inpainting")
    assert int(b.pretext_seed) != int(a.pretext_seed)
    b.load_state_dict(state)
    assert b._step == 3 and int(b.pretext_step) == 3
    out_a, out_b = a([x]), b([x])
    torch.testing.assert_close(a._last[1], b._last[1])  # the same holes at step 4
    torch.testing.assert_close(out_a["loss"], out_b["loss"])


def test_steps_and_ranks_draw_different_randomness():
    torch.manual_seed(0)
    m = build("inpainting")
    x = images()
    m([x])
    first = m._last[3].clone()
    m([x])
    assert not torch.equal(first, m._last[3])  # a new mask each training step
    m.eval()
    m([x])
    held = m._last[3].clone()
    m([x])
    assert torch.equal(held, m._last[3]) and m._step == 2  # eval forwards do not advance the step
    assert step_seed(5, 7, 0) != step_seed(5, 7, 1) != step_seed(5, 8, 0)
    assert 0 <= step_seed(2**62, 10**9, 1023) < 2**63


# ---- rotation ----------------------------------------------------------------------------------------------
def test_rotation_all_rotations_rotate_back():
    t = task("rotation")
    x = images(3)
    inputs, labels = t.make_inputs(x, gen())
    assert inputs.shape == (12, 3, 32, 32) and labels.tolist() == [0, 1, 2, 3] * 3
    for i in range(12):
        back = torch.rot90(inputs[i], -int(labels[i]), dims=(1, 2))
        torch.testing.assert_close(back, x[i // 4], rtol=0, atol=0)
    assert not torch.equal(inputs[1], inputs[0])


def test_rotation_random_rotate_back():
    t = task("rotation", all_rotations=False)
    x = images(16)
    inputs, labels = t.make_inputs(x, gen())
    assert inputs.shape == x.shape and set(labels.tolist()) <= {0, 1, 2, 3} and len(set(labels.tolist())) > 1
    for i in range(16):
        torch.testing.assert_close(torch.rot90(inputs[i], -int(labels[i]), dims=(1, 2)), x[i], rtol=0, atol=0)
    again, labels2 = t.make_inputs(x, gen())
    assert torch.equal(labels, labels2) and torch.equal(inputs, again)  # the generator decides


def test_rotation_loss_and_visuals():
    t = task("rotation")
    logits, labels = torch.randn(6, 4), torch.tensor([0, 1, 2, 3, 1, 2])
    naive = sum(-math.log(math.exp(logits[i, labels[i]]) / sum(math.exp(v) for v in logits[i])) for i in range(6)) / 6
    assert float(t.loss(logits, labels)) == pytest.approx(naive, abs=1e-5)
    inputs, labels = t.make_inputs(images(2), gen())
    vis = t.visualize(images(2), inputs, F.one_hot(labels, 4).float(), labels)  # a perfect prediction
    torch.testing.assert_close(vis["prediction"], vis["target"])
    torch.testing.assert_close(vis["target"][0], denormalize(images(2))[0])


# ---- jigsaw ------------------------------------------------------------------------------------------------
def test_hamming_permutation_sets():
    from sslrun.plugins.pretext.jigsaw import _all_permutations, hamming_permutations

    assert sorted(map(tuple, _all_permutations(5).tolist())) == sorted(itertools.permutations(range(5)))
    two = hamming_permutations(4, 24, 0)
    assert sorted(map(tuple, two.tolist())) == sorted(itertools.permutations(range(4)))  # all 24
    three = hamming_permutations(9, 100, 0)
    assert three.shape == (100, 9) and len({tuple(p) for p in three.tolist()}) == 100
    assert all(sorted(p) == list(range(9)) for p in three.tolist())
    dists = (three[:, None, :] != three[None, :, :]).sum(-1) + 9 * torch.eye(100, dtype=torch.long).numpy()
    # greedy max-min selection: every pair differs in >= 6 of 9 positions (100 random permutations: 2-3)
    assert dists.min() >= 6
    assert (hamming_permutations(9, 100, 0) == three).all()
    assert not (hamming_permutations(9, 100, 1) == three).all()


@pytest.mark.parametrize("grid", [2, 3])
def test_jigsaw_unpermuting_recovers_the_image(grid: int):
    t = task("jigsaw", size=30, grid=grid, tile_crop=1.0, tile_norm=False)
    x = images(5, 30)
    tiles, labels = t.make_inputs(x, gen())
    cell = 30 // grid
    assert tiles.shape == (5, grid * grid, 3, cell, cell)
    assert labels.max() < len(t.permutations)
    from sslrun.plugins.common.patches import assemble_tiles

    restored = assemble_tiles(t.unshuffle(tiles, labels), grid, gap=0)
    torch.testing.assert_close(restored, x[:, :, : grid * cell, : grid * cell], rtol=0, atol=0)
    # and the inputs really are shuffled for non-identity permutations
    ident = torch.arange(grid * grid)
    shuffled = [i for i in range(5) if not torch.equal(t.permutations[labels[i]], ident)]
    assert shuffled and not torch.equal(tiles[shuffled[0]], t.unshuffle(tiles, labels)[shuffled[0]])


def test_jigsaw_tiles_are_crops_inside_their_cells():
    t = task("jigsaw", size=32, grid=2, tile_crop=0.75, tile_norm=False)
    x = images(2, 32)
    tiles, labels = t.make_inputs(x, gen())
    tiles = t.unshuffle(tiles, labels)
    assert tiles.shape[-1] == 12
    for n in range(2):
        for i in range(4):
            r, c = divmod(i, 2)
            found = any(
                torch.equal(tiles[n, i], x[n, :, r * 16 + dy : r * 16 + dy + 12, c * 16 + dx : c * 16 + dx + 12])
                for dy in range(5)
                for dx in range(5)
            )
            assert found, (n, i)
    normed, _ = task("jigsaw", size=32, grid=2).make_inputs(x, gen())
    torch.testing.assert_close(normed.mean(dim=(3, 4)), torch.zeros(2, 4, 3), atol=1e-5, rtol=0)


def test_jigsaw_visuals_and_default_grid():
    assert task("jigsaw", size=32).grid == 2 and len(task("jigsaw", size=32).permutations) == 24
    t = task("jigsaw", size=32, tile_crop=1.0, tile_norm=False)
    x = images(2, 32)
    tiles, labels = t.make_inputs(x, gen())
    vis = t.visualize(x, tiles, F.one_hot(labels, 24).float(), labels)
    torch.testing.assert_close(vis["prediction"], vis["target"])
    torch.testing.assert_close(vis["target"][:, :, :16, :16], denormalize(x)[:, :, :16, :16])


# ---- inpainting --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mask", ["center", "random_patch", "random_blocks"])
def test_inpainting_inputs_and_targets(mask: str):
    t = task("inpainting", mask=mask)
    x = images(6)
    inputs, targets = t.make_inputs(x, gen())
    hole = targets[:, 3:4].bool()
    assert targets.shape == (6, 4, 32, 32)
    assert torch.equal(targets[:, :3], x)  # the target is the original image...
    assert (inputs.masked_select(hole.expand_as(inputs)) == 0).all()  # ...the input is blanked in the hole...
    assert torch.equal(inputs.masked_select(~hole.expand_as(inputs)), x.masked_select(~hole.expand_as(x)))
    area = hole.flatten(1).sum(1)
    if mask == "random_blocks":
        assert (area > 0).all() and (area <= 4 * 8 * 8).all()
    else:
        assert (area == 16 * 16).all()
    if mask == "center":
        assert hole[:, 0, 8:24, 8:24].all()
    else:
        assert len({tuple(h.nonzero()[0].tolist()) for h in hole[:, 0]}) > 1  # different places per image


def test_inpainting_loss_matches_naive():
    t = task("inpainting")
    g = gen(3)
    pred, target = torch.randn(2, 3, 5, 5, generator=g), torch.randn(2, 3, 5, 5, generator=g)
    mask = (torch.rand(2, 1, 5, 5, generator=g) > 0.6).float()
    total, count = 0.0, 0
    for n, c, i, j in itertools.product(range(2), range(3), range(5), range(5)):
        if mask[n, 0, i, j]:
            total += float(pred[n, c, i, j] - target[n, c, i, j]) ** 2
            count += 1
    loss = t.loss(pred, torch.cat([target, mask], dim=1))
    assert float(loss) == pytest.approx(total / count, abs=1e-5)


# ---- autoencoder -------------------------------------------------------------------------------------------
def test_autoencoder_noise_modes():
    x = images(8)
    inputs, targets = task("autoencoder", noise="none").make_inputs(x, gen())
    assert torch.equal(inputs, x) and torch.equal(targets, x)
    inputs, targets = task("autoencoder", noise="gaussian", noise_std=0.5).make_inputs(x, gen())
    assert torch.equal(targets, x) and float((inputs - x).std()) == pytest.approx(0.5, rel=0.05)
    inputs, _ = task("autoencoder", noise="masking", mask_prob=0.25).make_inputs(x, gen())
    dropped = (inputs == 0).all(dim=1).float().mean()
    assert float(dropped) == pytest.approx(0.25, abs=0.03)
    pred = torch.randn_like(x)
    assert float(task("autoencoder").loss(pred, x)) == pytest.approx(float(((pred - x) ** 2).sum() / x.numel()))


# ---- colorization ------------------------------------------------------------------------------------------
def test_colorization_rgb_input_is_the_grayscale_of_the_target():
    t = task("colorization", target="rgb")
    x = images(3)
    inputs, targets = t.make_inputs(x, gen())
    assert torch.equal(targets, x)
    gray = denormalize(inputs)
    torch.testing.assert_close(gray[:, 0], gray[:, 1], atol=1e-5, rtol=0)
    torch.testing.assert_close(gray[:, 0], gray[:, 2], atol=1e-5, rtol=0)
    rgb = denormalize(x).clamp(0, 1)
    luma = 0.299 * rgb[:, 0] + 0.587 * rgb[:, 1] + 0.114 * rgb[:, 2]
    torch.testing.assert_close(gray[:, 0], luma, atol=1e-5, rtol=0)


@pytest.mark.parametrize("stride", [1, 2])
def test_colorization_lab_inputs_and_targets(stride: int):
    t = task("colorization", output_stride=stride)
    x = images(3)
    inputs, ab = t.make_inputs(x, gen())
    lab = rgb_to_lab(denormalize(x).clamp(0, 1))
    in_lab = rgb_to_lab(denormalize(inputs).clamp(0, 1))
    torch.testing.assert_close(in_lab[:, 0], lab[:, 0], atol=0.05, rtol=0)  # same lightness...
    assert in_lab[:, 1:].abs().max() < 0.05  # ...and no colour
    assert ab.shape == (3, 2, 32 // stride, 32 // stride)
    torch.testing.assert_close(ab, F.avg_pool2d(lab[:, 1:], stride), atol=1e-4, rtol=0)
    assert ab.abs().max() > 5  # the test images are coloured


def test_ab_bins():
    from sslrun.plugins.pretext.colorization import ab_bins

    bins = ab_bins(10.0)
    assert bins.shape == (261, 2)
    assert torch.equal(bins, torch.round(bins / 10) * 10)
    assert (bins == 0).all(dim=1).any()  # neutral grey
    assert len({tuple(b) for b in bins.tolist()}) == 261


def test_colorization_class_loss_matches_naive():
    """Zhang et al. eq. 2 + 4 computed pixel by pixel with plain Python loops."""
    from sslrun.plugins.pretext.colorization import ab_bins

    t = task("colorization")
    bins = ab_bins(10.0).tolist()
    q = len(bins)
    g = gen(7)
    ab = torch.randn(1, 2, 2, 3, generator=g) * 30
    logits = torch.randn(1, q, 2, 3, generator=g)
    pixels = [(i, j) for i in range(2) for j in range(3)]
    soft, nearest = {}, {}
    for i, j in pixels:
        a, b = float(ab[0, 0, i, j]), float(ab[0, 1, i, j])
        d = sorted((math.hypot(a - ba, b - bb), k) for k, (ba, bb) in enumerate(bins))[:5]
        w = [math.exp(-(dist**2) / (2 * 5.0**2)) for dist, _ in d]
        soft[i, j] = [(k, wk / sum(w)) for (_, k), wk in zip(d, w, strict=True)]
        nearest[i, j] = d[0][1]
    counts = [0.0] * q
    for p in pixels:
        counts[nearest[p]] += 1 / len(pixels)
    smoothed = [
        sum(
            counts[r] * math.exp(-((bins[s][0] - bins[r][0]) ** 2 + (bins[s][1] - bins[r][1]) ** 2) / 50)
            for r in range(q)
        )
        for s in range(q)
    ]
    prior = [v / sum(smoothed) for v in smoothed]
    raw = [1 / (0.5 * p + 0.5 / q) for p in prior]
    norm = sum(p * w for p, w in zip(prior, raw, strict=True))
    weights = [w / norm for w in raw]
    total = 0.0
    for i, j in pixels:
        col = [float(v) for v in logits[0, :, i, j]]
        lse = math.log(sum(math.exp(v) for v in col))
        ce = -sum(z * (col[k] - lse) for k, z in soft[i, j])
        total += weights[nearest[i, j]] * ce
    assert float(t.loss(logits, ab)) == pytest.approx(total / len(pixels), abs=1e-5)


def test_annealed_mean():
    from sslrun.plugins.pretext.colorization import annealed_mean

    bins = torch.tensor([[0.0, 0.0], [10.0, -20.0], [30.0, 40.0]])
    logits = torch.tensor([1.0, 2.0, 0.5]).view(1, 3, 1, 1)
    p = torch.softmax(logits.view(3), 0)
    torch.testing.assert_close(annealed_mean(logits, bins, 1.0).view(2), p @ bins)
    torch.testing.assert_close(annealed_mean(logits, bins, 1e-3).view(2), bins[1])  # T -> 0: the mode


def test_colorization_refused_on_grayscale_data():
    cfg = ExperimentConfig(method=PluginRef("colorization"), data=DataCfg(dataset="fashion-mnist"))
    with pytest.raises(ConfigError, match="needs colour images"):
        validate_plugins(cfg)


# ---- MAE ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ratio", [0.75, 0.5, 0.9])
def test_mae_mask_count(ratio: float):
    t = task("mae", mask_ratio=ratio)
    inputs, mask = t.make_inputs(images(6), gen())
    assert mask.shape == (6, 64) and mask.dtype == torch.bool
    expected = 64 - int(64 * (1 - ratio))
    assert mask.sum(dim=1).tolist() == [expected] * 6
    assert len({tuple(m.tolist()) for m in mask}) == 6  # a different mask per image


def test_mae_encoder_sees_visible_patches_only():
    m = build("mae")
    seen = []
    hook = m.encoder.blocks[0].register_forward_pre_hook(lambda mod, args: seen.append(args[0].shape[1]))
    m([images(2)])
    hook.remove()
    assert seen == [1 + 16]  # CLS + 25% of 64 patches


def test_mae_loss_matches_official_formula():
    from sslrun.plugins.pretext.mae import mae_loss, patch_targets

    g = gen(5)
    pred_full, target_full = torch.randn(3, 16, 12, generator=g), torch.randn(3, 16, 12, generator=g)
    mask = torch.zeros(3, 16, dtype=torch.bool)
    for n in range(3):
        mask[n, torch.randperm(16, generator=g)[:12]] = True
    official = ((pred_full - target_full) ** 2).mean(dim=-1)
    official = (official * mask).sum() / mask.sum()
    ours = mae_loss(pred_full[mask].view(3, 12, 12), target_full[mask].view(3, 12, 12))
    assert float(ours) == pytest.approx(float(official), abs=1e-6)
    targets = patch_targets(images(2), 4, norm_pix=True)
    torch.testing.assert_close(targets.mean(-1), torch.zeros(2, 64), atol=1e-5, rtol=0)
    torch.testing.assert_close(targets.var(-1), torch.ones(2, 64), atol=1e-3, rtol=0)


def test_mae_predict_and_visuals():
    m = build("mae")
    x = images(2)
    inputs, mask = m.make_inputs(x, gen())
    pred, target = m.predict(inputs, mask)
    assert pred.shape == target.shape == (2, 48, 4 * 4 * 3)
    vis = m.visualize(x, inputs, pred.detach(), mask)
    from sslrun.plugins.common.patches import patchify

    keep = ~mask
    shown = patchify(vis["prediction"], 4)
    torch.testing.assert_close(shown[keep], patchify(denormalize(x), 4)[keep])  # visible patches kept as they are
    assert torch.allclose(patchify(vis["input"], 4)[mask], patchify(denormalize(torch.zeros_like(x)), 4)[mask])
    # a perfect prediction reconstructs the image exactly
    perfect = m.visualize(x, inputs, target, mask)
    torch.testing.assert_close(perfect["prediction"], denormalize(x), atol=1e-4, rtol=0)


def test_mae_refuses_non_vit_encoders():
    with pytest.raises(ConfigError, match="mae needs a ViT encoder"):
        build("mae", encoder=SMALL_CNN)


def test_patchify_roundtrip():
    from sslrun.plugins.common.patches import patchify, unpatchify

    x = images(2)
    p = patchify(x, 4)
    assert p.shape == (2, 64, 48)
    torch.testing.assert_close(p[0, 9].view(4, 4, 3).permute(2, 0, 1), x[0, :, 4:8, 4:8])  # patch (1, 1)
    torch.testing.assert_close(unpatchify(p, 4, 8, 8), x)


# ---- every task learns a fixed batch -----------------------------------------------------------------------
@pytest.mark.parametrize("name", PRETEXTS)
def test_loss_decreases_on_fixed_batch(name: str):
    torch.manual_seed(0)
    m = build(name)
    inputs, targets = m.make_inputs(images(8), gen())
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    losses = []
    for _ in range(20):
        pred, target = m.predict(inputs, targets)
        loss = m.loss(pred, target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.7 * losses[0], losses


# ---- end to end through `sslrun train` ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def train_data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One prepared synthetic split shared by the training runs below (preparing costs seconds per run)."""
    return tmp_path_factory.mktemp("pretext-data")


@pytest.mark.slow
@pytest.mark.parametrize("name", PRETEXTS)
def test_train_every_task_through_the_cli(name: str, tmp_path: Path, train_data_dir: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from typer.testing import CliRunner

    from sslrun.cli import app

    out = tmp_path / "run"
    flag = "--pretext" if PRETEXTS.index(name) % 2 else "--method"  # both spellings select a pretext task
    args = ["train", flag, name, "--dataset", "synthetic", "--data-dir", str(train_data_dir)]
    args += ["--encoder", "vit_tiny" if name == "mae" else "small_cnn", "--batch-size", "16", "--max-steps", "3"]
    args += ["--device", "cpu", "--num-workers", "1", "--output", str(out)]
    sets = ["data.max_samples=256", "data.dataset_kwargs.num_samples=256", "data.dataset_kwargs.test_samples=64"]
    sets += ["data.dataset_kwargs.size=32", "log.knn_every=0", "log.visuals_every=2", "log.log_every=1"]
    sets += ["encoder.kwargs.depth=2" if name == "mae" else "encoder.kwargs.width=8"]
    sets += [f"method.kwargs.{k}={json.dumps(v)}" for k, v in FAST_KWARGS.get(name, {}).items()]
    for s in sets:
        args += ["--set", s]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert (out / "checkpoints" / "last.pt").is_file()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["train/loss"] for r in records if "train/loss" in r]
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses)
    if name in FAST_KWARGS:  # the built-in tasks all show input / prediction / target grids in TensorBoard
        (events,) = (out / "tb").glob("events.out.tfevents.*")
        acc = EventAccumulator(str(events), size_guidance={"images": 0})
        acc.Reload()
        assert {"visuals/input", "visuals/prediction", "visuals/target"} <= set(acc.Tags()["images"])
