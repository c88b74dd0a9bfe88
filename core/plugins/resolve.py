"""Turn the names and kwargs of an :class:`ExperimentConfig` into plugin objects, checking everything first.

The driver calls :func:`validate_plugins` before asking for any resources: unknown names, bad kwargs and
colour/grayscale mismatches fail there, in one line. Workers call :func:`check_plugin_versions` to make sure
they see the same plugin distributions as the driver (entry points are per environment).
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any

import torch
from torch import nn

from sslrun.core.config import ExperimentConfig, coerce_dataclass
from sslrun.core.errors import ConfigError, SslrunError, UnknownPluginError
from sslrun.core.interfaces import Dataset, Method, ViewSpec
from sslrun.core.plugins.registry import get_registry
from sslrun.core.pretext import PretextMethod

__all__ = [
    "build_dataset",
    "build_encoder",
    "build_method",
    "check_plugin_versions",
    "encoder_kwargs",
    "method_class",
    "method_config",
    "method_views",
    "validate_plugins",
]


def method_class(name: str) -> type[Method]:
    """The Method class for ``name``: a ``sslrun.methods`` or a ``sslrun.pretexts`` plugin (both are Methods)."""
    methods, pretexts = get_registry("method"), get_registry("pretext")
    if name in methods.names():
        return methods.get(name)
    if name in pretexts.names():
        return pretexts.get(name)
    raise UnknownPluginError(
        f"unknown method {name!r}; methods: {', '.join(methods.names()) or '(none)'}; "
        f"pretext tasks: {', '.join(pretexts.names()) or '(none)'}"
    )


def method_config(cfg: ExperimentConfig) -> Any:
    """``method.kwargs`` checked against and converted to the method's own ``Config`` dataclass."""
    cls = method_class(cfg.method.name)
    return coerce_dataclass(cls.Config, cfg.method.kwargs, f"method.kwargs ({cfg.method.name})")


def method_views(cfg: ExperimentConfig, image_size: int) -> list[ViewSpec]:
    """The method's views for ``image_size`` px sources, with ``data.view_overrides`` set on every one.

    Raises:
        ConfigError: an override names no ViewSpec field or gives it a value the field refuses.
    """
    specs = method_class(cfg.method.name).view_specs(method_config(cfg), image_size)
    overrides = dict(cfg.data.view_overrides)
    if not overrides:
        return specs
    fields = [f.name for f in dataclasses.fields(ViewSpec)]
    unknown = sorted(set(overrides) - set(fields))
    if unknown:
        raise ConfigError(f"unknown data.view_overrides key {unknown[0]!r}; valid: {', '.join(fields)}")
    # TOML/--set give lists where ViewSpec holds tuples (scale, ratio, jitter, blur_sigma)
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()}
    try:
        return [dataclasses.replace(spec, **values) for spec in specs]
    except (ValueError, TypeError) as e:
        raise ConfigError(f"data.view_overrides {overrides}: {e}; fix the value (see docs/data.md)") from None


def dataset_config(cfg: ExperimentConfig) -> Any:
    """``data.dataset_kwargs`` (plus ``data.root``) checked against the dataset plugin's ``Config``."""
    cls = get_registry("dataset").get(cfg.data.dataset)
    kwargs = dict(cfg.data.dataset_kwargs)
    names = {f.name for f in dataclasses.fields(cls.Config)}
    if cfg.data.root is not None and "root" in names:
        kwargs.setdefault("root", cfg.data.root)
    return coerce_dataclass(cls.Config, kwargs, f"data.dataset_kwargs ({cfg.data.dataset})")


def encoder_kwargs(cfg: ExperimentConfig, image_size: int | None = None) -> dict[str, Any]:
    """The keyword arguments the encoder factory is called with: ``encoder.kwargs``, checked against its
    signature (unknown keys and wrong types are one-line :class:`ConfigError`), plus ``image_size`` when the
    factory takes it."""
    factory = get_registry("encoder").get(cfg.encoder.name)
    kwargs = dict(cfg.encoder.kwargs)
    try:
        sig = inspect.signature(factory)
    except (TypeError, ValueError):
        return kwargs
    params = sig.parameters
    takes_var_kw = any(p.kind is p.VAR_KEYWORD for p in params.values())
    if not takes_var_kw:
        unknown = sorted(set(kwargs) - set(params))
        if unknown:
            valid = ", ".join(n for n in params if n != "image_size") or "(none)"
            raise ConfigError(
                f"unknown encoder.kwargs key {unknown[0]!r} for encoder {cfg.encoder.name!r}; valid: {valid}"
            )
    for key, value in kwargs.items():
        p = params.get(key)
        if p is not None and p.default is not p.empty and p.default is not None and value is not None:
            expected = type(p.default)
            ok = isinstance(value, expected) or (expected is float and isinstance(value, int))
            if not ok or (expected is int and isinstance(value, bool)):
                raise ConfigError(
                    f"encoder.kwargs.{key} for {cfg.encoder.name!r}: expected {expected.__name__}, got {value!r}"
                )
    if image_size is not None and "image_size" in params and "image_size" not in kwargs:
        kwargs["image_size"] = image_size
    return kwargs


def build_dataset(cfg: ExperimentConfig) -> Dataset:
    """The dataset plugin instance for ``cfg.data``."""
    cls = get_registry("dataset").get(cfg.data.dataset)
    return cls(dataset_config(cfg))


def build_encoder(cfg: ExperimentConfig, image_size: int | None = None) -> nn.Module:
    """The encoder module; ``image_size`` is passed to factories that take it (small-image stem)."""
    factory = get_registry("encoder").get(cfg.encoder.name)
    module = factory(**encoder_kwargs(cfg, image_size))
    if not isinstance(getattr(module, "output_dim", None), int):
        info = get_registry("encoder").info(cfg.encoder.name)
        raise ConfigError(
            f"encoder {cfg.encoder.name!r} from {info.dist_version} returned a module without an int `output_dim`"
        )
    return module


def build_method(cfg: ExperimentConfig, image_size: int) -> Method:
    """The method (wrapping a freshly built encoder), ready to train."""
    cls = method_class(cfg.method.name)
    encoder = build_encoder(cfg, image_size)
    if issubclass(cls, PretextMethod):  # its head is built in the constructor, to the image size (dense outputs)
        return cls(encoder, method_config(cfg), image_size=image_size)
    return cls(encoder, method_config(cfg))


def validate_plugins(cfg: ExperimentConfig) -> ExperimentConfig:
    """Resolve every plugin the config names, check all kwargs, and record ``kind:name -> dist==version``.

    Raises:
        PluginError / ConfigError / DataError: one line saying what is wrong and what to do.
    """
    versions: dict[str, str] = {}
    mcls = method_class(cfg.method.name)
    method_config(cfg)
    kind = "method" if cfg.method.name in get_registry("method").names() else "pretext"
    versions[f"{kind}:{cfg.method.name}"] = get_registry(kind).info(cfg.method.name).dist_version
    encoder_kwargs(cfg, None)
    versions[f"encoder:{cfg.encoder.name}"] = get_registry("encoder").info(cfg.encoder.name).dist_version
    dcls = get_registry("dataset").get(cfg.data.dataset)
    dataset_config(cfg)
    versions[f"dataset:{cfg.data.dataset}"] = get_registry("dataset").info(cfg.data.dataset).dist_version
    info = dcls(dataset_config(cfg)).info()
    _dry_build(cfg, info.image_size)
    method_views(cfg, info.image_size)
    if getattr(mcls, "requires_color", False) and info.grayscale:
        raise ConfigError(
            f"method {cfg.method.name!r} needs colour images but dataset {cfg.data.dataset!r} is grayscale; "
            f"pick a colour dataset (cifar10, stl10, imagefolder) or another method"
        )
    cfg.plugin_versions = versions
    return cfg


def _dry_build(cfg: ExperimentConfig, image_size: int) -> None:
    """Build the method on the meta device (no memory, no compute) so that errors raised at construction — MAE
    without a ViT, a MoCo queue smaller than a batch, a bad encoder kwarg value — surface on the driver, before
    any resources are asked for. Only our one-line errors count: anything else the meta device cannot do is left
    to the real build on the workers."""
    try:
        with torch.device("meta"):
            build_method(cfg, image_size)
    except SslrunError:
        raise
    except Exception:  # a meta-device limitation, not a config error
        pass


def check_plugin_versions(cfg: ExperimentConfig) -> None:
    """On a worker: the plugins it discovers must be the driver's (same distribution and version)."""
    for key, expected in cfg.plugin_versions.items():
        kind, _, name = key.partition(":")
        try:
            found = get_registry(kind).info(name).dist_version
        except UnknownPluginError:
            found = "not installed"
        if found != expected:
            raise ConfigError(
                f"{kind} plugin {name!r} is {found} on this worker but {expected} on the driver; "
                f"install the same version on every node"
            )
