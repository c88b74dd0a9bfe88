"""The base class of the classic pretext tasks (rotation, jigsaw, inpainting, colorization, MAE, autoencoders).

A pretext task makes its label from the image itself. It is an ordinary :class:`~sslrun.core.interfaces.Method`,
so ``sslrun train --method rotation`` (or ``--pretext rotation``) runs through the same trainer and launcher as
every other method; :class:`PretextMethod` only supplies the loop every such task shares, and a subclass
implements three hooks:

* :meth:`~PretextMethod.build_head` -- check the encoder and return the prediction head,
* :meth:`~PretextMethod.make_inputs` -- ``images -> (inputs, targets)``, batched on the device,
* :meth:`~PretextMethod.loss` -- the scalar loss of a prediction against its target,

plus, optionally, :meth:`~PretextMethod.predict` (tasks that drive the encoder themselves),
:meth:`~PretextMethod.metrics` and :meth:`~PretextMethod.visualize`. One training step is then
``make_inputs(views[0], generator) -> predict -> loss``.

The task's randomness (rotation labels, masks, permutations) comes from a ``torch.Generator`` seeded from
``(seed, step, rank)``. ``seed`` is drawn once from the global RNG (so ``system.seed`` controls it) and ``step``
counts training forwards; both are buffers, so they live in the checkpoint and a resumed run draws exactly the
masks an uninterrupted run would have drawn.

Example:
    >>> class Flip(PretextMethod):  # doctest: +SKIP
    ...     Config = FlipConfig
    ...     def build_head(self, encoder, image_size):
    ...         return nn.Linear(encoder.output_dim, 2)
    ...     def make_inputs(self, images, generator=None):
    ...         labels = torch.randint(2, (len(images),), generator=generator, device=images.device)
    ...         return torch.where(labels.view(-1, 1, 1, 1) == 1, images.flip(-1), images), labels
    ...     def loss(self, pred, target):
    ...         return F.cross_entropy(pred.float(), target)
"""

from __future__ import annotations

from abc import abstractmethod
from typing import Any, ClassVar

import torch
from torch import nn

from sslrun.core.distributed import rank
from sslrun.core.errors import ConfigError
from sslrun.core.interfaces import Method, ViewSpec
from sslrun.core.rng import step_seed

__all__ = ["PretextMethod"]


class PretextMethod(Method):
    """A :class:`Method` that trains the encoder on a label made from the image itself.

    Subclasses set ``Config`` (and ``requires_color`` if the task predicts colour) and implement
    :meth:`build_head`, :meth:`make_inputs` and :meth:`loss`.

    Args:
        encoder: the backbone (``self.encoder``).
        cfg: an instance of ``Config``.
        image_size: side of the training views; dense heads are built to produce images of this size.
            ``None`` = the encoder's ``image_size`` attribute (the built-in encoders record it).

    Raises:
        ConfigError: the task cannot use this encoder (MAE without a ViT), or no image size is known.
    """

    #: samples kept from each step for :meth:`visuals`
    num_visuals: ClassVar[int] = 8

    def __init__(self, encoder: nn.Module, cfg: Any, image_size: int | None = None) -> None:
        super().__init__(encoder, cfg)
        if image_size is None:
            image_size = getattr(encoder, "image_size", None)
        if not isinstance(image_size, int):
            raise ConfigError(
                f"pretext task {self.name or type(self).__name__!r} needs the image size to build its head; "
                f"build it with sslrun.core.plugins.resolve.build_method(cfg, image_size)"
            )
        self.image_size = image_size
        self.head = self.build_head(encoder, image_size)
        # (seed, step) are buffers so they are saved and restored with the weights; the Python mirrors avoid a
        # device->host sync every step to read them. The trainer seeds every rank alike before building the
        # method, so all ranks hold the same seed (DDP's buffer broadcast then changes nothing) and
        # differ only through the rank mixed into step_seed().
        self.register_buffer("pretext_seed", torch.randint(0, 2**62, (), dtype=torch.long))
        self.register_buffer("pretext_step", torch.zeros((), dtype=torch.long))
        self._seed = int(self.pretext_seed)
        self._step = 0
        self._last: tuple[torch.Tensor, ...] | None = None

    # ---- the task: implemented by subclasses ---------------------------------------------------------------
    @abstractmethod
    def build_head(self, encoder: nn.Module, image_size: int) -> nn.Module:
        """The prediction head on top of ``encoder`` (features ``(N, encoder.output_dim)``), for views of side
        ``image_size``. Called once, from the constructor: also the place to refuse an encoder the task cannot
        use (with a :class:`~sslrun.core.errors.ConfigError`) and to record its geometry."""

    @abstractmethod
    def make_inputs(
        self, images: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Batched on the device: normalised ``images (N, 3, H, W)`` -> ``(inputs, targets)``; all randomness from
        ``generator``."""

    @abstractmethod
    def loss(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Scalar loss of the prediction against the target (both as returned by :meth:`predict`)."""

    @classmethod
    def view_specs(cls, cfg: Any, image_size: int) -> list[ViewSpec]:
        """One light view: crop (scale 0.5-1) and flip, no colour changes (several tasks predict colour, and the
        visuals should show the true colours)."""
        return [ViewSpec(size=image_size, scale=(0.5, 1.0), jitter_p=0.0, grayscale_p=0.0)]

    def predict(self, inputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(prediction, loss target)`` for one batch; the loss is ``loss(prediction, loss target)``.

        The default is ``(head(encoder(inputs)), targets)``. Override it when the task must drive the encoder
        itself: MAE runs the ViT blocks on the visible patches only, jigsaw encodes each tile separately.
        """
        return self.head(self.encoder(inputs)), targets

    def metrics(self, pred: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        """Extra scalar terms to log (e.g. ``{"acc": ...}`` for classification tasks). Empty by default."""
        return {}

    def visualize(
        self, images: torch.Tensor, inputs: torch.Tensor, pred: torch.Tensor, targets: torch.Tensor
    ) -> dict[str, torch.Tensor] | None:
        """Image grids for a few samples: ``{"input", "prediction", "target"}`` as ``(n, 3, H, W)`` in 0..1.
        ``images`` are the views, ``inputs``/``targets`` what :meth:`make_inputs` made of them, ``pred`` the first
        output of :meth:`predict`. None (nothing to show) by default."""
        return None

    # ---- pixel space ---------------------------------------------------------------------------------------
    def denormalize(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised ``(N, 3, H, W)`` -> pixel values in 0..1 units (not clamped), with the statistics recorded by
        :meth:`~sslrun.core.interfaces.Method.set_normalization`."""
        mean = torch.tensor(self.norm_mean, device=images.device, dtype=images.dtype).view(1, -1, 1, 1)
        std = torch.tensor(self.norm_std, device=images.device, dtype=images.dtype).view(1, -1, 1, 1)
        return images * std + mean

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """Pixel values in 0..1 -> the normalised space the encoder is trained in."""
        mean = torch.tensor(self.norm_mean, device=images.device, dtype=images.dtype).view(1, -1, 1, 1)
        std = torch.tensor(self.norm_std, device=images.device, dtype=images.dtype).view(1, -1, 1, 1)
        return (images - mean) / std

    # ---- the shared training step ----------------------------------------------------------------------------
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
        inputs, targets = self.make_inputs(images, gen)
        pred, target = self.predict(inputs, targets)
        out = {"loss": self.loss(pred, target)}
        with torch.no_grad():
            out.update({k: v.detach() for k, v in self.metrics(pred, target).items()})
            k = self.num_visuals
            # a few samples only, copied: the loader reuses its buffers and the full batch should not stay alive
            self._last = tuple(t[:k].detach().clone() for t in (images, inputs, pred, targets))
        return out

    @torch.no_grad()
    def visuals(self) -> dict[str, torch.Tensor] | None:
        """:meth:`visualize` of the last step's samples, ``(n, 3, H, W)`` float clamped to [0, 1]."""
        if self._last is None:
            return None
        vis = self.visualize(*self._last)
        if not vis:
            return None
        return {name: img.detach().float().clamp(0.0, 1.0) for name, img in vis.items()}

    def extra_repr(self) -> str:
        return f"image_size={self.image_size}"
