"""Projection and prediction heads of the built-in methods and pretext tasks (lightly-style building blocks).

The methods' heads are MLPs of ``(Linear, optional BatchNorm1d, optional activation)`` blocks, with the layer
sizes, norms and biases of the paper's official code. Widths are constructor arguments with the paper's defaults;
the methods take them from their ``Config`` so tests and CPU runs can shrink them. The pretext tasks' heads are a
classifier (:class:`ClassifierHead`) and a vector-to-image decoder (:class:`ConvDecoder`).

Example:
    >>> head = SimCLRProjectionHead(in_dim=512)  # 512 -> 2048 -> 128
    >>> head(torch.zeros(4, 512)).shape
    torch.Size([4, 128])
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "BYOLPredictionHead",
    "BYOLProjectionHead",
    "BarlowTwinsProjectionHead",
    "ClassifierHead",
    "ConvDecoder",
    "DINOProjectionHead",
    "MoCoV2ProjectionHead",
    "NormedLinear",
    "ProjectionHead",
    "SimCLRProjectionHead",
    "SimSiamPredictionHead",
    "SimSiamProjectionHead",
]

#: One block: (in_dim, out_dim, batch norm or None, activation or None).
Block = tuple[int, int, nn.Module | None, nn.Module | None]


def _check_dims(name: str, *dims: int) -> None:
    for d in dims:
        if d < 1:
            raise ValueError(f"{name}: every layer width must be >= 1, got {dims}")


class ProjectionHead(nn.Module):
    """An MLP built from blocks; a Linear layer's bias is dropped when a BatchNorm follows it (redundant).

    Args:
        blocks: ``(in_dim, out_dim, batch_norm, activation)`` per layer, in order.
        last_bias: give the last Linear a bias (when no BatchNorm follows it).

    Example:
        >>> head = ProjectionHead([(8, 16, nn.BatchNorm1d(16), nn.ReLU()), (16, 4, None, None)])
        >>> head(torch.zeros(2, 8)).shape
        torch.Size([2, 4])
    """

    def __init__(self, blocks: Sequence[Block], last_bias: bool = True) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for i, (in_dim, out_dim, bn, act) in enumerate(blocks):
            _check_dims(type(self).__name__, in_dim, out_dim)
            is_last = i == len(blocks) - 1
            layers.append(nn.Linear(in_dim, out_dim, bias=bn is None and (last_bias or not is_last)))
            if bn is not None:
                layers.append(bn)
            if act is not None:
                layers.append(act)
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, in_dim) -> (N, out_dim)``."""
        return self.layers(x)


class SimCLRProjectionHead(ProjectionHead):
    """SimCLR's ``g(h) = W2 relu(BN(W1 h))`` (Chen et al. 2020, section 2.1; BN as in the official code):
    ``in -> hidden -> out`` with ``hidden = 2048`` (= the ResNet-50 feature size) and ``out = 128``."""

    def __init__(self, in_dim: int, hidden_dim: int = 2048, out_dim: int = 128) -> None:
        super().__init__(
            [(in_dim, hidden_dim, nn.BatchNorm1d(hidden_dim), nn.ReLU()), (hidden_dim, out_dim, None, None)]
        )


class MoCoV2ProjectionHead(ProjectionHead):
    """MoCo v2's MLP head (Chen, Fan, Girshick & He 2020): ``fc(2048) -> ReLU -> fc(128)``, no BatchNorm."""

    def __init__(self, in_dim: int, hidden_dim: int = 2048, out_dim: int = 128) -> None:
        super().__init__([(in_dim, hidden_dim, None, nn.ReLU()), (hidden_dim, out_dim, None, None)])


class BYOLProjectionHead(ProjectionHead):
    """BYOL's projector (Grill et al. 2020, section 3.3): ``Linear(4096) -> BN -> ReLU -> Linear(256)``."""

    def __init__(self, in_dim: int, hidden_dim: int = 4096, out_dim: int = 256) -> None:
        super().__init__(
            [(in_dim, hidden_dim, nn.BatchNorm1d(hidden_dim), nn.ReLU()), (hidden_dim, out_dim, None, None)]
        )


class BYOLPredictionHead(BYOLProjectionHead):
    """BYOL's predictor ``q_theta``: the same architecture as the projector, ``256 -> 4096 -> 256``."""

    def __init__(self, in_dim: int = 256, hidden_dim: int = 4096, out_dim: int = 256) -> None:
        super().__init__(in_dim, hidden_dim, out_dim)


class BarlowTwinsProjectionHead(ProjectionHead):
    """Barlow Twins' projector (Zbontar et al. 2021, section 3): three linear layers of 8192 units, the first two
    followed by BN and ReLU, no bias anywhere (official code). VICReg's expander (Bardes et al. 2022, section 4.1)
    is the same network, so VICReg uses this class too."""

    def __init__(self, in_dim: int, hidden_dim: int = 8192, out_dim: int = 8192) -> None:
        super().__init__(
            [
                (in_dim, hidden_dim, nn.BatchNorm1d(hidden_dim), nn.ReLU()),
                (hidden_dim, hidden_dim, nn.BatchNorm1d(hidden_dim), nn.ReLU()),
                (hidden_dim, out_dim, None, None),
            ],
            last_bias=False,
        )


class SimSiamProjectionHead(ProjectionHead):
    """SimSiam's projector (Chen & He 2021, section 4): three layers of 2048 with BN on every layer, including the
    output (no ReLU there, and BN without affine parameters, as in the official code)."""

    def __init__(self, in_dim: int, hidden_dim: int = 2048, out_dim: int = 2048) -> None:
        super().__init__(
            [
                (in_dim, hidden_dim, nn.BatchNorm1d(hidden_dim), nn.ReLU()),
                (hidden_dim, hidden_dim, nn.BatchNorm1d(hidden_dim), nn.ReLU()),
                (hidden_dim, out_dim, nn.BatchNorm1d(out_dim, affine=False), None),
            ]
        )


class SimSiamPredictionHead(ProjectionHead):
    """SimSiam's predictor: a bottleneck ``2048 -> 512 -> 2048`` with BN + ReLU on the hidden layer only."""

    def __init__(self, in_dim: int = 2048, hidden_dim: int = 512, out_dim: int = 2048) -> None:
        super().__init__(
            [(in_dim, hidden_dim, nn.BatchNorm1d(hidden_dim), nn.ReLU()), (hidden_dim, out_dim, None, None)]
        )


class NormedLinear(nn.Module):
    """A bias-free linear layer with weight normalisation ``W = g * v / ||v||`` (per output unit), DINO's last layer.

    With ``learn_norm=False`` the norm ``g`` is fixed to 1 (DINO's ``norm_last_layer=True``), which makes the
    output a cosine similarity to ``K`` prototypes and stabilises training.

    Args:
        in_dim: input features (the bottleneck, 256).
        out_dim: ``K`` prototypes (65536).
        learn_norm: learn ``g`` (True) or keep it at 1 (False).
    """

    def __init__(self, in_dim: int, out_dim: int, learn_norm: bool = False) -> None:
        super().__init__()
        _check_dims("NormedLinear", in_dim, out_dim)
        self.weight_v = nn.Parameter(torch.empty(out_dim, in_dim))
        nn.init.kaiming_uniform_(self.weight_v, a=math.sqrt(5))  # nn.Linear's default init
        self.weight_g = nn.Parameter(torch.ones(out_dim, 1), requires_grad=learn_norm)

    def forward(self, x: torch.Tensor, grad_gate: torch.Tensor | None = None) -> torch.Tensor:
        """``(N, in_dim) -> (N, out_dim)``.

        Args:
            x: inputs.
            grad_gate: a 0-d tensor multiplying this layer's parameter gradients (0 freezes the layer for this
                step, 1 trains it); the forward value is unchanged. A gate in the graph rather than a gradient hook:
                it survives deep copies and ``torch.compile``, and DDP still sees the parameters used.
        """
        v, g = self.weight_v, self.weight_g
        if grad_gate is not None:
            v = v.detach() + grad_gate * (v - v.detach())  # value v exactly; gradient grad_gate * dL/dv
            g = g.detach() + grad_gate * (g - g.detach())
        return F.linear(x, g * F.normalize(v, dim=1))


class DINOProjectionHead(nn.Module):
    """DINO's head (Caron et al. 2021, section 3.1 and appendix): a 3-layer MLP (hidden 2048, GELU, optional BN)
    to a 256-d bottleneck, L2 normalisation, then a weight-normalised linear layer to ``K = 65536`` dimensions.

    Args:
        in_dim: encoder features.
        out_dim: ``K``.
        hidden_dim: MLP width (2048).
        bottleneck_dim: bottleneck (256).
        use_bn: BatchNorm in the MLP (off for ViTs in the paper).
        norm_last_layer: fix the last layer's weight norm to 1 (True in the paper for ViT-B; False is better for
            ViT-S but can be unstable).

    Attributes:
        last_layer: the :class:`NormedLinear` (frozen during the first steps by the DINO method).
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int = 65536,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        use_bn: bool = False,
        norm_last_layer: bool = True,
    ) -> None:
        super().__init__()
        _check_dims("DINOProjectionHead", in_dim, out_dim, hidden_dim, bottleneck_dim)

        def bn(d: int) -> nn.Module | None:
            return nn.BatchNorm1d(d) if use_bn else None

        self.mlp = ProjectionHead(
            [
                (in_dim, hidden_dim, bn(hidden_dim), nn.GELU()),
                (hidden_dim, hidden_dim, bn(hidden_dim), nn.GELU()),
                (hidden_dim, bottleneck_dim, None, None),
            ]
        )
        for m in self.mlp.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)  # official init
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        self.last_layer = NormedLinear(bottleneck_dim, out_dim, learn_norm=not norm_last_layer)

    def forward(self, x: torch.Tensor, last_layer_grad_gate: torch.Tensor | None = None) -> torch.Tensor:
        """``(N, in_dim) -> (N, out_dim)`` logits; ``last_layer_grad_gate`` as in :meth:`NormedLinear.forward`."""
        x = F.normalize(self.mlp(x), dim=-1)
        return self.last_layer(x, last_layer_grad_gate)


class ClassifierHead(nn.Module):
    """``(N, in_dim) -> (N, num_classes)`` logits: ``Linear-BN-ReLU-Linear``, or one ``Linear`` if
    ``hidden_dim == 0`` (the pretext classifiers: 4 rotations, the jigsaw permutations).

    Args:
        in_dim: feature dimension.
        num_classes: number of classes.
        hidden_dim: width of the hidden layer; 0 for a linear classifier.
    """

    def __init__(self, in_dim: int, num_classes: int, hidden_dim: int = 512) -> None:
        super().__init__()
        if hidden_dim > 0:
            self.net: nn.Module = nn.Sequential(
                nn.Linear(in_dim, hidden_dim, bias=False),
                nn.BatchNorm1d(hidden_dim),
                nn.ReLU(inplace=True),
                nn.Linear(hidden_dim, num_classes),
            )
        else:
            self.net = nn.Linear(in_dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _decoder_geometry(out_size: int) -> tuple[int, int]:
    """``(start side, number of 2x upsamplings)``: start between 4 and 8 px and double up to ``out_size`` exactly
    when it is ``s * 2**k`` (28 = 7 * 4, 32 = 4 * 8, 96 = 6 * 16, 224 = 7 * 32); otherwise overshoot slightly and
    resize the last map."""
    if out_size <= 4:
        return out_size, 0
    n_up = int(math.floor(math.log2(out_size / 4)))
    return math.ceil(out_size / 2**n_up), n_up


class ConvDecoder(nn.Module):
    """Feature vector -> image: ``Linear -> (C, s, s) -> [ConvTranspose(4, stride 2) - BN - ReLU] x k -> Conv3x3``.

    The head of the dense pretext tasks (colorization, inpainting, autoencoder). They only get the encoder's pooled
    ``(N, D)`` feature vector, so their head must produce an image from a vector: this is the fully-connected
    bottleneck then up-convolution decoder of context encoders (Pathak et al. 2016, section 3.1) and of DCGAN's
    generator. Because the whole image must pass through the feature vector, these tasks train the *encoder* to
    summarise the image, which is what the representation is evaluated on.

    Args:
        in_dim: feature dimension.
        out_channels: channels of the output map (3 for RGB, 2 for ab, Q for colour classes).
        out_size: side of the output map.
        channels: channels after the fully-connected layer; halved at every upsampling, down to 32.

    Shape:
        ``(N, in_dim) -> (N, out_channels, out_size, out_size)``; no output activation (targets are
        normalised, i.e. unbounded).
    """

    def __init__(self, in_dim: int, out_channels: int, out_size: int, channels: int = 128) -> None:
        super().__init__()
        start, n_up = _decoder_geometry(out_size)
        self.out_size = out_size
        self.start, self.channels = start, channels
        self.fc = nn.Sequential(nn.Linear(in_dim, channels * start * start), nn.ReLU(inplace=True))
        layers: list[nn.Module] = []
        c = channels
        for _ in range(n_up):
            c_out = max(c // 2, 32)
            layers += [
                nn.ConvTranspose2d(c, c_out, kernel_size=4, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(c_out),
                nn.ReLU(inplace=True),
            ]
            c = c_out
        layers.append(nn.Conv2d(c, out_channels, kernel_size=3, padding=1))
        self.up = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc(x).view(x.shape[0], self.channels, self.start, self.start)  # (N, C, s, s)
        y = self.up(y)  # (N, out, s * 2**k, s * 2**k)
        if y.shape[-1] != self.out_size:
            y = F.interpolate(y, size=(self.out_size, self.out_size), mode="bilinear", align_corners=False)
        return y
