"""Plugin discovery through entry points: one path for our built-ins and third-party packages alike.

Names are listed from the entry-point metadata without importing anything; a plugin is imported only when it is
used (:meth:`Registry.get`) or checked (:meth:`Registry.check`). The entry-point name is the plugin's name: the
registry sets it as ``cls.name`` on the classes it loads. Pretext tasks are Methods (subclasses of
:class:`~sslrun.core.pretext.PretextMethod`); their group ``sslrun.pretexts`` only lists them apart from the other
methods. Every failure is a one-line :class:`PluginError` naming the plugin, its kind and its distribution:

* importing raises            -> :class:`PluginLoadError` (with the original exception chained),
* the object is the wrong kind -> :class:`PluginValidationError` (also: a class stating another ``name``),
* two distributions, one name  -> :class:`DuplicatePluginError` naming both,
* no such name                 -> :class:`UnknownPluginError` listing the valid names.

Discovery uses the ``entrypoints`` package (``get_group_all`` keeps duplicates, which ``importlib.metadata``'s
``entry_points()[name]`` would silently resolve to whichever dist-info directory is read first); see
docs/internals.md, section 'Entry points: duplicates and versions'.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import entrypoints

from sslrun.core import interfaces
from sslrun.core.errors import (
    DuplicatePluginError,
    PluginLoadError,
    PluginValidationError,
    UnknownPluginError,
)
from sslrun.core.pretext import PretextMethod

__all__ = ["GROUPS", "KINDS", "PluginInfo", "Registry", "get_registry", "reset_registries"]

#: kind -> entry-point group
GROUPS: dict[str, str] = {
    "method": "sslrun.methods",
    "encoder": "sslrun.encoders",
    "pretext": "sslrun.pretexts",
    "dataset": "sslrun.datasets",
}
KINDS = tuple(GROUPS)


@dataclass(frozen=True)
class PluginInfo:
    """What the metadata says about one plugin, before it is imported."""

    name: str
    kind: str
    target: str  # "module:attr"
    dist: str  # distribution name ("sslrun", "sslrun-example-plugin")
    version: str

    @property
    def dist_version(self) -> str:
        return f"{self.dist}=={self.version}"


def _metadata_version(dist: str) -> str:
    """The version from the distribution's metadata. ``entrypoints`` parses it from the directory name, and the
    in-tree ``<name>.egg-info`` of an editable install has none; Ray puts the driver's working directory (the
    checkout) first on its workers' ``sys.path``, so without this they report ``sslrun==None``."""
    import importlib.metadata

    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _require_config(obj: type, kind: str) -> str | None:
    cfg = getattr(obj, "Config", None)
    if cfg is None or not dataclasses.is_dataclass(cfg):
        return f"{obj.__name__}.Config must be a dataclass of the {kind}'s hyperparameters"
    return None


def _validate_class(base: type, kind: str) -> Callable[[Any], str | None]:
    def check(obj: Any) -> str | None:
        if not (inspect.isclass(obj) and issubclass(obj, base)):
            return f"expected a subclass of {base.__module__}.{base.__qualname__}, got {obj!r}"
        if inspect.isabstract(obj):
            missing = ", ".join(sorted(obj.__abstractmethods__))
            return f"{obj.__name__} does not implement {missing}"
        return _require_config(obj, kind)

    return check


def _validate_encoder(obj: Any) -> str | None:
    if not callable(obj):
        return f"expected a callable factory fn(**kwargs) -> nn.Module, got {obj!r}"
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return None
    if any(p.kind in (p.POSITIONAL_ONLY,) and p.default is p.empty for p in sig.parameters.values()):
        return "an encoder factory must be callable with keyword arguments only"
    return None


VALIDATORS: dict[str, Callable[[Any], str | None]] = {
    "method": _validate_class(interfaces.Method, "method"),
    "pretext": _validate_class(PretextMethod, "pretext task"),
    "dataset": _validate_class(interfaces.Dataset, "dataset"),
    "encoder": _validate_encoder,
}


class Registry:
    """Plugins of one kind, discovered from the entry-point group ``GROUPS[kind]``.

    Args:
        kind: one of ``method``, ``encoder``, ``pretext``, ``dataset``.
        path: directories to scan instead of ``sys.path`` (tests point it at fake ``*.dist-info`` folders).

    Example:
        >>> get_registry("method").names()  # doctest: +SKIP
        ['barlow_twins', 'byol', 'dino', 'mocov2', 'simclr', 'simsiam', 'vicreg']
    """

    def __init__(self, kind: str, path: list[str] | None = None) -> None:
        if kind not in GROUPS:
            raise ValueError(f"unknown plugin kind {kind!r}; kinds: {', '.join(KINDS)}")
        self.kind = kind
        self.group = GROUPS[kind]
        self._path = path
        self._infos: dict[str, PluginInfo] | None = None
        self._eps: dict[str, entrypoints.EntryPoint] = {}
        self._loaded: dict[str, Any] = {}

    # ---- discovery (no imports) -------------------------------------------------------------------------
    def _scan(self) -> dict[str, PluginInfo]:
        if self._infos is not None:
            return self._infos
        infos: dict[str, PluginInfo] = {}
        for ep in entrypoints.get_group_all(self.group, path=self._path):
            dist = ep.distro.name.replace("_", "-") if ep.distro else "unknown"
            version = (ep.distro.version or _metadata_version(ep.distro.name)) if ep.distro else "unknown"
            target = f"{ep.module_name}:{ep.object_name}" if ep.object_name else ep.module_name
            info = PluginInfo(ep.name, self.kind, target, dist, version)
            prev = infos.get(ep.name)
            if prev is not None and (prev.dist, prev.target) != (info.dist, info.target):
                raise DuplicatePluginError(
                    f"{self.kind} plugin {ep.name!r} is registered twice in entry-point group {self.group}: by "
                    f"{prev.dist_version} ({prev.target}) and by {info.dist_version} ({info.target}); "
                    f"uninstall one of the two distributions"
                )
            infos[ep.name] = info
            self._eps[ep.name] = ep
        self._infos = dict(sorted(infos.items()))
        return self._infos

    def names(self) -> list[str]:
        """Registered names, sorted, without importing any plugin."""
        return list(self._scan())

    def info(self, name: str) -> PluginInfo:
        """Metadata of ``name``; :class:`UnknownPluginError` lists the valid names if there is no such plugin."""
        infos = self._scan()
        if name not in infos:
            valid = ", ".join(infos) or "(none installed)"
            raise UnknownPluginError(f"unknown {self.kind} {name!r}; available: {valid}")
        return infos[name]

    # ---- loading ------------------------------------------------------------------------------------------
    def get(self, name: str) -> Any:
        """Import, validate and return the plugin object (a class, or an encoder factory)."""
        if name in self._loaded:
            return self._loaded[name]
        info = self.info(name)
        try:
            obj = self._eps[name].load()
        except Exception as exc:
            raise PluginLoadError(
                f"{self.kind} plugin {name!r} from {info.dist_version} ({info.target}) failed to import: "
                f"{type(exc).__name__}: {exc}; fix or reinstall that package"
            ) from exc
        problem = VALIDATORS[self.kind](obj)
        if problem:
            raise PluginValidationError(
                f"{self.kind} plugin {name!r} from {info.dist_version} ({info.target}) is invalid: {problem}"
            )
        if inspect.isclass(obj):
            self._name_class(obj, info)
        self._loaded[name] = obj
        return obj

    def _name_class(self, cls: type, info: PluginInfo) -> None:
        """Give a plugin class its entry-point name as ``cls.name``: the entry point is the one place a plugin's
        name is written. A class that states a different ``name`` itself (or was loaded under another name
        before) is refused rather than known by two names."""
        stated = vars(cls).get("name")
        if stated and stated != info.name:
            raise PluginValidationError(
                f"{self.kind} plugin {info.name!r} from {info.dist_version} ({info.target}) is invalid: the class "
                f"is named {stated!r}; drop its `name` attribute (the entry point names the plugin), or register "
                f"a subclass under the second name"
            )
        cls.name = info.name  # type: ignore[attr-defined]

    def check(self, name: str) -> str:
        """``"ok"`` or ``"broken: <reason>"``; never raises for a broken plugin."""
        try:
            self.get(name)
        except (PluginLoadError, PluginValidationError) as exc:
            cause = exc.__cause__
            reason = f"{type(cause).__name__}: {cause}" if cause is not None else str(exc).split(" is invalid: ")[-1]
            return f"broken: {reason}"
        return "ok"


_REGISTRIES: dict[str, Registry] = {}


def get_registry(kind: str) -> Registry:
    """The process-wide registry of ``kind`` (entry points are scanned once per process)."""
    if kind not in _REGISTRIES:
        _REGISTRIES[kind] = Registry(kind)
    return _REGISTRIES[kind]


def reset_registries() -> None:
    """Forget scanned metadata and loaded plugins (tests, or after installing a package at run time)."""
    _REGISTRIES.clear()
