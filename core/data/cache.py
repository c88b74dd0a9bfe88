"""The dataset cache: ``<data_dir>/<dataset>/<split>.beton``, prepared from a dataset plugin on first use and
reused, verified, afterwards.

:func:`ensure_prepared` is what training and evaluation call; :func:`prepare_dataset` is ``sslrun data prepare``.
A cached file is prepared again when it fails verification, or was prepared with other dataset settings or another
image format (both recorded in its manifest). Ranks that ask for the same split at once wait on a file lock while
one of them writes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sslrun.core.config import DataCfg, coerce_dataclass
from sslrun.core.data.format import verify_beton
from sslrun.core.data.manifest import Manifest
from sslrun.core.data.writer import write_beton
from sslrun.core.errors import ConfigError, DataError
from sslrun.core.plugins.registry import get_registry

__all__ = ["cached_path", "dataset_from_cfg", "ensure_prepared", "prepare_dataset", "prepare_split"]


def dataset_from_cfg(data_cfg: DataCfg) -> tuple[Any, dict[str, Any]]:
    """The dataset plugin instance for ``data_cfg`` and its config as plain data (for the manifest).

    ``data.root`` fills the plugin's ``root`` unless ``dataset_kwargs`` sets it.
    """
    cls = get_registry("dataset").get(data_cfg.dataset)
    kwargs = dict(data_cfg.dataset_kwargs)
    names = {f.name for f in dataclasses.fields(cls.Config)}
    if data_cfg.root is not None and "root" in names:
        kwargs.setdefault("root", data_cfg.root)
    cfg = coerce_dataclass(cls.Config, kwargs, f"data.dataset_kwargs ({data_cfg.dataset})")
    plain = json.loads(json.dumps(dataclasses.asdict(cfg), default=str))
    plain.pop("download", None)  # how the raw files were obtained does not change the data
    return cls(cfg), plain


def cached_path(data_cfg: DataCfg, split: str) -> Path:
    """``<data_dir>/<dataset>/<split>.beton``."""
    safe = data_cfg.dataset.replace(os.sep, "_")
    return Path(data_cfg.data_dir).expanduser() / safe / f"{split.replace(os.sep, '_')}.beton"


def _resolve_split(ds: Any, split: str | None, name: str) -> str:
    if split is None:
        return ds.splits[0]
    if split not in ds.splits:
        raise ConfigError(f"dataset {name!r} has no split {split!r}; splits: {', '.join(ds.splits)}")
    return split


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Exclusive lock so that ranks preparing the same split at once wait for one writer."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = path.with_name(path.name + ".lock")
    with open(lock, "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"waiting for another process preparing {path} ...", file=sys.stderr)
            t0 = time.monotonic()
            fcntl.flock(fh, fcntl.LOCK_EX)
            print(f"... done after {time.monotonic() - t0:.0f} s", file=sys.stderr)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _cache_mismatch(m: Manifest, name: str, split: str, fmt: str, config: dict[str, Any]) -> str | None:
    if (m.dataset, m.split) != (name, split):
        return f"it holds {m.dataset}/{m.split}"
    if m.image_format != fmt:
        return f"it stores {m.image_format} images, {fmt} was asked for"
    if m.dataset_config != config:
        changed = sorted(
            k for k in set(config) | set(m.dataset_config or {}) if config.get(k) != (m.dataset_config or {}).get(k)
        )
        return f"the dataset settings changed ({', '.join(changed)})"
    return None


def prepare_split(
    data_cfg: DataCfg,
    split: str | None = None,
    *,
    output: str | Path | None = None,
    force: bool = False,
    num_workers: int = 1,
    progress: bool = True,
) -> tuple[Path, Manifest, bool]:
    """Prepare one split (or reuse the cached file). Returns ``(path, manifest, written)``.

    Args:
        data_cfg: dataset name, kwargs, root, cache dir and image format.
        split: a split of the dataset; None = its first split (the pretraining split).
        output: write here instead of the cache (always written).
        force: write even if a valid cached file with the same settings exists.
        num_workers: writer processes (1 = in this process).
        progress: show a progress bar.

    Raises:
        DataError / ConfigError / PluginError: one line saying what is wrong.
    """
    ds, config = dataset_from_cfg(data_cfg)
    split = _resolve_split(ds, split, data_cfg.dataset)
    path = Path(output).expanduser() if output is not None else cached_path(data_cfg, split)
    fmt = data_cfg.format
    # the lock is for the shared cache (ranks preparing at once); an explicit --output is the user's own file
    with _file_lock(path) if output is None else contextlib.nullcontext():
        if output is None and not force and path.exists():
            try:
                m = verify_beton(path)
            except DataError as exc:
                warnings.warn(f"cached {path} is unusable ({exc}); preparing it again", stacklevel=2)
            else:
                why = _cache_mismatch(m, data_cfg.dataset, split, fmt, config)
                if why is None:
                    return path, m, False
                print(f"re-preparing {path}: {why}", file=sys.stderr)
        info = ds.info()
        samples = ds.open_split(split)
        manifest = write_beton(
            samples,
            path,
            dataset=data_cfg.dataset,
            split=split,
            num_classes=info.num_classes,
            grayscale=info.grayscale,
            fmt=fmt,
            num_workers=num_workers,
            dataset_config=config,
            progress=progress,
        )
    return path, manifest, True


def prepare_dataset(
    data_cfg: DataCfg,
    split: str | None = None,
    *,
    output: str | Path | None = None,
    force: bool = False,
    num_workers: int = 1,
    progress: bool = True,
) -> list[tuple[str, Path, Manifest, bool]]:
    """What ``sslrun data prepare`` does: one split, or (``split=None``, no ``output``) the pretraining split and,
    for labelled data, the evaluation splits. Returns ``[(split, path, manifest, written)]``.

    Raises:
        ConfigError: ``output`` without a single split for a dataset whose splits would all need one.
        DataError / PluginError: as :func:`prepare_split`.
    """
    ds, _ = dataset_from_cfg(data_cfg)
    if split is not None or output is not None:
        splits = [_resolve_split(ds, split, data_cfg.dataset)]
    else:
        splits = [ds.splits[0]]
        if ds.eval_splits and ds.info().num_classes is not None:
            splits += [s for s in ds.eval_splits if s not in splits]
    out = []
    for s in splits:
        path, manifest, written = prepare_split(
            data_cfg, s, output=output, force=force, num_workers=num_workers, progress=progress
        )
        out.append((s, path, manifest, written))
    return out


def ensure_prepared(
    data_cfg: DataCfg, split: str | None = None, *, num_workers: int = 1, progress: bool = True
) -> Path:
    """The cached ``<data_dir>/<dataset>/<split>.beton``, prepared on first use and reused (verified) afterwards.

    Re-prepared when the cached file fails verification, or was prepared with other dataset settings or image
    format. Safe to call from several processes at once (a file lock lets one of them write).

    Args:
        data_cfg: the experiment's data section.
        split: a split name; None = the dataset's first split.

    Raises:
        DataError / ConfigError / PluginError: one line saying what is wrong.
    """
    path, _, _ = prepare_split(data_cfg, split, num_workers=num_workers, progress=progress)
    return path
