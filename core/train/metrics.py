"""The metrics-logging callback: what a run reports every ``log.log_every`` steps, at epoch ends and at its end.

Each step's scalar terms stay on the device, summed over the logging window; at a log step they are averaged,
packed with the window's timings into one tensor and all-reduced once, so logging costs one host sync per window,
not per step. The results go through :meth:`~sslrun.core.train.callbacks.Loop.emit` (TensorBoard,
``metrics.jsonl``, every callback's ``on_log``) and to the console's progress line.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from sslrun.core.train.callbacks import Loop, TrainHooks
from sslrun.core.train.state import StepResult

__all__ = ["MetricsLogger"]


@dataclass
class _Window:
    """Sums over the steps since the last log."""

    terms: dict[str, Any] = field(default_factory=dict)
    steps: int = 0
    data_s: float = 0.0
    compute_s: float = 0.0
    start: float = field(default_factory=time.perf_counter)

    def add(self, result: StepResult) -> None:
        if result.grad_norm is not None:
            self._add("grad_norm", result.grad_norm.detach().float())
        for name, value in result.terms.items():
            if isinstance(value, torch.Tensor):
                if value.numel() != 1:
                    continue  # only scalar terms are logged
                value = value.detach().float().reshape(())
            self._add(name, value)
        self.steps += 1
        self.data_s += result.data_s
        self.compute_s += result.compute_s

    def _add(self, name: str, value: Any) -> None:
        self.terms[name] = self.terms.get(name, 0.0) + value


class MetricsLogger(TrainHooks):
    """Training metrics (``train/*``, ``opt/*``, ``perf/*``), the start and resume lines, and the run's hparams.

    Logs every ``log.log_every`` steps, at the step that reaches ``max_steps`` and after an agreed stop.
    """

    def __init__(self) -> None:
        self._window = _Window()

    def on_train_start(self, loop: Loop) -> None:
        run, state, cfg = loop.run, loop.state, loop.run.cfg
        if state.step == 0:
            loop.monitor.echo(
                f"training {cfg.method.name} + {cfg.encoder.name} on {cfg.data.dataset}: "
                f"{run.steps_per_epoch} steps/epoch x {cfg.schedule.epochs} epochs "
                f"(global batch {cfg.data.batch_size} on {run.world} worker(s), {run.device}); "
                f"peak lr {run.peak_lr:.4g}, warm-up {run.schedules.warmup_steps} steps then cosine"
            )
        else:
            where = f"step {state.step} (epoch {state.epoch + 1}, batch {state.batch})"
            loop.monitor.echo(f"resumed at {where} from {state.resumed_from}")
        self._window = _Window()

    def on_step_end(self, loop: Loop, result: StepResult) -> None:
        self._window.add(result)
        state = loop.state
        if state.step % loop.run.cfg.log.log_every == 0 or state.stop_requested or state.step >= loop.run.max_steps:
            self._log(loop)

    def on_epoch_end(self, loop: Loop, seconds: float) -> None:
        run = loop.run
        if run.world > 1:  # the slowest rank's time, so that every rank logs the same value
            t = torch.tensor([seconds], device=run.device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            seconds = t.item()
        loop.emit({"perf/epoch_time_s": seconds, "epoch": loop.state.step / run.steps_per_epoch})

    def on_train_end(self, loop: Loop) -> None:
        if self._window.steps > 0:
            self._log(loop)
        final = {"final_loss": loop.state.final_loss}
        if "knn/top1" in loop.state.metrics:
            final["knn/top1"] = loop.state.metrics["knn/top1"]
        loop.monitor.hparams(loop.run.cfg.to_dict(), final)

    def _log(self, loop: Loop) -> None:
        run, state, w = loop.run, loop.state, self._window
        n = max(w.steps, 1)
        wall = time.perf_counter() - w.start
        names = sorted(w.terms)
        values = [torch.as_tensor(w.terms[k], dtype=torch.float32, device=run.device) / n for k in names]
        values += [
            torch.tensor(x, dtype=torch.float32, device=run.device) for x in (w.data_s / n, w.compute_s / n, wall)
        ]
        packed = torch.stack(values)
        if run.world > 1:
            dist.all_reduce(packed)
            packed /= run.world
        vals = packed.tolist()
        lr, wd, momentum = run.schedules.at(max(state.step - 1, 0))
        metrics = {("opt/" if k == "grad_norm" else "train/") + k: v for k, v in zip(names, vals, strict=False)}
        data_s, compute_s, wall_s = vals[len(names) :]
        metrics.update(
            {
                "opt/lr": lr,
                "opt/weight_decay": wd,
                "perf/images_per_s": w.steps * run.cfg.data.batch_size / max(wall_s, 1e-9),
                "perf/data_time_s": data_s,
                "perf/compute_time_s": compute_s,
                "perf/world_size": float(run.world),  # elastic runs change it: TensorBoard shows when
                "epoch": state.step / run.steps_per_epoch,
            }
        )
        if momentum is not None:
            metrics["opt/momentum"] = momentum
        if run.device.type == "cuda":
            metrics["perf/gpu_mem_gb"] = torch.cuda.max_memory_allocated(run.device) / 2**30
        loop.emit(metrics)
        loop.monitor.progress(
            state.step,
            state.epoch,
            state.final_loss,
            metrics["perf/images_per_s"],
            data_share=data_s / (data_s + compute_s) if data_s + compute_s > 0 else None,
            force=state.step >= run.max_steps,
        )
        self._window = _Window()
