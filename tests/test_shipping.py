"""A driver's local data shipped to the nodes that cannot see it (no shared storage, no ``--data-dir``).

Fast tests drive the node's end (:class:`sslrun.cluster.shipping.Receiver`) in-process on a real ``.beton``; the
slow one runs ``sslrun launch --nodes 2`` against a ``ray.cluster_utils.Cluster`` whose nodes each have their own
stage directory, with the driver in its own mount namespace so that its data dir is invisible to the nodes, as on
separate machines.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from sslrun.cluster.shipping import CHUNK_BYTES, Receiver, chunk_bytes_from_env
from sslrun.core.config import DataCfg
from sslrun.core.data.cache import locate, prepare_split
from sslrun.core.data.format import verify_beton
from sslrun.core.data.manifest import Manifest
from sslrun.core.errors import ConfigError, DataError
from sslrun.tests.net import require_loopback_namespace
from sslrun.tests.ray_head import simulated_cluster, token_auth

BIN = Path(sys.executable).parent
SETTINGS = {"num_samples": 64, "size": 16, "test_samples": 16}


def _driver_file(tmp_path: Path) -> tuple[DataCfg, Path, bytes, Manifest]:
    """Prepare a tiny split in ``tmp_path/driver``, then take the file away: this process now plays a node that
    cannot see the driver's data dir. Returns the config, the driver's path, the file's bytes and its manifest."""
    cfg = DataCfg(dataset="synthetic", dataset_kwargs=dict(SETTINGS), data_dir=str(tmp_path / "driver"))
    path, manifest, _ = prepare_split(cfg, progress=False)
    data = Path(path).read_bytes()
    shutil.rmtree(tmp_path / "driver")
    return cfg, Path(path), data, manifest


def _send(receiver: Receiver, path: Path, data_dir: str, data: bytes, manifest: Manifest, chunk: int = 4096) -> str:
    """What the driver does: begin, the chunks in order, finish. Returns the path of the node's copy."""
    assert receiver.begin(str(path), data_dir, manifest.to_json()) is None
    for offset in range(0, len(data), chunk):
        receiver.write(memoryview(data)[offset : offset + chunk])
    return receiver.finish()


def test_a_received_copy_is_verified_put_in_place_found_by_locate_and_not_sent_twice(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SSLRUN_STAGE_DIR", str(tmp_path / "node"))
    cfg, path, data, manifest = _driver_file(tmp_path)
    assert len(data) > 4096 * 3  # several chunks
    copy = Path(_send(Receiver(), path, cfg.data_dir, data, manifest))
    assert copy.is_relative_to(tmp_path / "node" / "shipped") and copy.read_bytes() == data
    assert verify_beton(copy).sha256 == manifest.sha256
    beside = sorted(p.name for p in copy.parent.iterdir())
    assert beside == sorted([copy.name, copy.name + ".json", copy.name + ".lock"])
    assert locate(cfg) == copy  # what a worker on this node reads
    # a second launch: the node holds a verified copy, nothing is sent
    assert Receiver().begin(str(path), cfg.data_dir, manifest.to_json()) == str(copy)


def test_a_corrupt_or_truncated_copy_is_refused_and_never_put_in_place(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SSLRUN_STAGE_DIR", str(tmp_path / "node"))
    cfg, path, data, manifest = _driver_file(tmp_path)
    flipped = data[:100] + bytes([data[100] ^ 1]) + data[101:]
    with pytest.raises(DataError, match="does not match the manifest's sha256"):
        _send(Receiver(), path, cfg.data_dir, flipped, manifest)
    with pytest.raises(DataError, match=f"the copy is {len(data) - 10} bytes, the manifest says {len(data)}"):
        _send(Receiver(), path, cfg.data_dir, data[:-10], manifest)
    left = sorted(p.name for p in (tmp_path / "node").rglob("*") if p.is_file())
    assert left == ["train.beton.lock"]  # no copy, no temporary file
    with pytest.raises(DataError, match=r"no copy was shipped to it .*pass --data-dir s3://\S+ for clusters whose"):
        locate(cfg)  # a worker on a node that got no copy (one that joined later) says what to do


def test_two_launches_on_one_node_copy_the_file_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The second receiver waits on the file's lock, then finds the first one's verified copy."""
    monkeypatch.setenv("SSLRUN_STAGE_DIR", str(tmp_path / "node"))
    cfg, path, data, manifest = _driver_file(tmp_path)
    first, second = Receiver(), Receiver()
    assert first.begin(str(path), cfg.data_dir, manifest.to_json()) is None
    got: list[str | None] = []
    waiter = threading.Thread(target=lambda: got.append(second.begin(str(path), cfg.data_dir, manifest.to_json())))
    waiter.start()
    waiter.join(timeout=1.0)
    assert waiter.is_alive() and not got  # held by the first launch
    first.write(data)
    copy = first.finish()
    waiter.join(timeout=10)
    assert got == [copy]


def test_an_aborted_copy_leaves_nothing_and_releases_the_lock(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SSLRUN_STAGE_DIR", str(tmp_path / "node"))
    cfg, path, data, manifest = _driver_file(tmp_path)
    r = Receiver()
    assert r.begin(str(path), cfg.data_dir, manifest.to_json()) is None
    r.write(data[:1000])
    r.abort()
    assert sorted(p.name for p in (tmp_path / "node").rglob("*") if p.is_file()) == ["train.beton.lock"]
    assert Path(_send(Receiver(), path, cfg.data_dir, data, manifest)).read_bytes() == data  # lock was released


def test_a_node_holding_other_bytes_at_the_drivers_path_is_refused(tmp_path: Path) -> None:
    """Its workers would read that file, not a shipped copy: ranks must all read the driver's."""
    cfg = DataCfg(dataset="synthetic", dataset_kwargs=dict(SETTINGS), data_dir=str(tmp_path / "data"))
    path, manifest, _ = prepare_split(cfg, progress=False)
    drivers = dataclasses.replace(manifest, sha256="0" * 64)  # the driver wrote the same split in another order
    with pytest.raises(ConfigError, match=r"train.beton on this node is not the driver's copy .*remove it there"):
        Receiver().begin(str(path), cfg.data_dir, drivers.to_json())
    assert Receiver().begin(str(path), cfg.data_dir, manifest.to_json()) == str(path)  # the same file: nothing sent


def test_the_chunk_size_can_be_set_and_a_bad_one_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SSLRUN_SHIP_CHUNK_MB", raising=False)
    assert chunk_bytes_from_env() == CHUNK_BYTES == 64 << 20
    monkeypatch.setenv("SSLRUN_SHIP_CHUNK_MB", "0.25")
    assert chunk_bytes_from_env() == 256 << 10
    for bad in ("0", "-1", "lots"):
        monkeypatch.setenv("SSLRUN_SHIP_CHUNK_MB", bad)
        with pytest.raises(ConfigError, match=f"SSLRUN_SHIP_CHUNK_MB='{bad}' is not a positive number of MiB"):
            chunk_bytes_from_env()


# ---- two nodes, no shared storage ------------------------------------------------------------------------------
@pytest.fixture
def _token_auth() -> Iterator[None]:
    """Token authentication for the launch's driver (the token created, RAY_AUTH_MODE=token) for one test."""
    with token_auth():
        yield


def _private_mounts_work() -> bool:
    """True when this process may give a child its own mount namespace (root, or user namespaces allowed)."""
    try:
        res = subprocess.run(["unshare", "-m", "true"], capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return res.returncode == 0


def _launch_hidden(args: list[str], hidden: Path, seen_as: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    """``sslrun launch ARGS`` in its own mount namespace, where ``hidden`` is bind-mounted at ``seen_as``: the
    driver's data dir is ``seen_as``, and no other process (the Ray nodes) sees anything there."""
    script = f'mount --bind "{hidden}" "{seen_as}" && exec "{BIN / "sslrun"}" "$@"'
    return subprocess.run(
        ["unshare", "-m", "sh", "-c", script, "sh", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **env},
    )


@pytest.mark.slow
@pytest.mark.ray
def test_two_nodes_without_shared_storage_get_the_drivers_data_once_each_and_train(
    tmp_path: Path, _token_auth: None
) -> None:
    """`sslrun launch --address ... --nodes 2` with no --data-dir: the driver prepares the data in its own cache,
    ships one verified copy to each node, the workers train from those copies; a second launch ships nothing."""
    require_loopback_namespace("tests/test_shipping.py")
    if not _private_mounts_work():
        pytest.skip("needs `unshare -m` (root or user namespaces) to hide the driver's data dir from the nodes")

    hidden, data_dir = tmp_path / "driver-only", tmp_path / "driver-data"
    hidden.mkdir()
    data_dir.mkdir()
    env = {"SSLRUN_DATA_DIR": str(data_dir), "SSLRUN_STAGE_DIR": str(tmp_path / "driver-stage")}
    caches = [tmp_path / f"node{i}" for i in range(2)]
    with simulated_cluster(*({"SSLRUN_STAGE_DIR": str(cache)} for cache in caches)) as (cluster, _):

        def launch(run: str, ok: bool = True, **extra_env: str) -> str:
            args = ["launch", "--method", "simclr", "--encoder", "small_cnn", "--dataset", "synthetic"]
            args += ["--epochs", "2", "--batch-size", "16", "--max-steps", "2", "--output", str(tmp_path / run)]
            args += ["--address", cluster.address, "--nodes", "2"]
            for key, value in SETTINGS.items():
                args += ["--set", f"data.dataset_kwargs.{key}={value}"]
            args += ["--set", "log.knn_every=0", "--set", "log.visuals_every=0", "--set", "log.progress=plain"]
            res = _launch_hidden(args, hidden, data_dir, {**env, **extra_env})
            out = res.stdout + res.stderr
            assert (res.returncode == 0) == ok, out
            assert ("finished: 2 steps" in out) == ok, out
            return out

        out = launch("run1", SSLRUN_SHIP_CHUNK_MB="0.25")  # a file of ~4 MB in 16 chunks, 4 in flight
        # the driver prepared the file where only it sees it; the nodes saw an empty data dir
        driver_file = hidden / "synthetic" / "train.beton"
        assert driver_file.is_file() and not any(data_dir.iterdir())
        assert driver_file.stat().st_size > 8 * (256 << 10)  # more chunks than fit in flight at once
        sha = verify_beton(driver_file).sha256
        copies = []
        for cache in caches:  # one verified copy per node, shipped before the workers started, found by them
            (copy,) = cache.rglob("*.beton")
            assert copy.is_relative_to(cache / "shipped") and verify_beton(copy).sha256 == sha
            assert out.count(f": shipped {copy} (") == 1, out
            assert f": {copy}\n" in out, out  # the node's own check found it where its workers will read it
            copies.append(copy)
        assert out.count(": shipped ") == 2, out

        out = launch("run2")  # every node holds a verified copy: nothing is sent
        assert ": shipped " not in out, out
        assert all(f": {copy}\n" in out for copy in copies), out
        assert [list(cache.rglob("*.beton")) for cache in caches] == [[copy] for copy in copies]

        # a node that cannot take a copy (its stage dir is a file): retried, then one line naming it, no worker
        broken = tmp_path / "not-a-dir"
        broken.write_text("")
        node = cluster.add_node(num_cpus=1, env_vars={"SSLRUN_STAGE_DIR": str(broken)})
        cluster.wait_for_nodes()
        out = launch("run3", ok=False)
        assert out.count(f"to node {node.node_id[:12]}: attempt ") == 3, out
        assert f"node {node.node_id[:12]}: cannot copy {data_dir / 'synthetic' / 'train.beton'} there" in out, out
        assert not (tmp_path / "run3" / "workers").exists()
