"""``sslrun train`` (this machine: one process, or one per GPU under torchrun) and ``sslrun launch`` (a Ray
cluster). Both take the same experiment options (:class:`sslrun.cli.options.ExperimentFlags`)."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Annotated

import typer

from sslrun.cli.common import experiment_from_cli, friendly
from sslrun.cli.options import ExperimentFlags, expand_flags
from sslrun.core.errors import SslrunError


@friendly
@expand_flags
def train(
    flags: ExperimentFlags,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from OUTPUT/checkpoints/last.pt.")] = False,
) -> None:
    """Pretrain on this machine (one process, or one per GPU under torchrun); see docs/training.md.

    Writes OUTPUT/config.toml, OUTPUT/checkpoints/, OUTPUT/tb/ (TensorBoard), OUTPUT/metrics.jsonl and
    OUTPUT/report.html.
    Ctrl-C writes a checkpoint at the next step and stops; --resume continues from OUTPUT/checkpoints/last.pt.
    """
    from sslrun.core.train.trainer import check_output_free, summary_line
    from sslrun.core.train.trainer import train as run_training

    cfg = experiment_from_cli(**dataclasses.asdict(flags), resume=resume)
    check_output_free(cfg)
    result = run_training(cfg)
    if os.environ.get("RANK", "0") != "0":
        return  # under torchrun only rank 0 prints (the process group is gone by now)
    _write_report(result.output)  # before the summary, which stays the last line
    if result.interrupted:
        typer.echo(
            f"stopped at step {result.steps}; resume with: sslrun train --config {result.output / 'config.toml'} "
            f"--resume"
        )
    typer.echo(summary_line(result))


@friendly
@expand_flags
def launch(
    flags: ExperimentFlags,
    nodes: Annotated[
        str | None,
        typer.Option(
            help="Nodes to spread the workers over (needs --address): N, or MIN:MAX to keep training as nodes come "
            "and go (elastic)."
        ),
    ] = None,
    gpus_per_node: Annotated[
        int | None, typer.Option(min=0, help="GPUs per node, one worker each (default: all local GPUs, else CPU).")
    ] = None,
    workers_per_node: Annotated[
        int | None, typer.Option(min=1, help="Workers per node (default: GPUs per node; 2 CPU workers locally).")
    ] = None,
    cpus_per_worker: Annotated[
        int | None, typer.Option(min=1, help="CPUs Ray reserves per worker (also caps its loader threads).")
    ] = None,
    address: Annotated[
        str | None,
        typer.Option(help="Ray cluster: auto, HOST:PORT or ray://HOST:10001 (default: start Ray on this machine)."),
    ] = None,
    storage_path: Annotated[
        str | None,
        typer.Option(help="Checkpoint storage seen by all nodes: NFS path, s3://..., gs://... (default OUTPUT/ray)."),
    ] = None,
    name: Annotated[str | None, typer.Option(help="Run name; the same name with --resume continues it.")] = None,
    max_failures: Annotated[
        int | None, typer.Option(min=0, help="Restarts from the last checkpoint after a worker dies (default 0).")
    ] = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue the run stored under the same storage path and name.")
    ] = False,
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Show every line Ray and the workers print (always in OUTPUT/logs).")
    ] = False,
) -> None:
    """Train on a Ray cluster with Ray Train (DDP); with no --address, on a local Ray started here.

    One progress view on the console (a bar on a terminal, timestamped lines otherwise); every process's full
    output in OUTPUT/logs/; OUTPUT/report.html at the end."""
    from sslrun.cluster.launcher import launch as run_launch
    from sslrun.cluster.plan import parse_nodes

    min_nodes, max_nodes = parse_nodes(nodes) if nodes is not None else (None, None)
    cluster = {
        "nodes": max_nodes,
        "min_nodes": min_nodes,
        "gpus_per_node": gpus_per_node,
        "workers_per_node": workers_per_node,
        "cpus_per_worker": cpus_per_worker,
        "address": address,
        "storage_path": storage_path,
        "name": name,
        "max_failures": max_failures,
    }
    cfg = experiment_from_cli(
        **dataclasses.asdict(flags), resume=resume, extra={f"cluster.{k}": v for k, v in cluster.items()}
    )
    try:
        result = run_launch(cfg, echo=typer.echo, verbose=verbose)
    except KeyboardInterrupt:
        typer.echo("aborted", err=True)
        raise typer.Exit(130) from None
    _write_report(result.output)


def _write_report(output: Path) -> None:
    """The run's HTML report (``sslrun report``) and its path; a report that cannot be written is one line,
    never a failed run."""
    from sslrun.cli.report import write_report

    try:
        path = write_report([output])
    except (SslrunError, ImportError, OSError) as exc:
        typer.echo(f"  report:         not written ({exc}); try: sslrun report {output}")
        return
    typer.echo(f"  report:         {path}")
