"""Dataset plugins: each raw format is written here by the test in its real layout (IDX gz, CIFAR pickles, STL-10
binaries, JPEG/PNG trees), prepared to a .beton through core, and read back; pixels and labels must round-trip.

No test touches the network: the torchvision download is replaced by a function that fails (or, in one test, writes
the files as a download would).
"""

from __future__ import annotations

import gzip
import io
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest

from sslrun.core.config import DataCfg
from sslrun.core.data.cache import ensure_prepared, prepare_dataset
from sslrun.core.data.format import BetonReader, verify_beton
from sslrun.core.errors import ConfigError, DataError
from sslrun.core.plugins.registry import get_registry
from sslrun.plugins.common import readers as _common
from sslrun.plugins.datasets.cifar import CIFAR10
from sslrun.plugins.datasets.fashion_mnist import FashionMNIST
from sslrun.plugins.datasets.imagefolder import ImageFolder, SkippedImagesWarning, load_square
from sslrun.plugins.datasets.stl10 import STL10
from sslrun.plugins.datasets.synthetic import Synthetic, class_glyphs

REAL_FMNIST = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, Path]]:
    """Every download attempt fails like an unreachable network, and is recorded."""
    calls: list[tuple[str, Path]] = []

    def fail(dataset_class: str, root: Path, **kwargs: object) -> None:
        calls.append((dataset_class, root))
        raise OSError("[Errno 101] Network is unreachable")

    monkeypatch.setattr(_common, "torchvision_download", fail)
    return calls


def prepare(tmp_path: Path, dataset: str, split: str | None = None, **kwargs: object) -> BetonReader:
    cfg = DataCfg(dataset=dataset, dataset_kwargs=dict(kwargs), data_dir=str(tmp_path / "cache"))
    return BetonReader(ensure_prepared(cfg, split, progress=False))


def read_all(reader: BetonReader) -> tuple[np.ndarray, np.ndarray]:
    return np.stack([reader[i][0] for i in range(len(reader))]), reader.labels


# ---- writers of the real raw formats -----------------------------------------------------------------------------
def write_idx(path: Path, arr: np.ndarray) -> None:
    header = struct.pack(">BBBB", 0, 0, 0x08, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    data = header + arr.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)


def write_fmnist(root: Path, n_train: int = 40, n_test: int = 12, seed: int = 0) -> dict[str, tuple]:
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    out = {}
    for split, prefix, n in (("train", "train", n_train), ("test", "t10k", n_test)):
        x = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        y = rng.integers(0, 10, n).astype(np.uint8)
        write_idx(root / f"{prefix}-images-idx3-ubyte.gz", x)
        write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", y)
        out[split] = (x, y)
    return out


def write_cifar(root: Path, hundred: bool = False, n: int = 6, seed: int = 0) -> dict[str, tuple]:
    """The "python version" layout: dicts with bytes keys, data (N, 3072) planar RGB, pickled."""
    rng = np.random.default_rng(seed)
    folder = root / ("cifar-100-python" if hundred else "cifar-10-batches-py")
    folder.mkdir(parents=True, exist_ok=True)
    names = {"train": ["train"], "test": ["test"]} if hundred else {
        "train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]
    }  # fmt: skip
    out = {}
    for split, files in names.items():
        xs, ys, cs = [], [], []
        for f in files:
            x = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
            y = rng.integers(0, 100 if hundred else 10, n)
            c = rng.integers(0, 20, n)
            d = {b"data": x.transpose(0, 3, 1, 2).reshape(n, 3072), b"filenames": [b"x.png"] * n}
            if hundred:
                d.update({b"fine_labels": y.tolist(), b"coarse_labels": c.tolist()})
            else:
                d.update({b"labels": y.tolist(), b"batch_label": b"batch"})
            (folder / f).write_bytes(pickle.dumps(d, protocol=2))
            xs.append(x), ys.append(y), cs.append(c)
        out[split] = (np.concatenate(xs), np.concatenate(ys), np.concatenate(cs))
    return out


def write_stl10(root: Path, counts: dict[str, int] | None = None, seed: int = 0) -> dict[str, tuple]:
    """stl10_binary/*_X.bin: each image column-major (3 x 96 x 96, width slowest after channel); labels 1..10."""
    rng = np.random.default_rng(seed)
    folder = root / "stl10_binary"
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for split, n in (counts or {"train": 4, "test": 3, "unlabeled": 5}).items():
        x = rng.integers(0, 256, (n, 96, 96, 3), dtype=np.uint8)
        (folder / f"{split}_X.bin").write_bytes(x.transpose(0, 3, 2, 1).tobytes())  # HWC -> C, W, H
        y = rng.integers(1, 11, n).astype(np.uint8)
        if split != "unlabeled":
            (folder / f"{split}_y.bin").write_bytes(y.tobytes())
        out[split] = (x, y.astype(np.int64) - 1 if split != "unlabeled" else np.full(n, -1))
    return out


def save_image(path: Path, arr: np.ndarray) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


# ---- registry ----------------------------------------------------------------------------------------------------
def test_builtin_dataset_plugins_load_and_validate() -> None:
    reg = get_registry("dataset")
    for name in ("fashion-mnist", "cifar10", "cifar100", "stl10", "imagefolder", "synthetic"):
        cls = reg.get(name)
        assert cls.name == name
        assert "root" in cls.Config.__dataclass_fields__
        assert reg.check(name) == "ok"


# ---- IDX / Fashion-MNIST -----------------------------------------------------------------------------------------
def test_read_idx_plain_gz_and_corrupt(tmp_path: Path) -> None:
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    for name in ("a-idx3-ubyte", "a-idx3-ubyte.gz"):
        write_idx(tmp_path / name, arr)
        np.testing.assert_array_equal(_common.read_idx(tmp_path / name), arr)
    (tmp_path / "bad").write_bytes(b"\x08\x03\x00\x00" + bytes(20))
    with pytest.raises(DataError, match="not an IDX file"):
        _common.read_idx(tmp_path / "bad")
    (tmp_path / "short").write_bytes((tmp_path / "a-idx3-ubyte").read_bytes()[:-5])
    with pytest.raises(DataError, match="truncated or corrupt"):
        _common.read_idx(tmp_path / "short")


@pytest.mark.parametrize("layout", ["", "FashionMNIST/raw"])
def test_fashion_mnist_idx_roundtrip(tmp_path: Path, layout: str) -> None:
    src = write_fmnist(tmp_path / "raw" / layout)
    for split in ("train", "test"):
        r = prepare(tmp_path, "fashion-mnist", split, root=str(tmp_path / "raw"))
        x, y = read_all(r)
        np.testing.assert_array_equal(x, np.repeat(src[split][0][..., None], 3, 3))  # gray replicated to RGB
        np.testing.assert_array_equal(y, src[split][1])
        assert r.manifest.grayscale and r.manifest.num_classes == 10 and r.manifest.image_size == [28, 28]
        expected_mean = src[split][0].mean() / 255
        assert r.manifest.mean == pytest.approx([expected_mean] * 3, abs=1e-5)


def test_fashion_mnist_wrong_shape_is_a_data_error(tmp_path: Path) -> None:
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", np.zeros((3, 32, 32), np.uint8))
    for name in ("train-labels-idx1-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        write_idx(tmp_path / name, np.zeros(3, np.uint8))
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", np.zeros((3, 28, 28), np.uint8))
    with pytest.raises(DataError, match="28x28"):
        FashionMNIST(FashionMNIST.Config(root=str(tmp_path))).open_split("train")


@pytest.mark.skipif(not REAL_FMNIST.is_dir(), reason="Debian's dataset-fashion-mnist is not installed")
def test_real_fashion_mnist_prepares(tmp_path: Path) -> None:
    r = prepare(tmp_path, "fashion-mnist", "train", root=str(REAL_FMNIST))
    m = r.manifest
    assert len(r) == m.num_samples == 60000
    assert m.label_histogram == dict.fromkeys(range(10), 6000)
    # the published statistics of Fashion-MNIST's training set: mean 0.2860, std 0.3530
    assert m.mean == pytest.approx([0.2860] * 3, abs=1e-3) and m.std == pytest.approx([0.3530] * 3, abs=1e-3)
    raw = gzip.decompress((REAL_FMNIST / "train-images-idx3-ubyte.gz").read_bytes())
    labels = np.frombuffer(gzip.decompress((REAL_FMNIST / "train-labels-idx1-ubyte.gz").read_bytes()), np.uint8, -1, 8)
    for i in (0, 1234, 59999):
        img = np.frombuffer(raw, np.uint8, 784, 16 + 784 * i).reshape(28, 28)
        got, label = r[i]
        np.testing.assert_array_equal(got[..., 0], img)
        assert label == labels[i]


# ---- CIFAR -------------------------------------------------------------------------------------------------------
def test_cifar10_pickles_roundtrip(tmp_path: Path) -> None:
    src = write_cifar(tmp_path / "raw")
    for split in ("train", "test"):
        r = prepare(tmp_path, "cifar10", split, root=str(tmp_path / "raw"))
        x, y = read_all(r)
        np.testing.assert_array_equal(x, src[split][0])
        np.testing.assert_array_equal(y, src[split][1])
        assert len(r) == (30 if split == "train" else 6)
        assert not r.manifest.grayscale and r.manifest.num_classes == 10


def test_cifar100_fine_and_coarse(tmp_path: Path) -> None:
    src = write_cifar(tmp_path / "raw", hundred=True)
    fine = prepare(tmp_path, "cifar100", "test", root=str(tmp_path / "raw"))
    coarse = prepare(tmp_path, "cifar100", "test", root=str(tmp_path / "raw"), label_type="coarse")
    np.testing.assert_array_equal(read_all(fine)[0], src["test"][0])
    np.testing.assert_array_equal(fine.labels, src["test"][1])
    np.testing.assert_array_equal(coarse.labels, src["test"][2])
    assert fine.manifest.num_classes == 100 and coarse.manifest.num_classes == 20


def test_cifar_pickle_cannot_run_code(tmp_path: Path) -> None:
    write_cifar(tmp_path)

    class Evil:
        def __reduce__(self) -> tuple:
            return (print, ("pwned",))

    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(pickle.dumps({b"data": Evil()}))
    with pytest.raises(DataError, match="not allowed"):
        CIFAR10(CIFAR10.Config(root=str(tmp_path))).open_split("test")


# ---- STL-10 ------------------------------------------------------------------------------------------------------
def test_stl10_binaries_roundtrip_all_splits(tmp_path: Path) -> None:
    src = write_stl10(tmp_path / "raw")
    ds = STL10(STL10.Config(root=str(tmp_path / "raw")))
    for split in ("train", "test", "unlabeled"):
        got = ds.open_split(split)
        np.testing.assert_array_equal(np.stack([got[i][0] for i in range(len(got))]), src[split][0])
        assert [got[i][1] for i in range(len(got))] == src[split][1].tolist()
    r = prepare(tmp_path, "stl10", None, root=str(tmp_path / "raw"))  # first split: train+unlabeled
    assert r.manifest.split == "train+unlabeled" and len(r) == 9
    x, y = read_all(r)
    np.testing.assert_array_equal(x, np.concatenate([src["train"][0], src["unlabeled"][0]]))
    np.testing.assert_array_equal(y, np.concatenate([src["train"][1], np.full(5, -1)]))
    assert r.manifest.label_histogram[-1] == 5


def test_stl10_truncated_binary(tmp_path: Path) -> None:
    write_stl10(tmp_path)
    xbin = tmp_path / "stl10_binary" / "test_X.bin"
    xbin.write_bytes(xbin.read_bytes()[:-100])
    with pytest.raises(DataError, match="truncated"):
        STL10(STL10.Config(root=str(tmp_path))).open_split("test")


# ---- missing files, download -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "files", "layout"),
    [
        ("fashion-mnist", "train-images-idx3-ubyte.gz", ""),
        ("cifar10", "data_batch_1", "cifar-10-batches-py"),
        ("cifar100", "train, test", "cifar-100-python"),
        ("stl10", "unlabeled_X.bin", "stl10_binary"),
    ],
)
def test_missing_raw_files_offline_names_what_to_put_where(
    tmp_path: Path, offline: list, name: str, files: str, layout: str
) -> None:
    root = tmp_path / "empty"
    cfg = DataCfg(dataset=name, root=str(root), data_dir=str(tmp_path / "cache"))
    with pytest.raises(DataError) as err:
        ensure_prepared(cfg, "test", progress=False)
    msg = str(err.value)
    assert "\n" not in msg and "download failed" in msg and "Network is unreachable" in msg
    assert files in msg and str(root / layout if layout else root) in msg
    assert offline == [(offline[0][0], root)]  # it tried to download into the given root
    assert not (tmp_path / "cache" / name / "test.beton").exists()


def test_missing_default_root_points_to_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SSLRUN_DATA_DIR", str(tmp_path / "c"))
    with pytest.raises(DataError, match="download is disabled") as err:
        CIFAR10(CIFAR10.Config(download=False)).open_split("train")
    assert str(tmp_path / "c" / "raw" / "cifar10" / "cifar-10-batches-py") in str(err.value)
    assert "--root" in str(err.value)


def test_download_fills_the_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the download works, its files (torchvision's layout) are found and prepared."""

    def fake_download(dataset_class: str, root: Path, **kwargs: object) -> None:
        assert dataset_class == "FashionMNIST"
        write_fmnist(root / "FashionMNIST" / "raw", seed=3)

    monkeypatch.setattr(_common, "torchvision_download", fake_download)
    monkeypatch.setattr("sslrun.plugins.datasets.fashion_mnist.DEBIAN_DIR", tmp_path / "no-debian")
    monkeypatch.setenv("SSLRUN_DATA_DIR", str(tmp_path / "c"))
    split = FashionMNIST(FashionMNIST.Config()).open_split("test")
    expected = write_fmnist(tmp_path / "ref", seed=3)["test"]
    assert len(split) == 12 and split[5][1] == expected[1][5]
    np.testing.assert_array_equal(split[5][0][..., 2], expected[0][5])
    assert (tmp_path / "c" / "raw" / "fashion-mnist" / "FashionMNIST" / "raw" / "t10k-images-idx3-ubyte.gz").is_file()


# ---- imagefolder -------------------------------------------------------------------------------------------------
def test_imagefolder_class_tree_png_exact_jpeg_close(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    imgs = {}
    for cls in ("cat", "dog"):
        for k in range(3):
            arr = rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)
            save_image(tmp_path / "photos" / cls / f"{k}.png", arr)
            imgs[(cls, k)] = arr
    smooth = np.zeros((24, 24, 3), np.uint8)
    smooth[..., 0] = np.linspace(0, 255, 24)[None, :]
    save_image(tmp_path / "photos" / "dog" / "smooth.jpg", smooth)
    r = prepare(tmp_path, "imagefolder", "train", root=str(tmp_path / "photos"), size=24, test_fraction=0.0)
    assert len(r) == 7 and r.manifest.num_classes == 2
    got = {i: r[i] for i in range(len(r))}
    # files in sorted order per class: cat/0..2, then dog/0..2, dog/smooth.jpg
    for i, key in enumerate([("cat", 0), ("cat", 1), ("cat", 2), ("dog", 0), ("dog", 1), ("dog", 2)]):
        np.testing.assert_array_equal(got[i][0], imgs[key])
        assert got[i][1] == (0 if key[0] == "cat" else 1)
    assert np.abs(got[6][0].astype(int) - smooth).mean() < 4 and got[6][1] == 1


def test_imagefolder_resize_and_centre_crop(tmp_path: Path) -> None:
    tall = np.zeros((80, 40, 3), np.uint8)  # portrait: red top quarter, green middle half, blue bottom quarter
    tall[:20, :, 0] = tall[20:60, :, 1] = tall[60:, :, 2] = 255
    save_image(tmp_path / "tall.png", tall)
    out = load_square(tmp_path / "tall.png", 16)
    assert out.shape == (16, 16, 3)
    # the centre 40x40 square (rows 20..60) is green; only the filter's support at its border sees red/blue
    inner = out[2:-2].astype(int)
    assert inner[..., 1].min() > 250 and inner[..., 0].max() < 5 and inner[..., 2].max() < 5
    assert out[..., 1].min() > 200 and out[..., 0].max() < 60 and out[..., 2].max() < 60


def test_imagefolder_flat_folder_is_unlabelled(tmp_path: Path) -> None:
    for k in range(4):
        save_image(tmp_path / "mine" / f"img{k}.png", np.full((30, 50, 3), 40 * k, np.uint8))
    ds = ImageFolder(ImageFolder.Config(root=str(tmp_path / "mine"), size=16))
    assert ds.info().num_classes is None
    assert ds.eval_splits is None and ImageFolder.eval_splits == ("train", "test")  # the trainer skips kNN
    cfg = DataCfg(dataset="imagefolder", root=str(tmp_path / "mine"), dataset_kwargs={"size": 16},
                  data_dir=str(tmp_path / "cache"))  # fmt: skip
    done = prepare_dataset(cfg, progress=False)  # unlabelled: only the pretraining split
    assert [s for s, *_ in done] == ["train"]
    r = BetonReader(done[0][1])
    assert r.labels.tolist() == [-1] * 4 and r.manifest.label_histogram == {-1: 4}
    assert r.manifest.image_size == [16, 16] and r.manifest.num_classes is None
    with pytest.raises(DataError, match="no test split"):
        ds.open_split("test")


def test_imagefolder_empty_and_missing_folders(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("no images here")
    for root, pattern in (
        (tmp_path / "empty", "contains no images"),
        (tmp_path / "notes", "contains no images"),
        (tmp_path / "nope", "not a directory"),
        (None, "needs a folder"),
    ):
        with pytest.raises(DataError, match=pattern) as err:
            ImageFolder(ImageFolder.Config(root=None if root is None else str(root))).open_split("train")
        assert "\n" not in str(err.value)


def test_imagefolder_skips_unreadable_images_with_a_warning(tmp_path: Path) -> None:
    good = np.full((20, 20, 3), 99, np.uint8)
    for k in range(3):
        save_image(tmp_path / "pics" / f"ok{k}.png", good)
    buf = io.BytesIO()
    from PIL import Image

    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(buf, "JPEG")
    (tmp_path / "pics" / "cut.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (tmp_path / "pics" / "text.png").write_text("not an image")
    with pytest.warns(SkippedImagesWarning, match="skipped 2 unreadable") as rec:
        split = ImageFolder(ImageFolder.Config(root=str(tmp_path / "pics"), size=20)).open_split("train")
    assert "cut.jpg" in str(rec[0].message) and "text.png" in str(rec[0].message)
    assert len(split) == 3 and all((split[i][0] == 99).all() for i in range(3))
    for f in ("ok0.png", "ok1.png", "ok2.png"):
        (tmp_path / "pics" / f).unlink()
    with pytest.warns(SkippedImagesWarning), pytest.raises(DataError, match="none of the 2 image"):
        ImageFolder(ImageFolder.Config(root=str(tmp_path / "pics"), size=20)).open_split("train")


def test_imagefolder_mixed_layout_and_label_modes(tmp_path: Path) -> None:
    save_image(tmp_path / "mix" / "loose.png", np.zeros((10, 10, 3), np.uint8))
    save_image(tmp_path / "mix" / "a" / "x.png", np.zeros((10, 10, 3), np.uint8))
    save_image(tmp_path / "mix" / "b" / "deep" / "y.png", np.zeros((10, 10, 3), np.uint8))
    with pytest.raises(DataError, match="labels to 'folders'"):
        ImageFolder(ImageFolder.Config(root=str(tmp_path / "mix"))).open_split("train")
    flat = ImageFolder(ImageFolder.Config(root=str(tmp_path / "mix"), labels="none", size=8)).open_split("train")
    assert len(flat) == 3 and {flat[i][1] for i in range(3)} == {-1}
    with pytest.warns(SkippedImagesWarning, match="ignored"):
        cls = ImageFolder(ImageFolder.Config(root=str(tmp_path / "mix"), labels="folders", size=8, test_fraction=0.0))
        tree = cls.open_split("train")
    assert sorted(tree[i][1] for i in range(len(tree))) == [0, 1]
    with pytest.raises(ConfigError, match="size"):
        ImageFolder.Config(size=4)


def test_imagefolder_splits(tmp_path: Path) -> None:
    for split, n in (("train", 3), ("val", 2)):
        for cls in ("a", "b"):
            for k in range(n):
                save_image(tmp_path / "ds" / split / cls / f"{k}.png", np.full((12, 12, 3), k, np.uint8))
    ds = ImageFolder(ImageFolder.Config(root=str(tmp_path / "ds"), size=12))
    assert len(ds.open_split("train")) == 6 and len(ds.open_split("test")) == 4
    assert ds.info().num_classes == 2
    # no split folders: a stable hash-based hold-out
    for cls in ("a", "b"):
        for k in range(40):
            save_image(tmp_path / "one" / cls / f"{k}.png", np.full((12, 12, 3), k, np.uint8))
    ds = ImageFolder(ImageFolder.Config(root=str(tmp_path / "one"), size=12, test_fraction=0.25))
    assert ds.eval_splits == ("train", "test")
    assert ImageFolder(ImageFolder.Config(root=str(tmp_path / "one"), test_fraction=0.0)).eval_splits is None
    train, test = ds.open_split("train"), ds.open_split("test")
    names = lambda s: {str(p) for p, _ in s.files}
    assert names(train).isdisjoint(names(test)) and len(train) + len(test) == 80
    assert 8 <= len(test) <= 35
    assert names(ImageFolder(ds.cfg).open_split("test")) == names(test)


def test_imagefolder_size_change_reprepares(tmp_path: Path) -> None:
    for k in range(3):
        save_image(tmp_path / "flat" / f"{k}.png", np.full((40, 40, 3), k, np.uint8))
    cfg = DataCfg(dataset="imagefolder", root=str(tmp_path / "flat"), dataset_kwargs={"size": 16},
                  data_dir=str(tmp_path / "cache"))  # fmt: skip
    path = ensure_prepared(cfg, progress=False)
    assert verify_beton(path).image_size == [16, 16]
    cfg.dataset_kwargs = {"size": 24}
    assert ensure_prepared(cfg, progress=False) == path
    m = verify_beton(path)
    assert m.image_size == [24, 24] and m.dataset_config["size"] == 24


# ---- synthetic -----------------------------------------------------------------------------------------------------
def test_synthetic_is_deterministic_balanced_and_learnable() -> None:
    cfg = Synthetic.Config(num_samples=600, test_samples=200, size=24, num_classes=10, seed=1)
    a, b = Synthetic(cfg).open_split("train"), Synthetic(cfg).open_split("train")
    for i in (0, 17, 599):
        np.testing.assert_array_equal(a[i][0], b[i][0])
    other = Synthetic(Synthetic.Config(num_samples=600, size=24, seed=2)).open_split("train")
    assert not np.array_equal(a[0][0], other[0][0])
    assert np.bincount([a[i][1] for i in range(len(a))]).tolist() == [60] * 10
    g = class_glyphs(50, 0)
    assert all((g[i] != g[j]).sum() >= 4 for i in range(50) for j in range(i))

    def features(split) -> tuple[np.ndarray, np.ndarray]:
        x = np.stack([split[i][0] for i in range(len(split))]).mean(-1).reshape(len(split), -1)
        x = (x - x.mean(1, keepdims=True)) / (x.std(1, keepdims=True) + 1e-6)
        return x, np.array([split[i][1] for i in range(len(split))])

    xtr, ytr = features(a)
    xte, yte = features(Synthetic(cfg).open_split("test"))
    acc = (ytr[(xte @ xtr.T).argmax(1)] == yte).mean()
    assert acc > 0.6, f"1-NN on pixels reaches only {acc:.2f} (chance 0.10): the classes are not learnable"
