"""The dataset cache: ``<data_dir>/<dataset>/<split>.beton``, prepared from a dataset plugin on first use and
reused, verified, afterwards.

:func:`ensure_prepared` is what training and evaluation call; :func:`prepare_dataset` is ``sslrun data prepare``.
A cached file is prepared again when it fails verification, or was prepared with other dataset settings or another
image format (both recorded in its manifest). Ranks that ask for the same split at once wait on a file lock while
one of them writes.

``data_dir`` may also be a store URI (``s3://``, ``gs://``, see :mod:`sslrun.core.data.remote`): a split is
prepared on the machine that asks first and published there, a split the store holds is reused after checking its
manifest (other settings are refused, never overwritten without ``force``), and readers get a node-local copy
(:mod:`sslrun.core.data.staging`). :func:`locate` finds a prepared split without ever preparing one: what training
workers call.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
import warnings
from pathlib import Path
from typing import Any

from sslrun.core.config import DataCfg, coerce_dataclass
from sslrun.core.data.format import verify_beton
from sslrun.core.data.manifest import Manifest, manifest_path
from sslrun.core.data.remote import Store, check_manifest_matches, is_uri, open_store
from sslrun.core.data.staging import file_lock, shipped_path, stage, stage_root
from sslrun.core.data.writer import write_beton
from sslrun.core.errors import ConfigError, DataError
from sslrun.core.plugins.registry import get_registry

__all__ = [
    "cached_manifest",
    "cached_path",
    "dataset_from_cfg",
    "ensure_prepared",
    "locate",
    "prepare_dataset",
    "prepare_split",
    "refuse_preparing",
]


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


def cached_manifest(data_cfg: DataCfg, split: str) -> Manifest | None:
    """The manifest of ``split`` in the local cache when it was prepared with ``data_cfg``'s settings, else None.
    Read without hashing the ``.beton``: for readers that need only sizes and statistics."""
    sidecar = manifest_path(cached_path(data_cfg, split))
    if not sidecar.is_file():
        return None
    m = Manifest.from_json(sidecar.read_text(), sidecar)
    _, config = dataset_from_cfg(data_cfg)
    return None if _cache_mismatch(m, data_cfg.dataset, split, data_cfg.format, config) else m


def _cache_mismatch(m: Manifest, name: str, split: str, fmt: str, config: dict[str, Any]) -> str | None:
    if (m.dataset, m.split) != (name, split):
        return f"it holds {m.dataset}/{m.split}"
    if m.image_format != fmt:
        return f"it stores {m.image_format} images, {fmt} was asked for"
    old = m.dataset_config or {}
    # a setting absent on one side counts as None: a setting added in a later version does not void old caches
    changed = sorted(k for k in set(config) | set(old) if config.get(k) != old.get(k))
    if changed:
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
) -> tuple[Path | str, Manifest, bool]:
    """Prepare one split (or reuse the cached file). Returns ``(path, manifest, written)``; under a URI data dir,
    ``path`` is the file's URL in the store (reused after checking its manifest, or prepared here and published).

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
    if output is None and is_uri(data_cfg.data_dir):
        return _prepare_in_store(data_cfg, ds, split, config, force=force, num_workers=num_workers, progress=progress)
    path = Path(output).expanduser() if output is not None else cached_path(data_cfg, split)
    fmt = data_cfg.format
    # the lock is for the shared cache (ranks preparing at once); an explicit --output is the user's own file
    with file_lock(path) if output is None else contextlib.nullcontext():
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
        manifest = _write(data_cfg, ds, split, config, path, num_workers=num_workers, progress=progress)
    return path, manifest, True


# Set in processes that must only read prepared data (Ray training workers): the reason, for the error message.
_REFUSED: str | None = None


def refuse_preparing(reason: str) -> None:
    """From now on this process never prepares a dataset: a split that is not prepared is a :class:`DataError`
    saying ``reason``. Ray workers call it: FFCV's writer forks processes, and a worker that prepares makes the
    other ranks wait in a collective that times out."""
    global _REFUSED
    _REFUSED = reason


def _write(
    data_cfg: DataCfg, ds: Any, split: str, config: dict[str, Any], path: Path, *, num_workers: int, progress: bool
) -> Manifest:
    """Write ``split`` of ``ds`` to ``path`` (atomically, with its manifest)."""
    if _REFUSED is not None:
        raise DataError(f"{data_cfg.dataset}/{split} is not prepared at {path}; {_REFUSED}")
    info = ds.info()
    return write_beton(
        ds.open_split(split),
        path,
        dataset=data_cfg.dataset,
        split=split,
        num_classes=info.num_classes,
        grayscale=info.grayscale,
        fmt=data_cfg.format,
        num_workers=num_workers,
        dataset_config=config,
        progress=progress,
    )


def _store_parts(data_cfg: DataCfg, split: str) -> tuple[str, str]:
    """``(dataset folder, file name)`` of a split, the same under a local data dir and in a store."""
    path = cached_path(data_cfg, split)
    return path.parent.name, path.name


def _store_manifest(store: Store, data_cfg: DataCfg, split: str, config: dict[str, Any]) -> Manifest | None:
    """The store's manifest of ``split`` if it holds one, checked against the settings and the file's size.

    Raises:
        ConfigError: the store holds the split prepared with other settings (never overwritten without --force).
        DataError: its ``.beton`` is missing or of another size than the manifest says.
    """
    folder, name = _store_parts(data_cfg, split)
    m = store.read_manifest(folder, name + ".json")
    if m is None:
        return None
    why = _cache_mismatch(m, data_cfg.dataset, split, data_cfg.format, config)
    if why is not None:
        raise ConfigError(
            f"{store.url(folder, name)} does not match this run: {why}; use another --data-dir, or replace it with "
            f"`sslrun data prepare {data_cfg.dataset} --data-dir URI --force`"
        )
    check_manifest_matches(m, store.size(folder, name), store.url(folder, name))
    return m


def _prepare_in_store(
    data_cfg: DataCfg, ds: Any, split: str, config: dict[str, Any], *, force: bool, num_workers: int, progress: bool
) -> tuple[str, Manifest, bool]:
    """Reuse the split the store holds (checked), or prepare it on this machine and publish it. Returns the
    store's URL of the file (for messages), its manifest and whether it was written."""
    store = open_store(data_cfg.data_dir)
    store.check(write=False)
    folder, name = _store_parts(data_cfg, split)
    if not force and (m := _store_manifest(store, data_cfg, split, config)) is not None:
        return store.url(folder, name), m, False
    store.check(write=True)  # before minutes of preparing, not after
    local = stage_root() / "published" / folder / name
    with file_lock(local):
        manifest = _write(data_cfg, ds, split, config, local, num_workers=num_workers, progress=progress)
        store.publish(local, manifest_path(local), folder, name)
    return store.url(folder, name), manifest, True


def locate(data_cfg: DataCfg, split: str | None = None) -> Path:
    """The local, verified ``.beton`` of a split that was prepared already; never prepares.

    A local data dir is read where it is, or, on a node that does not see it, from the copy ``sslrun launch``
    shipped to this node (:func:`~sslrun.core.data.staging.shipped_path`); a store's file is copied to this node
    once (:func:`stage`).

    Raises:
        DataError / ConfigError: the split is not prepared (saying how to prepare it), does not match the
            settings, or cannot be copied, in one line.
    """
    ds, config = dataset_from_cfg(data_cfg)
    split = _resolve_split(ds, split, data_cfg.dataset)
    where = data_cfg.data_dir
    prepare = f"prepare it first with `sslrun data prepare {data_cfg.dataset} --split {split} --data-dir {where}`"
    if is_uri(data_cfg.data_dir):
        store = open_store(data_cfg.data_dir)
        m = _store_manifest(store, data_cfg, split, config)
        if m is None:
            raise DataError(f"{store.url(*_store_parts(data_cfg, split))} does not exist; {prepare}")
        return stage(store, *_store_parts(data_cfg, split), m)
    path = cached_path(data_cfg, split)
    if not path.exists():
        shipped = shipped_path(data_cfg.data_dir, path.parent.name, path.name)
        if not shipped.exists():
            raise DataError(
                f"{path} does not exist on this node and no copy was shipped to it ({shipped}): `sslrun launch` "
                f"copies a driver's local data only to the nodes the cluster has when it starts, and a node that "
                f"joins later cannot get it from a worker; pass --data-dir s3://bucket/prefix for clusters whose "
                f"nodes change (or a path every node shares), or {prepare}"
            )
        path = shipped
    why = _cache_mismatch(verify_beton(path), data_cfg.dataset, split, data_cfg.format, config)
    if why is not None:
        raise DataError(f"{path} does not match this run: {why}; {prepare}")
    return path


def prepare_dataset(
    data_cfg: DataCfg,
    split: str | None = None,
    *,
    output: str | Path | None = None,
    force: bool = False,
    num_workers: int = 1,
    progress: bool = True,
) -> list[tuple[str, Path | str, Manifest, bool]]:
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
    if _REFUSED is not None:  # a Ray worker: the driver prepared the split, and shipped or published it; find it
        return locate(data_cfg, split)
    path, _, _ = prepare_split(data_cfg, split, num_workers=num_workers, progress=progress)
    return locate(data_cfg, split) if is_uri(data_cfg.data_dir) else Path(path)
