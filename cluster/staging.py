"""Before the workers start: every node that can host a worker gets the data it will read, once.

One Ray task per such node (pinned there, no CPU reserved) calls :func:`sslrun.core.data.cache.locate` for every
split: under a store URI data dir that copies the ``.beton`` to the node's own disk (one copy per node, verified,
see :mod:`sslrun.core.data.staging`); under a local data dir, the driver first sends the prepared file to every
node that cannot see it and holds no verified copy (:mod:`sslrun.cluster.shipping`), then each node checks it can
read it. This runs before Ray Train forms the process group, so a slow copy never keeps other ranks in a collective
that times out, and a node that cannot read the data is one line before any worker starts.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from sslrun.cluster.plan import LaunchPlan
from sslrun.core.config import DataCfg
from sslrun.core.errors import ConfigError, SslrunError

__all__ = ["stage_on_nodes"]

Echo = Callable[[str], None]


def _locate_all(data: dict[str, Any], splits: list[str | None]) -> list[str]:
    """On one node: the local path of every split (copied here first when the data dir is a store), each marked
    ``(copied now)`` when this call wrote it: the driver's log then shows every copy, one per node."""
    import time
    from pathlib import Path

    from sslrun.core.data.cache import locate

    cfg = DataCfg(**data)
    out = []
    for split in splits:
        t0 = time.time()
        path = locate(cfg, split)
        out.append(f"{path}{' (copied now)' if Path(path).stat().st_mtime >= t0 else ''}")
    return out


def _worker_nodes(plan: LaunchPlan, nodes: list[dict[str, Any]]) -> list[str]:
    """Ids of the alive nodes that have room for one worker of ``plan`` (where Ray Train may place one)."""
    need = plan.resources_per_worker
    return [
        n["NodeID"]
        for n in nodes
        if n.get("Alive") and all(n.get("Resources", {}).get(k, 0.0) >= v for k, v in need.items())
    ]


def stage_on_nodes(data_cfg: DataCfg, splits: list[str | None], plan: LaunchPlan, echo: Echo) -> None:
    """Make every split readable on every node that can host a worker, one task per node, all at once (after
    shipping the driver's copy to the nodes that lack one, under a local data dir).

    Raises:
        ConfigError / DataError: a node cannot read or copy the data, in one line naming the node.
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from sslrun.cluster.shipping import ship_to_nodes
    from sslrun.core.data.remote import is_uri

    nodes = _worker_nodes(plan, ray.nodes())
    if not is_uri(data_cfg.data_dir):  # no store: nodes that cannot see the driver's data get a copy from it
        ship_to_nodes(data_cfg, splits, nodes, echo)
    task = ray.remote(num_cpus=0, max_retries=0)(_locate_all)
    plain = dataclasses.asdict(data_cfg)
    refs = {
        node: task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote(plain, splits)
        for node in nodes
    }
    for node, ref in refs.items():
        try:
            paths = ray.get(ref)
        except ray.exceptions.RayTaskError as exc:
            cause = exc.cause if isinstance(exc.cause, SslrunError) else None
            if cause is None:
                raise ConfigError(f"node {node[:12]}: reading the data failed: {str(exc).splitlines()[-1]}") from exc
            raise type(cause)(f"node {node[:12]}: {cause}") from exc
        echo(f"data on node {node[:12]}: {', '.join(dict.fromkeys(paths))}")
