"""Fused CPU kernel for the colour part of a view: uint8 pixels -> float, colour jitter, grayscale, in one pass.

On a GPU, :class:`~sslrun.core.data.augment.ColorAugment` runs as a handful of batched torch kernels, and they are
cheap. On the CPU the same torch code makes ~15 full passes over the batch in memory (one per elementwise op, each
allocating), and that is what bounds a CPU loader (about 22 us per 28 px view, against ~1 us for FFCV's crop).
This module does the same arithmetic per image while the image sits in the L1 cache: read FFCV's uint8 NHWC
pixels, write float32 NCHW in [0, 1], then apply each sample's jitter operations in its own order and its
grayscale choice. The random parameters are the very :class:`~sslrun.core.data.color_params.ColorParams` the torch path
draws, so both paths give the same images (to float rounding; ``tests/test_color_cpu.py`` checks them against
each other and, through the torch path's own tests, against torchvision).

The kernel is compiled with ``nogil=True`` and without numba's ``parallel``: FFCV already runs numba-parallel
code in its own thread, and numba's default (workqueue) threading layer must not be entered from two threads at
once. The loader instead runs one view per Python thread, and these calls release the GIL.
"""

from __future__ import annotations

import numba
import numpy as np
import torch

from sslrun.core.data.color_params import ColorParams

__all__ = ["normalize_uint8", "to_float_jitter_gray"]

_L0, _L1, _L2 = (
    np.float32(0.2989),
    np.float32(0.587),
    np.float32(0.114),
)  # torchvision's rgb_to_grayscale weights (augment._LUMA)


@numba.njit(cache=True, nogil=True, fastmath=True)
def _kernel(
    src: np.ndarray,  # (N, P, 3) uint8: FFCV's NHWC pixels, P = H * W
    out: np.ndarray,  # (N, 3, P) float32
    jitter: np.ndarray,  # (N,) bool
    factors: np.ndarray,  # (N, 4) float32: brightness, contrast, saturation factor, hue shift
    order: np.ndarray,  # (N, 4) int64
    enabled: np.ndarray,  # (4,) bool
    gray: np.ndarray,  # (N,) bool
) -> None:
    # Every loop below runs over the flat pixels of one image with no branch inside, so LLVM vectorises it.
    n_img, n_pix = src.shape[0], src.shape[1]
    d255 = np.float32(255.0)
    one, zero = np.float32(1.0), np.float32(0.0)
    for n in range(n_img):
        r, g, b = out[n, 0], out[n, 1], out[n, 2]
        for i in range(n_pix):
            r[i] = np.float32(src[n, i, 0]) / d255  # x / 255 (fastmath: times 1/255, 1 ulp off)
            g[i] = np.float32(src[n, i, 1]) / d255
            b[i] = np.float32(src[n, i, 2]) / d255
        if jitter[n]:
            for pos in range(4):
                op = order[n, pos]
                if not enabled[op]:
                    continue
                f = factors[n, op]
                if op == 0:  # brightness: blend with black
                    for i in range(n_pix):
                        r[i] = min(max(f * r[i], zero), one)
                        g[i] = min(max(f * g[i], zero), one)
                        b[i] = min(max(f * b[i], zero), one)
                elif op == 1:  # contrast: blend with the mean luma of the image as it is now
                    acc = np.float32(0.0)
                    for i in range(n_pix):
                        acc += _L0 * r[i] + _L1 * g[i] + _L2 * b[i]
                    ref = (one - f) * (acc / np.float32(n_pix))
                    for i in range(n_pix):
                        r[i] = min(max(f * r[i] + ref, zero), one)
                        g[i] = min(max(f * g[i] + ref, zero), one)
                        b[i] = min(max(f * b[i] + ref, zero), one)
                elif op == 2:  # saturation: blend with the pixel's own luma
                    rest = one - f
                    for i in range(n_pix):
                        lum = (_L0 * r[i] + _L1 * g[i] + _L2 * b[i]) * rest
                        r[i] = min(max(f * r[i] + lum, zero), one)
                        g[i] = min(max(f * g[i] + lum, zero), one)
                        b[i] = min(max(f * b[i] + lum, zero), one)
                else:  # hue: the closed form of augment.adjust_hue, per pixel
                    shift = np.float32(6.0) * f
                    for i in range(n_pix):
                        rv, gv, bv = r[i], g[i], b[i]
                        maxc = max(max(rv, gv), bv)
                        chroma = maxc - min(min(rv, gv), bv)
                        inv = one / max(chroma, np.float32(1e-12))  # gray pixel: all distances below are 0
                        rc, gc, bc = (maxc - rv) * inv, (maxc - gv) * inv, (maxc - bv) * inv
                        not_r = np.float32(rc > zero)  # 0 where red is the maximum (checked first, as torchvision)
                        not_g = np.float32(gc > zero)
                        hh = (
                            (bc - gc) * (one - not_r)
                            + (np.float32(2.0) + rc - bc) * (not_r * (one - not_g))
                            + (np.float32(4.0) + gc - rc) * (not_r * not_g)
                            + shift
                        )
                        # Output channel c is maxc - chroma * clamp(min(k, 4 - k), 0, 1) with k = (hh + 5 - 2c)
                        # mod 6. hh > -4, so k + 6 > 0 and truncation is floor.
                        k = hh + np.float32(11.0)
                        k -= np.float32(np.int32(k * np.float32(1.0 / 6.0))) * np.float32(6.0)
                        r[i] = maxc - chroma * min(max(min(k, np.float32(4.0) - k), zero), one)
                        k = hh + np.float32(9.0)
                        k -= np.float32(np.int32(k * np.float32(1.0 / 6.0))) * np.float32(6.0)
                        g[i] = maxc - chroma * min(max(min(k, np.float32(4.0) - k), zero), one)
                        k = hh + np.float32(7.0)
                        k -= np.float32(np.int32(k * np.float32(1.0 / 6.0))) * np.float32(6.0)
                        b[i] = maxc - chroma * min(max(min(k, np.float32(4.0) - k), zero), one)
        if gray[n]:
            for i in range(n_pix):
                lum = _L0 * r[i] + _L1 * g[i] + _L2 * b[i]
                r[i] = lum
                g[i] = lum
                b[i] = lum


def to_float_jitter_gray(x: torch.Tensor, params: ColorParams, enabled: tuple[bool, bool, bool, bool]) -> torch.Tensor:
    """uint8 ``(N, 3, H, W)`` pixels (any layout; FFCV's is channels-last) -> float32 NCHW in [0, 1] with each
    sample's colour jitter (in its drawn order) and grayscale applied. Blur and solarization are left to the
    caller (:meth:`~sslrun.core.data.augment.ColorAugment.apply` with jitter and grayscale switched off).

    Equal, to float rounding, to ``ColorAugment.apply`` restricted to jitter and grayscale on ``x / 255``.
    """
    if x.dtype != torch.uint8 or x.dim() != 4 or x.shape[1] != 3 or x.device.type != "cpu":
        raise ValueError(f"expected uint8 (N, 3, H, W) on the CPU, got {x.dtype} {tuple(x.shape)} on {x.device}")
    n, _, h, w = x.shape
    src = x.permute(0, 2, 3, 1).contiguous().numpy().reshape(n, h * w, 3)  # no copy for FFCV's channels-last
    out = torch.empty(x.shape, dtype=torch.float32)
    _kernel(
        src,
        out.numpy().reshape(n, 3, h * w),
        params.jitter.numpy(),
        params.factors.to(torch.float32).numpy(),
        params.order.contiguous().numpy(),
        np.array(enabled, dtype=np.bool_),
        params.gray.numpy(),
    )
    return out


@numba.njit(cache=True, nogil=True, fastmath=True)
def _normalize_kernel(src: np.ndarray, out: np.ndarray, scale: np.ndarray, shift: np.ndarray) -> None:
    # src (N, P, 3) uint8 NHWC, out (N, 3, P) float32: one read and one write of every value
    s0, s1, s2 = scale[0], scale[1], scale[2]
    t0, t1, t2 = shift[0], shift[1], shift[2]
    for n in range(src.shape[0]):
        r, g, b = out[n, 0], out[n, 1], out[n, 2]
        for i in range(src.shape[1]):
            r[i] = np.float32(src[n, i, 0]) * s0 - t0
            g[i] = np.float32(src[n, i, 1]) * s1 - t1
            b[i] = np.float32(src[n, i, 2]) * s2 - t2


def normalize_uint8(x: torch.Tensor, scale: np.ndarray, shift: np.ndarray) -> torch.Tensor:
    """uint8 ``(N, 3, H, W)`` pixels (FFCV's channels-last layout, or any) -> float32 NCHW ``x * scale - shift``
    per channel, in one pass (torch's type-promoting ``mul`` then ``sub`` go over the batch three times).

    Args:
        scale: 3 float32, ``1 / (255 std)``.
        shift: 3 float32, ``mean / std``.
    """
    n, _, h, w = x.shape
    src = x.permute(0, 2, 3, 1).contiguous().numpy().reshape(n, h * w, 3)  # no copy for FFCV's channels-last
    out = torch.empty(x.shape, dtype=torch.float32)
    _normalize_kernel(src, out.numpy().reshape(n, 3, h * w), scale, shift)
    return out
