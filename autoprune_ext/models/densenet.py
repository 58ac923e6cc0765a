"""DenseNet-BC (Huang et al. 2017) for CIFAR-sized inputs.

Three dense blocks of bottleneck layers ``BN-ReLU-conv1x1(4k)-BN-ReLU-conv3x3(k)`` whose
outputs are concatenated to their inputs, separated by transitions
``BN-ReLU-conv1x1(compressed)-avgpool2``; stem conv with ``2k`` channels; final
``BN-ReLU-adaptive avgpool-linear``. ``densenet22`` (depth 22, growth 12, compression
0.5, 3 bottleneck layers per block) has ~0.07M parameters at 10 classes.
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["Bottleneck", "Transition", "DenseNetBC", "densenet22"]


class Bottleneck(nn.Module):
    """DenseNet-BC bottleneck layer; returns ``cat([x, new_features])``.

    Args:
        in_planes: Input channels.
        growth: Growth rate ``k`` (channels added by this layer).
    """

    def __init__(self, in_planes: int, growth: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU()
        self.conv1 = nn.Conv2d(in_planes, 4 * growth, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(4 * growth)
        self.relu2 = nn.ReLU()
        self.conv2 = nn.Conv2d(4 * growth, growth, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return ``x`` concatenated with ``growth`` new channels."""
        out = self.conv1(self.relu1(self.bn1(x)))
        out = self.conv2(self.relu2(self.bn2(out)))
        return torch.cat([x, out], dim=1)


class Transition(nn.Module):
    """Transition ``BN-ReLU-conv1x1-avgpool2`` between dense blocks.

    Args:
        in_planes: Input channels.
        out_planes: Output channels.
    """

    def __init__(self, in_planes: int, out_planes: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(in_planes)
        self.relu = nn.ReLU()
        self.conv = nn.Conv2d(in_planes, out_planes, 1, bias=False)
        self.pool = nn.AvgPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Compress channels and halve the resolution."""
        return self.pool(self.conv(self.relu(self.bn(x))))


class DenseNetBC(nn.Module):
    """DenseNet-BC with three dense blocks.

    Args:
        depth: Network depth; ``(depth - 4)`` must be divisible by 6 (``(depth-4)/6``
            bottleneck layers per block).
        growth: Growth rate ``k``.
        compression: Channel reduction factor of the transitions (``theta``).
        in_channels: Number of input image channels.
        num_classes: Number of output logits.
    """

    def __init__(
        self,
        depth: int = 22,
        growth: int = 12,
        compression: float = 0.5,
        in_channels: int = 3,
        num_classes: int = 10,
    ) -> None:
        super().__init__()
        if (depth - 4) % 6 != 0 or depth < 10:
            raise ValueError(f"DenseNet-BC depth must be 6n + 4 with n >= 1, got {depth}")
        if not 0.0 < compression <= 1.0:
            raise ValueError(f"compression must be in (0, 1], got {compression}")
        if growth < 1 or in_channels < 1 or num_classes < 1:
            raise ValueError("growth, in_channels and num_classes must be positive")
        n = (depth - 4) // 6
        planes = 2 * growth
        self.conv1 = nn.Conv2d(in_channels, planes, 3, padding=1, bias=False)
        blocks: list[nn.Module] = []
        for b in range(3):
            layers: list[nn.Module] = []
            for _ in range(n):
                layers.append(Bottleneck(planes, growth))
                planes += growth
            blocks.append(nn.Sequential(*layers))
            if b < 2:
                out_planes = int(math.floor(planes * compression))
                blocks.append(Transition(planes, out_planes))
                planes = out_planes
        self.dense1, self.trans1, self.dense2, self.trans2, self.dense3 = blocks
        self.bn = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(planes, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return logits ``[N, num_classes]`` for images ``x`` of shape ``[N, C, H, W]``."""
        x = self.conv1(x)
        x = self.trans1(self.dense1(x))
        x = self.trans2(self.dense2(x))
        x = self.relu(self.bn(self.dense3(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


def densenet22(*, in_channels: int = 3, num_classes: int = 10) -> DenseNetBC:
    """DenseNet-BC-22 with growth 12 and compression 0.5 (~0.07M parameters)."""
    return DenseNetBC(22, 12, 0.5, in_channels=in_channels, num_classes=num_classes)
