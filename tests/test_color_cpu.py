"""The fused CPU colour kernel (sslrun.core.data.color_cpu) against the torch path and torchvision.

The torch path (ColorAugment.apply) is itself checked against torchvision in test_augment.py; here the kernel
must give the same images as both, for every operation alone and all together, any order, colour and gray input.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from test_augment import _reference  # tests/ is on sys.path (rootdir-relative, no package)

from sslrun.core.data.augment import ColorAugment
from sslrun.core.data.color_cpu import to_float_jitter_gray
from sslrun.core.interfaces import ViewSpec

_SPECS = {
    "simclr": ViewSpec(size=20, jitter=(0.4, 0.4, 0.4, 0.1), jitter_p=0.8, grayscale_p=0.2),
    "strong-hue": ViewSpec(size=20, jitter=(0.8, 0.8, 0.8, 0.5), jitter_p=1.0, grayscale_p=0.5),
    "byol": ViewSpec(size=20, jitter=(0.4, 0.4, 0.2, 0.1), jitter_p=0.8, grayscale_p=0.2, blur_p=0.5, solarize_p=0.3),
    "brightness-only": ViewSpec(size=20, jitter=(0.5, 0.0, 0.0, 0.0), jitter_p=1.0),
    "hue-only": ViewSpec(size=20, jitter=(0.0, 0.0, 0.0, 0.3), jitter_p=1.0),
}


def _pixels(n: int, side: int, seed: int, gray: bool = False) -> torch.Tensor:
    """uint8 (n, 3, side, side) in FFCV's channels-last layout; pure pixel values incl. 0/255 and ties."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, side, side, 1 if gray else 3), generator=g, dtype=torch.uint8)
    if gray:
        x = x.expand(-1, -1, -1, 3).contiguous()
    else:  # a few pixels with exact ties between channels (hue sector boundaries) and saturated ones
        x[:, 0, :, 1] = x[:, 0, :, 0]
        x[:, 1, :, :] = 255
    return x.permute(0, 3, 1, 2)


@pytest.mark.parametrize("name", sorted(_SPECS))
@pytest.mark.parametrize("random_order", [True, False])
def test_fused_path_equals_torch_path_and_torchvision(name: str, random_order: bool) -> None:
    aug = ColorAugment(_SPECS[name], random_order=random_order)
    x = _pixels(40, 20, seed=1)
    fused = aug.from_uint8(x, torch.Generator().manual_seed(7))
    params = aug.sample(40, torch.Generator().manual_seed(7))
    as_float = x.to(torch.float32, memory_format=torch.contiguous_format).div_(255.0)
    torch_path = aug.apply(as_float.clone(), params)
    assert fused.dtype == torch.float32 and fused.is_contiguous() and fused.shape == x.shape
    torch.testing.assert_close(fused, torch_path, atol=1e-5, rtol=0)
    torch.testing.assert_close(fused, _reference(as_float, aug, params), atol=1e-5, rtol=0)


def test_kernel_alone_is_jitter_then_grayscale_and_skips_the_rest() -> None:
    aug = ColorAugment(_SPECS["byol"])
    x = _pixels(32, 12, seed=2)
    params = aug.sample(32, torch.Generator().manual_seed(3))
    out = to_float_jitter_gray(x, params, aug._enabled)
    no_blur = dataclasses.replace(
        params, blur=torch.zeros(32, dtype=torch.bool), solarize=torch.zeros(32, dtype=torch.bool)
    )
    expected = aug.apply(x.float().div(255.0).contiguous(), no_blur)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)
    # Nothing applied: x / 255 (to the last bit but one: fastmath multiplies by 1/255), NCHW whatever the layout.
    off = dataclasses.replace(no_blur, jitter=torch.zeros(32, dtype=torch.bool), gray=torch.zeros(32, dtype=torch.bool))
    torch.testing.assert_close(
        to_float_jitter_gray(x.contiguous(), off, aug._enabled), x.float().div(255.0), atol=1e-7, rtol=0
    )


def test_gray_input_stays_gray() -> None:
    aug = ColorAugment(_SPECS["strong-hue"])
    out = aug.from_uint8(_pixels(16, 12, seed=4, gray=True), torch.Generator().manual_seed(5))
    torch.testing.assert_close(out[:, 0], out[:, 1], atol=1e-6, rtol=0)
    torch.testing.assert_close(out[:, 0], out[:, 2], atol=1e-6, rtol=0)


def test_bad_input_is_a_one_line_error() -> None:
    aug = ColorAugment(_SPECS["simclr"])
    params = aug.sample(2, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="expected uint8"):
        to_float_jitter_gray(torch.zeros(2, 3, 4, 4), params, aug._enabled)


@pytest.mark.parametrize("channels_last", [True, False])
def test_normalising_uint8_on_the_cpu_is_one_pass_of_the_same_arithmetic(channels_last: bool) -> None:
    """The numba path of ``Normalize.from_uint8`` (FFCV's channels-last bytes, or any layout) == ``(x / 255 - mean) /
    std`` in float32, as a new standard-layout tensor."""
    from sslrun.core.data.augment import Normalize

    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (4, 17, 19, 3), dtype=torch.uint8, generator=g).permute(0, 3, 1, 2)
    if not channels_last:
        x = x.contiguous()
    norm = Normalize((0.2, 0.5, 0.7), (0.1, 0.3, 0.9))
    got = norm.from_uint8(x)
    want = (x.float() / 255.0 - norm.mean) / torch.tensor((0.1, 0.3, 0.9)).view(1, 3, 1, 1)
    assert got.is_contiguous() and got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=0, atol=2e-6)
