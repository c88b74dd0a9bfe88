"""How a launch is laid out on Ray, decided from the config alone: pure functions, unit-tested without Ray.

:func:`plan_launch` turns ``cfg.cluster`` (and, on the embedded default, what this machine has) into a
:class:`LaunchPlan`: how many workers, which resources each, which placement strategy, how many loader threads,
where Ray Train keeps the run. :func:`resource_shortfall` says why a cluster, described by ``ray.nodes()`` and
``ray.available_resources()``, cannot place that plan yet. Neither imports Ray nor touches the network.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sslrun.cluster.local_ray import parse_address
from sslrun.core.config import ExperimentConfig
from sslrun.core.errors import ConfigError

__all__ = ["LaunchPlan", "parse_nodes", "plan_launch", "resource_shortfall"]

_DEFAULT_CPU_WORKERS = 2  # the embedded default: 2 CPU workers (gloo DDP), which the README demo runs


@dataclass(frozen=True)
class LaunchPlan:
    """How a run is laid out on Ray.

    Attributes:
        nodes: number of nodes the workers are spread over (elastic: the most).
        workers_per_node: workers on each node.
        num_workers: ``nodes * workers_per_node``, the DDP world size (elastic: the most).
        min_workers: elastic: the fewest workers the run trains on (``min_nodes * workers_per_node``); equal to
            ``num_workers`` for a fixed size.
        resize_interval_s: elastic: how often Ray Train looks for room to grow the group.
        use_gpu: one GPU per worker (NCCL) or CPU workers (gloo).
        resources_per_worker: what Ray reserves for each worker (``{"CPU": c, "GPU": 1}``).
        placement_strategy: PACK on one node; STRICT_SPREAD for one worker per node; SPREAD otherwise.
        loader_threads: FFCV threads per worker (``data.num_workers`` clipped to the CPUs a worker has).
        storage_path: where Ray Train persists checkpoints (absolute path or ``s3://`` / ``gs://`` URI).
        name: the Ray Train run name; the same ``(storage_path, name)`` resumes the run.
        embedded: True when sslrun starts its own local Ray.
        epochs: the length of the lr schedule.
        warmup_epochs: its linear warm-up (``schedule.warmup_epochs``, or the default for this many epochs).
    """

    nodes: int
    workers_per_node: int
    num_workers: int
    min_workers: int
    resize_interval_s: float
    use_gpu: bool
    resources_per_worker: dict[str, float]
    placement_strategy: str
    loader_threads: int
    storage_path: str
    name: str
    embedded: bool
    epochs: int
    warmup_epochs: float

    @property
    def elastic(self) -> bool:
        """The worker group may shrink and grow between ``min_workers`` and ``num_workers``."""
        return self.min_workers < self.num_workers

    def describe(self) -> str:
        """One line, e.g. ``2 CPU workers (gloo) on 1 node, 1 CPU and 1 loader thread each, PACK; 1 epoch, lr
        warm-up 0.1 epochs then cosine``."""
        kind = "GPU workers (NCCL)" if self.use_gpu else "CPU workers (gloo)"
        layout = "on 1 node" if self.nodes == 1 else f"on {self.nodes} nodes ({self.workers_per_node} per node)"
        count = str(self.num_workers)
        if self.elastic:
            low = self.min_workers // self.workers_per_node
            count = f"{self.min_workers}..{self.num_workers}"
            layout = f"on {low}..{self.nodes} nodes ({self.workers_per_node} per node), elastic"
        res = ", ".join(f"{_fmt(v)} {k}" for k, v in self.resources_per_worker.items())
        threads = f"{self.loader_threads} loader thread{'s' if self.loader_threads != 1 else ''}"
        epochs = f"{self.epochs} epoch{'s' if self.epochs != 1 else ''}"
        warmup = f"{_fmt(self.warmup_epochs)} epoch{'s' if self.warmup_epochs != 1 else ''}"
        return (
            f"{count} {kind} {layout}, {res} and {threads} each, {self.placement_strategy}; "
            f"{epochs}, lr warm-up {warmup} then cosine"
        )


def plan_launch(cfg: ExperimentConfig, *, embedded: bool, local_cpus: int, local_gpus: int) -> LaunchPlan:
    """Decide the layout of a run from its config and, on the embedded default, what this machine has.

    Args:
        cfg: the experiment; ``cfg.cluster`` holds the launch settings, ``cfg.output`` must be absolute.
        embedded: True when sslrun starts its own local Ray (no ``--address``).
        local_cpus: CPUs of this machine (used on the embedded default only).
        local_gpus: GPUs of this machine (used on the embedded default only).

    Raises:
        ConfigError: an impossible combination (several nodes without a cluster, more GPU workers than GPUs,
            a global batch that does not divide by the number of workers, ...), naming what to change.
    """
    cl = cfg.cluster
    if cl.address is not None:
        parse_address(cl.address)  # the syntax, before anything is prepared; reachability when connecting
    use_gpu, gpus = _gpus(cfg, embedded=embedded, local_gpus=local_gpus)
    per_node = _workers_per_node(cfg, embedded=embedded, use_gpu=use_gpu, gpus=gpus, local_cpus=local_cpus)
    num_workers = cl.nodes * per_node
    min_workers = (cl.min_nodes or cl.nodes) * per_node
    _check_batch(cfg.data.batch_size, [n * per_node for n in range(cl.min_nodes or cl.nodes, cl.nodes + 1)])

    if cl.placement_strategy is not None:
        strategy = cl.placement_strategy
    elif cl.nodes == 1:
        strategy = "PACK"
    elif min_workers < num_workers:
        # elastic: Ray Train sizes the group by the resources it finds, not by nodes, so a group may have to share
        # a node (STRICT_SPREAD would make that group unplaceable)
        strategy = "SPREAD"
    elif per_node == 1:
        strategy = "STRICT_SPREAD"  # exactly one worker on each node, or fail clearly
    else:
        strategy = "SPREAD"

    resources: dict[str, float] = {"CPU": float(cl.cpus_per_worker)}
    if use_gpu:
        resources["GPU"] = 1.0
    if embedded:
        # Loader threads share this machine's cores with the other workers: FFCV raises ValueError when asked for
        # more threads than usable cores (libffcv/ffcv#357), and oversubscribed cores slow every worker down.
        threads = max(1, min(cfg.data.num_workers, local_cpus // num_workers))
    else:
        threads = max(1, min(cfg.data.num_workers, cl.cpus_per_worker))

    output = Path(cfg.output)
    storage = cl.storage_path or str(output / "ray")
    if "://" not in storage:
        storage = str(Path(storage).expanduser().resolve())
    name = cl.name or output.name
    if not name or "/" in name or name in (".", ".."):
        raise ConfigError(f"--name {name!r} must be a plain directory name (no '/')")
    return LaunchPlan(
        nodes=cl.nodes,
        workers_per_node=per_node,
        num_workers=num_workers,
        min_workers=min_workers,
        resize_interval_s=cl.resize_interval_s,
        use_gpu=use_gpu,
        resources_per_worker=resources,
        placement_strategy=strategy,
        loader_threads=threads,
        storage_path=storage,
        name=name,
        embedded=embedded,
        epochs=cfg.schedule.epochs,
        warmup_epochs=min(cfg.schedule.warmup, cfg.schedule.epochs),
    )


def parse_nodes(text: str) -> tuple[int | None, int]:
    """``--nodes`` as ``(min_nodes, nodes)``: ``"4"`` -> ``(None, 4)``, ``"2:4"`` -> ``(2, 4)`` (an elastic range).

    Raises:
        ConfigError: anything else, in one line.
    """
    low, sep, high = text.strip().partition(":")
    try:
        top = int(high if sep else low)
        bottom = int(low) if sep else None
    except ValueError:
        raise ConfigError(f"--nodes {text!r} must be a number (4) or an elastic range MIN:MAX (2:4)") from None
    if top < 1 or (bottom is not None and not 1 <= bottom <= top):
        raise ConfigError(f"--nodes {text!r}: need 1 <= MIN <= MAX, e.g. --nodes 2:4")
    return (None if bottom == top else bottom), top


def _check_batch(batch: int, sizes: list[int]) -> None:
    """Every world size the run may train on splits the global batch evenly (elastic: whole nodes' worth of
    workers, each number of nodes in the range).

    An uneven split would change what a step averages over (DDP averages the ranks' gradients equally), so it is
    refused here rather than handled by gradient accumulation: the global batch, and with it the schedules, stay
    exactly the same at every size. (A group Ray sizes otherwise, on a node partly used by another job, is refused
    by each worker in one line.)
    """
    bad = [w for w in sizes if batch % w]
    if not bad:
        return
    if len(sizes) == 1:
        (w,) = sizes
        raise ConfigError(
            f"the global batch size {batch} does not divide by {w} workers; "
            f"use a multiple of {w} (e.g. --batch-size {max(w, batch // w * w)})"
        )
    step = math.lcm(*sizes)
    hint = f"e.g. --batch-size {max(step, batch // step * step)}" if step <= 65536 else "or narrow the range"
    raise ConfigError(
        f"the global batch size {batch} cannot be split evenly over {', '.join(map(str, bad))} workers, sizes the "
        f"elastic range {sizes[0]}..{sizes[-1]} may take; use a multiple of {step} ({hint})"
    )


def _gpus(cfg: ExperimentConfig, *, embedded: bool, local_gpus: int) -> tuple[bool, int]:
    """``(use_gpu, GPUs per node)``, after checking the device and the GPU flags agree."""
    cl = cfg.cluster
    if embedded and cl.nodes > 1:
        raise ConfigError(
            f"--nodes {cl.nodes} needs a Ray cluster: start one (docs/cluster.md) and pass --address HEAD_IP:6379, "
            f"or drop --nodes to run on this machine"
        )
    gpus = cl.gpus_per_node
    if embedded and gpus == 0 and cfg.system.device != "cpu":
        gpus = local_gpus  # the embedded default runs on what the machine has
    use_gpu = gpus > 0
    if embedded and use_gpu and gpus > local_gpus:
        raise ConfigError(f"--gpus-per-node {gpus} but this machine has {local_gpus} GPU(s); lower it")
    if cfg.system.device == "cuda" and not use_gpu:
        raise ConfigError(
            "system.device is cuda but the launch has no GPUs; pass --gpus-per-node N (GPUs on each node)"
        )
    if cfg.system.device == "cpu" and cl.gpus_per_node > 0:
        raise ConfigError("system.device is cpu but --gpus-per-node asks for GPUs; drop one of them")
    return use_gpu, gpus


def _workers_per_node(cfg: ExperimentConfig, *, embedded: bool, use_gpu: bool, gpus: int, local_cpus: int) -> int:
    """DDP workers on each node: the flag, else one per GPU, else the embedded or cluster CPU default."""
    cl = cfg.cluster
    if cl.workers_per_node is not None:
        per_node = cl.workers_per_node
        if per_node < 1:
            raise ConfigError(f"cluster.workers_per_node must be >= 1, got {per_node}")
        if use_gpu and per_node > gpus:
            raise ConfigError(
                f"--workers-per-node {per_node} exceeds --gpus-per-node {gpus}: each GPU worker needs its own GPU"
            )
        return per_node
    if use_gpu:
        return gpus  # one worker per GPU, the DDP norm
    if embedded:
        return max(1, min(_DEFAULT_CPU_WORKERS, local_cpus // cl.cpus_per_worker))
    return 1  # CPU clusters: one worker per node, using its cores through threads


def resource_shortfall(plan: LaunchPlan, nodes: list[dict[str, Any]], available: dict[str, float]) -> str | None:
    """Why the cluster cannot run ``plan`` now, or None when it can.

    Args:
        plan: the layout.
        nodes: ``ray.nodes()`` (``Alive`` and total ``Resources`` per node).
        available: ``ray.available_resources()`` (what other jobs leave free).

    An elastic plan needs room for its fewest workers (``min_workers``); it grows into the rest as room appears.

    Returns:
        A phrase naming what is missing ("2 nodes that can each hold a worker of 1 CPU, 1 GPU; the cluster has 1
        (CPU 16, GPU 1)"), or None.
    """
    need = {k: v for k, v in plan.resources_per_worker.items() if v > 0}
    count = plan.min_workers
    alive = [n for n in nodes if n.get("Alive", n.get("alive", True))]
    fits = [_fits(n.get("Resources", {}), need) for n in alive]
    have = _summary(alive)
    worker = ", ".join(f"{_fmt(v)} {k}" for k, v in need.items())
    if plan.placement_strategy == "STRICT_SPREAD":
        ok_nodes = sum(1 for f in fits if f >= 1)
        if ok_nodes < count:
            return (
                f"{count} nodes that can each hold a worker of {worker}; "
                f"the cluster has {ok_nodes} such node(s) ({have})"
            )
    elif plan.placement_strategy == "STRICT_PACK":
        if max(fits, default=0) < count:
            return f"one node that can hold {count} workers of {worker}; the cluster has {have}"
    elif sum(fits) < count:
        return f"room for {count} workers of {worker}; the cluster has {have}"
    busy = [
        f"{_fmt(v * count)} {k} (free: {_fmt(available.get(k, 0.0))})"
        for k, v in need.items()
        if available.get(k, 0.0) + 1e-9 < v * count
    ]
    if busy:
        return f"{', '.join(busy)} free; other jobs hold the rest"
    return None


def _fits(resources: dict[str, float], need: dict[str, float]) -> int:
    """How many workers of ``need`` fit on a node with ``resources`` in total."""
    return min((math.floor(resources.get(k, 0.0) / v + 1e-9) for k, v in need.items()), default=0)


def _summary(nodes: list[dict[str, Any]]) -> str:
    """The alive nodes' CPUs and GPUs, for messages: ``2 node(s): CPU 4, GPU 0; CPU 1, GPU 0``."""
    if not nodes:
        return "no alive nodes"
    parts = []
    for n in nodes:
        res = n.get("Resources", {})
        parts.append(f"CPU {_fmt(res.get('CPU', 0.0))}, GPU {_fmt(res.get('GPU', 0.0))}")
    return f"{len(nodes)} node(s): " + "; ".join(parts)


def _fmt(value: float) -> str:
    """``1.0`` -> ``"1"``, ``0.5`` -> ``"0.5"``."""
    return str(int(value)) if float(value).is_integer() else f"{value:g}"
