"""Object storage as the data directory and the run storage: a real S3-compatible server (moto's
``ThreadedMotoServer``) on 127.0.0.1, reached by pyarrow's ``S3FileSystem`` over HTTP, the real CLI, real
``.beton`` files, and (slow) a two-node ``ray.cluster_utils.Cluster`` whose nodes each have their own cache.

Run inside a loopback-only network namespace (see README): the missing-credentials case would otherwise let the
AWS SDK look for an instance metadata server on the network.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sslrun.core.config import DataCfg
from sslrun.core.data.cache import locate, prepare_split
from sslrun.core.data.remote import open_store
from sslrun.core.data.staging import ATTEMPTS, stage
from sslrun.core.errors import DataError
from sslrun.tests.net import free_port, require_loopback_namespace
from sslrun.tests.ray_head import SSLRUN, simulated_cluster, token_auth
from sslrun.tests.s3_server import assert_one_line_error as _bad
from sslrun.tests.s3_server import bucket_objects as _objects
from sslrun.tests.s3_server import moto_s3, moto_s3_with_auth
from sslrun.tests.s3_server import run_cli as _cli
from sslrun.tests.s3_server import s3_client as _client

SMALL = ["--set", "num_samples=64", "--set", "size=16", "--set", "test_samples=16"]


@pytest.fixture(scope="module")
def s3() -> Iterator[str]:
    """A moto S3 server on 127.0.0.1 for this module, fake credentials in the environment; yields its host:port."""
    require_loopback_namespace("tests/test_storage.py")
    with moto_s3() as endpoint:
        yield endpoint


def _bucket(endpoint: str, name: str) -> str:
    """Create bucket ``name`` and return the URI of a prefix in it."""
    _client(endpoint).create_bucket(Bucket=name)
    return f"s3://{name}/data?endpoint_override={endpoint}&scheme=http"


def _data_cfg(uri: str, **kwargs: int) -> DataCfg:
    settings = {"num_samples": 64, "size": 16, "test_samples": 16, **kwargs}
    return DataCfg(dataset="synthetic", dataset_kwargs=settings, data_dir=uri)


# ---- sslrun data prepare --data-dir s3://... -------------------------------------------------------------------
def test_prepare_publishes_to_the_bucket_and_a_second_prepare_reuses_it(s3: str, tmp_path: Path) -> None:
    uri = _bucket(s3, "publish")
    env = {"SSLRUN_STAGE_DIR": str(tmp_path / "stage")}
    first = _cli("data", "prepare", "synthetic", "--split", "train", "--data-dir", uri, *SMALL, env=env)
    assert first.returncode == 0, first.stderr
    assert (
        "synthetic/train: 64 samples, 16x16, raw -> s3://publish/data/synthetic/train.beton (prepared)" in first.stdout
    )
    objects = _objects(s3, "publish")
    assert set(objects) == {"data/synthetic/train.beton", "data/synthetic/train.beton.json"}
    again = _cli("data", "prepare", "synthetic", "--split", "train", "--data-dir", uri, *SMALL, env=env)
    assert again.returncode == 0 and "(cached, verified)" in again.stdout, again.stderr
    assert _objects(s3, "publish") == objects  # reused: nothing uploaded again


def test_a_store_prepared_with_other_settings_is_refused_and_left_alone(s3: str, tmp_path: Path) -> None:
    uri = _bucket(s3, "other-settings")
    env = {"SSLRUN_STAGE_DIR": str(tmp_path / "stage")}
    assert _cli("data", "prepare", "synthetic", "--split", "train", "--data-dir", uri, *SMALL, env=env).returncode == 0
    before = _objects(s3, "other-settings")
    bigger = [*SMALL, "--set", "size=24"]
    res = _cli("data", "prepare", "synthetic", "--split", "train", "--data-dir", uri, *bigger, env=env)
    assert res.returncode == 2 and res.stderr.count("\n") == 1, res.stderr
    assert "does not match this run: the dataset settings changed (size)" in res.stderr and "--force" in res.stderr
    assert _objects(s3, "other-settings") == before


def test_a_manifest_whose_beton_is_missing_is_one_line(s3: str, tmp_path: Path) -> None:
    uri = _bucket(s3, "half")
    env = {"SSLRUN_STAGE_DIR": str(tmp_path / "stage")}
    assert _cli("data", "prepare", "synthetic", "--split", "train", "--data-dir", uri, *SMALL, env=env).returncode == 0
    _client(s3).delete_object(Bucket="half", Key="data/synthetic/train.beton")
    res = _cli("data", "prepare", "synthetic", "--split", "train", "--data-dir", uri, *SMALL, env=env)
    assert res.returncode == 2 and res.stderr.count("\n") == 1, res.stderr
    assert "train.beton is missing but its manifest says" in res.stderr


# ---- node-local staging ----------------------------------------------------------------------------------------
def _published(s3: str, bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> DataCfg:
    monkeypatch.setenv("SSLRUN_STAGE_DIR", str(tmp_path / "publisher"))
    cfg = _data_cfg(_bucket(s3, bucket))
    prepare_split(cfg, "train", progress=False)
    return cfg


def test_two_processes_stage_the_same_file_once(s3: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = _published(s3, "twice", tmp_path, monkeypatch)
    code = (
        "import sys; from sslrun.core.config import DataCfg; from sslrun.core.data.cache import locate; "
        f"print(locate(DataCfg(dataset='synthetic', dataset_kwargs={cfg.dataset_kwargs!r}, data_dir={cfg.data_dir!r}), "
        "'train'))"
    )
    env = {**os.environ, "SSLRUN_STAGE_DIR": str(tmp_path / "node")}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    paths = {out.strip() for out, _ in outs}
    assert len(paths) == 1 and Path(paths.pop()).is_file()
    stderr = "".join(err for _, err in outs)
    assert stderr.count("staged s3://twice/data/synthetic/train.beton") == 1, stderr
    assert "MB/s" in stderr
    assert [p.name for p in (tmp_path / "node").rglob("*.beton")] == ["train.beton"]


def _replace_object(s3: str, bucket: str, key: str, data: bytes) -> None:
    _client(s3).put_object(Bucket=bucket, Key=key, Body=data)


@pytest.mark.parametrize(("damage", "message"), [("flip", "sha256"), ("truncate", "truncated")])
def test_a_corrupt_or_truncated_copy_is_retried_then_refused_and_never_put_in_place(
    s3: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture, damage: str, message: str
) -> None:
    bucket = f"damaged-{damage}"
    cfg = _published(s3, bucket, tmp_path, monkeypatch)
    good = next((tmp_path / "publisher").rglob("train.beton")).read_bytes()
    bad = good[:100] + bytes([good[100] ^ 0xFF]) + good[101:] if damage == "flip" else good[: len(good) // 2]
    _replace_object(s3, bucket, "data/synthetic/train.beton", bad)
    if damage == "truncate":  # the store's size check stops a short object before any download: stage it directly
        store = open_store(cfg.data_dir)
        from sslrun.core.data.manifest import Manifest

        manifest = Manifest.from_json(
            (next((tmp_path / "publisher").rglob("train.beton.json"))).read_text(), tmp_path / "m"
        )
        monkeypatch.setenv("SSLRUN_STAGE_DIR", str(tmp_path / "node"))
        with pytest.raises(DataError) as err:
            stage(store, "synthetic", "train.beton", manifest)
    else:
        monkeypatch.setenv("SSLRUN_STAGE_DIR", str(tmp_path / "node"))
        with pytest.raises(DataError) as err:
            locate(cfg, "train")
    assert "\n" not in str(err.value) and f"after {ATTEMPTS} attempts" in str(err.value)
    assert message in str(err.value)
    assert capfd.readouterr().err.count("attempt ") == ATTEMPTS
    assert not list((tmp_path / "node").rglob("*.beton")) and not list((tmp_path / "node").rglob(".*part*"))
    _replace_object(s3, bucket, "data/synthetic/train.beton", good)  # repaired: the next try stages it
    assert locate(cfg, "train").read_bytes() == good


# ---- bad input: one line, exit status 2, bounded time ---------------------------------------------------------
@pytest.fixture(scope="module")
def s3_auth() -> Iterator[tuple[str, dict[str, str]]]:
    """A second moto server that checks credentials (its first 4 requests, the setup, are let through): its
    host:port and the keys of a user that may only read."""
    import boto3

    with moto_s3_with_auth(setup_requests=4) as (endpoint, url):
        _client(endpoint).create_bucket(Bucket="locked")
        iam = boto3.client("iam", endpoint_url=url)
        iam.create_user(UserName="reader")
        rules = [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]
        rules.append({"Effect": "Deny", "Action": "s3:Put*", "Resource": "*"})
        read_only = {"Version": "2012-10-17", "Statement": rules}
        iam.put_user_policy(UserName="reader", PolicyName="read", PolicyDocument=json.dumps(read_only))
        key = iam.create_access_key(UserName="reader")["AccessKey"]
        yield endpoint, {"AWS_ACCESS_KEY_ID": key["AccessKeyId"], "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"]}


@pytest.mark.slow
def test_bad_data_dirs_are_one_line_each_in_bounded_time(
    s3: str, s3_auth: tuple[str, dict[str, str]], tmp_path: Path
) -> None:
    auth, reader = s3_auth
    env = {"SSLRUN_STAGE_DIR": str(tmp_path / "stage")}
    prep = ["data", "prepare", "synthetic", "--split", "train", *SMALL, "--data-dir"]
    _bad([*prep, "ftp://host/data"], env, "unknown URI scheme 'ftp://'")
    _bad(
        [*prep, f"s3://no-such-bucket/data?endpoint_override={s3}&scheme=http"],
        env,
        "bucket 'no-such-bucket' does not exist",
    )
    _bad(
        [*prep, f"s3://b/data?endpoint_override=127.0.0.1:{free_port()}&scheme=http"],
        env,
        "cannot connect to the endpoint",
    )
    locked = f"s3://locked/data?endpoint_override={auth}&scheme=http"
    _bad(
        [*prep, locked],
        {**env, "AWS_ACCESS_KEY_ID": "wrong", "AWS_SECRET_ACCESS_KEY": "wrong"},
        "access denied: the credentials are wrong",
    )
    _bad([*prep, locked], {**env, **reader}, "writing a probe object (write permission) failed: access denied")


def test_bad_storage_paths_stop_launch_before_any_worker(
    s3: str, s3_auth: tuple[str, dict[str, str]], tmp_path: Path
) -> None:
    auth, reader = s3_auth
    base = ["launch", "--method", "simclr", "--encoder", "small_cnn", "--dataset", "synthetic", "--max-steps", "1"]
    base += ["--output", str(tmp_path / "run"), "--data-dir", str(tmp_path / "data")]
    base += ["--set", "data.dataset_kwargs.num_samples=64", "--set", "data.dataset_kwargs.size=16"]
    env = {"SSLRUN_STAGE_DIR": str(tmp_path / "stage")}
    _bad(
        [*base, "--storage-path", f"s3://gone/runs?endpoint_override={s3}&scheme=http"],
        env,
        "bucket 'gone' does not exist",
    )
    locked = f"s3://locked/runs?endpoint_override={auth}&scheme=http"
    _bad([*base, "--storage-path", locked], {**env, **reader}, "write permission) failed: access denied")
    assert not (tmp_path / "run" / "workers").exists()  # no worker ever started


# ---- two nodes, data and checkpoints only in the bucket --------------------------------------------------------
@pytest.fixture
def _token_auth() -> Iterator[None]:
    """Token authentication for the launch's driver (the token created, RAY_AUTH_MODE=token) for one test."""
    with token_auth():
        yield


@pytest.mark.slow
@pytest.mark.ray
def test_two_nodes_stage_the_bucket_data_once_each_and_train(s3: str, tmp_path: Path, _token_auth: None) -> None:
    """`sslrun launch --nodes 2 --data-dir s3://... --storage-path s3://...` on a two-node Cluster whose nodes each
    have their own cache: the driver publishes the data, each node copies it once, the workers train from the copies
    and Ray Train writes its checkpoints to the bucket."""

    data = _bucket(s3, "e2e-data")
    runs = _bucket(s3, "e2e-runs").replace("/data?", "/runs?")
    caches = [tmp_path / f"node{i}" for i in range(2)]
    with simulated_cluster(*({"SSLRUN_STAGE_DIR": str(cache)} for cache in caches)) as (cluster, _):
        args = ["launch", "--method", "simclr", "--encoder", "small_cnn", "--dataset", "synthetic", "--epochs", "100"]
        args += ["--batch-size", "16", "--output", str(tmp_path / "run"), "--data-dir", data]
        args += ["--storage-path", runs, "--address", cluster.address, "--nodes", "2"]
        for item in ("num_samples=64", "size=16", "test_samples=16"):
            args += ["--set", f"data.dataset_kwargs.{item}"]
        args += ["--set", "log.knn_every=0", "--set", "log.visuals_every=0", "--set", "log.progress=plain"]
        args += ["--set", "log.log_every=1"]
        env = {"SSLRUN_STAGE_DIR": str(tmp_path / "driver")}
        res = _cli(*args, "--max-steps", "2", env=env, timeout=300)
        out = res.stdout + res.stderr
        assert res.returncode == 0, out
        assert "finished: 2 steps" in out
        assert f"run in storage: {runs.replace('/runs?', '/runs/run/run?')}" in out, out
        for cache in caches:  # one copy per node, made before the workers started, and none by the workers
            (copy,) = cache.rglob("*.beton")
            assert out.count(f"{copy} (copied now)") == 1, out
        assert out.count("(copied now)") == 2, out
        # the driver prepared and published the file, and copied nothing for itself
        assert list((tmp_path / "driver").glob("*/synthetic/train.beton")) == [
            tmp_path / "driver" / "published" / "synthetic" / "train.beton"
        ]
        assert any(k.startswith("runs/") and "checkpoint_" in k for k in _objects(s3, "e2e-runs"))
        # rank 0 mirrored the run's products next to Ray's checkpoints
        mirrored = set(_objects(s3, "e2e-runs"))
        for name in ("config.toml", "metrics.jsonl", "launch.jsonl", "checkpoints/last.pt"):
            assert f"runs/run/run/{name}" in mirrored, sorted(mirrored)

        # rank 0's node is lost with everything local: --resume continues from the bucket, history included;
        # SIGTERM then raises the stop flag in the bucket, the workers checkpoint and stop
        shutil.rmtree(tmp_path / "run")
        metrics = tmp_path / "run" / "metrics.jsonl"
        proc = subprocess.Popen(
            [SSLRUN, *args, "--max-steps", "400", "--resume"],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, **env},
        )
        try:
            deadline = time.monotonic() + 240
            while not (metrics.exists() and any(json.loads(x)["step"] >= 4 for x in metrics.read_text().splitlines())):
                assert proc.poll() is None and time.monotonic() < deadline, "the resumed run did not reach step 4"
                time.sleep(0.2)
            proc.send_signal(signal.SIGTERM)
            out, _ = proc.communicate(timeout=180)
        finally:
            if proc.poll() is None:
                proc.kill()
        assert proc.returncode == 0, out
        assert "stopped: " in out and "continue with the same command plus --resume" in out, out
        stopped = int(out.split("stopped: ", 1)[1].split(" ", 1)[0])
        assert 4 <= stopped < 400
        assert "runs/run/.sslrun-stop" in _objects(s3, "e2e-runs")  # the flag the workers polled, in the bucket
        steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
        assert sorted(set(steps))[:4] == [1, 2, 3, 4], steps  # steps 1-2 restored from the bucket, then appended
        res = _cli(*args, "--max-steps", str(stopped + 2), "--resume", env=env, timeout=300)
        out = res.stdout + res.stderr
        assert res.returncode == 0, out
        assert f"finished: {stopped + 2} steps" in out, out

        # evaluation straight from the run's storage: its newest checkpoint, downloaded once
        res = _cli(
            "eval",
            "knn",
            "--checkpoint",
            runs.replace("/runs?", "/runs/run?"),
            "--output",
            str(tmp_path / "eval"),
            env=env,
            timeout=300,
        )
        assert res.returncode == 0, res.stdout + res.stderr
        assert "top-1" in res.stdout.lower(), res.stdout
