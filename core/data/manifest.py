"""The JSON manifest written next to every prepared ``.beton``: what was prepared, and how to recognise the file.

A prepared split is ``<file>.beton`` plus ``<file>.beton.json``::

    {"format": "sslrun-beton/1", "dataset", "split", "num_samples", "image_size": [H, W] (max),
     "image_size_min": [H, W], "grayscale", "num_classes", "mean": [r, g, b] (0..1), "std", "bytes", "sha256",
     "label_histogram": {label: count}, "image_format": "raw"|"jpg", "jpeg_quality", "skipped", "skipped_files",
     "fields": [[name, type], ...], "dataset_config": {...}, "created"}

Manifests written before a key existed lack it and read back with its default.

Why a manifest: FFCV checks only the header version of a ``.beton``, so a file cut short at the end or with a
flipped data byte iterates with no error at all; the recorded size and sha256 are what
:func:`sslrun.core.data.format.verify_beton` checks the file against.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sslrun.core.errors import DataError

__all__ = ["FIELDS", "FORMAT", "Manifest", "manifest_path"]

FORMAT = "sslrun-beton/1"
#: The fields every sslrun .beton has, in file order: (name, FFCV field type).
FIELDS: tuple[tuple[str, str], ...] = (("image", "RGBImageField"), ("label", "IntField"))


@dataclass
class Manifest:
    """What was prepared, and how to recognise the exact file (``bytes``, ``sha256``).

    Attributes:
        dataset: dataset plugin name; split: its split.
        num_samples: number of (image, label) records.
        image_size: ``[H, W]``, the largest image height and width.
        image_size_min: ``[H, W]``, the smallest; equal to ``image_size`` when every image has one size (square
            crops), smaller for whole images of varying shape (imagefolder's ``max_side``). None: not recorded.
        grayscale: images are grayscale replicated to 3 channels (models may use ``x[:, :1]``).
        num_classes: classes of the dataset, None when unknown/unlabelled.
        mean, std: per-channel statistics of the pixels in [0, 1] (for normalisation).
        bytes, sha256: size and checksum of the .beton.
        label_histogram: ``{label: count}`` (-1 = unlabelled).
        image_format: ``raw`` or ``jpg``.
        jpeg_quality: the JPEG quality of a ``jpg`` file (None for ``raw``).
        skipped: raw files the dataset left out (unreadable); skipped_files: ``"path (error)"`` of the first 1000.
        fields: ``[[name, FFCV field type], ...]`` in file order.
        dataset_config: the dataset plugin's Config used (minus ``download``); a cache with other settings is
            prepared again.
    """

    dataset: str
    split: str
    num_samples: int
    image_size: list[int]
    grayscale: bool
    num_classes: int | None
    mean: list[float]
    std: list[float]
    bytes: int
    sha256: str
    label_histogram: dict[int, int]
    image_format: str = "raw"
    image_size_min: list[int] | None = None
    jpeg_quality: int | None = None
    skipped: int = 0
    skipped_files: list[str] = field(default_factory=list)
    fields: list[list[str]] = field(default_factory=lambda: [list(f) for f in FIELDS])
    dataset_config: dict[str, Any] | None = None
    created: str = ""
    format: str = FORMAT

    def to_json(self) -> str:
        """The manifest as JSON (histogram keys become strings)."""
        data = dataclasses.asdict(self)
        data["label_histogram"] = {str(k): v for k, v in sorted(self.label_histogram.items())}
        return json.dumps(data, indent=1)

    @classmethod
    def from_json(cls, text: str, where: Path) -> Manifest:
        """Parse and check a manifest; :class:`DataError` naming ``where`` if it is not one."""
        try:
            data = json.loads(text)
            if not isinstance(data, dict):
                raise ValueError("not a JSON object")
            if data.get("format") != FORMAT:
                raise ValueError(f"format is {data.get('format')!r}, expected {FORMAT!r}")
            data["label_histogram"] = {int(k): int(v) for k, v in data["label_histogram"].items()}
            names = {f.name for f in dataclasses.fields(cls)}
            m = cls(**{k: v for k, v in data.items() if k in names})
            if m.image_size_min is not None and len(m.image_size_min) != 2:
                raise ValueError("image_size_min has the wrong length")
            if len(m.image_size) != 2 or len(m.mean) != 3 or len(m.std) != 3 or m.num_samples < 0:
                raise ValueError("image_size/mean/std have the wrong length")
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise DataError(f"manifest {where} is not a valid sslrun manifest ({exc}); prepare the data again") from exc
        return m


def manifest_path(path: str | Path) -> Path:
    """The manifest sidecar of a .beton: ``<file>.beton.json``."""
    p = Path(path)
    return p.with_name(p.name + ".json")
