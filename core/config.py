"""The experiment config: one tree of dataclasses, built from defaults < config file (TOML/YAML) < CLI flags <
``--set a.b=value`` overrides, and strict at every layer (nanoGPT's configurator, without the ``exec``).

An unknown key or a wrong type is a :class:`ConfigError` naming the key and the valid ones. Plugin kwargs
(``method.kwargs``, ``encoder.kwargs``, ``data.dataset_kwargs``) are plain dicts here; they are checked against
each plugin's own ``Config`` dataclass by :func:`sslrun.core.plugins.resolve.validate_plugins` before anything runs.
The config travels to Ray workers as plain data (:meth:`ExperimentConfig.to_dict`) and is rebuilt there.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from sslrun.core.errors import ConfigError

__all__ = [
    "ClusterCfg",
    "DataCfg",
    "ExperimentConfig",
    "LogCfg",
    "OptimCfg",
    "PluginRef",
    "ScheduleCfg",
    "SystemCfg",
    "apply_overrides",
    "coerce_dataclass",
    "default_data_dir",
    "load_config_file",
]


def default_data_dir() -> str:
    """Where prepared ``.beton`` files are cached: ``$SSLRUN_DATA_DIR``, else ``$XDG_CACHE_HOME/sslrun``,
    else ``~/.cache/sslrun``."""
    if env := os.environ.get("SSLRUN_DATA_DIR"):
        return env
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return str(Path(base) / "sslrun")


@dataclass
class PluginRef:
    """A plugin by name plus its keyword arguments (validated against the plugin's own ``Config``)."""

    name: str
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class DataCfg:
    """Where the data comes from and how it is loaded."""

    dataset: str = "fashion-mnist"  # a name in the `sslrun.datasets` entry-point group
    dataset_kwargs: dict[str, Any] = field(default_factory=dict)
    root: str | None = None  # raw files; None = the dataset's default place (or download when online)
    data_dir: str = field(default_factory=default_data_dir)  # cache of prepared .beton files
    split: str | None = None  # pretraining split; None = the dataset's first split
    batch_size: int = 256  # GLOBAL batch size, split evenly across ranks
    num_workers: int = 2  # FFCV threads per process, clipped to the usable cores
    os_cache: bool = True  # memory-map the .beton (page cache shared by ranks on a node) vs per-process cache
    format: Literal["raw", "jpg"] = "raw"  # how images are stored when a split is prepared on first use
    max_samples: int | None = None  # use only the first N samples (quick runs, tests)
    # ViewSpec fields set on every view of the method, e.g. {scale = [0.4, 1.0], solarize_p = 0.0}: tune the
    # paper's augmentations to your data without writing a plugin (see docs/data.md)
    view_overrides: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ConfigError(f"data.batch_size must be >= 1, got {self.batch_size}")
        if self.num_workers < 1:
            raise ConfigError(f"data.num_workers must be >= 1, got {self.num_workers}")


@dataclass
class OptimCfg:
    """Optimiser. ``lr`` is the base learning rate for a global batch of 256; the actual lr is
    ``lr * batch_size / 256`` (the linear scaling rule, Goyal et al. 2017)."""

    name: Literal["sgd", "lars", "adamw"] = "sgd"
    lr: float = 0.06  # per 256 images; SimCLR-on-CIFAR-style default for SGD
    weight_decay: float = 5e-4
    weight_decay_end: float | None = None  # cosine wd schedule end value (DINO); None = constant
    momentum: float = 0.9  # SGD/LARS momentum
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW
    # LARS trust coefficient: 0.001 in You et al. 2017 and in the official SimCLR, BYOL, Barlow Twins, VICReg and
    # SwAV code
    lars_eta: float = 0.001
    grad_clip: float | None = None  # max global grad norm; None = no clipping

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ConfigError(f"optim.lr must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            raise ConfigError(f"optim.weight_decay must be >= 0, got {self.weight_decay}")


@dataclass
class ScheduleCfg:
    """Length of training and per-iteration schedules (indexed by the global step)."""

    epochs: int = 100
    max_steps: int | None = None  # stop after this many global steps (overrides epochs when smaller)
    # linear lr warm-up, then cosine decay; None = min(10, epochs / 10), so a short run still reaches the decay
    warmup_epochs: float | None = None
    min_lr_ratio: float = 0.0  # final lr = lr * min_lr_ratio

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ConfigError(f"schedule.epochs must be >= 1, got {self.epochs}")
        if self.warmup_epochs is not None and self.warmup_epochs < 0:
            raise ConfigError(f"schedule.warmup_epochs must be >= 0, got {self.warmup_epochs}")

    @property
    def warmup(self) -> float:
        """The warm-up in epochs: ``warmup_epochs`` if set, else the smaller of 10 epochs and a tenth of the run."""
        return self.warmup_epochs if self.warmup_epochs is not None else min(10.0, self.epochs / 10)


@dataclass
class SystemCfg:
    """Device and numerics."""

    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto = bf16 autocast on CUDA, fp32 on CPU
    channels_last: bool = True  # model and inputs in channels_last (faster convolutions on CUDA and CPU)
    compile: bool = False  # torch.compile the method (first step pays ~20 s of compilation on CPU)
    sync_bn: bool = True  # SyncBatchNorm under DDP; CUDA only (gloo cannot run it)


@dataclass
class ClusterCfg:
    """Where ``sslrun launch`` runs. Ignored by ``sslrun train``."""

    nodes: int = 1  # the most nodes (with min_nodes: the top of an elastic range)
    min_nodes: int | None = None  # elastic: keep training on min_nodes..nodes nodes as they come and go
    resize_interval_s: float = 60.0  # elastic: how often Ray Train looks for room to grow the worker group
    workers_per_node: int | None = None  # None = gpus_per_node on GPU nodes; CPU: 2 on the local default, else 1
    gpus_per_node: int = 0
    cpus_per_worker: int = 1
    address: str | None = None  # None = start a local Ray in-process; "auto", "HOST:PORT", "ray://HOST:10001"
    storage_path: str | None = None  # shared storage for checkpoints (NFS path, s3://, gs://); None = OUTPUT
    name: str | None = None  # Ray Train run name; None = derived from the output directory
    max_failures: int = 0  # worker-group restarts from the last checkpoint before giving up
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_SPREAD"] | None = None  # None = SPREAD if nodes > 1
    resource_wait_s: float = 60.0  # how long to wait for enough cluster resources before failing clearly

    def __post_init__(self) -> None:
        if self.nodes < 1:
            raise ConfigError(f"cluster.nodes must be >= 1, got {self.nodes}")
        if self.min_nodes is not None and not 1 <= self.min_nodes <= self.nodes:
            raise ConfigError(
                f"the elastic range {self.min_nodes}:{self.nodes} nodes needs 1 <= min <= max; e.g. --nodes 2:4"
            )
        if self.resize_interval_s < 0:
            raise ConfigError(f"cluster.resize_interval_s must be >= 0, got {self.resize_interval_s}")
        if self.gpus_per_node < 0 or self.cpus_per_worker < 1:
            raise ConfigError("cluster.gpus_per_node must be >= 0 and cluster.cpus_per_worker >= 1")


@dataclass
class LogCfg:
    """Monitoring and checkpointing."""

    tensorboard: bool = True
    log_every: int = 10  # steps between scalar logs
    checkpoint_every: int = 500  # steps between checkpoints (also written at every epoch end)
    knn_every: int = 1  # epochs between online kNN evaluations; 0 = off
    knn_k: int = 200
    knn_t: float = 0.1
    knn_max_samples: int | None = 10000  # cap on bank/query size for the online monitor (cost control)
    visuals_every: int = 200  # steps between image grids (pretext tasks, augmented views at start)
    progress: Literal["auto", "bar", "plain", "off"] = "auto"


@dataclass
class ExperimentConfig:
    """The whole experiment. Only orchestrators (trainer, launcher) see all of it."""

    method: PluginRef = field(default_factory=lambda: PluginRef("simclr"))
    encoder: PluginRef = field(default_factory=lambda: PluginRef("small_cnn"))
    data: DataCfg = field(default_factory=DataCfg)
    optim: OptimCfg = field(default_factory=OptimCfg)
    schedule: ScheduleCfg = field(default_factory=ScheduleCfg)
    system: SystemCfg = field(default_factory=SystemCfg)
    cluster: ClusterCfg = field(default_factory=ClusterCfg)
    log: LogCfg = field(default_factory=LogCfg)
    output: str = "runs/default"
    resume: bool = False  # continue from OUTPUT/checkpoints/last.pt
    plugin_versions: dict[str, str] = field(default_factory=dict)  # "kind:name" -> "dist==version", set on resolve

    # ---- conversions -------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Plain data (dicts, lists, scalars): safe to send to Ray workers and to write as TOML/JSON."""
        return _to_plain(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ExperimentConfig:
        """Strictly rebuild from plain data: unknown keys and wrong types raise :class:`ConfigError`."""
        return coerce_dataclass(cls, data, "")

    def to_toml(self) -> str:
        """TOML text of the resolved config (``None`` values are left out: they are the defaults)."""
        import tomli_w

        return tomli_w.dumps(_drop_none(self.to_dict()))

    def architecture(self) -> dict[str, Any]:
        """The fields that must match for a checkpoint to be resumed or evaluated with this config."""
        return {"method": self.method.name, "encoder": _to_plain(self.encoder)}


# ---- strict coercion ---------------------------------------------------------------------------------------
def _to_plain(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: _to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {str(k): _to_plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_to_plain(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


def _drop_none(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _drop_none(v) for k, v in obj.items() if v is not None}
    return obj


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def coerce_value(tp: Any, value: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and convert where it is lossless (int -> float, list ->
    tuple, dict -> dataclass). Raise :class:`ConfigError` naming ``key`` otherwise."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce_value(arg, value, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(f"{key}: expected {' or '.join(_type_name(a) for a in args)}, got {value!r}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(repr(a) for a in args)}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a table of {tp.__name__} fields, got {value!r}")
        return coerce_dataclass(tp, value, key)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a table, got {value!r}")
        return dict(value)
    if origin is tuple:
        if not isinstance(value, list | tuple) or (args and args[-1] is not Ellipsis and len(value) != len(args)):
            raise ConfigError(f"{key}: expected a list of {len(args)} values, got {value!r}")
        if args and args[-1] is Ellipsis:
            return tuple(coerce_value(args[0], v, f"{key}[{i}]") for i, v in enumerate(value))
        return tuple(coerce_value(a, v, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value, strict=True)))
    if origin is list:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [coerce_value(args[0], v, f"{key}[{i}]") for i, v in enumerate(value)] if args else list(value)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, float) and value.is_integer())):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return int(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    return value


def coerce_dataclass(cls: type, data: dict[str, Any], prefix: str) -> Any:
    """Build dataclass ``cls`` from ``data``; unknown keys and wrong types raise :class:`ConfigError` naming the
    key and listing the valid ones. Used for the experiment config and for every plugin's ``Config``."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(
            f"unknown config key {where}{unknown[0]}; valid keys{' of ' + prefix if prefix else ''}: "
            f"{', '.join(sorted(fields))}"
        )
    kwargs = {
        name: coerce_value(hints[name], value, f"{prefix}.{name}" if prefix else name) for name, value in data.items()
    }
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{prefix or cls.__name__}: {exc}") from exc


# ---- layers: file, overrides ---------------------------------------------------------------------------
def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a TOML (``.toml``) or YAML (``.yaml``/``.yml``) config file into plain data."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {p} does not exist; pass an existing .toml or .yaml file")
    text = p.read_text()
    try:
        if p.suffix == ".toml":
            return tomllib.loads(text)
        if p.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text) or {}
            if not isinstance(data, dict):
                raise ConfigError(f"config file {p}: the top level must be a mapping")
            return data
    except (tomllib.TOMLDecodeError, ValueError) as exc:
        raise ConfigError(f"config file {p} is not valid {p.suffix[1:].upper()}: {exc}") from exc
    raise ConfigError(f"config file {p}: unsupported extension {p.suffix!r}; use .toml, .yaml or .yml")


def parse_scalar(text: str) -> Any:
    """Parse an override value as a TOML literal (``0.3``, ``true``, ``[0.2, 1.0]``, ``"x"``); anything that is
    not a valid literal is taken as a plain string (``optim.name=lars``)."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b=value`` overrides to plain config data (before coercion, which checks keys and types).

    Keys under a plugin's kwargs (``method.kwargs.temperature=0.2``) may be new; every other key must exist.
    """
    out = _deepcopy(data)
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"override {item!r} must look like section.key=value (e.g. optim.lr=0.3)")
        parts = key.split(".")
        node: dict[str, Any] = out
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None and _is_kwargs_path(parts[: i + 1]):
                child = node[part] = {}
            if not isinstance(child, dict):
                valid = ", ".join(sorted(k for k, v in node.items() if isinstance(v, dict)))
                raise ConfigError(f"override {key}: {'.'.join(parts[: i + 1])} is not a section; sections: {valid}")
            node = child
        node[parts[-1]] = parse_scalar(raw.strip())
    return out


def _is_kwargs_path(parts: list[str]) -> bool:
    return parts[-1] in ("kwargs", "dataset_kwargs")


def _deepcopy(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _deepcopy(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_deepcopy(v) for v in data]
    return data


def deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """``top`` over ``base``, recursively for tables."""
    out = _deepcopy(base)
    for k, v in top.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = _deepcopy(v)
    return out
