"""What a prepared ``.beton`` is on disk: FFCV's binary layout spelled out, the check of a file against it and its
manifest (:func:`verify_beton`), and a reader of its samples that needs no FFCV loader (:class:`BetonReader`).

The layout (``ffcv/types.py``, format version 2) is written out here so that verifying and inspecting a file does
not import FFCV: ``import ffcv`` costs seconds of numba compilation and sets torch's thread count to 1.
``tests/test_beton.py`` checks that these dtypes equal FFCV's own.

Why verify at all: FFCV checks only the header version. An empty or text file fails with an ``IndexError``, random
bytes with an ``AssertionError``, a file cut in half with ``ValueError: negative dimensions``, and a file cut short
at the end or with flipped data bytes iterates with no error at all. :func:`verify_beton` checks the layout, the
size (always) and the sha256 (files under 2 GiB) against the manifest and turns every problem into one
:class:`DataError` line; a verified ``(path, mtime, size)`` is remembered in-process so repeated calls cost a
``stat``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from sslrun.core.data.manifest import FIELDS, Manifest, manifest_path
from sslrun.core.errors import DataError
from sslrun.core.files import sha256_file as _sha256_file

__all__ = ["SHA256_LIMIT", "BetonReader", "remember_verified", "verify_beton"]

#: Files up to this size get a full sha256 check in verify_beton; larger ones only the size check.
SHA256_LIMIT = 2 << 30

# ---- the binary layout (ffcv/types.py, format version 2) --------------------------------------------------------
_BETON_VERSION = 2
_HEADER = np.dtype(
    [
        ("version", "<u2"),
        ("num_fields", "<u2"),
        ("page_size", "<u4"),
        ("num_samples", "<u8"),
        ("alloc_table_ptr", "<u8"),
    ],
    align=True,
)
_FIELD_DESC = np.dtype([("type_id", "<u1"), ("name", ("<u1", 16)), ("arguments", ("<u1", (1024,)))], align=True)
_ALLOC = np.dtype([("sample_id", "<u8"), ("ptr", "<u8"), ("size", "<u8")])
_TYPE_NAMES = {
    0: "FloatField",
    1: "IntField",
    2: "RGBImageField",
    3: "BytesField",
    4: "NDArrayField",
    5: "JSONField",
    6: "TorchTensorField",
    255: "custom",
}
_IMAGE_META = np.dtype([("mode", "<u1"), ("width", "<u2"), ("height", "<u2"), ("data_ptr", "<u8")])
_SAMPLE_META = np.dtype([("image", _IMAGE_META), ("label", "<i8")], align=True)
_MODE_RAW = 1  # the image mode byte: 0 = JPEG, 1 = raw pixels


def _read_layout(path: Path, size: int) -> tuple[np.void, list[tuple[str, str]]]:
    """Header and ``[(field name, field type)]`` of a .beton; ValueError if it is not one."""
    with open(path, "rb") as f:
        raw = f.read(_HEADER.itemsize)
        if len(raw) < _HEADER.itemsize:
            raise ValueError(f"only {size} bytes, too short for a .beton header")
        header = np.frombuffer(raw, dtype=_HEADER)[0]
        if int(header["version"]) != _BETON_VERSION:
            raise ValueError(f"header version {int(header['version'])}, expected {_BETON_VERSION}")
        nf = int(header["num_fields"])
        if not 1 <= nf <= 64:
            raise ValueError(f"{nf} fields in the header")
        raw = f.read(_FIELD_DESC.itemsize * nf)
        if len(raw) < _FIELD_DESC.itemsize * nf:
            raise ValueError("the field descriptors are cut off")
    descs = np.frombuffer(raw, dtype=_FIELD_DESC)
    fields = []
    for d in descs:
        name = bytes(d["name"]).split(b"\0", 1)[0].decode("ascii", "replace")
        fields.append((name, _TYPE_NAMES.get(int(d["type_id"]), f"unknown type {int(d['type_id'])}")))
    return header, fields


# ---- verification -----------------------------------------------------------------------------------------------
_VERIFIED: dict[tuple[str, int, int, int, int], Manifest] = {}


def _verify_key(path: Path) -> tuple[str, int, int, int, int] | None:
    try:
        st, ms = path.stat(), manifest_path(path).stat()
    except OSError:
        return None
    return (str(path.resolve()), st.st_mtime_ns, st.st_size, ms.st_mtime_ns, ms.st_size)


def remember_verified(path: Path, manifest: Manifest) -> None:
    """Record a file just written with ``manifest`` as verified (its writer computed the size and sha256)."""
    key = _verify_key(path)
    if key is not None:
        _VERIFIED[key] = manifest


def verify_beton(path: str | Path) -> Manifest:
    """Check that ``path`` is an intact sslrun .beton and return its manifest.

    Checks, in order: the file exists; it has a .beton header with fields ``image`` (RGBImageField) and ``label``
    (IntField); its manifest exists and is valid; sample count, size and (under 2 GiB) sha256 match the manifest.
    A verified ``(path, mtime, size)`` is cached in-process.

    Raises:
        DataError: one line naming the file, what is wrong and how to prepare it again.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise DataError(
            f"{p} does not exist{' (it is a directory)' if p.is_dir() else ''}; pass a prepared .beton or create "
            f"one with `sslrun data prepare NAME --output {p}`"
        )
    key = _verify_key(p)
    if key is not None and key in _VERIFIED:
        return _VERIFIED[key]
    size = p.stat().st_size
    generic = f"prepare it again with `sslrun data prepare NAME --output {p}`"
    try:
        header, fields = _read_layout(p, size)
    except (OSError, ValueError) as exc:
        raise DataError(f"{p} is not an FFCV .beton ({exc}); {generic}") from exc
    if [tuple(f) for f in fields] != list(FIELDS):
        got = ", ".join(f"{n} ({t})" for n, t in fields)
        raise DataError(
            f"{p} has fields {got}; sslrun needs image (RGBImageField) and label (IntField): it was not written by "
            f"`sslrun data prepare`; {generic}"
        )
    mpath = manifest_path(p)
    if not mpath.is_file():
        raise DataError(f"{p} has no manifest {mpath.name} (an interrupted or foreign write); {generic}")
    try:
        manifest = Manifest.from_json(mpath.read_text(), mpath)
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read manifest {mpath} ({exc}); {generic}") from exc
    again = f"prepare it again with `sslrun data prepare {manifest.dataset} --split {manifest.split} --output {p}`"
    if int(header["num_samples"]) != manifest.num_samples:
        raise DataError(
            f"{p} holds {int(header['num_samples'])} samples but its manifest says {manifest.num_samples}; {again}"
        )
    if size != manifest.bytes:
        what = "truncated" if size < manifest.bytes else "longer than written"
        raise DataError(f"{p} is {size} bytes but its manifest says {manifest.bytes} ({what}); {again}")
    if not int(header["alloc_table_ptr"]) <= size:
        raise DataError(f"{p} points past its own end (corrupt header); {again}")
    if size < SHA256_LIMIT and _sha256_file(p) != manifest.sha256:
        raise DataError(f"{p} does not match its manifest's sha256 (corrupt or modified); {again}")
    if key is not None:
        _VERIFIED[key] = manifest
    return manifest


# ---- reading without the FFCV loader (inspect, tests) ------------------------------------------------------------
class BetonReader:
    """Random access to the samples of a verified .beton with numpy (raw) or OpenCV (jpg), no numba JIT.

    For inspection and image grids; training reads through the FFCV loaders of :mod:`sslrun.core.data.loader`.

    Example:
        >>> r = BetonReader("train.beton")  # doctest: +SKIP
        >>> img, label = r[0]  # (H, W, 3) uint8, int
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.manifest = verify_beton(self.path)
        header, _ = _read_layout(self.path, self.path.stat().st_size)
        offset = _HEADER.itemsize + _FIELD_DESC.itemsize * len(FIELDS)
        self.meta = np.fromfile(self.path, dtype=_SAMPLE_META, count=int(header["num_samples"]), offset=offset)
        self._data = np.memmap(self.path, dtype=np.uint8, mode="r")
        table = np.frombuffer(self._data[int(header["alloc_table_ptr"]) :].tobytes(), dtype=_ALLOC)
        order = np.argsort(table["ptr"])
        self._ptrs, self._sizes = table["ptr"][order], table["size"][order]

    def __len__(self) -> int:
        return len(self.meta)

    @property
    def labels(self) -> np.ndarray:
        """All labels, ``(N,)`` int64."""
        return self.meta["label"].astype(np.int64)

    @property
    def sizes(self) -> np.ndarray:
        """``(N, 2)`` image heights and widths."""
        return np.stack([self.meta["image"]["height"], self.meta["image"]["width"]], 1).astype(np.int64)

    def stored_bytes(self, i: int) -> np.ndarray:
        """Sample ``i``'s image as stored: JPEG bytes (``jpg``) or ``h*w*3`` raw pixels, a uint8 copy."""
        ptr = int(self.meta[i]["image"]["data_ptr"])
        k = int(np.searchsorted(self._ptrs, ptr))
        return np.array(self._data[ptr : ptr + int(self._sizes[k])])

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        m = self.meta[i]
        img_m = m["image"]
        h, w, ptr = int(img_m["height"]), int(img_m["width"]), int(img_m["data_ptr"])
        if int(img_m["mode"]) == _MODE_RAW:
            img = np.array(self._data[ptr : ptr + h * w * 3]).reshape(h, w, 3)
        else:
            import cv2

            k = int(np.searchsorted(self._ptrs, ptr))
            buf = np.asarray(self._data[ptr : ptr + int(self._sizes[k])])
            bgr = cv2.imdecode(buf, cv2.IMREAD_COLOR)
            if bgr is None or bgr.shape[:2] != (h, w):
                raise DataError(f"{self.path}: sample {i} is not a decodable JPEG; prepare the data again")
            img = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
        return img, int(m["label"])
