"""Wide residual networks (Zagoruyko & Komodakis 2016) for CIFAR-sized inputs.

Pre-activation basic blocks ``BN-ReLU-conv3x3-BN-ReLU-conv3x3``; a block that changes
the width or the resolution uses a ``1x1`` convolution on the pre-activated input as its
shortcut. ``wrn16_8`` (depth 16, widen factor 8, no dropout) has ~10.96M parameters at
10 classes. The network ends with an adaptive average pool.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

__all__ = ["WideBasicBlock", "WideResNet", "wrn16_8"]


class WideBasicBlock(nn.Module):
    """Pre-activation wide basic block.

    Args:
        in_planes: Input channels.
        planes: Output channels.
        stride: Stride of the first convolution and of the shortcut.
    """

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.shortcut: Optional[nn.Conv2d] = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the block to ``x`` of shape ``[N, in_planes, H, W]``."""
        act = self.relu1(self.bn1(x))
        out = self.conv1(act)
        out = self.conv2(self.relu2(self.bn2(out)))
        identity = x if self.shortcut is None else self.shortcut(act)
        return out + identity


class WideResNet(nn.Module):
    """WRN-``depth``-``widen``: stem conv (16), three stages of width 16k/32k/64k, BN-ReLU, linear.

    Args:
        depth: Network depth; ``(depth - 4)`` must be divisible by 6.
        widen: Widen factor ``k``.
        in_channels: Number of input image channels.
        num_classes: Number of output logits.
    """

    def __init__(
        self, depth: int = 16, widen: int = 8, in_channels: int = 3, num_classes: int = 10
    ) -> None:
        super().__init__()
        if (depth - 4) % 6 != 0 or depth < 10:
            raise ValueError(f"WRN depth must be 6n + 4 with n >= 1, got {depth}")
        if widen < 1 or in_channels < 1 or num_classes < 1:
            raise ValueError("widen, in_channels and num_classes must be positive")
        n = (depth - 4) // 6
        widths = (16 * widen, 32 * widen, 64 * widen)
        self.conv1 = nn.Conv2d(in_channels, 16, 3, stride=1, padding=1, bias=False)
        in_planes = 16
        stages: list[nn.Sequential] = []
        for i, planes in enumerate(widths):
            blocks: list[nn.Module] = []
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(WideBasicBlock(in_planes, planes, stride))
                in_planes = planes
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.bn = nn.BatchNorm2d(in_planes)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_planes, num_classes)
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
        x = self.layer3(self.layer2(self.layer1(x)))
        x = self.relu(self.bn(x))
        return self.fc(torch.flatten(self.pool(x), 1))


def wrn16_8(*, in_channels: int = 3, num_classes: int = 10) -> WideResNet:
    """WRN-16-8 (~10.96M parameters at 10 classes)."""
    return WideResNet(16, 8, in_channels=in_channels, num_classes=num_classes)
