"""Prepared .beton files (sslrun.core.data's writer, manifest, format and cache modules): writing (in-process and
forked writers), the manifest, verification of broken files, the cache, and the `sslrun data prepare|inspect`
commands. Files are real .beton files read back with FFCV's own Loader or the
numpy reader."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from sslrun.cli import app
from sslrun.core.config import DataCfg
from sslrun.core.data import cache as beton_cache
from sslrun.core.data import format as layout
from sslrun.core.data.cache import ensure_prepared
from sslrun.core.data.format import BetonReader, verify_beton
from sslrun.core.data.manifest import Manifest, manifest_path
from sslrun.core.data.writer import write_beton
from sslrun.core.errors import ConfigError, DataError
from sslrun.plugins.common import readers as _common


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(dataset_class: str, root: Path, **kwargs: object) -> None:
        raise OSError("[Errno 101] Network is unreachable")

    monkeypatch.setattr(_common, "torchvision_download", fail)


def make_samples(n: int = 50, seed: int = 0, sizes: list[tuple[int, int]] | None = None) -> list[tuple]:
    rng = np.random.default_rng(seed)
    shapes = sizes or [(16, 16)]
    return [
        (rng.integers(0, 256, (*shapes[i % len(shapes)], 3), dtype=np.uint8), int(rng.integers(-1, 5)))
        for i in range(n)
    ]


def write(samples: list, path: Path, **kw: object) -> Manifest:
    args = {"dataset": "toy", "split": "train", "num_classes": 5, "grayscale": False, "progress": False, **kw}
    return write_beton(samples, path, **args)


@pytest.fixture(scope="module")
def toy(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list]:
    samples = make_samples(50)
    path = tmp_path_factory.mktemp("toy") / "toy.beton"
    write(samples, path)
    return path, samples


def test_header_dtypes_match_ffcv() -> None:
    from ffcv import types
    from ffcv.fields import IntField, RGBImageField

    assert types.HeaderType == layout._HEADER
    assert types.FieldDescType == layout._FIELD_DESC
    assert layout._ALLOC == types.ALLOC_TABLE_TYPE
    theirs = types.get_metadata_type([RGBImageField(), IntField()])
    assert layout._SAMPLE_META.itemsize == theirs.itemsize
    assert [layout._SAMPLE_META.fields[n][1] for n in ("image", "label")] == [theirs.fields[n][1] for n in theirs.names]
    assert {v.__name__ for v in types.TYPE_ID_HANDLER.values() if v} <= set(layout._TYPE_NAMES.values())


def test_roundtrip_through_the_ffcv_loader(toy: tuple[Path, list]) -> None:
    import torch

    threads = torch.get_num_threads()
    from ffcv.fields.decoders import IntDecoder, SimpleRGBImageDecoder
    from ffcv.loader import Loader, OrderOption

    path, samples = toy
    loader = Loader(
        str(path),
        batch_size=16,
        num_workers=1,
        order=OrderOption.SEQUENTIAL,
        drop_last=False,
        pipelines={"image": [SimpleRGBImageDecoder()], "label": [IntDecoder()]},
    )
    images, labels = [], []
    for x, y in loader:
        images.append(np.array(x)), labels.append(np.array(y).reshape(-1))  # copy: FFCV reuses its buffers
    torch.set_num_threads(threads)
    np.testing.assert_array_equal(np.concatenate(images), np.stack([s[0] for s in samples]))
    np.testing.assert_array_equal(np.concatenate(labels), [s[1] for s in samples])


def test_manifest_records_statistics(toy: tuple[Path, list]) -> None:
    path, samples = toy
    m = verify_beton(path)
    pixels = np.stack([s[0] for s in samples]).reshape(-1, 3) / 255.0
    assert m.mean == pytest.approx(pixels.mean(0).tolist(), abs=1e-5)
    assert m.std == pytest.approx(pixels.std(0).tolist(), abs=1e-5)
    labels, counts = np.unique([s[1] for s in samples], return_counts=True)
    assert m.label_histogram == dict(zip(labels.tolist(), counts.tolist(), strict=True))
    assert m.num_samples == 50 and m.image_size == [16, 16] and m.bytes == path.stat().st_size
    assert m.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    on_disk = json.loads(manifest_path(path).read_text())
    assert on_disk["format"] == "sslrun-beton/1" and on_disk["fields"] == [
        ["image", "RGBImageField"],
        ["label", "IntField"],
    ]
    assert not path.with_name(path.name + ".tmp").exists()


def test_variable_sizes_raw_exact_and_jpg_close(tmp_path: Path) -> None:
    samples = make_samples(12, sizes=[(20, 30), (31, 17), (8, 8)])
    m = write(samples, tmp_path / "raw.beton")
    assert m.image_size == [31, 30]
    r = BetonReader(tmp_path / "raw.beton")
    assert [r[i][0].shape for i in range(3)] == [(20, 30, 3), (31, 17, 3), (8, 8, 3)]
    for i, (img, label) in enumerate(samples):
        np.testing.assert_array_equal(r[i][0], img)
        assert r[i][1] == label
    smooth = [(np.broadcast_to(np.linspace(0, 255, 32, dtype=np.uint8)[None, :, None], (32, 32, 3)).copy(), 1)] * 4
    write(smooth, tmp_path / "j.beton", fmt="jpg")
    rj = BetonReader(tmp_path / "j.beton")
    assert rj.manifest.image_format == "jpg"
    assert np.abs(rj[2][0].astype(int) - smooth[0][0]).mean() < 3


def test_forked_writers_give_the_same_data(tmp_path: Path, toy: tuple[Path, list]) -> None:
    path, samples = toy
    m2 = write(samples, tmp_path / "two.beton", num_workers=2)
    m1 = verify_beton(path)
    assert (m2.mean, m2.std, m2.label_histogram) == (m1.mean, m1.std, m1.label_histogram)
    r1, r2 = BetonReader(path), BetonReader(tmp_path / "two.beton")
    for i in range(len(samples)):
        np.testing.assert_array_equal(r1[i][0], r2[i][0])
        assert r1[i][1] == r2[i][1]


@pytest.mark.parametrize(
    ("bad", "pattern"),
    [
        ((np.zeros((8, 8), np.uint8), 0), "sample 7 image is a uint8 array of shape \\(8, 8\\)"),
        ((np.zeros((8, 8, 3), np.float32), 0), "sample 7 image is a float32"),
        ((np.zeros((8, 8, 1), np.uint8), 0), "HxWx3 uint8"),
        ((np.zeros((8, 8, 3), np.uint8), "cat"), "sample 7 label is 'cat'"),
        ((np.zeros((8, 8, 3), np.uint8), 5), "label 5 is outside -1..4"),
        ("oops", "sample 7 is str"),
    ],
)
def test_bad_sample_is_a_data_error_and_leaves_nothing(tmp_path: Path, bad: object, pattern: str) -> None:
    samples = make_samples(10, sizes=[(8, 8)])
    samples[7] = bad
    out = tmp_path / "bad.beton"
    with pytest.raises(DataError, match=pattern) as err:
        write(samples, out)
    assert "\n" not in str(err.value)
    assert sorted(os.listdir(tmp_path)) == []


def test_empty_and_first_sample_checked_before_writing(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no samples"):
        write([], tmp_path / "e.beton")
    with pytest.raises(DataError, match="sample 0"):
        write([(np.zeros((4, 4)), 0)], tmp_path / "e.beton")
    with pytest.raises(ConfigError, match="png"):
        write(make_samples(2), tmp_path / "e.beton", fmt="png")
    assert list(tmp_path.iterdir()) == []


def test_unwritable_output_is_a_data_error(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("")
    with pytest.raises(DataError, match="cannot write .*a-file/x.beton"):
        write(make_samples(3), tmp_path / "a-file" / "x.beton")


class Exploding:
    """A dataset whose sample ``at`` raises, like a reader hitting a broken file."""

    def __init__(self, n: int, at: int) -> None:
        self.samples, self.at = make_samples(n, sizes=[(8, 8)]), at

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple:
        if i == self.at:
            raise RuntimeError(f"disk read error at {i}")
        return self.samples[i]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("num_workers", [1, 2])
def test_reader_failure_mid_write_never_hangs(tmp_path: Path, num_workers: int) -> None:
    out = tmp_path / "x.beton"
    with pytest.raises(DataError, match="toy/train: reading sample 333 failed \\(RuntimeError: disk read error at 333"):
        write(Exploding(400, 333), out, num_workers=num_workers)
    assert list(tmp_path.iterdir()) == []  # neither the file nor its .tmp


# ---- verification ---------------------------------------------------------------------------------------------
def copy_of(toy: tuple[Path, list], tmp_path: Path, manifest: bool = True) -> Path:
    path = tmp_path / "c.beton"
    path.write_bytes(toy[0].read_bytes())
    if manifest:
        manifest_path(path).write_text(manifest_path(toy[0]).read_text())
    return path


def one_line_error(path: Path, pattern: str) -> str:
    with pytest.raises(DataError, match=pattern) as err:
        verify_beton(path)
    msg = str(err.value)
    assert "\n" not in msg and str(path) in msg
    return msg


def test_verify_missing_garbage_and_empty(tmp_path: Path) -> None:
    one_line_error(tmp_path / "nope.beton", "does not exist")
    one_line_error(tmp_path, "is a directory")
    garbage = tmp_path / "g.beton"
    garbage.write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    one_line_error(garbage, "not an FFCV .beton")
    (tmp_path / "empty.beton").write_bytes(b"")
    one_line_error(tmp_path / "empty.beton", "too short")
    (tmp_path / "t.beton").write_text("hello")
    one_line_error(tmp_path / "t.beton", "not an FFCV .beton")


def test_verify_truncated_and_corrupted(tmp_path: Path, toy: tuple[Path, list]) -> None:
    path = copy_of(toy, tmp_path)
    verify_beton(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 4096])  # tail-truncated: FFCV would iterate it silently
    msg = one_line_error(path, "truncated")
    assert "sslrun data prepare toy --split train" in msg
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0xFF  # same size, one data byte flipped
    path.write_bytes(bytes(flipped))
    one_line_error(path, "sha256")


def test_verify_manifest_problems(tmp_path: Path, toy: tuple[Path, list]) -> None:
    path = copy_of(toy, tmp_path, manifest=False)
    one_line_error(path, "no manifest")
    manifest_path(path).write_text("{not json")
    one_line_error(path, "not a valid sslrun manifest")
    m = json.loads(manifest_path(toy[0]).read_text())
    m["num_samples"] = 49
    manifest_path(path).write_text(json.dumps(m))
    one_line_error(path, "holds 50 samples but its manifest says 49")


def test_verify_wrong_fields(tmp_path: Path, toy: tuple[Path, list]) -> None:
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    path = tmp_path / "foreign.beton"
    writer = DatasetWriter(str(path), {"img": RGBImageField(), "target": IntField()}, page_size=1 << 21, num_workers=1)
    writer.from_indexed_dataset(toy[1])
    # even with an otherwise valid manifest, the layout is refused
    m = json.loads(manifest_path(toy[0]).read_text())
    m.update(bytes=path.stat().st_size, sha256=hashlib.sha256(path.read_bytes()).hexdigest())
    manifest_path(path).write_text(json.dumps(m))
    msg = one_line_error(path, "has fields img \\(RGBImageField\\), target \\(IntField\\)")
    assert "image (RGBImageField) and label (IntField)" in msg


def test_verify_is_cached_until_the_file_changes(tmp_path: Path, toy: tuple[Path, list], monkeypatch) -> None:
    path = copy_of(toy, tmp_path)
    calls = []
    real = layout._sha256_file
    monkeypatch.setattr(layout, "_sha256_file", lambda p: calls.append(p) or real(p))
    verify_beton(path)
    verify_beton(path)
    assert len(calls) == 1
    os.utime(path, ns=(1, 1))  # a new mtime: verified again
    verify_beton(path)
    assert len(calls) == 2


# ---- the cache --------------------------------------------------------------------------------------------------
def synthetic_cfg(tmp_path: Path, **kw: object) -> DataCfg:
    kwargs = {"num_samples": 40, "test_samples": 10, "size": 16, **kw}
    return DataCfg(dataset="synthetic", dataset_kwargs=kwargs, data_dir=str(tmp_path / "cache"))


def test_ensure_prepared_caches_and_reuses(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = synthetic_cfg(tmp_path)
    path = ensure_prepared(cfg, progress=False)
    assert path == tmp_path / "cache" / "synthetic" / "train.beton"
    mtime = path.stat().st_mtime_ns
    layout._VERIFIED.clear()  # also reused by a fresh process: verification from disk

    def no_write(*a: object, **k: object) -> None:
        raise AssertionError("a cached split was written again")

    monkeypatch.setattr(beton_cache, "write_beton", no_write)
    assert ensure_prepared(cfg, "train", progress=False) == path
    assert path.stat().st_mtime_ns == mtime
    monkeypatch.undo()
    with pytest.raises(ConfigError, match="no split 'val'; splits: train, test"):
        ensure_prepared(cfg, "val", progress=False)


def test_ensure_prepared_reprepares_on_changed_settings_or_damage(tmp_path: Path) -> None:
    path = ensure_prepared(synthetic_cfg(tmp_path), progress=False)
    first = path.read_bytes()
    path2 = ensure_prepared(synthetic_cfg(tmp_path, size=24), progress=False)  # other settings
    assert path2 == path and verify_beton(path).image_size == [24, 24]
    jpg = synthetic_cfg(tmp_path, size=24)
    jpg.format = "jpg"
    ensure_prepared(jpg, progress=False)
    assert verify_beton(path).image_format == "jpg"
    cfg = synthetic_cfg(tmp_path)
    ensure_prepared(cfg, progress=False)
    path.write_bytes(path.read_bytes()[:-1000])  # damaged cache
    with pytest.warns(UserWarning, match="unusable"):
        ensure_prepared(cfg, progress=False)
    assert path.read_bytes() == first  # deterministic data: the same file again


# ---- CLI ----------------------------------------------------------------------------------------------------------
runner = CliRunner()


def test_cli_prepare_and_inspect(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    args = [
        "data",
        "prepare",
        "synthetic",
        "--set",
        "num_samples=30",
        "--set",
        "test_samples=9",
        "--data-dir",
        str(cache),
    ]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "synthetic/train: 30 samples, 32x32, raw" in res.output and "synthetic/test: 9 samples" in res.output
    assert runner.invoke(app, args).output.count("cached, verified") == 2
    out = tmp_path / "t.beton"
    res = runner.invoke(app, [*args, "--split", "test", "--output", str(out), "--format", "jpg"])
    assert res.exit_code == 0 and verify_beton(out).image_format == "jpg"

    grid = tmp_path / "g" / "grid.png"
    res = runner.invoke(app, ["data", "inspect", str(cache / "synthetic" / "train.beton"), "--grid", str(grid)])
    assert res.exit_code == 0, res.output
    assert "samples:     30" in res.output and "0: 3, 1: 3" in res.output and "image sizes: 32x32" in res.output
    from PIL import Image

    with Image.open(grid) as im:
        im.verify()
    with Image.open(grid) as im:
        assert im.format == "PNG" and im.size[0] > 6 * 64  # 6x5 cells of >= 64 px
    res = runner.invoke(app, ["data", "inspect", str(out), "--json"])
    info = json.loads(res.output)
    assert info["num_samples"] == 9 and info["fields"][0] == "image (RGBImageField, jpg)"


def test_cli_prepare_own_images_names_skipped_files(tmp_path: Path) -> None:
    from PIL import Image

    photos = tmp_path / "photos"
    photos.mkdir()
    for k in range(2):
        Image.fromarray(np.full((40, 60, 3), 50 * k, np.uint8)).save(photos / f"p{k}.jpg")
    (photos / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    out = tmp_path / "mine.beton"
    res = runner.invoke(
        app, ["data", "prepare", "imagefolder", "--root", str(photos), "--set", "size=32", "-o", str(out)]
    )
    assert res.exit_code == 0, res.output
    assert "warning: skipped 1 unreadable image(s)" in res.output and "broken.jpg" in res.output
    assert "imagefolder/train: 2 samples, 32x32" in res.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.beton", "mine.beton.json", "photos"]
    assert BetonReader(out).labels.tolist() == [-1, -1]


def test_cli_errors_are_one_line(tmp_path: Path) -> None:
    (tmp_path / "junk.beton").write_bytes(b"\x00" * 100)
    for args, pattern in (
        (["data", "inspect", str(tmp_path / "junk.beton")], "not an FFCV .beton"),
        (["data", "inspect", str(tmp_path / "none.beton")], "does not exist"),
        (["data", "prepare", "synthetic", "--set", "colour=1", "--data-dir", str(tmp_path)], "unknown config key"),
        (["data", "prepare", "synthetic", "--format", "png", "--data-dir", str(tmp_path)], "'png' is not one of"),
        (["data", "prepare", "mnist", "--data-dir", str(tmp_path)], "unknown dataset 'mnist'"),
        (["data", "prepare", "cifar10", "--root", str(tmp_path / "x"), "--data-dir", str(tmp_path)], "data_batch_1"),
    ):
        res = runner.invoke(app, args)
        assert res.exit_code == 2, res.output
        lines = [ln for ln in res.output.splitlines() if ln.startswith("error:")]
        assert len(lines) == 1 and pattern in lines[0], res.output


@pytest.mark.slow
def test_cli_inspect_views_grid(tmp_path: Path) -> None:
    """The augmented views of a method, from the training loader (pays one FFCV JIT)."""
    path = ensure_prepared(synthetic_cfg(tmp_path, size=32), progress=False)
    out = tmp_path / "views.png"
    res = runner.invoke(app, ["data", "inspect", str(path), "--views", "simclr", "--views-out", str(out), "--n", "32"])
    assert res.exit_code == 0, res.output
    from PIL import Image

    with Image.open(out) as im:
        w, h = im.size
    assert h > w >= 2 * 64 and h >= 4 * 64  # 4 rows (32 // 8 samples) x 2 columns (SimCLR's two views)
