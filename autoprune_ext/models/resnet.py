"""CIFAR ResNets (He et al. 2016, section 4.2) with 1x1 projection shortcuts.

Three stages of basic blocks with 16/32/64 channels; the first block of stages 2 and 3
halves the resolution. Where a block changes shape, the shortcut is a ``1x1 conv +
BN`` projection (option B), as in the torchprune code base; elsewhere it is the identity.
``resnet20`` has 3 blocks per stage (~0.27M parameters at 10 classes), ``resnet56`` 9
(~0.86M). The network ends with an adaptive average pool, so 28x28 and 32x32 inputs
both work.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

__all__ = ["BasicBlock", "CifarResNet", "resnet20", "resnet56"]


class BasicBlock(nn.Module):
    """``conv3x3-BN-ReLU-conv3x3-BN`` plus shortcut, then ReLU.

    Args:
        in_planes: Input channels.
        planes: Output channels.
        stride: Stride of the first convolution (and of the projection shortcut).
    """

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU()
        self.shortcut: Optional[nn.Sequential] = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the block to ``x`` of shape ``[N, in_planes, H, W]``."""
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.shortcut is None else self.shortcut(x)
        return self.relu2(out + identity)


class CifarResNet(nn.Module):
    """ResNet for small images: stem conv, three stages of :class:`BasicBlock`, linear head.

    Args:
        blocks_per_stage: Number of basic blocks in each of the three stages
            (depth = 6 * blocks_per_stage + 2).
        in_channels: Number of input image channels.
        num_classes: Number of output logits.
        widths: Channels of the three stages.
    """

    def __init__(
        self,
        blocks_per_stage: int,
        in_channels: int = 3,
        num_classes: int = 10,
        widths: tuple[int, int, int] = (16, 32, 64),
    ) -> None:
        super().__init__()
        if blocks_per_stage < 1 or in_channels < 1 or num_classes < 1:
            raise ValueError("blocks_per_stage, in_channels and num_classes must be positive")
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU()
        in_planes = widths[0]
        stages: list[nn.Sequential] = []
        for i, planes in enumerate(widths):
            blocks: list[nn.Module] = []
            for j in range(blocks_per_stage):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(BasicBlock(in_planes, planes, stride))
                in_planes = planes
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_planes, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return logits ``[N, num_classes]`` for images ``x`` of shape ``[N, C, H, W]``."""
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


def resnet20(*, in_channels: int = 3, num_classes: int = 10) -> CifarResNet:
    """ResNet-20 for CIFAR (3 blocks per stage, ~0.27M parameters)."""
    return CifarResNet(3, in_channels=in_channels, num_classes=num_classes)


def resnet56(*, in_channels: int = 3, num_classes: int = 10) -> CifarResNet:
    """ResNet-56 for CIFAR (9 basic blocks per stage, ~0.86M parameters)."""
    return CifarResNet(9, in_channels=in_channels, num_classes=num_classes)
