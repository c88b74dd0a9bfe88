"""Batched colour augmentations on the training device, with per-sample random parameters.

FFCV 1.0.2 has no grayscale, blur, solarize or hue op, and a torch module placed in an FFCV pipeline is called once
per batch, so a torchvision random transform there draws one random parameter per *batch*. So the colour part of a
view runs here, after the loader, on whole batches on the training device: every sample gets its own factors, drawn
from a ``torch.Generator`` seeded from ``(seed, epoch, global batch index)`` (:func:`sslrun.core.rng.batch_seed`) for
the whole global batch, of which each rank keeps its part, so a resumed run draws exactly the same parameters, on
any number of workers.

The operations follow torchvision's float-tensor kernels (``transforms.v2.functional``), which is what SimCLR,
MoCo v2, BYOL and DINO use through ``ColorJitter``/``RandomGrayscale``/``GaussianBlur``/``RandomSolarize``:

* colour jitter (Chen et al. 2020, SimCLR, appendix A): brightness, contrast and saturation factors uniform in
  ``[max(0, 1 - s), 1 + s]``, a hue shift uniform in ``[-h, h]``, applied in a random order per sample (as
  ``ColorJitter`` does per call) or in the fixed order b, c, s, h; each result clamped to [0, 1];
* grayscale with ITU-R 601 luma weights (0.2989, 0.587, 0.114), replicated to 3 channels;
* gaussian blur with a per-sample sigma, kernel side about 10% of the image (SimCLR), reflect padding;
* solarization (Grill et al. 2020, BYOL): ``x -> 1 - x`` where ``x >= 0.5``.

Images are ``(N, 3, H, W)`` float tensors in [0, 1]; :class:`Normalize` comes last.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from sslrun.core.data.color_params import ColorParams
from sslrun.core.interfaces import ViewSpec

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ColorAugment",
    "Normalize",
    "adjust_hue",
    "blur_kernel_size",
    "gaussian_blur",
    "grayscale",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_LUMA = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale weights
_BRIGHTNESS, _CONTRAST, _SATURATION, _HUE = range(4)


def grayscale(x: torch.Tensor) -> torch.Tensor:
    """Luma ``(N, 1, H, W)`` of ``(N, 3, H, W)`` images (torchvision's weights)."""
    r, g, b = x.unbind(1)
    return r.mul(_LUMA[0]).add_(g, alpha=_LUMA[1]).add_(b, alpha=_LUMA[2]).unsqueeze(1)


def adjust_hue(x: torch.Tensor, hue: torch.Tensor) -> torch.Tensor:
    """Rotate the hue of each image ``x[n]`` by ``hue[n]`` (a fraction of the colour circle, in [-0.5, 0.5]).

    The same HSV round trip as torchvision's ``adjust_hue`` (after Pillow's ``Convert.c``), in closed form:
    with ``chroma = max - min`` and the hue ``h`` in sextants, output channel ``n`` (5, 3, 1 for r, g, b) is
    ``max - chroma * clamp(min(k, 4 - k), 0, 1)``, ``k = (n + h) mod 6``. It is written with float arithmetic
    only, no boolean masks, ``where`` or gathers: on the CPU a boolean ``where`` over an image batch costs ~40x
    a float multiply, so this form is several times faster there (and no slower on a GPU).
    Agrees with torchvision to ~1e-6.
    """
    r, g, b = x.unbind(1)  # (N, H, W) each
    maxc = torch.maximum(torch.maximum(r, g), b)
    chroma = maxc - torch.minimum(torch.minimum(r, g), b)
    # Where r == g == b the distances below are all exactly 0 whatever the divisor; the clamp only avoids 0/0.
    inv = chroma.clamp_min(1e-12).reciprocal_()
    rc, gc, bc = (maxc - r).mul_(inv), (maxc - g).mul_(inv), (maxc - b).mul_(inv)  # in [0, 1]; 0 = the max
    not_r, not_g = torch.sign(rc), torch.sign(gc)  # 0 where that channel is the maximum, else 1 (exact)
    # Sector of the maximum, r first, then g (as torchvision): hue in sextants, in [-1, 5).
    h = (bc - gc).mul_(1.0 - not_r)
    h.add_((rc - bc).add_(2.0).mul_(not_r * (1.0 - not_g)))
    h.add_((gc - rc).add_(4.0).mul_(not_r * not_g))
    h.add_(6.0 * hue.view(-1, 1, 1))
    out = []
    for n in (5.0, 3.0, 1.0):
        k = h + n
        k.sub_(torch.floor(k * (1.0 / 6.0)).mul_(6.0))  # mod 6
        out.append(maxc - chroma * torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0))
    return torch.stack(out, dim=1)


def blur_kernel_size(size: int) -> int:
    """Odd gaussian-blur kernel side, about 10% of the image side (SimCLR, appendix A), at least 3."""
    return max(3, int(0.1 * size) // 2 * 2 + 1)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Blur each image ``x[n]`` with its own ``sigma[n]`` (separable, reflect padding as in torchvision)."""
    n, c, h, w = x.shape
    half = kernel_size // 2
    pos = torch.arange(-half, half + 1, device=x.device, dtype=x.dtype)
    kernel = torch.exp(-0.5 * (pos.view(1, -1) / sigma.view(-1, 1)) ** 2)  # (N, k)
    kernel = kernel / kernel.sum(1, keepdim=True)
    kernel = kernel.repeat_interleave(c, dim=0)  # (N*C, k): one kernel per channel of each image
    y = x.reshape(1, n * c, h, w)
    # torchvision pads by reflection; reflection needs the pad to be smaller than the side (tiny images).
    mode = "reflect" if half < min(h, w) else "replicate"
    y = F.pad(y, (half, half, half, half), mode=mode)
    y = F.conv2d(y, kernel.view(n * c, 1, -1, 1), groups=n * c)  # vertical pass
    y = F.conv2d(y, kernel.view(n * c, 1, 1, -1), groups=n * c)  # horizontal pass
    return y.reshape(n, c, h, w)


class ColorAugment:
    """The colour part of one :class:`~sslrun.core.interfaces.ViewSpec`, applied to whole batches.

    Args:
        spec: the view (its crop and flip happen in FFCV; this object uses the colour fields).
        random_order: apply the four jitter operations in a random order per sample (torchvision's
            ``ColorJitter``, used by SimCLR/BYOL/MoCo v2); False = fixed order brightness, contrast,
            saturation, hue (a little cheaper).

    Example:
        >>> from sslrun.core.rng import batch_seed
        >>> aug = ColorAugment(ViewSpec(size=32))
        >>> g = torch.Generator().manual_seed(batch_seed(0, epoch=0, batch=0, rank=0))
        >>> out = aug(torch.rand(8, 3, 32, 32), g)
    """

    def __init__(self, spec: ViewSpec, *, random_order: bool = True) -> None:
        b, c, s, h = (float(v) for v in spec.jitter)
        if min(b, c, s) < 0 or not 0 <= h <= 0.5:
            raise ValueError(f"jitter strengths must be >= 0 and hue <= 0.5, got {spec.jitter}")
        lo, hi = spec.blur_sigma
        if not 0 < lo <= hi:
            raise ValueError(f"blur_sigma must satisfy 0 < lo <= hi, got {spec.blur_sigma}")
        self.spec = spec
        self.random_order = random_order
        self.kernel_size = blur_kernel_size(spec.size)
        # (low, high) of each jitter factor: torchvision's ranges; a strength of 0 disables that operation.
        self._ranges = ((max(0.0, 1 - b), 1 + b), (max(0.0, 1 - c), 1 + c), (max(0.0, 1 - s), 1 + s), (-h, h))
        self._enabled = (b > 0, c > 0, s > 0, h > 0)
        #: True when no colour operation can ever apply (crop-and-flip views, e.g. pretext tasks'): the loader
        #: then skips this object entirely.
        self.is_identity = (spec.jitter_p == 0 or not any(self._enabled)) and max(
            spec.grayscale_p, spec.blur_p, spec.solarize_p
        ) == 0

    def sample(self, n: int, generator: torch.Generator) -> ColorParams:
        """Draw the parameters of ``n`` samples. The draw sequence is fixed, whatever the probabilities are, so
        changing one probability does not shift the others' random numbers."""
        spec = self.spec
        u = torch.rand(n, 9, generator=generator)  # one column per decision / continuous parameter
        factors = torch.stack([lo + (hi - lo) * u[:, k] for k, (lo, hi) in enumerate(self._ranges)], dim=1)
        keys = torch.rand(n, 4, generator=generator)
        order = keys.argsort(dim=1) if self.random_order else torch.arange(4).expand(n, 4)
        lo, hi = spec.blur_sigma
        return ColorParams(
            jitter=u[:, 4] < spec.jitter_p,
            factors=factors,
            order=order,
            gray=u[:, 5] < spec.grayscale_p,
            blur=u[:, 6] < spec.blur_p,
            sigma=lo + (hi - lo) * u[:, 7],
            solarize=u[:, 8] < spec.solarize_p,
        )

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Augment ``x`` ``(N, 3, H, W)`` float in [0, 1] (modified in place and returned)."""
        return self.apply(x, self.sample(x.shape[0], generator))

    def from_uint8(
        self, x: torch.Tensor, generator: torch.Generator, part: tuple[int, int] | None = None
    ) -> torch.Tensor:
        """Augment uint8 pixels ``x`` ``(N, 3, H, W)`` (any layout): a new float32 NCHW tensor in [0, 1].

        ``part=(offset, total)``: ``x`` is rows ``offset .. offset + N`` of a batch of ``total`` images (one rank's
        part of a global batch); the parameters are drawn for all ``total`` and these rows used, so that an image
        gets the same augmentation however the batch is split. None: ``x`` is the whole batch.
        The same images as ``self(x / 255, generator)`` when ``part`` is None. On the CPU, jitter and grayscale run
        in one fused numba pass per image (:mod:`sslrun.core.data.color_cpu`, ~12x faster there than these torch
        ops); elsewhere, and for blur and solarization, the torch ops below.
        """
        if part is None:
            params = self.sample(x.shape[0], generator)
        else:
            offset, total = part
            params = self.sample(total, generator).rows(slice(offset, offset + x.shape[0]))
        if x.device.type != "cpu":
            return self.apply(x.to(torch.float32, memory_format=torch.contiguous_format).div_(255.0), params)
        from sslrun.core.data.color_cpu import to_float_jitter_gray  # numba: imported only where it runs

        y = to_float_jitter_gray(x, params, self._enabled)
        return self._blur_solarize(y, params)

    def apply(self, x: torch.Tensor, params: ColorParams) -> torch.Tensor:
        """Apply already drawn parameters to ``x`` (modified in place where possible, and returned).

        Per-sample choices are applied with float weights that are exactly 0 or 1 for the samples they skip, or
        on the selected rows only, never with a boolean ``where`` over whole images (slow on the CPU). Every
        decision (which rows, which operation) is taken on the CPU copy of the parameters, so on a GPU nothing
        here waits for the device; only small per-sample vectors are copied to it.
        """
        if any(self._enabled) and bool(params.jitter.any()):
            x = self._jitter(x, params)
        if bool(params.gray.any()):
            rows = params.gray.nonzero().squeeze(1).to(x.device, non_blocking=True)
            x = x.index_copy(0, rows, grayscale(x.index_select(0, rows)).expand(-1, 3, -1, -1))
        return self._blur_solarize(x, params)

    def _blur_solarize(self, x: torch.Tensor, params: ColorParams) -> torch.Tensor:
        """The operations after jitter and grayscale: gaussian blur, then solarization, on their rows only."""
        dev = x.device
        if bool(params.blur.any()):
            rows = params.blur.nonzero().squeeze(1)
            sigma = params.sigma[rows].to(dev, non_blocking=True)
            rows = rows.to(dev, non_blocking=True)
            x = x.index_copy(0, rows, gaussian_blur(x.index_select(0, rows), sigma, self.kernel_size))
        if bool(params.solarize.any()):
            rows = params.solarize.nonzero().squeeze(1).to(dev, non_blocking=True)
            sub = x.index_select(0, rows)
            # x -> 1 - x where x >= 0.5: x + w (1 - 2x) with w = 1 above 0.5, 0 below (at 0.5 both give 0.5).
            w = torch.sign(sub - 0.5).add_(1.0).mul_(0.5)
            x = x.index_copy(0, rows, sub.addcmul_(w, 1.0 - 2.0 * sub))
        return x

    def _jitter(self, x: torch.Tensor, params: ColorParams) -> torch.Tensor:
        """Brightness, contrast and saturation are one blend ``f * x + (1 - f) * ref`` with ``ref`` = 0, the mean
        luma, or the luma image: at each of the four positions every sample does exactly one operation, so one
        blend per position serves all three. Samples whose operation there is the hue shift or a disabled one,
        and samples that skip jitter, get ``f = 1`` and ``1 - f = 0``: an exact identity. The hue shift runs
        only on the rows that do it at that position."""
        n, dev = x.shape[0], x.device
        enabled = torch.tensor(self._enabled)
        for pos in range(4):
            op = params.order[:, pos]  # (n,) which operation each sample does now (CPU)
            active = enabled[op] & params.jitter
            blend = active & (op != _HUE)
            if bool(blend.any()):
                f = torch.where(blend, params.factors.gather(1, op.view(-1, 1)).squeeze(1), 1.0)
                rest = 1.0 - f  # exactly 0 where f == 1
                is_c, is_s = blend & (op == _CONTRAST), blend & (op == _SATURATION)
                c_w = torch.where(is_c, rest, 0.0)
                s_w = torch.where(is_s, rest, 0.0)
                f, c_w, s_w = torch.stack([f, c_w, s_w]).to(dev, non_blocking=True).view(3, n, 1, 1, 1)
                if bool(is_c.any() | is_s.any()):
                    luma = grayscale(x)  # (n, 1, H, W), of the image as it is at this position
                    ref = luma.mul(s_w)
                    if bool(is_c.any()):
                        ref.add_(luma.mean((2, 3), keepdim=True).mul_(c_w))
                    x = torch.addcmul(ref, x, f).clamp_(0.0, 1.0)  # one pass for f * x + ref
                else:  # brightness only at this position: ref = 0
                    x = x.mul_(f).clamp_(0.0, 1.0)
            hue_rows = (active & (op == _HUE)).nonzero().squeeze(1)
            if hue_rows.numel():
                hue = params.factors[hue_rows, _HUE].to(dev, non_blocking=True)
                rows = hue_rows.to(dev, non_blocking=True)
                x = x.index_copy_(0, rows, adjust_hue(x.index_select(0, rows), hue))
        return x


class Normalize:
    """``(x - mean) / std`` per channel; ``mean``/``std`` are 3 floats in [0, 1]-image units (the manifest's)."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...], device: torch.device | str = "cpu") -> None:
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise ValueError(f"mean and std need 3 values each, std > 0; got mean={mean}, std={std}")
        self.mean = torch.tensor(mean, dtype=torch.float32, device=device).view(1, 3, 1, 1)
        self.inv_std = (1.0 / torch.tensor(std, dtype=torch.float32, device=device)).view(1, 3, 1, 1)
        # the same affine map from uint8 pixels, as 3 floats each for the CPU kernel
        self._scale = (self.inv_std.view(3).cpu() / 255.0).numpy().astype(np.float32)
        self._shift = (self.mean.view(3).cpu() * self.inv_std.view(3).cpu()).numpy().astype(np.float32)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise ``x`` ``(N, 3, H, W)`` in [0, 1] (in place)."""
        return x.sub_(self.mean).mul_(self.inv_std)

    def from_uint8(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise uint8 pixels directly: ``x * (1 / (255 std)) - mean / std``, a new float32 tensor in standard
        (NCHW-contiguous) layout whatever the layout of ``x``. Two passes instead of four (convert, /255, -mean,
        /std); equal to ``self(x / 255)`` up to float rounding."""
        if x.device.type == "cpu" and x.dtype == torch.uint8:
            # one numba pass from FFCV's channels-last bytes (3.6x faster than the torch ops below on 224 px)
            from sslrun.core.data.color_cpu import normalize_uint8  # numba: imported only where it runs

            return normalize_uint8(x, self._scale, self._shift)
        y = torch.empty(x.shape, dtype=torch.float32, device=x.device)
        torch.mul(x, self.inv_std * (1.0 / 255.0), out=y)
        return y.sub_(self.mean * self.inv_std)
