"""View recipes (:class:`~sslrun.core.interfaces.ViewSpec` lists) shared by the built-in methods: the views their
papers train on, and their adaptation to small images.

Small images (<= 64 px: Fashion-MNIST, CIFAR) get the changes SimCLR made for CIFAR-10 (Chen et al. 2020,
appendix B.9): **no gaussian blur** (at 28-32 px a blur with a kernel of 10% of the side wipes out the little
detail there is). The crop scale's lower bound is raised to 0.2 (MoCo v2 and SimSiam use 0.2 everywhere): an 8%
crop of a 28 px image is an 8x8 patch, which holds too little of the object to be a plausible view of it (the
loader upsamples bilinearly, so this is about content, not interpolation artefacts).

Example:
    >>> v1, v2 = byol_views(224)  # BYOL's asymmetric pair: v1 always blurred, v2 sometimes solarized
    >>> (v1.blur_p, v2.solarize_p)
    (1.0, 0.2)
    >>> byol_views(32)[0].blur_p  # no blur on small images
    0.0
"""

from __future__ import annotations

import dataclasses

from sslrun.core.interfaces import ViewSpec

__all__ = ["MIN_SMALL_SCALE", "SMALL_IMAGE", "byol_views", "for_image_size"]

#: Images at most this many pixels on a side count as small.
SMALL_IMAGE = 64
#: Lower bound of the crop scale on small images.
MIN_SMALL_SCALE = 0.2


def for_image_size(spec: ViewSpec, image_size: int, *, floor_scale: bool = True) -> ViewSpec:
    """``spec`` adapted to small images (see the module docstring); unchanged above :data:`SMALL_IMAGE` px.

    Args:
        spec: the paper's ImageNet view.
        image_size: side of the source images.
        floor_scale: raise the crop scale's lower bound to :data:`MIN_SMALL_SCALE` (off for DINO's local crops,
            whose whole point is to be small).
    """
    if image_size > SMALL_IMAGE:
        return spec
    lo, hi = spec.scale
    if floor_scale:
        lo = max(lo, MIN_SMALL_SCALE)
        hi = max(hi, lo)
    return dataclasses.replace(spec, blur_p=0.0, scale=(lo, hi))


def byol_views(image_size: int, scale: tuple[float, float] = (0.08, 1.0)) -> list[ViewSpec]:
    """BYOL's asymmetric pair (Grill et al. 2020, table 6), also used by Barlow Twins and VICReg: colour jitter
    (0.4, 0.4, 0.2, 0.1) with p=0.8, grayscale p=0.2, flip; view 1 always blurred and never solarized, view 2
    blurred with p=0.1 and solarized with p=0.2."""
    common = {"size": image_size, "scale": scale, "jitter": (0.4, 0.4, 0.2, 0.1), "jitter_p": 0.8, "grayscale_p": 0.2}
    return [
        for_image_size(ViewSpec(**common, blur_p=1.0, solarize_p=0.0), image_size),
        for_image_size(ViewSpec(**common, blur_p=0.1, solarize_p=0.2), image_size),
    ]
