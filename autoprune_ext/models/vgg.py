"""VGG networks for CIFAR-sized inputs.

* :class:`VGGLike` — the "cifar10 VGG-like" network of S. Zagoruyko (the one AutoPrune
  and Variational Dropout prune): thirteen ``conv3x3 + BN + ReLU`` layers in the cfg-D
  layout with five max-pools, followed by a small classifier ``512 -> 512 -> classes``.
* :func:`vgg16_bn` — cfg D with batch norm and a single linear classifier
  ``512 -> classes`` (the torchprune CIFAR variant, ~14.7M parameters).

Max-pools use ``ceil_mode=True`` and the features end with an adaptive average pool to
1x1, so inputs of 28x28 (which would shrink to zero with floor pooling) and 32x32 both
work; for 32x32 inputs ``ceil_mode`` changes nothing.

Deviation from Zagoruyko's original: it also has dropout layers and a ``BatchNorm1d`` in
the classifier. They carry no prunable weights; here they are omitted (only ``Linear``,
``Conv2d``, ``BatchNorm2d``, pooling and ``ReLU`` are used). Classifier dropout can be
switched back on with ``dropout > 0``.
"""

from __future__ import annotations

from typing import Sequence, Union

import torch
from torch import nn

__all__ = ["CFG_D", "VGG", "VGGLike", "vgg_like", "vgg16_bn"]

#: VGG-16 layout: channel counts of 3x3 conv layers, ``"M"`` for a 2x2 max-pool.
CFG_D: tuple[Union[int, str], ...] = (
    64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M",
)


def _make_features(cfg: Sequence[Union[int, str]], in_channels: int) -> tuple[nn.Sequential, int]:
    """Build the ``conv3x3 + BN + ReLU`` / max-pool stack of ``cfg``; return it and its width."""
    layers: list[nn.Module] = []
    channels = in_channels
    for item in cfg:
        if item == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2, ceil_mode=True))
        else:
            out = int(item)
            layers.append(nn.Conv2d(channels, out, kernel_size=3, padding=1, bias=False))
            layers.append(nn.BatchNorm2d(out))
            layers.append(nn.ReLU())
            channels = out
    return nn.Sequential(*layers), channels


def _init_weights(model: nn.Module) -> None:
    """Kaiming-normal conv weights, unit/zero batch-norm, small-normal linear weights."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, 0.01)
            nn.init.zeros_(m.bias)


class VGG(nn.Module):
    """VGG with batch norm: conv stack of ``cfg``, adaptive 1x1 pool, then a classifier.

    Args:
        cfg: Layer layout (see :data:`CFG_D`).
        in_channels: Number of input image channels.
        num_classes: Number of output logits.
        hidden: Widths of hidden fully connected layers (each followed by ReLU); empty for
            a single linear classifier.
        dropout: Dropout probability before each classifier layer after the first
            hidden one (0 disables dropout and adds no module).
    """

    def __init__(
        self,
        cfg: Sequence[Union[int, str]] = CFG_D,
        in_channels: int = 3,
        num_classes: int = 10,
        hidden: Sequence[int] = (),
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if in_channels < 1 or num_classes < 1:
            raise ValueError(
                f"in_channels and num_classes must be positive, got {in_channels}, {num_classes}"
            )
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.features, width = _make_features(cfg, in_channels)
        self.pool = nn.AdaptiveAvgPool2d(1)
        layers: list[nn.Module] = []
        for h in hidden:
            if dropout > 0 and layers:
                layers.append(nn.Dropout(dropout))
            layers.append(nn.Linear(width, h))
            layers.append(nn.ReLU())
            width = h
        if dropout > 0 and layers:
            layers.append(nn.Dropout(dropout))
        layers.append(nn.Linear(width, num_classes))
        self.classifier = nn.Sequential(*layers)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return logits ``[N, num_classes]`` for images ``x`` of shape ``[N, C, H, W]``."""
        x = self.pool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


class VGGLike(VGG):
    """Zagoruyko's CIFAR-10 "VGG-like" network (cfg D convs + BN, classifier 512-512-classes).

    Args:
        in_channels: Number of input image channels.
        num_classes: Number of output logits.
        dropout: Classifier dropout probability (default 0: no dropout module).
    """

    def __init__(self, in_channels: int = 3, num_classes: int = 10, dropout: float = 0.0) -> None:
        super().__init__(CFG_D, in_channels, num_classes, hidden=(512,), dropout=dropout)


def vgg_like(*, in_channels: int = 3, num_classes: int = 10, dropout: float = 0.0) -> VGGLike:
    """Build :class:`VGGLike`."""
    return VGGLike(in_channels=in_channels, num_classes=num_classes, dropout=dropout)


def vgg16_bn(*, in_channels: int = 3, num_classes: int = 10) -> VGG:
    """VGG-16 (cfg D) with batch norm and a single linear classifier (~14.7M parameters)."""
    return VGG(CFG_D, in_channels=in_channels, num_classes=num_classes, hidden=())
