"""ImageNet-scale image folders: whole images with a maximum side (``max_side``), views cropped from the whole
image at load time, and preparation that uses every core with a memory bound that does not grow with the number
of images and that can be interrupted safely.

Everything here is real: JPEG/PNG files on disk, ``sslrun data prepare`` (in-process through Typer, or as a
subprocess where memory or signals are measured), FFCV loaders with their numba JIT, forked writer processes.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from sslrun.cli import app
from sslrun.core.data.format import BetonReader, verify_beton
from sslrun.core.data.loader import ViewLoader
from sslrun.core.errors import ConfigError
from sslrun.core.interfaces import ViewSpec
from sslrun.plugins.datasets.imagefolder import ImageFolder, load_whole

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from photos import write_photo_folder  # noqa: E402

runner = CliRunner()
CORNERS = {"top_left": (255, 0, 0), "top_right": (0, 255, 0), "bottom_left": (0, 0, 255), "bottom_right": (255, 255, 0)}
#: The whole image as one view: area 1, aspect exactly the image's (5:4), no flip, no colour augmentation.
WHOLE_VIEW = ViewSpec(size=224, scale=(1.0, 1.0), ratio=(1.25, 1.25), flip_p=0.0, jitter_p=0.0, grayscale_p=0.0)


def _cornered(width: int = 320, height: int = 256, patch: int = 24) -> np.ndarray:
    """Grey ``height x width`` image with a coloured ``patch``-pixel square in each corner."""
    img = np.full((height, width, 3), 128, np.uint8)
    img[:patch, :patch] = CORNERS["top_left"]
    img[:patch, -patch:] = CORNERS["top_right"]
    img[-patch:, :patch] = CORNERS["bottom_left"]
    img[-patch:, -patch:] = CORNERS["bottom_right"]
    return img


def _corner_colours(img: np.ndarray, k: int = 4) -> dict[str, np.ndarray]:
    """Mean colour of the ``k x k`` pixels at each corner of an ``HxWx3`` image."""
    return {
        "top_left": img[:k, :k].reshape(-1, 3).mean(0),
        "top_right": img[:k, -k:].reshape(-1, 3).mean(0),
        "bottom_left": img[-k:, :k].reshape(-1, 3).mean(0),
        "bottom_right": img[-k:, -k:].reshape(-1, 3).mean(0),
    }


def _prepare(root: Path, out: Path, *settings: str) -> str:
    args = ["data", "prepare", "imagefolder", "--root", str(root), "-o", str(out)]
    for s in settings:
        args += ["--set", s]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    return res.output


def _whole_view(path: Path) -> np.ndarray:
    """View 0 of sample 0 (the 320x256 image) as ``HxWx3`` uint8."""
    ld = ViewLoader(path, [WHOLE_VIEW], 2, device="cpu", normalize=False, drop_last=False)
    try:
        views, labels = next(iter(ld.epoch(0)))
    finally:
        ld.close()
    row = int((labels == 0).nonzero()[0, 0]) if labels.min() >= 0 else 0
    return torch.round(views[0][row] * 255).clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()


def test_max_side_keeps_whole_images_and_views_reach_their_corners(tmp_path: Path) -> None:
    from PIL import Image

    photos = tmp_path / "photos"
    (photos / "a").mkdir(parents=True)
    (photos / "b").mkdir()
    Image.fromarray(_cornered()).save(photos / "a" / "wide.png")  # 320 wide, 256 high
    Image.fromarray(np.full((300, 200, 3), 60, np.uint8)).save(photos / "b" / "tall.png")  # a second shape
    whole, square = tmp_path / "whole.beton", tmp_path / "square.beton"
    out = _prepare(photos, whole, "max_side=256", "test_fraction=0")
    assert "imagefolder/train: 2 samples, 256x256, raw" in out  # the largest height and width

    r = BetonReader(whole)
    (h, w), (h2, w2) = r.sizes.tolist()
    assert (h, w) == (205, 256) and abs(w / h - 320 / 256) < 0.01  # shrunk as a whole, 5:4 kept
    assert (h2, w2) == (256, 171)  # portrait 2:3, longer side to 256
    m = r.manifest
    assert m.image_size == [256, 256] and m.image_size_min == [205, 171]
    assert m.dataset_config["max_side"] == 256 and m.skipped == 0 and m.jpeg_quality is None
    stored = r[0][0]
    for name, got in _corner_colours(stored).items():  # nothing was cropped away at preparation
        np.testing.assert_allclose(got, CORNERS[name], atol=2, err_msg=name)

    view = _whole_view(whole)  # mixed shapes: the shared padded decoder and the size table
    assert view.shape == (224, 224, 3)
    for name, got in _corner_colours(view).items():
        np.testing.assert_allclose(got, CORNERS[name], atol=3, err_msg=name)

    # The square centre crop (still the default) cuts the corners off: the same view shows none of them.
    _prepare(photos, square, "size=256", "test_fraction=0")
    assert BetonReader(square).sizes.tolist() == [[256, 256], [256, 256]]
    for name, got in _corner_colours(_whole_view(square)).items():
        assert np.abs(got - CORNERS[name]).max() > 60, name


def test_load_whole_shrinks_only_and_applies_exif_rotation(tmp_path: Path) -> None:
    from PIL import Image

    small = tmp_path / "small.jpg"
    Image.fromarray(np.full((50, 80, 3), 100, np.uint8)).save(small)
    assert load_whole(small, 256).shape == (50, 80, 3)  # never enlarged
    big = tmp_path / "big.jpg"
    Image.fromarray(_cornered(1000, 600)).save(big, quality=95)
    assert load_whole(big, 256).shape == (154, 256, 3)  # decoded at reduced scale, then resized to 256 wide
    rotated = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    Image.fromarray(_cornered(320, 256)).save(rotated, exif=exif, quality=95)
    img = load_whole(rotated, 256)
    assert img.shape == (256, 205, 3)  # displayed upright: portrait
    assert np.abs(img[:4, -4:].reshape(-1, 3).mean(0) - CORNERS["top_left"]).max() < 12  # top-left went top-right
    with pytest.raises(ConfigError, match="max_side must be in 8..4096"):
        ImageFolder.Config(root=str(tmp_path), max_side=4)


def test_unreadable_files_are_counted_and_listed_in_the_manifest(tmp_path: Path) -> None:
    write_photo_folder(tmp_path / "photos", 6, classes=1)
    (tmp_path / "photos" / "class_0" / "cut.jpg").write_bytes(
        (tmp_path / "photos/class_0/img_000000.jpg").read_bytes()[:900]
    )
    (tmp_path / "photos" / "class_0" / "notes.png").write_text("not an image")
    out = _prepare(tmp_path / "photos", tmp_path / "p.beton", "max_side=128", "labels=none")
    assert "warning: skipped 2 unreadable image(s)" in out
    m = verify_beton(tmp_path / "p.beton")
    assert m.num_samples == 6 and m.skipped == 2
    assert [Path(s.split(" (")[0]).name for s in m.skipped_files] == ["cut.jpg", "notes.png"]
    assert all("(" in s for s in m.skipped_files)  # each with its error


def test_jpeg_quality_is_a_setting_recorded_in_the_manifest_and_part_of_the_cache_key(tmp_path: Path) -> None:
    """``--set jpeg_quality=N`` reaches the encoder (a lower quality: a smaller file and pixels further from the
    source), the manifest records it, and a cached file of another quality is prepared again, never reused."""
    paths = write_photo_folder(tmp_path / "photos", 12, classes=1)
    cache = tmp_path / "cache"
    base = ["data", "prepare", "imagefolder", "--root", str(tmp_path / "photos"), "--data-dir", str(cache),
            "--set", "max_side=128", "--set", "labels=none", "--format", "jpg"]  # fmt: skip
    beton = cache / "imagefolder" / "train.beton"

    def prepare(*settings: str) -> tuple[str, dict]:
        res = runner.invoke(app, [*base, *[a for s in settings for a in ("--set", s)]])
        assert res.exit_code == 0, res.output
        m = verify_beton(beton)
        r = BetonReader(beton)
        source = load_whole(paths[0], 128).astype(np.float64)
        error = float(np.abs(r[0][0].astype(np.float64) - source).mean())  # sample 0 is paths[0] (labels=none)
        jpegs = sum(len(r.stored_bytes(i)) for i in range(len(r)))  # the file itself is whole 2 MiB pages
        return res.output, {"jpegs": jpegs, "quality": m.jpeg_quality, "config": m.dataset_config, "error": error}

    out, q90 = prepare()  # the default: 90, FFCV's
    assert "imagefolder/train: 12 samples" in out and "jpg quality 90" in out and "(prepared)" in out, out
    assert q90["quality"] == 90 and q90["config"]["jpeg_quality"] is None

    out, q30 = prepare("jpeg_quality=30")
    assert "jpeg_quality" in out.split("re-preparing", 1)[1].splitlines()[0], out  # says why it is not reused
    assert "jpg quality 30" in out and "(prepared)" in out, out
    assert q30["quality"] == 30 and q30["config"]["jpeg_quality"] == 30
    assert q30["jpegs"] < 0.6 * q90["jpegs"], (q30, q90)  # the quality reached the encoder
    assert q30["error"] > q90["error"] + 0.5, (q30, q90)

    out, again = prepare("jpeg_quality=30")
    assert "(cached, verified)" in out and "re-preparing" not in out and again == q30, out
    out, back = prepare("jpeg_quality=90")  # 90 asked for explicitly is another setting than the default
    assert "(prepared)" in out and back["quality"] == 90 and back["jpegs"] == q90["jpegs"], out

    for bad, says in [
        (["--set", "jpeg_quality=0"], "imagefolder jpeg_quality must be in 1..100, got 0"),
        (["--set", "jpeg_quality=80", "--format", "raw"], "jpeg_quality=80 applies only to JPEG files"),
    ]:
        res = runner.invoke(app, [*base, *bad, "-o", str(tmp_path / "bad.beton")])
        assert res.exit_code == 2 and f"error: {says}" in res.output, res.output
    assert not (tmp_path / "bad.beton").exists()


# ---- preparation at scale: memory bound, interruption (subprocesses) -----------------------------------------------
# The libraries are loaded first and left out of the figure, and the figure is the sum of the processes' private
# pages (USS): the libraries' shared pages count in a process's PSS divided by however many processes on the
# machine map them, so PSS moves by hundreds of MB with unrelated jobs. Decoded images held anywhere (in the parent
# before it forks, or in a writer) are private pages and show up here.
_PREPARE_AND_MEASURE = r"""
import json, sys, threading, time, psutil
import cv2, PIL.JpegImagePlugin
from sslrun.cli import main
from sslrun.core.data import writer
from sslrun.core.data.ffcv_compat import import_ffcv
import_ffcv()
me = psutil.Process()
base = me.memory_full_info().uss
peak, stop = [base], threading.Event()
def sample():
    while not stop.is_set():
        total = 0
        for p in [me, *me.children(recursive=True)]:
            try:
                total += p.memory_full_info().uss
            except psutil.Error:
                pass
        peak[0] = max(peak[0], total)
        time.sleep(0.02)
t = threading.Thread(target=sample, daemon=True); t.start()
sys.argv = ["sslrun", *sys.argv[2:]]
try:
    main()
except SystemExit as e:
    assert not e.code, e.code
stop.set(); t.join()
print(json.dumps({"libraries_mb": base / 2**20, "added_mb": (peak[0] - base) / 2**20}))
"""


def _prepare_subprocess(root: Path, out: Path, *extra: str) -> subprocess.Popen:
    args = ["data", "prepare", "imagefolder", "--root", str(root), "-o", str(out), "--set", "max_side=256",
            "--set", "labels=none", "--format", "jpg", "--workers", "2", *extra]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.Popen(
        [sys.executable, "-c", _PREPARE_AND_MEASURE, "-", *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip


@pytest.mark.slow
def test_preparing_memory_does_not_grow_with_the_number_of_images(tmp_path: Path) -> None:
    """Memory that preparing adds to the loaded libraries (peak summed USS of the CLI process and its writer
    processes) for 50 and 600 photo-like JPEGs kept whole (up to 500 px, 360 KB decoded on average): holding the
    550 extra decoded images would add ~190 MB; streaming adds nothing but noise (+-40 MB measured, mostly pages
    the forked writers copy). Both stay under the bound stated in docs/data.md."""
    write_photo_folder(tmp_path / "many", 600, classes=1, workers=2)
    (tmp_path / "few" / "class_0").mkdir(parents=True)
    for p in sorted((tmp_path / "many" / "class_0").iterdir())[:50]:
        (tmp_path / "few" / "class_0" / p.name).symlink_to(p)
    added = {}
    for name in ("few", "many"):
        proc = _prepare_subprocess(tmp_path / name, tmp_path / f"{name}.beton", "--set", "max_side=512")
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
        added[name] = json.loads(out.strip().splitlines()[-1])["added_mb"]
    assert verify_beton(tmp_path / "many.beton").num_samples == 600
    assert added["many"] - added["few"] < 80, added  # decoded images are never accumulated
    assert added["many"] < 300, added  # the bound stated in docs/data.md for 2 writer processes


@pytest.mark.slow
def test_interrupted_preparation_leaves_nothing_and_can_be_rerun(tmp_path: Path) -> None:
    """SIGTERM mid-write: workers stop, no .beton, no manifest, no temporary file. SIGKILL mid-write: the orphaned
    workers exit by themselves, and the next run deletes the temporary file and writes a valid one."""
    write_photo_folder(tmp_path / "photos", 400, classes=1, workers=2)
    out = tmp_path / "x.beton"

    def start_and_wait_for_tmp() -> tuple[subprocess.Popen, list[int]]:
        proc = _prepare_subprocess(tmp_path / "photos", out, "--set", "max_side=512")
        deadline = time.monotonic() + 120
        # a first 2 MiB page of JPEGs (~75 of the 400 images at up to 500 px) is in the file: the writers are busy
        while sum(p.stat().st_size for p in tmp_path.glob("x.beton.tmp-*")) <= 2 << 20:
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()[-2000:]
            time.sleep(0.01)
        import psutil

        return proc, [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]

    def gone(pids: list[int], within: float) -> bool:
        import psutil

        end = time.monotonic() + within
        while time.monotonic() < end:
            if not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in pids):
                return True
            time.sleep(0.1)
        return False

    proc, workers = start_and_wait_for_tmp()
    assert len(workers) >= 2
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode != 0 and "interrupted: nothing was written" in err, err[-2000:]
    assert gone(workers, 10)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["photos"]

    proc, workers = start_and_wait_for_tmp()
    proc.kill()
    proc.communicate(timeout=30)
    assert gone(workers, 30), "orphaned writer processes kept running"
    assert len(list(tmp_path.glob("x.beton.tmp-*"))) == 1 and not out.exists()  # only a temporary file
    proc = _prepare_subprocess(tmp_path / "photos", out)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err[-2000:]
    assert verify_beton(out).num_samples == 400
    assert sorted(p.name for p in tmp_path.iterdir()) == ["photos", "x.beton", "x.beton.json"]


@pytest.mark.slow
def test_ctrl_c_keeps_the_previous_cached_file_and_the_next_prepare_starts_over(tmp_path: Path) -> None:
    """Ctrl-C (SIGINT to the whole process group, as a terminal sends it) while ``sslrun data prepare`` re-prepares a
    cached split with another JPEG quality: the writers exit, the temporary file is deleted, and the complete file
    prepared before is left exactly as it was (never replaced by a half-written one). The next ``prepare`` starts
    over and writes a verified file with the new quality."""
    import psutil

    write_photo_folder(tmp_path / "photos", 400, classes=1, workers=2)
    cache = tmp_path / "cache"
    beton = cache / "imagefolder" / "train.beton"
    args = ["data", "prepare", "imagefolder", "--root", str(tmp_path / "photos"), "--data-dir", str(cache),
            "--set", "max_side=512", "--set", "labels=none", "--format", "jpg", "--workers", "2"]  # fmt: skip
    # the default SIGINT handler, as in a terminal (a shell without job control starts background jobs ignoring it)
    code = "import signal; signal.signal(signal.SIGINT, signal.default_int_handler); import sslrun.cli as c; c.main()"

    def start(*settings: str) -> subprocess.Popen:
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        extra = [a for s in settings for a in ("--set", s)]
        return subprocess.Popen([sys.executable, "-c", code, *args, *extra], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)  # fmt: skip

    proc = start("jpeg_quality=50")
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 0 and "jpg quality 50" in out and "(prepared)" in out, err[-2000:]
    before = verify_beton(beton)

    proc = start("jpeg_quality=90")
    deadline = time.monotonic() + 120
    # a first 2 MiB page of JPEGs (~75 of the 400 images at up to 500 px) is in the file: the writers are busy
    while sum(p.stat().st_size for p in beton.parent.glob("train.beton.tmp-*")) <= 2 << 20:
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()[-2000:]
        time.sleep(0.01)
    workers = [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
    assert len(workers) >= 2
    os.killpg(proc.pid, signal.SIGINT)  # the parent and its writers, like Ctrl-C
    out, err = proc.communicate(timeout=30)
    assert proc.returncode != 0 and "interrupted: nothing was written" in err, err[-2000:]
    assert "(prepared)" not in out, out
    end = time.monotonic() + 10
    while any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in workers):
        assert time.monotonic() < end, "writer processes kept running after Ctrl-C"
        time.sleep(0.1)
    assert sorted(p.name for p in beton.parent.iterdir()) == ["train.beton", "train.beton.json", "train.beton.lock"]
    kept = verify_beton(beton)  # size and sha256 checked against the manifest
    assert (kept.sha256, kept.jpeg_quality, kept.created) == (before.sha256, 50, before.created)

    proc = start("jpeg_quality=90")
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err[-2000:]
    assert "re-preparing" in err and "jpg quality 90" in out and "(prepared)" in out, (out, err[-2000:])
    after = verify_beton(beton)
    assert after.num_samples == 400 and after.jpeg_quality == 90 and after.sha256 != before.sha256
    assert not list(beton.parent.glob("*.tmp-*"))
