"""Run a :class:`~sslrun.core.interfaces.PretextTask` through the same trainer and launcher as every method.

:func:`pretext_method_class` turns a task class into a :class:`~sslrun.core.interfaces.Method` subclass, so
``sslrun train --method rotation`` (or ``--pretext rotation``) needs nothing pretext-specific in the trainer:

* ``Config`` is the task's ``Config`` (``method.kwargs`` are validated against it), ``requires_color`` is the
  task's (colorization is refused on grayscale datasets), ``view_specs`` is ``[task.view_spec(image_size)]``.
* ``forward(views)``: ``task.make_inputs(views[0], generator)`` -> ``task.predict(encoder, head, ...)`` ->
  ``task.loss``; classification tasks also log ``acc``.
* The task's randomness (rotation labels, masks, permutations) comes from a ``torch.Generator`` seeded from
  ``(seed, step, rank)``. ``seed`` is drawn once from the global RNG (so ``system.seed`` controls it) and ``step``
  counts training forwards; both are buffers, so they live in the checkpoint and a resumed run draws exactly the
  masks an uninterrupted run would have drawn.
* ``visuals()`` returns the task's input / prediction / target images of the last step for TensorBoard.

Example:
    >>> from sslrun.core.plugins.registry import get_registry
    >>> cls = pretext_method_class(get_registry("pretext").get("rotation"))  # doctest: +SKIP
    >>> cls.name  # doctest: +SKIP
    'rotation'
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from sslrun.core.distributed import rank
from sslrun.core.errors import ConfigError, PluginValidationError
from sslrun.core.interfaces import Method, PretextTask, ViewSpec
from sslrun.core.rng import step_seed

__all__ = ["PretextMethod", "pretext_method_class", "step_seed"]


class PretextMethod(Method):
    """A :class:`Method` that trains ``task_cls`` (set on the subclasses made by :func:`pretext_method_class`).

    Args:
        encoder: the backbone (``self.encoder``).
        cfg: an instance of the task's ``Config``.
        image_size: side of the training views; dense heads are built to produce images of this size.
            ``None`` = the encoder's ``image_size`` attribute (the built-in encoders record it).

    Raises:
        ConfigError: the task cannot use this encoder (MAE without a ViT), or no image size is known.
    """

    task_cls: ClassVar[type[PretextTask]]
    #: samples kept from each step for :meth:`visuals`
    num_visuals: ClassVar[int] = 8

    def __init__(self, encoder: nn.Module, cfg: Any, image_size: int | None = None) -> None:
        super().__init__(encoder, cfg)
        if image_size is None:
            image_size = getattr(encoder, "image_size", None)
        if not isinstance(image_size, int):
            raise ConfigError(
                f"pretext task {self.name!r} needs the image size to build its head; "
                f"build it with sslrun.core.plugins.resolve.build_method(cfg, image_size)"
            )
        self.image_size = image_size
        self.task = self.task_cls(cfg)
        self.task.setup(encoder, image_size)
        self.head = self.task.head(encoder.output_dim, image_size)
        # (seed, step) are buffers so they are saved and restored with the weights; the Python mirrors avoid a
        # device->host sync every step to read them. The trainer seeds every rank alike before building the
        # method, so all ranks hold the same seed (DDP's buffer broadcast then changes nothing) and
        # differ only through the rank mixed into step_seed().
        self.register_buffer("pretext_seed", torch.randint(0, 2**62, (), dtype=torch.long))
        self.register_buffer("pretext_step", torch.zeros((), dtype=torch.long))
        self._seed = int(self.pretext_seed)
        self._step = 0
        self._last: tuple[torch.Tensor, ...] | None = None

    @classmethod
    def view_specs(cls, cfg: Any, image_size: int) -> list[ViewSpec]:
        """One view: the task's light crop + flip (no colour changes: several tasks predict colour)."""
        return [cls.task_cls(cfg).view_spec(image_size)]

    def set_normalization(self, mean: Sequence[float], std: Sequence[float]) -> None:
        """Record the views' normalisation and pass it on to the task (Lab conversion, visuals)."""
        super().set_normalization(mean, std)
        self.task.set_normalization(mean, std)

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._seed = int(self.pretext_seed)
        self._step = int(self.pretext_step)

    @torch.compiler.disable
    def generator(self, device: torch.device) -> torch.Generator:
        """The generator of the current step on this rank (the same one on every call until the next step)."""
        gen = torch.Generator(device=device)
        gen.manual_seed(step_seed(self._seed, self._step, rank()))
        return gen

    @torch.compiler.disable
    def _advance(self) -> None:
        self._step += 1
        self.pretext_step.fill_(self._step)  # fill_ with a Python int: no host sync on CUDA

    def forward(self, views: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """``views[0] (N, 3, H, W)`` normalised -> ``{"loss", ...task metrics}``. Each training-mode call is one
        step: it draws the step's randomness, then advances the step counter (eval-mode calls do not)."""
        images = views[0]
        gen = self.generator(images.device)
        if self.training:
            self._advance()
        inputs, targets = self.task.make_inputs(images, gen)
        pred, target = self.task.predict(self.encoder, self.head, inputs, targets)
        out = {"loss": self.task.loss(pred, target)}
        with torch.no_grad():
            out.update({k: v.detach() for k, v in self.task.metrics(pred, target).items()})
            k = self.num_visuals
            # a few samples only, copied: the loader reuses its buffers and the full batch should not stay alive
            self._last = tuple(t[:k].detach().clone() for t in (images, inputs, pred, targets))
        return out

    @torch.no_grad()
    def visuals(self) -> dict[str, torch.Tensor] | None:
        """The task's input / prediction / target images of the last step, ``(n, 3, H, W)`` float in [0, 1]."""
        if self._last is None:
            return None
        vis = self.task.visuals(*self._last)
        if not vis:
            return None
        return {name: img.detach().float().clamp(0.0, 1.0) for name, img in vis.items()}

    def extra_repr(self) -> str:
        return f"task={self.task_cls.__name__}, image_size={self.image_size}"


@functools.cache
def pretext_method_class(task_cls: type[PretextTask]) -> type[Method]:
    """The :class:`Method` subclass that trains ``task_cls`` (one class per task, cached).

    Raises:
        PluginValidationError: ``task_cls`` is not a concrete :class:`PretextTask` subclass.
    """
    if not (inspect.isclass(task_cls) and issubclass(task_cls, PretextTask)) or inspect.isabstract(task_cls):
        raise PluginValidationError(f"{task_cls!r} is not a concrete subclass of sslrun.core.interfaces.PretextTask")
    attrs = {
        "name": task_cls.name,
        "Config": task_cls.Config,
        "requires_color": task_cls.requires_color,
        "task_cls": task_cls,
        "__module__": __name__,
        "__doc__": f"The {task_cls.name!r} pretext task ({task_cls.__module__}.{task_cls.__qualname__}) as a Method.",
    }
    return type(f"{task_cls.__name__}Method", (PretextMethod,), attrs)
