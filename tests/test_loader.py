"""The FFCV loaders (sslrun.core.data.loader, sslrun.core.data.eval_loader) on a real tiny .beton.

Every FFCV Loader pays numba JIT (seconds), so the module builds one 4-view loader (2 global + 2 local views, the
DINO multi-crop shape) and reads two epochs from it once; most tests check those batches. Crops, flips and colour
parameters are recomputed independently from (seed, epoch, sample index, batch) with OpenCV / torch / the
augment module and compared with what the loader produced: that is what makes a resumed run bit-identical.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sslrun.core.data.augment import ColorAugment
from sslrun.core.data.eval_loader import EvalLoader
from sslrun.core.data.loader import ViewLoader, sample_views
from sslrun.core.data.writer import write_beton
from sslrun.core.errors import ConfigError, DataError
from sslrun.core.interfaces import ViewSpec
from sslrun.core.rng import batch_seed

pytestmark = pytest.mark.timeout(600)

N, SIDE, BATCH, SEED = 48, 16, 8, 7
VIEWS = [
    # two global views (the first with the whole colour stack), two local views of another size
    ViewSpec(size=16, scale=(0.3, 1.0), blur_p=0.5, solarize_p=0.3),
    ViewSpec(size=16, scale=(0.3, 1.0)),
    ViewSpec(size=8, scale=(0.05, 0.4), grayscale_p=0.0),
    ViewSpec(size=8, scale=(0.05, 0.4), flip_p=1.0, jitter_p=0.0, grayscale_p=0.0),
]
PLAIN = ViewSpec(size=12, scale=(0.2, 1.0), jitter_p=0.0, grayscale_p=0.0)  # crop + flip only

Source = tuple[Path, np.ndarray, list[float], list[float]]  # .beton, its images, manifest mean and std
Batches = dict[int, list[tuple[list[torch.Tensor], torch.Tensor]]]  # epoch -> [(views, labels)]


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Source:
    """A 48-image 16x16 RGB .beton; the label of each sample is its index (to identify samples in batches)."""
    imgs = np.random.default_rng(0).integers(0, 256, (N, SIDE, SIDE, 3), dtype=np.uint8)
    path = tmp_path_factory.mktemp("beton") / "train.beton"
    m = write_beton(
        [(imgs[i], i) for i in range(N)],
        path,
        dataset="synthetic",
        split="train",
        num_classes=None,
        grayscale=False,
        progress=False,
    )
    return path, imgs, m.mean, m.std


@pytest.fixture(scope="module")
def loader(source: Source) -> Iterator[ViewLoader]:
    ld = ViewLoader(source[0], VIEWS, BATCH, device="cpu", num_workers=1, seed=SEED)
    yield ld
    ld.close()


@pytest.fixture(scope="module")
def epochs(loader: ViewLoader) -> Batches:
    return {e: list(loader.epoch(e)) for e in (0, 1)}


def _unnormalize(x: torch.Tensor, mean: list[float], std: list[float]) -> torch.Tensor:
    return x * torch.tensor(std).view(1, 3, 1, 1) + torch.tensor(mean).view(1, 3, 1, 1)


def _reference_crop(img: np.ndarray, epoch: int, index: int, view: int, spec: ViewSpec, seed: int) -> np.ndarray:
    """The crop + flip the seeded FFCV ops must produce, recomputed with OpenCV / torch."""
    from sslrun.core.data.ops import crop_for, flip_for

    top, left, h, w = crop_for(seed, epoch, index, view, img.shape[0], img.shape[1], spec.scale, spec.ratio)
    crop = img[top : top + h, left : left + w]
    s = spec.size
    if h < s or w < s:  # enlarging: bilinear, torchvision's convention
        t = torch.from_numpy(np.ascontiguousarray(crop)).permute(2, 0, 1)[None].double()
        t = F.interpolate(t, size=(s, s), mode="bilinear", align_corners=False)
        out = torch.floor(t + 0.5).clamp(0, 255)[0].permute(1, 2, 0).numpy().astype(np.uint8)
    else:  # shrinking: OpenCV INTER_AREA, as FFCV's decoder
        out = cv2.resize(np.ascontiguousarray(crop), (s, s), interpolation=cv2.INTER_AREA)
    if flip_for(seed, epoch, index, view, spec.flip_p):
        out = out[:, ::-1]
    return np.ascontiguousarray(out)


def _reference_view(source: Source, epoch: int, batch: int, labels: torch.Tensor, view: int) -> torch.Tensor:
    """What the loader must return for view ``view`` (-1: PLAIN as view 0) of one batch on rank 0."""
    _, imgs, mean, std = source
    spec = VIEWS[view] if view >= 0 else PLAIN
    crops = [_reference_crop(imgs[int(i)], epoch, int(i), max(view, 0), spec, SEED) for i in labels]
    x = torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).float().div(255.0)
    g = torch.Generator().manual_seed(batch_seed(SEED, epoch, batch, 0, max(view, 0)))
    x = ColorAugment(spec)(x, g)
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def test_batches_have_the_spec_shapes_and_cover_the_epoch(loader: ViewLoader, epochs: Batches) -> None:
    assert len(loader) == N // BATCH
    assert loader._first_view == 2  # one image size: the views share one decode
    for batches in epochs.values():
        assert len(batches) == N // BATCH
        for views, labels in batches:
            assert len(views) == len(VIEWS)
            for v, spec in zip(views, VIEWS, strict=True):
                assert v.shape == (BATCH, 3, spec.size, spec.size) and v.dtype == torch.float32
                assert v.device.type == "cpu" and v.is_contiguous() and torch.isfinite(v).all()
            assert labels.shape == (BATCH,) and labels.dtype == torch.int64
        seen = torch.cat([labels for _, labels in batches])
        assert sorted(seen.tolist()) == list(range(N))  # each sample once per epoch
    assert not torch.equal(epochs[0][0][1], epochs[1][0][1])  # a new order each epoch


def test_views_match_an_independent_reference(source: Source, epochs: Batches) -> None:
    """Crop, flip and colour are pure functions of (seed, epoch, index, batch, view): recomputed outside FFCV
    they match. This is what makes a rebuilt loader or a resumed run see the same data."""
    for epoch, batches in epochs.items():
        for b, (views, labels) in enumerate(batches):
            for i in range(len(VIEWS)):
                ref = _reference_view(source, epoch, b, labels, i)
                diff = (views[i] - ref).abs()
                # bilinear rounding may differ by one grey level on a rare pixel; nearly all are exact
                assert float(diff.max()) < 3.0 / 255 / min(source[3]), (epoch, b, i)
                assert float((diff < 1e-4).float().mean()) > 0.97, (epoch, b, i)


def test_views_differ_from_each_other_from_the_source_and_across_epochs(source: Source, epochs: Batches) -> None:
    _, imgs, mean, std = source
    views, labels = epochs[0][0]
    src = torch.from_numpy(imgs[labels.numpy()]).permute(0, 3, 1, 2).float() / 255
    for i in range(2):  # the global views have the source's size
        assert (_unnormalize(views[i], mean, std) - src).abs().mean() > 0.05
    assert (views[0] - views[1]).abs().mean() > 0.05
    assert (views[2] - views[3]).abs().mean() > 0.05

    def by_index(e: int, view: int) -> dict[int, torch.Tensor]:
        return {int(y): vs[view][k] for vs, ys in epochs[e] for k, y in enumerate(ys)}

    e0, e1 = by_index(0, 3), by_index(1, 3)  # view 3: crop + flip only, no colour
    changed = sum(not torch.equal(e0[i], e1[i]) for i in range(N))
    assert changed >= N - 2, "epoch 1 reused epoch 0's crops"


def test_resume_mid_epoch_equals_the_tail_of_the_epoch(loader: ViewLoader, epochs: Batches) -> None:
    tail = list(loader.epoch(1, start_batch=4))
    assert len(tail) == len(epochs[1]) - 4
    for (views, labels), (ref_views, ref_labels) in zip(tail, epochs[1][4:], strict=True):
        assert torch.equal(labels, ref_labels)
        for v, r in zip(views, ref_views, strict=True):
            assert torch.equal(v, r)  # bit-identical, colour included
    assert list(loader.epoch(1, start_batch=len(loader))) == []


def test_abandoned_epoch_is_closed_and_torch_threads_are_kept(loader: ViewLoader, epochs: Batches) -> None:
    torch.set_num_threads(2)
    try:
        gen = loader.epoch(0)
        first = next(gen)
        gen.close()  # abandon mid-epoch: the FFCV thread must stop (no leaked thread or buffers)
        assert loader._active is None
        assert torch.get_num_threads() == 2  # FFCV would have set it to num_workers=1
        again = next(iter(loader.epoch(0)))
        assert torch.equal(first[0][0], again[0][0]) and torch.equal(first[0][0], epochs[0][0][0][0])
    finally:
        torch.set_num_threads(1)


def test_mixed_image_sizes_are_cropped_by_a_decoder_per_view(tmp_path: Path) -> None:
    """Mixed image sizes share one padded decode between the views too, and each view's seeded crop reads the
    sample's true size: the crops equal an independent reference."""
    rng = np.random.default_rng(1)
    imgs = [rng.integers(0, 256, (16, 16, 3) if i % 2 else (14, 20, 3), dtype=np.uint8) for i in range(16)]
    m = write_beton(
        [(img, i) for i, img in enumerate(imgs)],
        tmp_path / "mixed.beton",
        dataset="synthetic",
        split="train",
        num_classes=None,
        grayscale=False,
        progress=False,
    )
    ld = ViewLoader(tmp_path / "mixed.beton", [PLAIN], 8, device="cpu", seed=SEED)
    try:
        assert ld._first_view == 2  # mixed sizes share one padded decode too
        for b, (views, labels) in enumerate(ld.epoch(2)):
            crops = [_reference_crop(imgs[int(i)], 2, int(i), 0, PLAIN, SEED) for i in labels]
            ref = torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).float().div(255.0)
            ref = (ref - torch.tensor(m.mean).view(1, 3, 1, 1)) / torch.tensor(m.std).view(1, 3, 1, 1)
            assert float((views[0] - ref).abs().max()) < 3.0 / 255 / min(m.std), b
    finally:
        ld.close()
    images, labels = next(iter(EvalLoader(tmp_path / "mixed.beton", 16, device="cpu")))
    assert images.shape == (16, 3, 16, 16) and labels.tolist() == list(range(16))  # centre squares, resized
    pixels = torch.round(_unnormalize(images, m.mean, m.std) * 255).to(torch.uint8).permute(0, 2, 3, 1)
    assert torch.equal(pixels[1], torch.from_numpy(imgs[1]))  # a 16x16 image is its own centre square


def test_eval_loader_returns_exact_pixels_in_order(source: Source) -> None:
    path, imgs, mean, std = source
    ev = EvalLoader(path, 20, device="cpu")
    batches = list(ev)
    assert len(ev) == 3 and [len(y) for _, y in batches] == [20, 20, 8]  # no drop_last
    images = torch.cat([x for x, _ in batches])
    labels = torch.cat([y for _, y in batches])
    assert labels.tolist() == list(range(N))
    pixels = torch.round(_unnormalize(images, mean, std) * 255).to(torch.uint8).permute(0, 2, 3, 1)
    assert torch.equal(pixels, torch.from_numpy(imgs))
    assert list(EvalLoader.__iter__(ev))[0][1].tolist() == list(range(20))  # iterable again
    ev.close()


def test_sample_views_are_unnormalised_grids(source: Source) -> None:
    out = sample_views(source[0], [PLAIN], 5)
    assert len(out) == 1 and out[0].shape == (5, 3, PLAIN.size, PLAIN.size)
    assert out[0].min() >= 0 and out[0].max() <= 1 and out[0].std() > 0.1


def test_building_a_loader_leaves_numba_types_intact(source: Source) -> None:
    """ffcv 1.0.2 sets ``mutable = False`` on numba's interned uint8 array type whenever a Loader is built, which
    corrupts numba's dispatcher caches (a later loader then failed to compile); core.data.ffcv_compat fixes it."""
    import numba
    from ffcv.loader import Loader

    import sslrun.core.data.ops  # noqa: F401 - imports FFCV through ffcv_compat.import_ffcv, which applies the fix

    interned = numba.uint8[::1]
    Loader(str(source[0]), batch_size=8, num_workers=1)  # construction only: no JIT
    assert interned.mutable and numba.uint8[::1] is interned


def test_numba_hash_equals_the_python_one() -> None:
    from sslrun.core.data.ops import mix64
    from sslrun.core.rng import mix64 as _mix64

    for x in (0, 1, 12345, (1 << 63) + 5, (1 << 64) - 1):
        assert int(mix64(np.uint64(x))) == _mix64(x)


def test_a_failing_pipeline_raises_instead_of_hanging(source: Source) -> None:
    """An exception in FFCV's pipeline thread leaves plain FFCV blocked forever on its output queue."""
    from ffcv.fields.rgb_image import SimpleRGBImageDecoder
    from ffcv.loader import Loader
    from ffcv.pipeline.operation import Operation
    from ffcv.transforms import ToTensor

    from sslrun.core.data.ffcv_compat import start_epoch

    class Boom(Operation):
        def generate_code(self) -> Callable:
            def boom(x: torch.Tensor, dst: None) -> torch.Tensor:
                raise RuntimeError("boom inside the pipeline")

            return boom

        def declare_state_and_memory(self, previous_state: Any) -> tuple[Any, None]:
            return previous_state, None

    ffcv_loader = Loader(
        str(source[0]),
        batch_size=8,
        num_workers=1,
        pipelines={"image": [SimpleRGBImageDecoder(), ToTensor(), Boom()], "label": None},
    )
    run = start_epoch(ffcv_loader, 0, 0, source[0])
    try:
        with pytest.raises(DataError, match="RuntimeError: boom inside the pipeline"):
            next(run)
    finally:
        run.close()


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"views": []}, ConfigError, "non-empty list of ViewSpec"),
        ({"views": [{"size": 16}]}, ConfigError, "ViewSpec instances"),
        ({"views": [ViewSpec(size=200)]}, ConfigError, "at most 128"),
        ({"batch_size": 0}, ConfigError, "batch_size"),
        ({"num_workers": 0}, ConfigError, "num_workers"),
        ({"distributed": True}, ConfigError, "init_process_group"),
        ({"device": "nonsense"}, ConfigError, "not a torch device"),
        ({"batch_size": 64}, DataError, "fewer than one batch"),
        ({"max_samples": 4}, DataError, "fewer than one batch"),
        ({"indices": [0, 5, N]}, ConfigError, "indices must be in"),
    ],
)
def test_bad_arguments_are_one_line_errors(source: Source, kwargs: dict, error: type, match: str) -> None:
    args = {"views": [PLAIN], "batch_size": 8, "device": "cpu", **kwargs}
    with pytest.raises(error, match=match) as info:
        ViewLoader(source[0], args.pop("views"), args.pop("batch_size"), **args)
    assert "\n" not in str(info.value)


def test_missing_and_damaged_files_are_data_errors(source: Source, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        ViewLoader(tmp_path / "nope.beton", [PLAIN], 8, device="cpu")
    with pytest.raises(DataError, match="does not exist"):
        EvalLoader(tmp_path / "nope.beton", 8, device="cpu")
    bad = tmp_path / "train.beton"
    data = bytearray(source[0].read_bytes())
    data[-100] ^= 0xFF  # one flipped byte: FFCV alone would read it silently
    bad.write_bytes(bytes(data))
    (tmp_path / "train.beton.json").write_text(Path(str(source[0]) + ".json").read_text())
    with pytest.raises(DataError, match="sha256"):
        ViewLoader(bad, [PLAIN], 8, device="cpu")


# ---- distributed: a real 2-process gloo group ------------------------------------------------------------------
def _rank_main(rank: int, world: int, port: int, path: str, out: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        # os_cache=False: each process keeps its own page cache (the other cache manager of FFCV)
        ld = ViewLoader(path, [PLAIN], 4, device="cpu", num_workers=1, distributed=True, seed=SEED, os_cache=False)
        result = {"len": len(ld), "epochs": {e: [(v[0], y) for v, y in ld.epoch(e)] for e in (0, 1)}}
        ld.close()
        # the colour-augmented views of the module's single-process loader, split over 2 ranks (global batch 8)
        ld = ViewLoader(path, VIEWS, BATCH // world, device="cpu", num_workers=1, distributed=True, seed=SEED)
        result["views"] = {e: [(v, y) for v, y in ld.epoch(e)] for e in (0, 1)}
        result["resumed"] = [(v, y) for v, y in ld.epoch(1, start_batch=2)]
        ld.close()
        torch.save(result, f"{out}/rank{rank}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_read_disjoint_covering_shards(source: Source, tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_rank_main, args=(2, port, str(source[0]), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert ranks[0]["len"] == ranks[1]["len"] == N // 2 // 4
    for e in (0, 1):
        shards = [torch.cat([y for _, y in r["epochs"][e]]).tolist() for r in ranks]
        assert not set(shards[0]) & set(shards[1]), "ranks overlap"
        assert sorted(shards[0] + shards[1]) == list(range(N)), "ranks do not cover the dataset"
        # crops depend on (seed, epoch, index) only: the same in these processes as in the reference
        for r in ranks:
            for b, (view, labels) in enumerate(r["epochs"][e]):
                ref = _reference_view(source, e, b, labels, view=-1)
                assert float((view - ref).abs().max()) < 3.0 / 255 / min(source[3])
    orders = [[torch.cat([y for _, y in r["epochs"][e]]).tolist() for e in (0, 1)] for r in ranks]
    assert orders[0][0] != orders[0][1]  # reshuffled each epoch


@pytest.mark.slow
def test_global_batches_do_not_depend_on_the_world_size(source: Source, epochs: Batches, tmp_path: Path) -> None:
    """Global batch k of 2 ranks x 4 = batch k of 1 process x 8: the same images, augmented alike (crops, flips and
    colour parameters), so a run can continue on another number of workers without seeing an image twice."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_rank_main, args=(2, port, str(source[0]), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for e in (0, 1):
        assert len(ranks[0]["views"][e]) == len(epochs[e]) == N // BATCH
        for b, (views, labels) in enumerate(epochs[e]):
            parts = [r["views"][e][b] for r in ranks]
            assert torch.equal(torch.cat([p[1] for p in parts]), labels), (e, b)
            for i, view in enumerate(views):
                joined = torch.cat([p[0][i] for p in parts])
                assert float((joined - view).abs().max()) < 1e-5, (e, b, i)
    # resumed at global batch 2 of epoch 1: the rest of that epoch, rank by rank
    for r, rank in enumerate(ranks):
        assert [y.tolist() for _, y in rank["resumed"]] == [y.tolist() for _, y in rank["views"][1][2:]], r
