"""Batched on-device colour augmentations (sslrun.core.data.augment) against torchvision's per-image kernels.

No FFCV here: these run on plain tensors and take a few seconds in all.
"""

from __future__ import annotations

import pytest
import torch
from torchvision.transforms.v2 import functional as TF

from sslrun.core.data.augment import (
    ColorAugment,
    Normalize,
    adjust_hue,
    blur_kernel_size,
    gaussian_blur,
    grayscale,
)
from sslrun.core.interfaces import ViewSpec
from sslrun.core.rng import batch_seed

_JITTER_FNS = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _reference(x: torch.Tensor, aug: ColorAugment, params) -> torch.Tensor:
    """torchvision, one image at a time, with the parameters ColorAugment drew."""
    out = []
    for i in range(x.shape[0]):
        im = x[i]
        if params.jitter[i]:
            for op in params.order[i].tolist():
                if aug._enabled[op]:
                    im = _JITTER_FNS[op](im, float(params.factors[i, op]))
        if params.gray[i]:
            im = TF.rgb_to_grayscale(im, num_output_channels=3)
        if params.blur[i]:
            im = TF.gaussian_blur(im, [aug.kernel_size] * 2, [float(params.sigma[i])] * 2)
        if params.solarize[i]:
            im = TF.solarize(im, 0.5)
        out.append(im)
    return torch.stack(out)


@pytest.mark.parametrize("random_order", [True, False])
def test_full_stack_matches_torchvision_per_sample(random_order: bool) -> None:
    # Every operation on, with probabilities that leave a mix of applied / skipped samples.
    spec = ViewSpec(size=24, jitter=(0.4, 0.4, 0.4, 0.1), jitter_p=0.8, grayscale_p=0.3, blur_p=0.5, solarize_p=0.3)
    aug = ColorAugment(spec, random_order=random_order)
    x = torch.rand(48, 3, 24, 24, generator=_gen(1))
    params = aug.sample(48, _gen(2))
    assert 0 < int(params.jitter.sum()) < 48 and 0 < int(params.gray.sum()) < 48
    assert 0 < int(params.blur.sum()) < 48 and 0 < int(params.solarize.sum()) < 48
    if random_order:
        assert len({tuple(o) for o in params.order.tolist()}) > 5  # genuinely per-sample orders
    else:
        assert (params.order == torch.arange(4)).all()
    got = aug.apply(x.clone(), params)
    torch.testing.assert_close(got, _reference(x, aug, params), atol=1e-5, rtol=0)


def test_hue_matches_torchvision_including_ties_and_grey_pixels() -> None:
    x = torch.rand(16, 3, 10, 10, generator=_gen(3))
    x[:, :, 0, :] = x[:, :1, 0, :]  # r == g == b (no hue)
    x[:, 1, 1, :] = x[:, 0, 1, :]  # r == g ties for the maximum
    x[:, 2, 2, :] = x[:, 1, 2, :]  # g == b ties
    x[:, :, 3, :] = torch.tensor([1.0, 0.0, 0.0]).view(3, 1)  # pure red, on a sector border
    hue = torch.linspace(-0.5, 0.5, 16)
    ref = torch.stack([TF.adjust_hue(x[i], float(hue[i])) for i in range(16)])
    torch.testing.assert_close(adjust_hue(x, hue), ref, atol=1e-5, rtol=0)


def test_blur_matches_torchvision_with_per_sample_sigma() -> None:
    x = torch.rand(6, 3, 32, 32, generator=_gen(4))
    sigma = torch.tensor([0.1, 0.5, 1.0, 1.5, 2.0, 3.0])
    k = blur_kernel_size(96)
    assert k == 9 and blur_kernel_size(28) == 3 and blur_kernel_size(224) == 23
    ref = torch.stack([TF.gaussian_blur(x[i], [k, k], [float(s), float(s)]) for i, s in enumerate(sigma)])
    torch.testing.assert_close(gaussian_blur(x, sigma, k), ref, atol=1e-5, rtol=0)


def test_identical_images_get_different_augmentations() -> None:
    """Per-sample randomness: a torch module in an FFCV pipeline would give every sample the same jitter."""
    aug = ColorAugment(ViewSpec(size=16, jitter_p=1.0, grayscale_p=0.0))
    x = torch.rand(1, 3, 16, 16, generator=_gen(5)).expand(32, 3, 16, 16).clone()
    out = aug(x.clone(), _gen(6))
    flat = out.flatten(1)
    dists = torch.cdist(flat, flat)
    off_diag = dists[~torch.eye(32, dtype=torch.bool)]
    assert float(off_diag.min()) > 1e-3, "two samples got the same colour jitter"
    assert not torch.equal(out, x)


def test_same_seed_same_output_and_different_seed_different_output() -> None:
    aug = ColorAugment(ViewSpec(size=16, blur_p=0.5, solarize_p=0.2))
    x = torch.rand(32, 3, 16, 16, generator=_gen(7))
    a = aug(x.clone(), _gen(batch_seed(0, 3, 5, 1)))
    b = aug(x.clone(), _gen(batch_seed(0, 3, 5, 1)))
    c = aug(x.clone(), _gen(batch_seed(0, 3, 6, 1)))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_batch_seed_separates_every_coordinate() -> None:
    base = (11, 2, 7, 1, 0)
    seeds = {batch_seed(*base)}
    for pos in range(5):
        for delta in (1, 2):
            other = list(base)
            other[pos] += delta
            seeds.add(batch_seed(*other))
    assert len(seeds) == 11  # no two of (seed, epoch, batch, rank, view) neighbours collide
    assert all(0 <= s < (1 << 63) for s in seeds)


def test_probabilities_zero_is_exact_identity_and_one_always_applies() -> None:
    x = torch.rand(16, 3, 12, 12, generator=_gen(8))
    off = ColorAugment(ViewSpec(size=12, jitter_p=0.0, grayscale_p=0.0, blur_p=0.0, solarize_p=0.0))
    assert torch.equal(off(x.clone(), _gen(0)), x)
    gray = ColorAugment(ViewSpec(size=12, jitter_p=0.0, grayscale_p=1.0))
    out = gray(x.clone(), _gen(0))
    torch.testing.assert_close(out, grayscale(x).expand_as(x), atol=0, rtol=0)


def test_apply_probabilities_follow_the_spec() -> None:
    spec = ViewSpec(size=8, jitter_p=0.8, grayscale_p=0.2, blur_p=0.5, solarize_p=0.1)
    p = ColorAugment(spec).sample(20000, _gen(9))
    for got, want in ((p.jitter, 0.8), (p.gray, 0.2), (p.blur, 0.5), (p.solarize, 0.1)):
        assert abs(got.float().mean().item() - want) < 0.015
    lo, hi = p.factors[:, 0].min().item(), p.factors[:, 0].max().item()
    assert 0.6 <= lo < 0.61 and 1.39 < hi <= 1.4  # brightness 0.4 -> U[0.6, 1.4]
    assert p.factors[:, 3].abs().max().item() <= 0.1
    assert (p.sigma >= 0.1).all() and (p.sigma <= 2.0).all()


def test_grayscale_images_stay_grayscale() -> None:
    """Grayscale datasets are stored with replicated channels; colour jitter must not invent colour."""
    g = torch.rand(32, 1, 16, 16, generator=_gen(10)).expand(32, 3, 16, 16).clone()
    out = ColorAugment(ViewSpec(size=16, jitter_p=1.0, blur_p=0.5, solarize_p=0.5))(g, _gen(11))
    assert (out.max(1).values - out.min(1).values).max().item() < 1e-3


def test_normalize_from_uint8_equals_the_two_step_path_in_nchw_layout() -> None:
    norm = Normalize((0.3, 0.4, 0.5), (0.2, 0.25, 0.3))
    pixels = torch.randint(0, 256, (4, 9, 7, 3), dtype=torch.uint8, generator=_gen(12)).permute(0, 3, 1, 2)
    fused = norm.from_uint8(pixels)  # channels-last input, as FFCV hands it out
    assert fused.is_contiguous() and fused.dtype == torch.float32
    torch.testing.assert_close(fused, norm(pixels.float() / 255), atol=1e-6, rtol=0)
    assert ColorAugment(ViewSpec(jitter_p=0.0, grayscale_p=0.0)).is_identity
    assert ColorAugment(ViewSpec(jitter=(0, 0, 0, 0), grayscale_p=0.0)).is_identity
    assert not ColorAugment(ViewSpec(jitter_p=0.0, grayscale_p=0.0, solarize_p=0.1)).is_identity
    assert not ColorAugment(ViewSpec()).is_identity


def test_normalize_and_invalid_parameters() -> None:
    x = torch.full((2, 3, 4, 4), 0.5)
    out = Normalize((0.5, 0.25, 0.0), (0.5, 0.25, 0.5))(x)
    assert torch.allclose(out[:, 0], torch.zeros(2, 4, 4)) and torch.allclose(out[:, 1], torch.ones(2, 4, 4))
    assert torch.allclose(out[:, 2], torch.ones(2, 4, 4))
    with pytest.raises(ValueError, match="std"):
        Normalize((0.5,) * 3, (0.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="hue"):
        ColorAugment(ViewSpec(jitter=(0.4, 0.4, 0.4, 0.7)))
    with pytest.raises(ValueError, match="blur_sigma"):
        ColorAugment(ViewSpec(blur_sigma=(0.0, 1.0)))
