"""A run's products in object storage, and checkpoints read back by URI: a real S3-compatible server (moto's
``ThreadedMotoServer``) on 127.0.0.1, reached by pyarrow's ``S3FileSystem`` over HTTP, the output directory of a
real (tiny, CPU) ``sslrun train`` run, and the real CLI.

* :class:`sslrun.cluster.mirror.RunMirror` copies the output directory to ``<storage_path>/<name>/run/``, sends
  only what changed, never fails training for a storage error, and does nothing for a local storage path;
* ``sslrun eval knn`` and ``sslrun export`` take ``--checkpoint s3://...`` (a file, a Ray checkpoint directory, a
  run's storage directory: its newest checkpoint), downloading it once into the local cache;
* a bad URI is one line, exit status 2, within 30 s.

Run inside a loopback-only network namespace (see README): the missing-credentials cases would otherwise let the
AWS SDK look for an instance metadata server on the network.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from sslrun.cli import app
from sslrun.cluster.mirror import MIRROR_STATE, RunMirror
from sslrun.core.eval.export import EXPORT_FORMAT
from sslrun.tests.net import free_port, require_loopback_namespace
from sslrun.tests.s3_server import assert_one_line_error as _bad
from sslrun.tests.s3_server import bucket_objects as _objects
from sslrun.tests.s3_server import moto_s3, moto_s3_with_auth
from sslrun.tests.s3_server import run_cli as _cli
from sslrun.tests.s3_server import s3_client as _client

DATA = ["--set", "data.dataset_kwargs.num_samples=64", "--set", "data.dataset_kwargs.size=16"]
DATA += ["--set", "data.dataset_kwargs.test_samples=16"]
NAME = "tiny"
RAY_OLD, RAY_NEW = "checkpoint_2026-01-01_10-00-00.000001", "checkpoint_2026-01-01_10-05-00.000001"


@pytest.fixture(scope="module")
def s3() -> Iterator[str]:
    """A moto S3 server on 127.0.0.1 for this module, fake credentials in the environment; yields its host:port."""
    require_loopback_namespace("tests/test_run_storage.py")
    with moto_s3() as endpoint:
        yield endpoint


def _storage(endpoint: str, bucket: str) -> str:
    """Create ``bucket`` and return the URI of a ``runs`` prefix in it (a ``--storage-path``)."""
    _client(endpoint).create_bucket(Bucket=bucket)
    return f"s3://{bucket}/runs?endpoint_override={endpoint}&scheme=http"


def _uri(endpoint: str, path: str) -> str:
    return f"s3://{path}?endpoint_override={endpoint}&scheme=http"


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The output directory of a real 4-step ``sslrun train`` (SimCLR, small CNN, synthetic 16 px, CPU), with the
    ``launch.jsonl`` a launch would add."""
    base = tmp_path_factory.mktemp("run")
    args = ["train", "--method", "simclr", "--encoder", "small_cnn", "--dataset", "synthetic", "--max-steps", "4"]
    args += ["--batch-size", "16", "--device", "cpu", "--output", str(base / "out"), "--data-dir", str(base / "data")]
    args += [*DATA, "--set", "log.knn_every=0", "--set", "log.visuals_every=0", "--set", "log.progress=plain"]
    res = _cli(*args)
    assert res.returncode == 0, res.stdout + res.stderr
    out = base / "out"
    (out / "launch.jsonl").write_text(json.dumps({"event": "attempt", "world_size": 1}) + "\n")
    return out


# ---- the mirror ------------------------------------------------------------------------------------------------
def test_the_mirror_copies_the_run_and_then_only_what_changed(s3: str, trained: Path) -> None:
    storage = _storage(s3, "mirror")
    warnings: list[str] = []
    mirror = RunMirror(trained, storage, NAME, warn=warnings.append)
    (event_file,) = (trained / "tb").iterdir()
    products = {"config.toml", "metrics.jsonl", "launch.jsonl", "checkpoints/last.pt", f"tb/{event_file.name}"}
    assert set(mirror.sync()) == products and not warnings
    objects = _objects(s3, "mirror")
    prefix = f"runs/{NAME}/run/"
    assert set(objects) == {prefix + p for p in products} | {prefix + MIRROR_STATE}
    body = _client(s3).get_object(Bucket="mirror", Key=prefix + "checkpoints/last.pt")["Body"].read()
    assert body == (trained / "checkpoints" / "last.pt").read_bytes()

    assert mirror.sync() == []  # nothing changed: nothing sent
    assert RunMirror(trained, storage, NAME).sync() == []  # a restarted mirror reads what was sent from the store
    assert _objects(s3, "mirror") == objects

    # TensorBoard (without TensorFlow) reads the mirrored events straight from the bucket through boto3; its S3
    # endpoint is read once, at import, from S3_ENDPOINT: a fresh interpreter, as `tensorboard --logdir` would be
    code = (
        "import sys, json; from tensorboard.backend.event_processing.event_accumulator import EventAccumulator; "
        "print(json.dumps(sorted(EventAccumulator(sys.argv[1]).Reload().Tags()['scalars'])))"
    )
    tags = [
        subprocess.run(
            [sys.executable, "-c", code, logdir],
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "S3_ENDPOINT": f"http://{s3}"},
            check=True,
        ).stdout
        for logdir in (f"s3://mirror/{prefix}tb", str(trained / "tb"))
    ]
    assert json.loads(tags[0]) and tags[0] == tags[1]

    with open(trained / "metrics.jsonl", "a") as f:  # training went on: one more log line
        f.write(json.dumps({"step": 5, "loss": 1.0}) + "\n")
    assert mirror.sync() == ["metrics.jsonl"]
    after = _objects(s3, "mirror")
    changed = {k for k in after if after[k] != objects.get(k)}
    assert changed == {prefix + "metrics.jsonl", prefix + MIRROR_STATE}


def test_a_resume_on_a_new_node_gets_the_history_back_before_it_appends(s3: str, trained: Path, tmp_path: Path) -> None:
    storage = _storage(s3, "restore")
    assert RunMirror(trained, storage, NAME).sync()
    fresh = tmp_path / "new-node-output"
    fresh.mkdir()
    (fresh / "config.toml").write_text("# written by this attempt\n")  # present: left alone
    restored = RunMirror(fresh, storage, NAME).restore()
    (event_file,) = (trained / "tb").iterdir()
    assert restored == ["launch.jsonl", "metrics.jsonl", f"tb/{event_file.name}"]  # no checkpoint, no config
    for rel in restored:
        assert (fresh / rel).read_bytes() == (trained / rel).read_bytes()
    assert (fresh / "config.toml").read_text() == "# written by this attempt\n"
    assert RunMirror(fresh, storage, NAME).restore() == []  # all there now
    assert RunMirror(fresh, _storage(s3, "restore-empty"), NAME).restore() == []  # nothing mirrored yet: nothing


def test_background_copies_finish_by_close(s3: str, trained: Path) -> None:
    storage = _storage(s3, "background")
    mirror = RunMirror(trained, storage, NAME)
    t0 = time.perf_counter()
    mirror.sync_in_background()
    mirror.sync_in_background()  # a second checkpoint during the copy: one more pass later, no second thread
    returned = time.perf_counter() - t0
    mirror.close()
    assert returned < 0.5, returned  # the training step does not wait for the upload
    keys = set(_objects(s3, "background"))
    assert f"runs/{NAME}/run/checkpoints/last.pt" in keys and f"runs/{NAME}/run/config.toml" in keys


def test_a_local_storage_path_is_not_mirrored_and_a_file_store_gets_whole_files(trained: Path, tmp_path: Path) -> None:
    local = RunMirror(trained, str(tmp_path / "ray"), NAME)
    assert not local.enabled and local.sync() == [] and not (tmp_path / "ray").exists()
    store = tmp_path / "store"
    assert len(RunMirror(trained, f"file://{store}", NAME).sync()) == 5
    run = store / NAME / "run"
    assert (run / "checkpoints" / "last.pt").read_bytes() == (trained / "checkpoints" / "last.pt").read_bytes()
    assert not [p for p in run.rglob("*") if ".tmp" in p.name]  # written under a temporary name, then renamed
    # the copy is laid out like the output directory: the report and the evaluation read it as a local run
    from sslrun.cli.report import write_report
    from sslrun.core.eval.features import load_pretrained

    assert write_report([run], None).is_file()
    assert load_pretrained(run).step == 4


def test_an_unreachable_store_is_one_warning_line_and_training_goes_on(trained: Path) -> None:
    warnings: list[str] = []
    storage = f"s3://b/runs?endpoint_override=127.0.0.1:{free_port()}&scheme=http"
    mirror = RunMirror(trained, storage, NAME, warn=warnings.append)
    t0 = time.monotonic()
    assert mirror.sync() == []
    assert time.monotonic() - t0 < 30
    assert len(warnings) == 1 and "\n" not in warnings[0], warnings
    assert warnings[0].startswith("warning: copying the run to s3://b/runs/tiny/run failed"), warnings
    assert "training goes on" in warnings[0]


# ---- checkpoints by URI ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bucket_run(s3: str, trained: Path) -> str:
    """A run's storage directory as ``sslrun launch`` leaves it: two Ray Train checkpoint directories (the older
    one damaged, so that picking it fails) and the mirrored run directory. Returns ``bucket/runs/tiny``."""
    storage = _storage(s3, "ckpts")
    assert RunMirror(trained, storage, NAME).sync()
    client = _client(s3)
    base = f"runs/{NAME}"
    client.put_object(Bucket="ckpts", Key=f"{base}/{RAY_OLD}/checkpoint.pt", Body=b"not a checkpoint")
    good = (trained / "checkpoints" / "last.pt").read_bytes()
    client.put_object(Bucket="ckpts", Key=f"{base}/{RAY_NEW}/checkpoint.pt", Body=good)
    client.put_object(Bucket="ckpts", Key=f"{base}/{RAY_NEW}/sslrun.json", Body=b'{"step": 4}')
    return f"ckpts/{base}"


def test_eval_knn_reads_the_newest_checkpoint_of_a_run_in_the_bucket(
    s3: str, bucket_run: str, trained: Path, tmp_path: Path
) -> None:
    env = {"SSLRUN_CHECKPOINT_CACHE": str(tmp_path / "cache")}
    args = ["eval", "knn", "--checkpoint", _uri(s3, bucket_run), "--data-dir", str(trained.parent / "data")]
    args += ["--set", "num_samples=64", "--set", "size=16", "--set", "test_samples=16", "--device", "cpu"]
    args += ["--output", str(tmp_path / "eval"), "--json"]
    first = _cli(*args, env=env)
    assert first.returncode == 0, first.stdout + first.stderr
    result = json.loads(first.stdout)
    assert result["kind"] == "knn" and result["checkpoint_step"] == 4 and 0.0 <= result["top1"] <= 1.0
    assert f"checkpoint s3://{bucket_run}/{RAY_NEW}/checkpoint.pt -> " in first.stderr
    assert "(downloaded, " in first.stderr and "endpoint_override" not in first.stderr
    (cached,) = (tmp_path / "cache").glob("*/checkpoint.pt")
    assert cached.read_bytes() == (trained / "checkpoints" / "last.pt").read_bytes()
    assert not [p for p in (tmp_path / "cache").rglob("*") if ".tmp" in p.name]

    again = _cli(*args, env=env)
    assert again.returncode == 0, again.stderr
    assert f"-> {cached} (cached)" in again.stderr  # downloaded once


@pytest.mark.parametrize("where", ["file", "ray_dir", "mirror_dir"])
def test_export_takes_a_checkpoint_file_a_ray_directory_or_the_mirrored_run(
    s3: str, bucket_run: str, trained: Path, tmp_path: Path, where: str
) -> None:
    path, resolved = {
        "file": (f"{bucket_run}/run/checkpoints/last.pt", f"{bucket_run}/run/checkpoints/last.pt"),
        "ray_dir": (f"{bucket_run}/{RAY_NEW}/", f"{bucket_run}/{RAY_NEW}/checkpoint.pt"),
        "mirror_dir": (f"{bucket_run}/run", f"{bucket_run}/run/checkpoints/last.pt"),
    }[where]
    out = tmp_path / "encoder.pt"
    with pytest.MonkeyPatch.context() as mp:  # in this process: no second interpreter to import torch
        mp.setenv("SSLRUN_CHECKPOINT_CACHE", str(tmp_path / "cache"))
        res = CliRunner().invoke(app, ["export", "--checkpoint", _uri(s3, path), "--output", str(out), "--json"])
    assert res.exit_code == 0, res.output
    meta = json.loads(res.stdout)
    assert meta["encoder"] == "small_cnn" and meta["step"] == 4
    assert meta["source_checkpoint"] == f"s3://{resolved}"  # the file's URI, without the query
    blob = torch.load(out, weights_only=True)
    assert blob["format"] == EXPORT_FORMAT and blob["state_dict"]


# ---- bad URIs: one line, exit status 2, bounded time -----------------------------------------------------------
@pytest.fixture(scope="module")
def s3_auth() -> Iterator[str]:
    """A second moto server that checks credentials (its first request, the bucket's creation, is let through):
    its host:port."""
    with moto_s3_with_auth(setup_requests=1) as (endpoint, _):
        _client(endpoint).create_bucket(Bucket="locked")
        yield endpoint


@pytest.mark.slow
def test_bad_checkpoint_uris_are_one_line_each_in_bounded_time(
    s3: str, s3_auth: str, bucket_run: str, tmp_path: Path
) -> None:
    env = {"SSLRUN_CHECKPOINT_CACHE": str(tmp_path / "cache")}
    export = ["export", "--output", str(tmp_path / "e.pt"), "--checkpoint"]
    _bad([*export, "ftp://host/run"], env, "unknown URI scheme 'ftp://'")
    _bad([*export, _uri(s3, "ckpts/runs/nothing-here")], env, "s3://ckpts/runs/nothing-here does not exist")
    _bad([*export, _uri(s3, "gone/runs/tiny")], env, "bucket 'gone' does not exist")
    _bad([*export, _uri(s3, f"{bucket_run}/run/tb")], env, "holds no sslrun checkpoint")
    _bad([*export, _uri(f"127.0.0.1:{free_port()}", "b/runs/tiny")], env, "cannot connect to the endpoint")
    wrong = {**env, "AWS_ACCESS_KEY_ID": "wrong", "AWS_SECRET_ACCESS_KEY": "wrong"}
    _bad([*export, _uri(s3_auth, "locked/runs/tiny")], wrong, "access denied: the credentials are wrong")
    knn = ["eval", "knn", "--checkpoint", _uri(s3, "ckpts/runs/nothing-here")]
    _bad(knn, env, "s3://ckpts/runs/nothing-here does not exist")
    # a damaged object: the line saying where the copy came from, then the loader's one-line error about it
    res = _cli(*export, _uri(s3, f"{bucket_run}/{RAY_OLD}"), env=env)
    assert res.returncode == 2, res.stderr
    said, error = res.stderr.splitlines()
    assert said.startswith(f"checkpoint s3://{bucket_run}/{RAY_OLD}/checkpoint.pt -> ") and "is unreadable" in error
