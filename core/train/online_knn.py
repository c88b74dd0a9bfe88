"""Online kNN monitor: how good the encoder's features are, measured while pretraining runs.

Every ``log.knn_every`` epochs the current encoder (``method.encoder``) embeds the dataset's labelled bank split
and query split (``Dataset.eval_splits``, each capped at ``log.knn_max_samples``) and a weighted cosine kNN
(Wu et al. 2018; k=200, T=0.1 as in DINO's eval_knn) classifies the queries. The encoder runs in eval mode under
``no_grad`` and is put back in train mode afterwards; the feature bank is freed as soon as the accuracy is known,
and the seconds it took are logged beside it, so the monitor's cost is visible next to the training time it takes.

The two :class:`~sslrun.core.data.eval_loader.EvalLoader` objects are built on first use and kept for the rest of
the run: each new FFCV loader compiles its pipeline with numba again (seconds, every time). :class:`KnnMonitor` is
the training callback: under DDP only rank 0 evaluates and broadcasts the result, which doubles as the barrier the
other ranks wait at.
"""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from sslrun.core.config import DataCfg
from sslrun.core.errors import TrainingError
from sslrun.core.plugins import resolve
from sslrun.core.train.build import Run, prepare_for_ranks
from sslrun.core.train.callbacks import Loop, TrainHooks
from sslrun.core.train.checkpoint import capture_rng, restore_rng
from sslrun.core.train.knn import knn_accuracy

__all__ = ["KnnMonitor", "OnlineKnn"]

log = logging.getLogger(__name__)

#: Images per batch when embedding the bank and queries (no gradients, so larger than training batches is fine).
EVAL_BATCH = 256


class OnlineKnn:
    """Weighted kNN top-1/top-5 of an encoder on a dataset's labelled (bank, query) splits.

    Args:
        data_cfg: the run's data config (where the splits are prepared and cached).
        eval_splits: ``(bank split, query split)`` from the dataset plugin.
        device: where the encoder lives.
        k: neighbours.
        t: softmax temperature of the vote weights.
        max_samples: cap on each split's size (None = all).
        bf16: run the encoder under bf16 autocast (CUDA).
    """

    def __init__(
        self,
        data_cfg: DataCfg,
        eval_splits: tuple[str, str],
        device: torch.device,
        *,
        k: int = 200,
        t: float = 0.1,
        max_samples: int | None = None,
        bf16: bool = False,
    ) -> None:
        self.data_cfg = data_cfg
        self.eval_splits = eval_splits
        self.device = device
        self.k = k
        self.t = t
        self.max_samples = max_samples
        self.bf16 = bf16
        self._loaders: list[Any] | None = None
        self._num_classes: int | None = None

    def _build(self) -> list[Any]:
        from sslrun.core.data.cache import ensure_prepared
        from sslrun.core.data.eval_loader import EvalLoader
        from sslrun.core.data.format import verify_beton

        loaders = []
        for split in self.eval_splits:
            path: Path = ensure_prepared(self.data_cfg, split)
            manifest = verify_beton(path)
            if manifest.num_classes:
                self._num_classes = max(self._num_classes or 0, int(manifest.num_classes))
            loaders.append(
                EvalLoader(
                    path,
                    EVAL_BATCH,
                    device=self.device,
                    num_workers=min(self.data_cfg.num_workers, 2),
                    max_samples=self.max_samples,
                )
            )
        return loaders

    @torch.no_grad()
    def _embed(self, encoder: nn.Module, loader: Any) -> tuple[torch.Tensor, torch.Tensor]:
        feats, labels = [], []
        autocast = torch.autocast(self.device.type, dtype=torch.bfloat16) if self.bf16 else contextlib.nullcontext()
        for images, y in loader:
            with autocast:
                f = encoder(images)
            feats.append(f.float())
            labels.append(y.to(self.device).long())  # loader buffers are reused: torch.cat below copies them
        return torch.cat(feats), torch.cat(labels)

    def evaluate(self, encoder: nn.Module) -> dict[str, float]:
        """``{"knn/top1", "knn/top5", "knn/time_s"}`` (accuracies in percent) for ``encoder``.

        The encoder is switched to eval mode and restored to its previous mode afterwards, and every RNG state is
        restored, so the monitor cannot change what training does next.
        """
        start = time.perf_counter()
        if self._loaders is None:
            self._loaders = self._build()
        was_training = encoder.training
        encoder.eval()
        rng = capture_rng()  # torch, CUDA, Python and numpy: training continues exactly as without the monitor
        try:
            bank, bank_labels = self._embed(encoder, self._loaders[0])
            query, query_labels = self._embed(encoder, self._loaders[1])
            keep_b, keep_q = bank_labels >= 0, query_labels >= 0  # -1 = unlabelled samples
            bank, bank_labels = bank[keep_b], bank_labels[keep_b]
            query, query_labels = query[keep_q], query_labels[keep_q]
            num_classes = self._num_classes or int(max(bank_labels.max(), query_labels.max()).item()) + 1
            acc = knn_accuracy(query, query_labels, bank, bank_labels, num_classes, k=self.k, t=self.t, topk=(1, 5))
        finally:
            encoder.train(was_training)
            restore_rng(rng)
        # free the bank now, not at the next allocation: on GPUs it competes with training activations
        del bank, bank_labels, query, query_labels
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        return {
            "knn/top1": 100.0 * acc[1],
            "knn/top5": 100.0 * acc[5],
            "knn/time_s": time.perf_counter() - start,
        }

    def close(self) -> None:
        """Release the loaders."""
        for loader in self._loaders or []:
            close = getattr(loader, "close", None)
            if close is not None:
                close()
        self._loaders = None


class KnnMonitor(TrainHooks):
    """The online kNN monitor as a training callback: every ``log.knn_every`` epochs, and once more at the end of
    a run cut short by ``schedule.max_steps`` (so it still reports where its features stand).

    Built on every rank before the loop: the first rank of each node prepares the labelled splits. A dataset
    without labelled splits gets a note in TensorBoard's text tab instead.
    """

    def __init__(self, run: Run) -> None:
        cfg = run.cfg
        self.every = cfg.log.knn_every
        self.note: str | None = None
        self.knn: OnlineKnn | None = None
        self.enabled = False
        self._last_step = -1
        if self.every <= 0:
            return
        splits = resolve.build_dataset(cfg).eval_splits
        if not splits:
            self.note = f"online kNN monitor off: dataset {cfg.data.dataset!r} has no labelled splits"
            return
        for split in splits:
            prepare_for_ranks(cfg, split, run.device)
        if run.rank == 0:
            self.knn = OnlineKnn(
                cfg.data,
                tuple(splits),  # type: ignore[arg-type]
                run.device,
                k=cfg.log.knn_k,
                t=cfg.log.knn_t,
                max_samples=cfg.log.knn_max_samples,
                bf16=run.bf16 and run.device.type == "cuda",
            )
        self.enabled = True

    def on_train_start(self, loop: Loop) -> None:
        if self.note:
            loop.monitor.text("notes", self.note, loop.state.step)

    def on_epoch_end(self, loop: Loop, seconds: float) -> None:
        if self.enabled and loop.state.epoch % self.every == 0:
            self._evaluate(loop)

    def on_train_end(self, loop: Loop) -> None:
        state = loop.state
        ran = state.step > state.start_step
        if self.enabled and ran and not state.stop_requested and self._last_step != state.step:
            self._evaluate(loop)

    def close(self) -> None:
        """Release the evaluation loaders."""
        if self.knn is not None:
            self.knn.close()

    def _evaluate(self, loop: Loop) -> None:
        """Rank 0 evaluates; the others wait in the broadcast of its result (which is the barrier)."""
        run = loop.run
        result = torch.zeros(4, device=run.device)
        if self.knn is not None:
            try:
                r = self.knn.evaluate(run.method.encoder)
                result = torch.tensor([1.0, r["knn/top1"], r["knn/top5"], r["knn/time_s"]], device=run.device)
            except Exception as exc:
                if run.world == 1:
                    raise
                log.error("online kNN failed on rank 0: %s", exc)
        if run.world > 1:
            dist.broadcast(result, src=0)
        ok, top1, top5, secs = result.tolist()
        if ok == 0:
            raise TrainingError("the online kNN monitor failed on rank 0 (see its error above); set log.knn_every=0")
        self._last_step = loop.state.step
        loop.emit({"knn/top1": top1, "knn/top5": top5, "knn/time_s": secs})
        loop.monitor.echo(f"epoch {loop.state.epoch}: kNN top-1 {top1:.2f}% (top-5 {top5:.2f}%, {secs:.1f} s)")
