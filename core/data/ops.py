"""Seeded FFCV operations: random-resized-crop decoder and horizontal flip whose randomness is a pure function of
``(seed, epoch, sample index, view)``.

Why not FFCV's own ``RandomResizedCropRGBImageDecoder`` / ``RandomHorizontalFlip``: they draw from numba's
per-thread RNG, which Python cannot seed (``np.random.seed`` in Python does not reach it), so two runs with the same
seeds get different crops and a resumed run sees different data than an uninterrupted one (FFCV's ``Loader(seed=)``
seeds only the order). Here every random number is a counter-based hash (splitmix64, Steele et al. 2014) of the
seed, the epoch, the sample's index in the ``.beton`` and a per-view salt, so the result does not depend on which
thread, rank or batch handles the sample, nor on what ran before.

The epoch changes at run time, but numba freezes every global and closure value into the compiled code, and the
FFCV pipeline only passes its own arguments to an op. So the ops read ``(seed, epoch)`` from a tiny int64 array
(:class:`AugmentState`) through its raw address, baked into the code as a constant; the owner writes the array
before each epoch's iterator thread starts and keeps it alive as long as the loader.

Interpolation: FFCV's decoder resizes with OpenCV ``INTER_AREA``, which is right for shrinking but behaves almost
like nearest-neighbour when enlarging (libffcv/ffcv#245; measured: an 8x8 crop enlarged to 28x28 had 59% equal
vertical neighbours, against 9% for bilinear). Small datasets (28-32 px) enlarge on nearly every crop, so when a
crop is smaller than the output in either dimension the crop op resamples bilinearly itself (the torchvision
``RandomResizedCrop`` convention: half-pixel centres, no antialiasing, which is exact for enlargement); crops at
least as large as the output keep ``INTER_AREA``, which antialiases. Doing it in the crop op keeps all cropping in
FFCV's threads; a torch-side resize would need ragged crops to be padded or handled one by one.
"""

# ruff: noqa: E402 - ffcv is imported through import_ffcv, before the `from ffcv...` lines
from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import numba
import numpy as np

from sslrun.core.data.ffcv_compat import import_ffcv

import_ffcv()

from ffcv.fields.rgb_image import IMAGE_MODES, SimpleRGBImageDecoder
from ffcv.libffcv import imdecode, memcpy, resize_crop
from ffcv.pipeline.allocation_query import AllocationQuery
from ffcv.pipeline.compiler import Compiler
from ffcv.pipeline.operation import Operation
from ffcv.pipeline.state import State
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

__all__ = [
    "AugmentState",
    "PaddedRGBImageDecoder",
    "SeededHorizontalFlip",
    "SeededResizedCrop",
    "crop_params",
    "crop_for",
    "flip_for",
    "mix64",
    "sample_key",
    "uniform",
]

_U64 = np.uint64
_GOLDEN = _U64(0x9E3779B97F4A7C15)
_M1 = _U64(0xBF58476D1CE4E5B9)
_M2 = _U64(0x94D049BB133111EB)
_S30, _S27, _S31, _S11 = _U64(30), _U64(27), _U64(31), _U64(11)
_INV_2_53 = 1.0 / 9007199254740992.0  # 2**-53: top 53 bits of a hash -> a double in [0, 1)
_CROP_TRIES = 10  # torchvision RandomResizedCrop tries 10 times before falling back to a centre crop

#: Salts that separate the random streams of the crop and the flip of one view.
CROP_SALT = 0x1
FLIP_SALT = 0x2


@numba.njit(cache=False, nogil=True)
def mix64(x: np.uint64) -> np.uint64:
    """splitmix64 finaliser: a bijective 64-bit mix with full avalanche (all arithmetic wraps modulo 2**64)."""
    x = _U64(x) + _GOLDEN
    x = (x ^ (x >> _S30)) * _M1
    x = (x ^ (x >> _S27)) * _M2
    return x ^ (x >> _S31)


@numba.njit(cache=False, nogil=True)
def sample_key(seed: np.uint64, epoch: np.uint64, index: np.uint64, salt: np.uint64) -> np.uint64:
    """The random-stream key of one sample of one view in one epoch."""
    return mix64(mix64(mix64(mix64(seed) ^ epoch) ^ index) ^ salt)


@numba.njit(cache=False, nogil=True)
def uniform(key: np.uint64, counter: int) -> float:
    """The ``counter``-th uniform double in [0, 1) of the stream ``key``."""
    return float(mix64(key ^ mix64(_U64(counter))) >> _S11) * _INV_2_53


@numba.njit(cache=False, nogil=True)
def crop_params(
    key: np.uint64, height: int, width: int, scale_lo: float, scale_hi: float, log_r0: float, log_r1: float
) -> tuple[int, int, int, int]:
    """``(top, left, h, w)`` of a random-resized crop, torchvision's algorithm with hashed random numbers.

    Up to 10 tries of (area fraction ~ U(scale), log aspect ratio ~ U(log ratio)); if none fits, a centre crop
    clamped to the ratio range (Szegedy et al. 2015, "Going deeper with convolutions", as in torchvision).
    """
    area = float(height) * float(width)
    for t in range(_CROP_TRIES):
        target_area = area * (scale_lo + (scale_hi - scale_lo) * uniform(key, 4 * t))
        aspect = math.exp(log_r0 + (log_r1 - log_r0) * uniform(key, 4 * t + 1))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(uniform(key, 4 * t + 2) * (height - h + 1))
            left = int(uniform(key, 4 * t + 3) * (width - w + 1))
            return top, left, h, w
    in_ratio = float(width) / float(height)
    r_min, r_max = math.exp(min(log_r0, log_r1)), math.exp(max(log_r0, log_r1))
    if in_ratio < r_min:
        w = width
        h = int(round(w / r_min))
    elif in_ratio > r_max:
        h = height
        w = int(round(h * r_max))
    else:
        w = width
        h = height
    return (height - h) // 2, (width - w) // 2, h, w


@numba.njit(cache=False, nogil=True)
def bilinear_crop_resize(src: np.ndarray, top: int, left: int, h: int, w: int, dst: np.ndarray) -> None:
    """Resample ``src[top:top+h, left:left+w]`` (HxWx3 uint8) bilinearly into ``dst`` (h'xw'x3 uint8).

    Same sampling and the same order of operations as ``torch.nn.functional.interpolate(mode="bilinear",
    align_corners=False)`` on float64: output pixel centres map to ``(y + 0.5) * h / h' - 0.5`` in the crop,
    clamped at the border; rows are interpolated horizontally first (each source row once), then vertically.
    """
    out_h, out_w = dst.shape[0], dst.shape[1]
    sy, sx = h / out_h, w / out_w
    x0s = np.empty(out_w, np.int64)
    x1s = np.empty(out_w, np.int64)
    wxs = np.empty(out_w, np.float64)
    for x in range(out_w):
        fx = max((x + 0.5) * sx - 0.5, 0.0)
        x0 = min(int(fx), w - 1)
        x0s[x] = left + x0
        x1s[x] = left + min(x0 + 1, w - 1)
        wxs[x] = fx - x0
    rows = np.empty((h, out_w, 3), np.float64)  # the crop's rows, resampled horizontally
    for r in range(h):
        srow = src[top + r]
        for x in range(out_w):
            a, b, wx = x0s[x], x1s[x], wxs[x]
            for c in range(3):
                rows[r, x, c] = srow[a, c] * (1.0 - wx) + srow[b, c] * wx
    for y in range(out_h):
        fy = max((y + 0.5) * sy - 0.5, 0.0)
        y0 = min(int(fy), h - 1)
        y1 = min(y0 + 1, h - 1)
        wy = fy - y0
        r0, r1, out = rows[y0], rows[y1], dst[y]
        for x in range(out_w):
            for c in range(3):
                v = r0[x, c] * (1.0 - wy) + r1[x, c] * wy + 0.5
                out[x, c] = np.uint8(min(max(v, 0.0), 255.0))


def crop_for(
    seed: int,
    epoch: int,
    index: int,
    view: int,
    height: int,
    width: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
) -> tuple[int, int, int, int]:
    """``(top, left, h, w)`` that :class:`SeededResizedCrop` takes from sample ``index`` (from Python: for tests
    and for reproducing a view)."""
    key = sample_key(_U64(seed % (1 << 63)), _U64(epoch), _U64(index), _U64(_check_view_salt(view) | CROP_SALT))
    return crop_params(_U64(key), int(height), int(width), float(scale[0]), float(scale[1]), *map(math.log, ratio))


def flip_for(seed: int, epoch: int, index: int, view: int, p: float) -> bool:
    """Whether :class:`SeededHorizontalFlip` flips sample ``index`` (from Python)."""
    key = sample_key(_U64(seed % (1 << 63)), _U64(epoch), _U64(index), _U64(_check_view_salt(view) | FLIP_SALT))
    return bool(uniform(_U64(key), 0) < p)


@intrinsic
def _address_as_voidptr(typingctx: Any, address: Any) -> Any:
    """numba intrinsic: an integer address -> ``void*`` (to view memory owned by Python with ``numba.carray``)."""
    if not isinstance(address, types.Integer):
        return None

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        return builder.inttoptr(args[0], cgutils.voidptr_t)

    return types.voidptr(address), codegen


class AugmentState:
    """``(seed, epoch)`` shared by a loader's seeded ops, read by the compiled code at run time.

    Compiled code sees this array through its address (see the module docstring), so this object must outlive
    every loader built with it; :class:`sslrun.core.data.loader.ViewLoader` owns one. Set the epoch *before*
    starting an epoch's iterator: the iterator thread then reads it for every batch.

    Args:
        seed: the run's seed (any int; reduced modulo 2**63).
    """

    def __init__(self, seed: int) -> None:
        self._array = np.zeros(2, dtype=np.int64)
        self._array[0] = int(seed) % (1 << 63)

    @property
    def seed(self) -> int:
        return int(self._array[0])

    @property
    def epoch(self) -> int:
        return int(self._array[1])

    def set_epoch(self, epoch: int) -> None:
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        self._array[1] = epoch

    @property
    def address(self) -> int:
        return int(self._array.ctypes.data)


def _check_view_salt(view: int) -> int:
    if not 0 <= view < (1 << 24):
        raise ValueError(f"view index must be in [0, 2**24), got {view}")
    return view << 8  # low byte: which op (crop/flip); above it: which view


def _check_crop_range(scale: tuple[float, float], ratio: tuple[float, float]) -> None:
    """Reject crop ranges torchvision's RandomResizedCrop would also reject."""
    if not 0 < scale[0] <= scale[1] <= 1:
        raise ValueError(f"scale must satisfy 0 < lo <= hi <= 1, got {scale}")
    if not 0 < ratio[0] <= ratio[1]:
        raise ValueError(f"ratio must satisfy 0 < lo <= hi, got {ratio}")


class PaddedRGBImageDecoder(SimpleRGBImageDecoder):
    """Decode an ``RGBImageField`` whose images vary in size, ONCE per sample, for every view to crop from.

    FFCV's ``SimpleRGBImageDecoder`` refuses mixed sizes, and its crop decoders decode once per view (8 decodes
    of each JPEG for DINO's multi-crop). This one writes each image, ``h x w x 3`` with row stride ``w``, to the
    start of a ``max_h x max_w x 3`` slot of the batch buffer; :class:`SeededResizedCrop` given the file's
    per-sample size table reads it back from there. Memory per batch is the same as one crop decoder's scratch
    buffer.
    """

    def declare_state_and_memory(self, previous_state: State) -> tuple[State, AllocationQuery]:
        shape = (int(self.metadata["height"].max()), int(self.metadata["width"].max()), 3)
        dtype = np.dtype("<u1")
        return replace(previous_state, jit_mode=True, shape=shape, dtype=dtype), AllocationQuery(shape, dtype)

    def generate_code(self) -> Any:
        mem_read = self.memory_read
        imdecode_c = Compiler.compile(imdecode)
        memcpy_c = Compiler.compile(memcpy)
        jpg = IMAGE_MODES["jpg"]
        my_range = Compiler.get_iterator()

        def decode(batch_indices, destination, metadata, storage_state):
            for dst_ix in my_range(len(batch_indices)):
                field = metadata[batch_indices[dst_ix]]
                image_data = mem_read(field["data_ptr"], storage_state)
                height, width = field["height"], field["width"]
                flat = destination[dst_ix].reshape(-1)
                if field["mode"] == jpg:
                    imdecode_c(image_data, flat, height, width, height, width, 0, 0, 1, 1, False, False)
                else:
                    memcpy_c(image_data, flat)
            return destination[: len(batch_indices)]

        decode.is_parallel = True
        return decode


class SeededResizedCrop(Operation):
    """Random-resized crop of already decoded ``HxWx3`` uint8 images, seeded by ``(seed, epoch, index, view)``
    (:func:`crop_for` gives the same crop from Python).

    One shared decoder (FFCV's ``SimpleRGBImageDecoder`` for images of one size, :class:`PaddedRGBImageDecoder`
    for whole images of varying shape) feeds every view's crop, so a JPEG is decompressed once per sample instead
    of once per view (2x fewer decodes for SimCLR, 8x for DINO's multi-crop). The decoded buffer is only read
    here, never modified.

    Args:
        state: the loader's :class:`AugmentState`.
        view: this view's index.
        output_size: ``(height, width)`` of the output.
        scale: range of the crop area as a fraction of the image area.
        ratio: range of the crop aspect ratio (width / height).
        sizes: for a :class:`PaddedRGBImageDecoder` input, the file's ``(N, 2)`` table of image heights and
            widths by sample index (kept alive here; the compiled code reads it through its address).
    """

    def __init__(
        self,
        state: AugmentState,
        view: int,
        output_size: tuple[int, int],
        scale: tuple[float, float] = (0.08, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        sizes: np.ndarray | None = None,
    ) -> None:
        super().__init__()
        _check_crop_range(scale, ratio)
        self.state = state
        self.salt = _check_view_salt(view) | CROP_SALT
        self.sizes = None if sizes is None else np.ascontiguousarray(sizes, dtype=np.int64).reshape(-1, 2)
        self.output_size = (int(output_size[0]), int(output_size[1]))
        self.scale = (float(scale[0]), float(scale[1]))
        self.ratio = (float(ratio[0]), float(ratio[1]))

    def declare_state_and_memory(self, previous_state: State) -> tuple[State, AllocationQuery]:
        shape = (*self.output_size, 3)
        dtype = np.dtype("<u1")
        return replace(previous_state, jit_mode=True, shape=shape, dtype=dtype), AllocationQuery(shape, dtype)

    def generate_code(self) -> Any:
        my_range = Compiler.get_iterator()
        resize_crop_c = Compiler.compile(resize_crop)
        address = self.state.address
        salt = _U64(self.salt)
        scale_lo, scale_hi = self.scale
        log_r0, log_r1 = math.log(self.ratio[0]), math.log(self.ratio[1])
        out_h, out_w = self.output_size
        if self.sizes is not None:
            return self._variable_size_code(my_range, resize_crop_c, address, salt, scale_lo, scale_hi, log_r0, log_r1)

        def crop(images, dst, batch_indices):
            st = numba.carray(_address_as_voidptr(address), (2,), np.int64)
            seed, epoch = _U64(st[0]), _U64(st[1])
            height, width = images.shape[1], images.shape[2]
            for i in my_range(images.shape[0]):
                key = sample_key(seed, epoch, _U64(batch_indices[i]), salt)
                top, left, h, w = crop_params(key, height, width, scale_lo, scale_hi, log_r0, log_r1)
                if h < out_h or w < out_w:
                    bilinear_crop_resize(images[i], top, left, h, w, dst[i])
                else:
                    resize_crop_c(images[i], top, top + h, left, left + w, dst[i])
            return dst

        crop.is_parallel = True
        crop.with_indices = True  # the sample indices seed the crops
        return crop

    def _variable_size_code(self, my_range: Any, resize_crop_c: Any, address: int, salt: np.uint64,
                            scale_lo: float, scale_hi: float, log_r0: float, log_r1: float) -> Any:  # fmt: skip
        """The crop for :class:`PaddedRGBImageDecoder` output: each image's true size from the size table."""
        assert self.sizes is not None
        sizes_address, n = int(self.sizes.ctypes.data), len(self.sizes)
        out_h, out_w = self.output_size

        def crop(images, dst, batch_indices):
            st = numba.carray(_address_as_voidptr(address), (2,), np.int64)
            seed, epoch = _U64(st[0]), _U64(st[1])
            table = numba.carray(_address_as_voidptr(sizes_address), (n, 2), np.int64)
            for i in my_range(images.shape[0]):
                index = batch_indices[i]
                height, width = table[index, 0], table[index, 1]
                img = images[i].reshape(-1)[: height * width * 3].reshape(height, width, 3)
                key = sample_key(seed, epoch, _U64(index), salt)
                top, left, h, w = crop_params(key, height, width, scale_lo, scale_hi, log_r0, log_r1)
                if h < out_h or w < out_w:
                    bilinear_crop_resize(img, top, left, h, w, dst[i])
                else:
                    resize_crop_c(img, top, top + h, left, left + w, dst[i])
            return dst

        crop.is_parallel = True
        crop.with_indices = True
        return crop


class SeededHorizontalFlip(Operation):
    """Flip HxWx3 uint8 images left-right, in place, with probability ``p`` seeded by ``(seed, epoch, index, view)``.

    In place (no allocation, no copy of unflipped images): it must directly follow an operation whose output no
    other pipeline branches from, which holds for :class:`sslrun.core.data.loader.ViewLoader` (each view's own
    crop; never the shared decoder).

    Args:
        state: the loader's :class:`AugmentState`.
        view: this view's index (independent of the crop's stream through a different salt).
        p: flip probability.
    """

    def __init__(self, state: AugmentState, view: int, p: float = 0.5) -> None:
        super().__init__()
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"flip probability must be in [0, 1], got {p}")
        self.state = state
        self.salt = _check_view_salt(view) | FLIP_SALT
        self.p = float(p)

    def declare_state_and_memory(self, previous_state: State) -> tuple[State, AllocationQuery | None]:
        return replace(previous_state, jit_mode=True), None

    def generate_code(self) -> Any:
        my_range = Compiler.get_iterator()
        address = self.state.address
        salt = _U64(self.salt)
        p = self.p

        def flip(images, dst, batch_indices):
            st = numba.carray(_address_as_voidptr(address), (2,), np.int64)
            seed, epoch = _U64(st[0]), _U64(st[1])
            width = images.shape[2]
            for i in my_range(images.shape[0]):
                if uniform(sample_key(seed, epoch, _U64(batch_indices[i]), salt), 0) < p:
                    img = images[i]
                    for y in range(img.shape[0]):
                        for x in range(width // 2):
                            for c in range(3):
                                t = img[y, x, c]
                                img[y, x, c] = img[y, width - 1 - x, c]
                                img[y, width - 1 - x, c] = t
            return images

        flip.is_parallel = True
        flip.with_indices = True  # FFCV then passes the batch's sample indices as the third argument
        return flip
